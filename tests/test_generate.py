"""Generation with a KV cache: dense models match full recomputation; S2 models decode through the
pruned cache (local ring + per-KV-head strided blocks) token for token like dense-masked
recomputation, while holding a fraction of a dense cache."""

from __future__ import annotations

import pytest
import torch

from exatrain.config import ModelConfig, S2Config
from exatrain.model.generate import KVCache, generate
from exatrain.model.llama import build_model, materialize
from exatrain.model.s2 import force_impl

VOCAB = 61


def model(attention="s2", n_kv_heads=2, **s2):
    s2 = S2Config(**{"block_size": 16, "local_blocks": 2, "vert_stride": 2, **s2})
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB, max_seq_len=160,
                      attention=attention, s2=s2, init_std=0.3)
    return materialize(build_model(cfg), "cpu", seed=1).eval()


def prompt(B, T, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_dense_cache_matches_recompute():
    m = model("sdpa")
    p = prompt(2, 37)
    assert torch.equal(generate(m, p, 40), generate(m, p, 40, use_cache=False))


@pytest.mark.parametrize("prompt_len,kwargs", [
    (70, {}),                                                              # MHA-like groups of 2, ragged prompt
    (16, {"n_kv_heads": 4, "vert_stride": 4}),                             # prompt inside the local window
    (96, {"n_kv_heads": 4, "vert_stride": 3, "local_blocks": 3, "num_dense_heads": 1, "dense_layers": [1]}),
    (33, {"n_kv_heads": 2, "homo_head": True, "block_size": 32, "local_blocks": 1}),
])
def test_s2_pruned_cache_matches_dense_masked_generation(prompt_len, kwargs):
    n_kv = kwargs.pop("n_kv_heads", 2)
    m = model("s2", n_kv, **kwargs)
    p = prompt(2, prompt_len)
    new = 160 - prompt_len - 1
    cached = generate(m, p, new)
    with force_impl("reference"):
        recomputed = generate(m, p, new, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_s2_step_logits_match_reference():
    m = model("s2", 4, vert_stride=4)
    tokens = prompt(1, 160)
    cache = KVCache(m, 1, 160)
    logits = [m(tokens[:, :90], positions=torch.arange(90)[None], cache=cache)[:, -1]]
    for t in range(90, 159):
        logits.append(m(tokens[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)[:, -1])
    with force_impl("reference"):
        ref = m(tokens[:, :159])[:, 89:]
    torch.testing.assert_close(torch.stack(logits, 1), ref, atol=1e-4, rtol=1e-4)


def test_s2_cache_memory():
    """Per layer and KV head: a 32-token ring plus one 16-token block of every 4 beyond it."""
    m = model("s2", 4, vert_stride=4)
    cache = KVCache(m, 1, 160)
    blocks = 160 // 16
    far = -(-(blocks - 2) // 4)
    per_head = (2 * 16 + far * 16) * 8 * 4 * 2  # tokens * head_dim * fp32 * (K, V)
    assert cache.nbytes() == 3 * 4 * per_head
    assert cache.dense_bytes == 3 * 4 * 160 * 8 * 4 * 2
    assert cache.nbytes() / cache.dense_bytes == pytest.approx((32 + far * 16) / 160)


def test_cache_errors():
    m = model("s2")
    cache = KVCache(m, 1, 40)
    m(prompt(1, 20), positions=torch.arange(20)[None], cache=cache)
    with pytest.raises(ValueError, match="one token per step"):
        m(prompt(1, 2), positions=torch.arange(20, 22)[None], cache=cache)
    with pytest.raises(ValueError, match="packed documents"):
        m(prompt(1, 1), positions=torch.tensor([[20]]), doc_ids=torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        KVCache(m, 1, 1000)
    dense = KVCache(model("sdpa"), 1, 8)
    with pytest.raises(ValueError, match="KV cache is full"):
        model("sdpa")(prompt(1, 9), positions=torch.arange(9)[None], cache=dense)
