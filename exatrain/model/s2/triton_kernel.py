"""S2 attention as Triton kernels (forward and backward) for GPUs.

One program per (query tile, head) walks only the key blocks its head reads: first the far
strided blocks (every vert_stride-th block from the unit's phase up to q - local_blocks), then
the local window, with an online softmax (FlashAttention-2 style). The backward has a dK/dV
program per (key tile, head) walking the query tiles that read that key tile (the local
ones, and every later one if its block is on the head's stride) and a dQ program that retraces
the forward walk. Masked block pairs are never loaded, so the work is O(attended blocks).
Tiles are a launch choice (launch.py: per backend, kernel, dtype and head dim, chosen so that
nothing spills), not the pattern's block: a block is walked in tiles of TILE_M x TILE_N.

Dense units (num_dense_heads) take stride 1 from block 0. GQA: each query head reads its KV
head's rows; dK/dV are produced per query head and summed over the group afterwards.
Dots are IEEE (no TF32), so fp32 matches the reference; bf16 is the fast GPU path. Tested on
CPU with TRITON_INTERPRET=1 against the reference (tests/test_s2_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from exatrain.model.s2.launch import LaunchConfig, backend_of, launch_config
from exatrain.model.s2.pattern import S2Pattern
from exatrain.model.s2.phases import local_phases


@triton.jit
def _load_rows(ptr, base, rows, offs_d, T, D: tl.constexpr):
    """A (rows, head dim) tile of a (T, D) matrix at `base`, zero outside it."""
    return tl.load(ptr + base + rows[:, None] * D + offs_d[None, :], mask=(rows[:, None] < T) & (offs_d[None, :] < D),
                   other=0.0)


@triton.jit
def _program_head(Phase, T, H, G, D: tl.constexpr):
    """This program's (batch x query head) index, batch, its KV unit's stride phase (< 0: dense) and the
    offset of its KV head's (T, D) matrix; grid axis 1 runs over batch x query heads."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    return bh, b, tl.load(Phase + h // G), (b * (H // G) + h // G) * T * D


