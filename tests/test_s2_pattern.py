"""S2 pattern properties: the DESIGN.md §4 formula, causality, coverage, per-head phases, GQA/TP
head indexing, hybrid layers, attended fraction, and parameter validation."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from exatrain.config import ConfigError, ModelConfig, S2Config, load_config
from exatrain.model.s2 import attended_fraction, is_dense_layer, layer_attention
from exatrain.model.s2.pattern import S2Pattern
from exatrain.model.s2.reference import s2_mask


def dkernel_mask(num_heads: int, seqlen: int, block_size: int, local_blocks: int, vert_stride: int,
                 homo_head: bool = False, num_kv_heads: int | None = None, head_sliding_offset: int = 0,
                 num_dense_heads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """DKernel's get_sparse_attn_mask (dkernel/utils.py; causal, absolute vertical positions) written
    again: (block mask (heads, m, m), token mask (heads, seqlen, seqlen)). Homogeneous heads are one
    row broadcast to every head, as DKernel's (1, m, m) pattern is; `num_dense_heads` counts KV heads,
    the last ones."""
    if homo_head:
        assert num_dense_heads == 0
        num_heads_eff, num_kv_heads = 1, 1
    else:
        num_heads_eff, num_kv_heads = num_heads, num_kv_heads or num_heads
    step = max(1, int(vert_stride / num_heads_eff))
    num_sparse_heads = num_kv_heads - num_dense_heads
    m = -(-seqlen // block_size)
    vert = [[h >= num_sparse_heads or (k + h * step + head_sliding_offset) % vert_stride == 0 for k in range(m)]
            for h in range(num_kv_heads) for _ in range(num_heads_eff // num_kv_heads)]
    blocks = torch.tensor([[[q >= k and (q - k < local_blocks or row[k]) for k in range(m)] for q in range(m)]
                           for row in vert]).expand(num_heads, m, m)
    dense = torch.kron(blocks.int(), torch.ones(block_size, block_size, dtype=torch.int))[:, :seqlen, :seqlen]
    return blocks, (dense * torch.ones(seqlen, seqlen, dtype=torch.int).tril()).bool()


def vllm_mask(n_heads: int, seqlen: int, block_size: int, local_blocks: int, vert_stride: int,
              homo_head: bool) -> torch.Tensor:
    """vLLM's blocksparse get_sparse_attn_mask (block mask): phase per query head, offset fixed at 1."""
    m = -(-seqlen // block_size)
    step = 0 if homo_head else max(1, int(vert_stride / n_heads))
    return torch.tensor([[[q >= k and (q - k < local_blocks or (k + h * step + 1) % vert_stride == 0)
                           for k in range(m)] for q in range(m)] for h in range(n_heads)])


def formula_mask(p: S2Pattern, n: int) -> torch.Tensor:
    """The DKernel block mask of a pattern with n blocks, exatrain's query-head num_dense_heads mapped to
    DKernel's KV heads."""
    return dkernel_mask(p.n_heads, n * p.block_size, p.block_size, p.local_blocks, p.vert_stride, p.homo_head,
                        p.n_kv_heads, p.head_sliding_offset, p.num_dense_heads // p.group)[0]


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


HEADS = [(1, 1), (2, 2), (3, 3), (4, 4), (4, 2), (4, 1), (8, 8), (8, 2), (12, 4), (16, 4)]


def test_pattern_is_dkernel_block_for_block():
    """Every option of DKernel's get_sparse_attn_mask over a grid, with lengths not a multiple of the block."""
    for (H, Hkv), V, L, offset, (bs, T) in itertools.product(HEADS, (1, 2, 3, 4, 8, 16), (1, 3), (0, 1, 5),
                                                             ((16, 16 * 9 + 5), (32, 200))):
        for homo, dense_kv in [(True, 0)] + [(False, d) for d in sorted({0, 1, Hkv})]:
            p = S2Pattern(bs, L, V, H, Hkv, homo_head=homo, num_dense_heads=dense_kv * (H // Hkv),
                          head_sliding_offset=offset)
            ref, _ = dkernel_mask(H, T, bs, L, V, homo, Hkv, offset, dense_kv)
            n = -(-T // bs)
            assert torch.equal(p.block_mask(n).repeat_interleave(p.group, 0), ref), p


@pytest.mark.parametrize("H,Hkv,V,dense_kv,homo,offset,T", [
    (4, 4, 4, 0, False, 0, 16 * 7 + 3), (8, 2, 8, 1, False, 1, 16 * 6), (6, 3, 3, 1, False, 2, 16 * 5 + 15),
    (4, 2, 16, 0, False, 0, 16 * 8 + 1), (4, 2, 4, 0, True, 1, 16 * 6 + 9),
])
def test_token_mask_and_tp_shards_are_dkernel(H, Hkv, V, dense_kv, homo, offset, T):
    """Token level (kron of the block mask, causal) and DKernel's active_head_range slices for each TP shard."""
    p = S2Pattern(16, 2, V, H, Hkv, homo_head=homo, num_dense_heads=dense_kv * (H // Hkv), head_sliding_offset=offset)
    _, ref = dkernel_mask(H, T, 16, 2, V, homo, Hkv, offset, dense_kv)
    assert torch.equal(p.token_mask(T).repeat_interleave(p.group, 0), ref)
    for tp in [d for d in range(1, Hkv + 1) if Hkv % d == 0]:
        local = H // tp
        for rank in range(tp):
            assert torch.equal(s2_mask(p, T, local, rank * local, None)[0], ref[rank * local:(rank + 1) * local])


@pytest.mark.parametrize("H,V,homo", [(4, 4, False), (8, 4, False), (2, 8, False), (3, 8, False), (4, 8, True)])
def test_offset_one_is_vllm_without_gqa(H, V, homo):
    """vLLM's copy of the function (per query head, offset 1, no dense heads) is head_sliding_offset=1."""
    p = S2Pattern(16, 3, V, H, homo_head=homo, head_sliding_offset=1)
    assert torch.equal(p.block_mask(21), vllm_mask(H, 21 * 16, 16, 3, V, homo))


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
    sparse = m[:p.n_sparse_units]
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
    assert torch.equal(m[3], torch.ones(30, 30, dtype=torch.bool).tril()) and torch.equal(m[2], m[3])
    assert not torch.equal(m[1], m[2]) and not torch.equal(m[0], m[1])


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
    ("model.s2.head_sliding_offset=-1", "model.s2.head_sliding_offset"),
    ("model.s2.block_size=256", "model.s2.block_size"),  # one block per data.seq_len=256 sequence: dense
])
def test_bad_config_is_rejected_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.attention=s2", "model.n_heads=4", "model.n_kv_heads=2", override])


def test_too_few_heads_for_the_stride_warns_once_at_config_time():
    assert not S2Pattern(16, 2, 8, 4).covers_context and S2Pattern(16, 2, 4, 4).covers_context
    with pytest.warns(UserWarning, match="cannot cover all 8 stride phases"):
        load_config(None, ["model.attention=s2", "model.n_heads=4", "model.n_kv_heads=4", "model.s2.block_size=16",
                           "model.s2.vert_stride=8", "model.s2.local_blocks=2"])


def test_homo_head_has_no_dense_heads_and_a_dense_pattern_warns():
    with pytest.raises(ConfigError, match=r"model\.s2\.num_dense_heads=2 needs model\.s2\.homo_head=false"):
        load_config(None, ["model.attention=s2", "model.n_heads=4", "model.s2.homo_head=true",
                           "model.s2.num_dense_heads=2"])
    with pytest.warns(UserWarning, match=r"dense at data\.seq_len=256: model\.s2\.local_blocks=4"):
        load_config(None, ["model.attention=s2", "model.n_heads=4", "model.s2.block_size=64", "model.s2.local_blocks=4",
                           "model.s2.vert_stride=4"])
    with pytest.warns(UserWarning, match="vert_stride=1, num_dense_heads=0 read every block"):
        load_config(None, ["model.attention=s2", "model.n_heads=4", "model.s2.block_size=16", "model.s2.local_blocks=2",
                           "model.s2.vert_stride=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["model.attention=s2", "model.n_heads=4", "model.s2.block_size=16", "model.s2.local_blocks=2",
                           "model.s2.vert_stride=4"])
