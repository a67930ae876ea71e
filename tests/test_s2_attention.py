"""The CPU block-sparse S2 path equals the exact masked reference in outputs and gradients (fp32),
across shapes (ragged lengths, GQA, document packing, dense heads, TP head shards), and the
model dispatches to it."""

from __future__ import annotations

import pytest
import torch

from exatrain.config import ModelConfig, S2Config
from exatrain.model.llama import build_model, materialize
from exatrain.model.s2 import S2Attention, blocksparse, force_impl, layer_attention, select_impl
from exatrain.model.s2.blocksparse import blocksparse_attention
from exatrain.model.s2.pattern import S2Pattern
from exatrain.model.s2.reference import reference_s2_attention

TOL = dict(atol=2e-5, rtol=1e-4)


def run(fn, q, k, v, pattern, doc_ids, head_offset, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, pattern, doc_ids=doc_ids, scale=q.shape[-1] ** -0.5, head_offset=head_offset)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def inputs(B, H, Hkv, T, D, docs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, grad = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    doc_ids = torch.cumsum(torch.rand(B, T, generator=g) < docs, dim=1) if docs else None
    return q, k, v, doc_ids, grad


CASES = {
    "mha_ragged": (2, 4, 4, 16 * 11 + 7, 16, dict(block_size=16, local_blocks=2, vert_stride=4)),
    "gqa": (1, 8, 2, 16 * 20, 16, dict(block_size=16, local_blocks=3, vert_stride=2)),
    "wide_window_partial_group": (1, 4, 4, 16 * 24 + 3, 8, dict(block_size=16, local_blocks=8, vert_stride=4)),
    "window_not_multiple_of_group": (1, 4, 2, 16 * 30 + 9, 8, dict(block_size=16, local_blocks=13, vert_stride=2)),
    "dense_heads": (2, 8, 4, 16 * 13, 8, dict(block_size=16, local_blocks=1, vert_stride=3, num_dense_heads=4)),
    "homo_head": (1, 4, 4, 32 * 9 + 1, 8, dict(block_size=32, local_blocks=2, vert_stride=3, homo_head=True)),
    "offset_dense_last": (1, 8, 4, 16 * 14 + 5, 8, dict(block_size=16, local_blocks=2, vert_stride=8, num_dense_heads=2,
                                                         head_sliding_offset=3)),
    "stride_1": (1, 2, 2, 16 * 9, 8, dict(block_size=16, local_blocks=2, vert_stride=1)),
    "all_local": (1, 2, 2, 16 * 4 - 5, 8, dict(block_size=16, local_blocks=4, vert_stride=4)),
}


@pytest.mark.parametrize("docs", [0.0, 0.02], ids=["one_doc", "packed_docs"])
@pytest.mark.parametrize("name", list(CASES))
def test_blocksparse_matches_reference(name, docs):
    B, H, Hkv, T, D, kw = CASES[name]
    pattern = S2Pattern(n_heads=H, n_kv_heads=Hkv, **kw)
    q, k, v, doc_ids, grad = inputs(B, H, Hkv, T, D, docs)
    ref = run(reference_s2_attention, q, k, v, pattern, doc_ids, 0, grad)
    got = run(blocksparse_attention, q, k, v, pattern, doc_ids, 0, grad)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, w=what: f"{name} {w}: {m}")


@pytest.mark.parametrize("docs", [0.0, 0.02], ids=["one_doc", "packed_docs"])
def test_local_groups_split_over_kernel_calls(monkeypatch, docs):
    """Long sequences run the local band in several kernel calls (here one group each), with the band
    mask shared past the sequence start; the result must not change."""
    monkeypatch.setattr(blocksparse, "LOCAL_ELEMENTS", 1)
    B, H, Hkv, T, D, kw = CASES["wide_window_partial_group"]
    pattern = S2Pattern(n_heads=H, n_kv_heads=Hkv, **kw)
    q, k, v, doc_ids, grad = inputs(B, H, Hkv, T, D, docs)
    ref = run(reference_s2_attention, q, k, v, pattern, doc_ids, 0, grad)
    got = run(blocksparse_attention, q, k, v, pattern, doc_ids, 0, grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("dense", [0, 2], ids=["sparse", "last_group_dense"])
def test_tp_shards_use_their_global_pattern_rows(dense):
    """Each rank of a TP=2 split, given its head_offset, computes exactly its slice of the full result."""
    pattern = S2Pattern(16, 2, 4, 8, 4, num_dense_heads=dense)
    q, k, v, doc_ids, grad = inputs(1, 8, 4, 16 * 12 + 5, 8, 0.02)
    full = run(reference_s2_attention, q, k, v, pattern, doc_ids, 0, grad)
    for rank in range(2):
        hq, hk = slice(4 * rank, 4 * rank + 4), slice(2 * rank, 2 * rank + 2)
        part = run(blocksparse_attention, q[:, hq], k[:, hk], v[:, hk], pattern, doc_ids, 4 * rank, grad[:, hq])
        for a, b in zip(part, (full[0][:, hq], full[1][:, hq], full[2][:, hk], full[3][:, hk])):
            torch.testing.assert_close(a, b, **TOL)
    wrong = blocksparse_attention(q[:, 4:], k[:, 2:], v[:, 2:], pattern, doc_ids=doc_ids, scale=8 ** -0.5,
                                  head_offset=0)
    assert not torch.allclose(wrong, full[0][:, 4:], **TOL), "head_offset must change the pattern rows"


def test_bf16_runs_close_to_fp32():
    pattern = S2Pattern(16, 2, 4, 4)
    q, k, v, _, _ = inputs(1, 4, 4, 16 * 10, 16, 0)
    ref = reference_s2_attention(q, k, v, pattern, doc_ids=None, scale=0.25, head_offset=0)
    got = blocksparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pattern, doc_ids=None, scale=0.25,
                                head_offset=0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)


def s2_model(**s2):
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=256, attention="s2",
                      s2=S2Config(**{"block_size": 16, "local_blocks": 2, "vert_stride": 2, **s2}))
    return cfg, materialize(build_model(cfg), "cpu", seed=0)


def test_model_uses_s2_on_sparse_layers_and_matches_the_reference():
    cfg, model = s2_model(dense_layers=[1])
    kinds = [type(layer.attention.attend).__name__ for layer in model.layers.values()]
    assert kinds == ["S2Attention", "function", "S2Attention"]
    assert isinstance(layer_attention(cfg, 0), S2Attention) and layer_attention(cfg, 1) is None
    assert select_impl(torch.device("cpu")) == "blocksparse"
    tokens = torch.randint(0, 50, (2, 200))
    doc_ids = (torch.arange(200) >= 120).long().expand(2, 200)
    positions = torch.where(doc_ids == 0, torch.arange(200), torch.arange(200) - 120)
    grads = []
    for impl in ("blocksparse", "reference"):
        model.zero_grad()
        with force_impl(impl):
            assert select_impl(torch.device("cpu")) == impl
            logits = model(tokens, positions, doc_ids)
        logits.square().mean().backward()
        grads.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match="unknown S2 implementation"):
        with force_impl("flex"):
            pass