@triton.jit
def _fwd_tile(q, m_i, l_i, acc, K, V, Docs, doc_q, kv_base, b, kt, offs_m, offs_d, scale, T,
              D: tl.constexpr, TILE_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_n = kt * TILE_N + tl.arange(0, TILE_N)
    k = _load_rows(K, kv_base, offs_n, offs_d, T, D)
    v = _load_rows(V, kv_base, offs_n, offs_d, T, D)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T)
    if HAS_DOCS:
        doc_k = tl.load(Docs + b * T + offs_n, mask=offs_n < T, other=-2)
        valid = valid & (doc_q[:, None] == doc_k[None, :])
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _s2_fwd(Q, K, V, Docs, Phase, Out, Lse, scale, T, H, G,
            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, TILE_M: tl.constexpr,
            TILE_N: tl.constexpr, LOCAL: tl.constexpr, STRIDE: tl.constexpr, HAS_DOCS: tl.constexpr):
    qt = tl.program_id(0)
    qb = qt * TILE_M // BLOCK
    bh, b, phase, kv_base = _program_head(Phase, T, H, G, D)
    q_base = bh * T * D
    offs_m = qt * TILE_M + tl.arange(0, TILE_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, q_base, offs_m, offs_d, T, D)
    doc_q = offs_m
    if HAS_DOCS:
        doc_q = tl.load(Docs + b * T + offs_m, mask=offs_m < T, other=-1)
    m_i = tl.full((TILE_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((TILE_M,), tl.float32)
    acc = tl.zeros((TILE_M, BLOCK_D), tl.float32)
    far_start = tl.where(phase < 0, 0, phase)
    far_step = tl.where(phase < 0, 1, STRIDE)
    for kb in range(far_start, qb - LOCAL + 1, far_step):
        for kt in range(kb * (BLOCK // TILE_N), (kb + 1) * (BLOCK // TILE_N)):
            m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, K, V, Docs, doc_q, kv_base, b, kt, offs_m, offs_d, scale, T,
                                      D, TILE_N, HAS_DOCS)
    # The local window, up to the key tile holding this query tile's last row.
    for kt in range(tl.maximum(qb - LOCAL + 1, 0) * (BLOCK // TILE_N), tl.cdiv((qt + 1) * TILE_M, TILE_N)):
        m_i, l_i, acc = _fwd_tile(q, m_i, l_i, acc, K, V, Docs, doc_q, kv_base, b, kt, offs_m, offs_d, scale, T,
                                  D, TILE_N, HAS_DOCS)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(Out + q_base + offs_m[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))
    tl.store(Lse + bh * T + offs_m, m_i + tl.log(l_safe), mask=offs_m < T)


@triton.jit
def _bwd_probs(q, k, Lse, Docs, doc_k, bh, b, offs_m, offs_n, scale, T, HAS_DOCS: tl.constexpr):
    """Recomputed probabilities of one (query tile, key tile) pair, zero where masked."""
    lse = tl.load(Lse + bh * T + offs_m, mask=offs_m < T, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T) & (offs_m[:, None] < T)
    if HAS_DOCS:
        doc_q = tl.load(Docs + b * T + offs_m, mask=offs_m < T, other=-1)
        valid = valid & (doc_q[:, None] == doc_k[None, :])
    return tl.where(valid, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _dkdv_tile(k, v, dk, dv, Q, DO, Lse, Delta, Docs, doc_k, bh, b, qt, offs_n, offs_d, scale, T,
               D: tl.constexpr, TILE_M: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_m = qt * TILE_M + tl.arange(0, TILE_M)
    q = _load_rows(Q, bh * T * D, offs_m, offs_d, T, D)
    do = _load_rows(DO, bh * T * D, offs_m, offs_d, T, D)
    delta = tl.load(Delta + bh * T + offs_m, mask=offs_m < T, other=0.0)
    p = _bwd_probs(q, k, Lse, Docs, doc_k, bh, b, offs_m, offs_n, scale, T, HAS_DOCS)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    return dk, dv


@triton.jit
def _s2_dkdv(Q, K, V, DO, Lse, Delta, Docs, Phase, DK, DV, scale, T, H, G, n_q_tiles,
             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, TILE_M: tl.constexpr,
             TILE_N: tl.constexpr, LOCAL: tl.constexpr, STRIDE: tl.constexpr, HAS_DOCS: tl.constexpr):
    kt = tl.program_id(0)
    kb = kt * TILE_N // BLOCK
    bh, b, phase, kv_base = _program_head(Phase, T, H, G, D)
    offs_n = kt * TILE_N + tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, kv_base, offs_n, offs_d, T, D)
    v = _load_rows(V, kv_base, offs_n, offs_d, T, D)
    doc_k = offs_n
    if HAS_DOCS:
        doc_k = tl.load(Docs + b * T + offs_n, mask=offs_n < T, other=-2)
    dk = tl.zeros((TILE_N, BLOCK_D), tl.float32)
    dv = tl.zeros((TILE_N, BLOCK_D), tl.float32)
    # Local readers: from the query tile holding this key tile's first row to the end of block kb + LOCAL - 1.
    local_end = tl.minimum((kb + LOCAL) * (BLOCK // TILE_M), n_q_tiles)
    for qt in range(kt * TILE_N // TILE_M, local_end):
        dk, dv = _dkdv_tile(k, v, dk, dv, Q, DO, Lse, Delta, Docs, doc_k, bh, b, qt, offs_n, offs_d, scale, T,
                            D, TILE_M, HAS_DOCS)
    on_stride = (phase < 0) | (kb % STRIDE == phase)
    for qt in range(local_end, tl.where(on_stride, n_q_tiles, local_end)):
        dk, dv = _dkdv_tile(k, v, dk, dv, Q, DO, Lse, Delta, Docs, doc_k, bh, b, qt, offs_n, offs_d, scale, T,
                            D, TILE_M, HAS_DOCS)
    out_base = bh * T * D + offs_n[:, None] * D + offs_d[None, :]
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    tl.store(DK + out_base, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_base, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(q, do, delta, dq, K, V, Lse, Docs, kv_base, bh, b, kt, offs_m, offs_d, scale, T,
             D: tl.constexpr, TILE_N: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_n = kt * TILE_N + tl.arange(0, TILE_N)
    k = _load_rows(K, kv_base, offs_n, offs_d, T, D)
    v = _load_rows(V, kv_base, offs_n, offs_d, T, D)
    doc_k = offs_n
    if HAS_DOCS:
        doc_k = tl.load(Docs + b * T + offs_n, mask=offs_n < T, other=-2)
    p = _bwd_probs(q, k, Lse, Docs, doc_k, bh, b, offs_m, offs_n, scale, T, HAS_DOCS)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision="ieee")


@triton.jit
def _s2_dq(Q, K, V, DO, Lse, Delta, Docs, Phase, DQ, scale, T, H, G,
           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, TILE_M: tl.constexpr,
           TILE_N: tl.constexpr, LOCAL: tl.constexpr, STRIDE: tl.constexpr, HAS_DOCS: tl.constexpr):
    qt = tl.program_id(0)
    qb = qt * TILE_M // BLOCK
    bh, b, phase, kv_base = _program_head(Phase, T, H, G, D)
    offs_m = qt * TILE_M + tl.arange(0, TILE_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = _load_rows(Q, bh * T * D, offs_m, offs_d, T, D)
    do = _load_rows(DO, bh * T * D, offs_m, offs_d, T, D)
    delta = tl.load(Delta + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros((TILE_M, BLOCK_D), tl.float32)
    far_start = tl.where(phase < 0, 0, phase)
    far_step = tl.where(phase < 0, 1, STRIDE)
    for kb in range(far_start, qb - LOCAL + 1, far_step):
        for kt in range(kb * (BLOCK // TILE_N), (kb + 1) * (BLOCK // TILE_N)):
            dq = _dq_tile(q, do, delta, dq, K, V, Lse, Docs, kv_base, bh, b, kt, offs_m, offs_d, scale, T,
                          D, TILE_N, HAS_DOCS)
    for kt in range(tl.maximum(qb - LOCAL + 1, 0) * (BLOCK // TILE_N), tl.cdiv((qt + 1) * TILE_M, TILE_N)):
        dq = _dq_tile(q, do, delta, dq, K, V, Lse, Docs, kv_base, bh, b, kt, offs_m, offs_d, scale, T,
                      D, TILE_N, HAS_DOCS)
    tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


def _launch_args(q: torch.Tensor, pattern: S2Pattern, doc_ids: torch.Tensor | None, cfg: LaunchConfig) -> dict:
    return dict(D=q.shape[-1], BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), BLOCK=pattern.block_size,
                LOCAL=pattern.local_blocks, STRIDE=pattern.vert_stride, HAS_DOCS=doc_ids is not None,
                **cfg.kernel_args(pattern.block_size))


class _S2Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, phases, scale, pattern):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, _ = q.shape
        docs = doc_ids.contiguous() if doc_ids is not None else q.new_empty(0, dtype=torch.int64)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        backend = backend_of(q)
        cfg = launch_config(backend, "fwd", q.dtype, q.shape[-1])
        args = _launch_args(q, pattern, doc_ids, cfg)
        grid = (triton.cdiv(T, args["TILE_M"]), B * H)
        _s2_fwd[grid](q, k, v, docs, phases, out, lse, scale, T, H, pattern.group, **args,
                      **cfg.compile_options(backend))
        ctx.save_for_backward(q, k, v, out, lse, docs, phases)
        ctx.scale, ctx.pattern, ctx.has_docs = scale, pattern, doc_ids is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, docs, phases = ctx.saved_tensors
        pattern, scale = ctx.pattern, ctx.scale
        do = grad_out.contiguous()
        B, H, T, D = q.shape
        G = pattern.group
        delta = (do.float() * out.float()).sum(-1)
        backend = backend_of(q)
        cfg = launch_config(backend, "bwd", q.dtype, D)
        args = _launch_args(q, pattern, docs if ctx.has_docs else None, cfg)
        options = cfg.compile_options(backend)
        n_q_tiles = triton.cdiv(T, args["TILE_M"])
        dq = torch.empty_like(q)
        dk = torch.empty(B, H, T, D, dtype=k.dtype, device=k.device)
        dv = torch.empty(B, H, T, D, dtype=v.dtype, device=v.device)
        _s2_dkdv[(triton.cdiv(T, args["TILE_N"]), B * H)](q, k, v, do, lse, delta, docs, phases, dk, dv, scale, T, H,
                                                          G, n_q_tiles, **args, **options)
        _s2_dq[(n_q_tiles, B * H)](q, k, v, do, lse, delta, docs, phases, dq, scale, T, H, G, **args, **options)
        dk = dk.view(B, H // G, G, T, D).sum(2)
        dv = dv.view(B, H // G, G, T, D).sum(2)
        return dq, dk, dv, None, None, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                     doc_ids: torch.Tensor | None, scale: float, head_offset: int) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D)."""
    units = pattern.local_units(head_offset, q.shape[1])
    if len(units) != k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads need {len(units)} KV heads under the pattern, got {k.shape[1]}")
    phases = local_phases(pattern, head_offset, q.shape[1], q.device)
    return _S2Triton.apply(q, k, v, doc_ids, phases, scale, pattern)
