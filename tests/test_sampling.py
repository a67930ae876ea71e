"""Sampling for EigenScore: top-k/top-p filtering against a brute-force reference, cached sampling
token for token against sampling by full recomputation, the captured hidden state against a plain
forward of the finished sequence, eos handling, and eigenscore_for_prompts on a tiny random model."""

from __future__ import annotations

import pytest
import torch

from exatrain.config import ModelConfig, S2Config
from exatrain.eval.eigenscore import eigenscore
from exatrain.eval.hallucination import eigenscore_for_prompts
from exatrain.model.llama import build_model, materialize
from exatrain.model.sampling import capture, filter_logits, middle_layer, sample_with_hidden

VOCAB = 37


def tiny(n_layers: int = 3, attention: str = "sdpa"):
    cfg = ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64,
                      init_std=0.3, attention=attention, s2=S2Config(block_size=16, local_blocks=1, vert_stride=2))
    return materialize(build_model(cfg), "cpu", seed=2).eval()


def reference_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Keep-set by brute force per row: the top_k largest, then HF's nucleus (ascending cumulative
    mass <= 1 - top_p is removed, the largest token always kept)."""
    out = torch.full_like(logits, float("-inf"))
    for r, row in enumerate(logits.float() / temperature):
        keep = set(row.argsort(descending=True)[:top_k].tolist()) if top_k else set(range(len(row)))
        kept = row.clone()
        kept[[i for i in range(len(row)) if i not in keep]] = float("-inf")
        asc = kept.argsort()
        mass = kept[asc].softmax(-1).cumsum(-1)
        removed = {int(asc[i]) for i in range(len(asc) - 1) if mass[i] <= 1 - top_p}
        for i in keep - removed:
            out[r, i] = row[i]
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 10, 0.99), (1.0, 0, 0.9), (0.7, 5, 1.0), (2.0, 3, 0.5)])
def test_filter_logits_matches_reference(temperature, top_k, top_p):
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(filter_logits(logits, temperature, top_k, top_p), reference_filter(logits, temperature, top_k, top_p))


def recompute_sampling(model, prompt, k, n, temperature, top_k, top_p, layer, eos_id, seed):
    """Sampling without the KV cache: the whole sequence is run again at every step."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor(prompt)[None].expand(k, -1)
    done = torch.zeros(k, dtype=torch.bool)
    for _ in range(n):
        probs = reference_filter(model(tokens)[:, -1], temperature, top_k, top_p).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=g)[:, 0]
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        if done.all():
            break
    return tokens


@pytest.mark.parametrize("attention", ["sdpa", "s2"])
def test_cached_sampling_matches_recomputation_and_hidden_is_last_token_state(attention):
    model = tiny(attention=attention)
    prompt, k, n = [0, 5, 9, 11, 3, 7], 5, 30  # 36 tokens: beyond S2's 16-token local window
    s = sample_with_hidden(model, prompt, k, n, temperature=1.0, top_k=10, top_p=0.95, layer=1,
                           generator=torch.Generator().manual_seed(7))
    ref = recompute_sampling(model, prompt, k, n, 1.0, 10, 0.95, 1, None, 7)
    assert torch.equal(s.tokens, ref)
    assert torch.equal(s.generated, torch.full((k,), n))
    with capture(model.layers["1"]) as box:
        model(s.tokens)
    torch.testing.assert_close(s.hidden, box["h"][:, -1], atol=1e-5, rtol=1e-5)


def test_eos_rows_keep_the_state_of_their_last_token():
    model = tiny()
    prompt, k, n = [0, 4, 4, 8], 8, 10
    eos = 6
    # a hot temperature over a small vocabulary: some rows hit eos early, some never
    s = sample_with_hidden(model, prompt, k, n, temperature=3.0, top_k=0, top_p=1.0, layer=0, eos_id=eos,
                           generator=torch.Generator().manual_seed(3))
    ref = recompute_sampling(model, prompt, k, n, 3.0, 0, 1.0, 0, eos, 3)
    ref = torch.cat([ref, torch.full((k, s.tokens.shape[1] - ref.shape[1]), eos)], 1)
    assert torch.equal(s.tokens, ref)
    assert 0 < int((s.generated < n).sum()) < k, "the seed should give both stopped and running rows"
    for row in range(k):
        last = len(prompt) + int(s.generated[row])  # tokens up to the last non-eos one
        assert (s.tokens[row, last:] == eos).all() and (s.tokens[row, len(prompt):last] != eos).all()
        with capture(model.layers["0"]) as box:
            model(s.tokens[row:row + 1, :last])
        torch.testing.assert_close(s.hidden[row], box["h"][0, -1], atol=1e-5, rtol=1e-5)


def test_greedy_rows_are_identical_and_middle_layer_follows_inside():
    model = tiny(n_layers=4)
    s = sample_with_hidden(model, [0, 1, 2], 3, 5, temperature=0.0)
    assert (s.tokens == s.tokens[0]).all() and torch.allclose(s.hidden, s.hidden[0].expand_as(s.hidden))
    # HF hidden_states has n_layers + 1 entries; INSIDE takes entry len // 2 = output of block len // 2 - 1
    assert [middle_layer(n) for n in (1, 2, 4, 32, 40)] == [0, 0, 1, 15, 19]


def test_eigenscore_for_prompts():
    model = tiny()
    prompts = [[0, 3, 5], [0, 9, 9, 9, 9, 2, 1], [0, 12]]  # different lengths: one batch of K per prompt
    out = eigenscore_for_prompts(model, prompts, k=6, max_new_tokens=8, seed=4)
    assert len(out) == 3
    for r, p in zip(out, prompts):
        assert r.prompt == p and r.tokens.shape == (6, len(p) + 8) and r.hidden.shape == (6, 32)
        assert set(r.scores) == {"exact", "chebyshev", "slq"}
        assert r.scores["exact"] == pytest.approx(eigenscore(r.hidden))
        assert r.scores["slq"] == pytest.approx(r.scores["exact"], abs=1e-8)  # K = 6 <= 20 probes: exact trace
    # a prompt's samples depend on (seed, prompt) only: same result alone and in another order
    again = eigenscore_for_prompts(model, [prompts[2], prompts[0]], k=6, max_new_tokens=8, seed=4)
    assert torch.equal(again[0].tokens, out[2].tokens) and again[1].scores == out[0].scores
    other = eigenscore_for_prompts(model, prompts[:1], k=6, max_new_tokens=8, seed=5)
    assert not torch.equal(other[0].tokens, out[0].tokens)
    with pytest.raises(ValueError):
        eigenscore_for_prompts(model, prompts, methods=["svd"])
