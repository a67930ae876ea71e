"""S2 pattern properties: the DESIGN.md §4 formula, causality, coverage, per-head phases, GQA/TP
head indexing, hybrid layers, attended fraction, and parameter validation."""

from __future__ import annotations

import pytest
import torch

from exatrain.config import ConfigError, ModelConfig, S2Config, load_config
from exatrain.model.s2 import attended_fraction, is_dense_layer, layer_attention
from exatrain.model.s2.pattern import OFFSET, S2Pattern
from exatrain.model.s2.reference import s2_mask


def formula_mask(p: S2Pattern, n: int) -> torch.Tensor:
    """DESIGN.md §4 written out block by block (per query head)."""
    sparse = p.n_heads - p.num_dense_heads
    step = max(1, p.vert_stride // (sparse // p.group))
    out = torch.zeros(p.n_heads, n, n, dtype=torch.bool)
    for h in range(p.n_heads):
        s = h // p.group - p.num_dense_heads // p.group
        for q in range(n):
            for k in range(q + 1):
                out[h, q, k] = (s < 0 or q - k < p.local_blocks
                                or (k + (0 if p.homo_head else s) * step + OFFSET) % p.vert_stride == 0)
    return out


PATTERNS = [
    S2Pattern(64, 16, 8, 8),
    S2Pattern(16, 2, 4, 4),
    S2Pattern(16, 1, 3, 8, 8),
    S2Pattern(16, 2, 2, 8, 4),
    S2Pattern(32, 3, 4, 16, 8, num_dense_heads=4),
    S2Pattern(16, 2, 4, 4, homo_head=True),
]


@pytest.mark.parametrize("p", PATTERNS, ids=str)
def test_block_mask_is_the_design_formula(p):
    n = 40
    per_unit = p.block_mask(n)
    assert torch.equal(per_unit.repeat_interleave(p.group, 0), formula_mask(p, n))


@pytest.mark.parametrize("p", PATTERNS, ids=str)
def test_causal_and_local(p):
    n = 37
    m = p.block_mask(n)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert not (m & (k > q)).any(), "a key block after the query block is attended"
    assert m[:, (q - k >= 0) & (q - k < p.local_blocks)].all(), "the local window is incomplete"
    tok = p.token_mask(100)
    assert not (tok & torch.ones(100, 100, dtype=torch.bool).triu(1)).any()
    assert tok.diagonal(dim1=1, dim2=2).all()


@pytest.mark.parametrize("p", [p for p in PATTERNS if not p.homo_head], ids=str)
def test_union_of_heads_covers_the_context_and_heads_differ(p):
    n = 50
    m = p.block_mask(n)
    assert torch.equal(m.any(0), torch.ones(n, n, dtype=torch.bool).tril())
    sparse = m[p.n_dense_units:]
    distinct = {tuple(u.flatten().tolist()) for u in sparse}
    assert len(distinct) == min(len(sparse), p.vert_stride), "sparse heads should use distinct stride phases"
    # Beyond the local window each sparse head reads one phase: about 1/vert_stride of the far blocks.
    far = torch.ones(n, n, dtype=torch.bool).tril(-p.local_blocks)
    frac = (sparse & far).sum((1, 2)).float() / far.sum()
    assert torch.allclose(frac, torch.full_like(frac, 1 / p.vert_stride), atol=0.05)


def test_homo_head_and_dense_heads():
    homo = S2Pattern(16, 2, 4, 4, homo_head=True).block_mask(30)
    assert all(torch.equal(homo[0], homo[i]) for i in range(4))
    p = S2Pattern(16, 2, 4, 8, 4, num_dense_heads=4)
    assert not p.covers_context
    m = p.block_mask(30)
    assert torch.equal(m[0], torch.ones(30, 30, dtype=torch.bool).tril()) and torch.equal(m[0], m[1])
    assert not torch.equal(m[2], m[1])


def test_gqa_groups_share_rows_and_tp_shards_keep_global_heads():
    p = S2Pattern(16, 2, 4, 8, 4)
    full = s2_mask(p, 90, 8, 0, None)[0]
    assert all(torch.equal(full[2 * g], full[2 * g + 1]) for g in range(4))
    for tp in (2, 4):
        local = 8 // tp
        for rank in range(tp):
            shard = s2_mask(p, 90, local, rank * local, None)[0]
            assert torch.equal(shard, full[rank * local:(rank + 1) * local])
    with pytest.raises(ValueError, match="splits a GQA group"):
        p.local_units(1, 2)
    with pytest.raises(ValueError, match="exceed n_heads"):
        p.local_units(6, 4)


def test_hybrid_layers_and_attended_fraction():
    cfg = ModelConfig(n_layers=6, n_heads=8, attention="s2", s2=S2Config(64, 16, 8, dense_period=3, dense_layers=[4]))
    dense = [i for i in range(6) if is_dense_layer(cfg, i)]
    assert dense == [0, 3, 4]
    assert [layer_attention(cfg, i) is None for i in range(6)] == [i in dense for i in range(6)]
    p = S2Pattern.from_config(cfg)
    n = 16384 // 64
    assert p.attended_fraction(16384) == pytest.approx(p.block_mask(n).sum().item() / (8 * n * (n + 1) / 2))
    assert p.attended_fraction(16384) < 0.25
    assert attended_fraction(cfg, 16384) == pytest.approx((3 + 3 * p.attended_fraction(16384)) / 6)
    assert p.attended_fraction(1024) == 1.0  # all within the local window: dense


@pytest.mark.parametrize("field,value,match", [
    ("block_size", 8, "power of two >= 16"), ("block_size", 48, "power of two >= 16"),
    ("vert_stride", 0, "vert_stride must be >= 1"), ("local_blocks", 0, "local_blocks must be >= 1"),
])
def test_bad_pattern_parameters(field, value, match):
    kwargs = dict(block_size=64, local_blocks=4, vert_stride=4, n_heads=8)
    kwargs[field] = value
    with pytest.raises(ValueError, match=match):
        S2Pattern(**kwargs)


@pytest.mark.parametrize("override,key", [
    ("model.s2.block_size=24", "model.s2.block_size"), ("model.s2.block_size=8", "model.s2.block_size"),
    ("model.s2.vert_stride=0", "model.s2.vert_stride"), ("model.s2.local_blocks=0", "model.s2.local_blocks"),
    ("model.s2.num_dense_heads=1", "model.s2.num_dense_heads"), ("model.s2.dense_layers=[9]", "model.s2.dense_layers"),
])
def test_bad_config_is_rejected_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.attention=s2", "model.n_heads=4", "model.n_kv_heads=2", override])


def test_too_few_heads_for_the_stride_warns_once_at_config_time():
    assert not S2Pattern(16, 2, 8, 4).covers_context and S2Pattern(16, 2, 4, 4).covers_context
    with pytest.warns(UserWarning, match="cannot cover all 8 stride phases"):
        load_config(None, ["model.attention=s2", "model.n_heads=4", "model.n_kv_heads=4", "model.s2.block_size=16",
                           "model.s2.vert_stride=8"])
