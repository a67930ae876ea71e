import pytest
import torch

from exatrain.config import ModelConfig
from exatrain.model.attention import causal_document_mask, reference_attention, sdpa_attention
from exatrain.model.llama import build_model, count_params, materialize


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def make(cfg: ModelConfig, seed: int = 0):
    return materialize(build_model(cfg), "cpu", seed)


def test_shapes_meta_build_and_deterministic_init():
    cfg = tiny_cfg()
    meta = build_model(cfg)
    assert all(p.is_meta for p in meta.parameters())
    a, b = make(cfg, 3), make(cfg, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    assert a(tokens).shape == (2, 16, cfg.vocab_size)
    assert a.layers["0"].attention.wk.weight.shape == (2 * 16, 64)


def test_tied_embeddings_share_storage_and_param_count():
    tied, untied = make(tiny_cfg()), make(tiny_cfg(tie_embeddings=False))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert count_params(untied) - count_params(tied) == 97 * 64


def test_causal_no_future_leak():
    model = make(tiny_cfg())
    tokens = torch.randint(0, 97, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    out_a, out_b = model(tokens), model(changed)
    torch.testing.assert_close(out_a[:, :10], out_b[:, :10])
    assert not torch.allclose(out_a[:, 10:], out_b[:, 10:])


def test_document_mask_isolates_documents():
    model = make(tiny_cfg())
    tokens = torch.randint(0, 97, (1, 16))
    doc_ids = torch.tensor([[0] * 6 + [1] * 10])
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    packed = model(tokens, positions=positions, doc_ids=doc_ids)
    alone = model(tokens[:, 6:])
    torch.testing.assert_close(packed[:, 6:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_matches_reference(kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 12, 8)
    k, v = torch.randn(2, kv_heads, 12, 8), torch.randn(2, kv_heads, 12, 8)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    for d in (None, doc_ids):
        ref = reference_attention(q, k, v, doc_ids=d, scale=0.3, head_offset=0)
        out = sdpa_attention(q, k, v, doc_ids=d, scale=0.3, head_offset=0)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mask_shape():
    m = causal_document_mask(torch.tensor([[0, 0, 1]]), 3, torch.device("cpu"))
    assert m.tolist() == [[[[True, False, False], [True, True, False], [False, False, True]]]]


def test_vocab_size_required():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(tiny_cfg(vocab_size=0))
