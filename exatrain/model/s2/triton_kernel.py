"""S2 attention as Triton kernels (forward and backward) for GPUs.

One program per (query block, head) walks only the key blocks its head reads: first the far
strided blocks (every vert_stride-th block from the unit's phase up to q - local_blocks), then
the local window, with an online softmax (FlashAttention-2 style). The backward has a dK/dV
program per (key block, head) walking the query blocks that read that key block (the local
ones, and every later one if the block is on the head's stride) and a dQ program that retraces
the forward walk. Masked block pairs are never loaded, so the work is O(attended blocks).

Dense units (num_dense_heads) take stride 1 from block 0. GQA: each query head reads its KV
head's rows; dK/dV are produced per query head and summed over the group afterwards.
Dots are IEEE (no TF32), so fp32 matches the reference; bf16 is the fast GPU path. Tested on
CPU with TRITON_INTERPRET=1 against the reference (tests/test_s2_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from exatrain.model.documents import documents
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
def _fwd_block(q, m_i, l_i, acc, K, V, Docs, doc_q, kv_base, b, kb, offs_m, offs_d, scale, T,
               D: tl.constexpr, BLOCK: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
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
            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, LOCAL: tl.constexpr,
            STRIDE: tl.constexpr, HAS_DOCS: tl.constexpr):
    qb = tl.program_id(0)
    bh, b, phase, kv_base = _program_head(Phase, T, H, G, D)
    q_base = bh * T * D
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, q_base, offs_m, offs_d, T, D)
    doc_q = offs_m
    if HAS_DOCS:
        doc_q = tl.load(Docs + b * T + offs_m, mask=offs_m < T, other=-1)
    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    far_start = tl.where(phase < 0, 0, phase)
    far_step = tl.where(phase < 0, 1, STRIDE)
    for kb in range(far_start, qb - LOCAL + 1, far_step):
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, K, V, Docs, doc_q, kv_base, b, kb, offs_m, offs_d, scale, T,
                                   D, BLOCK, HAS_DOCS)
    for kb in range(tl.maximum(qb - LOCAL + 1, 0), qb + 1):
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, K, V, Docs, doc_q, kv_base, b, kb, offs_m, offs_d, scale, T,
                                   D, BLOCK, HAS_DOCS)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(Out + q_base + offs_m[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < T) & (offs_d[None, :] < D))
    tl.store(Lse + bh * T + offs_m, m_i + tl.log(l_safe), mask=offs_m < T)


@triton.jit
def _bwd_probs(q, k, Lse, Docs, doc_k, bh, b, offs_m, offs_n, scale, T,
               BLOCK: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Recomputed probabilities of one (query block, key block) tile, zero where masked."""
    lse = tl.load(Lse + bh * T + offs_m, mask=offs_m < T, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    valid = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T) & (offs_m[:, None] < T)
    if HAS_DOCS:
        doc_q = tl.load(Docs + b * T + offs_m, mask=offs_m < T, other=-1)
        valid = valid & (doc_q[:, None] == doc_k[None, :])
    return tl.where(valid, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _dkdv_block(k, v, dk, dv, Q, DO, Lse, Delta, Docs, doc_k, bh, b, qb, offs_n, offs_d, scale, T,
                D: tl.constexpr, BLOCK: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    q = _load_rows(Q, bh * T * D, offs_m, offs_d, T, D)
    do = _load_rows(DO, bh * T * D, offs_m, offs_d, T, D)
    delta = tl.load(Delta + bh * T + offs_m, mask=offs_m < T, other=0.0)
    p = _bwd_probs(q, k, Lse, Docs, doc_k, bh, b, offs_m, offs_n, scale, T, BLOCK, HAS_DOCS)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
    return dk, dv


@triton.jit
def _s2_dkdv(Q, K, V, DO, Lse, Delta, Docs, Phase, DK, DV, scale, T, H, G, n_blocks,
             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, LOCAL: tl.constexpr,
             STRIDE: tl.constexpr, HAS_DOCS: tl.constexpr):
    kb = tl.program_id(0)
    bh, b, phase, kv_base = _program_head(Phase, T, H, G, D)
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K, kv_base, offs_n, offs_d, T, D)
    v = _load_rows(V, kv_base, offs_n, offs_d, T, D)
    doc_k = offs_n
    if HAS_DOCS:
        doc_k = tl.load(Docs + b * T + offs_n, mask=offs_n < T, other=-2)
    dk = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    for qb in range(kb, tl.minimum(kb + LOCAL, n_blocks)):
        dk, dv = _dkdv_block(k, v, dk, dv, Q, DO, Lse, Delta, Docs, doc_k, bh, b, qb, offs_n, offs_d, scale, T,
                             D, BLOCK, HAS_DOCS)
    on_stride = (phase < 0) | (kb % STRIDE == phase)
    for qb in range(kb + LOCAL, tl.where(on_stride, n_blocks, kb + LOCAL)):
        dk, dv = _dkdv_block(k, v, dk, dv, Q, DO, Lse, Delta, Docs, doc_k, bh, b, qb, offs_n, offs_d, scale, T,
                             D, BLOCK, HAS_DOCS)
    out_base = bh * T * D + offs_n[:, None] * D + offs_d[None, :]
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < D)
    tl.store(DK + out_base, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_base, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_block(q, do, delta, dq, K, V, Lse, Docs, kv_base, bh, b, kb, offs_m, offs_d, scale, T,
              D: tl.constexpr, BLOCK: tl.constexpr, HAS_DOCS: tl.constexpr):
    offs_n = kb * BLOCK + tl.arange(0, BLOCK)
    k = _load_rows(K, kv_base, offs_n, offs_d, T, D)
    v = _load_rows(V, kv_base, offs_n, offs_d, T, D)
    doc_k = offs_n
    if HAS_DOCS:
        doc_k = tl.load(Docs + b * T + offs_n, mask=offs_n < T, other=-2)
    p = _bwd_probs(q, k, Lse, Docs, doc_k, bh, b, offs_m, offs_n, scale, T, BLOCK, HAS_DOCS)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision="ieee")


@triton.jit
def _s2_dq(Q, K, V, DO, Lse, Delta, Docs, Phase, DQ, scale, T, H, G,
           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, LOCAL: tl.constexpr,
           STRIDE: tl.constexpr, HAS_DOCS: tl.constexpr):
    qb = tl.program_id(0)
    bh, b, phase, kv_base = _program_head(Phase, T, H, G, D)
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = _load_rows(Q, bh * T * D, offs_m, offs_d, T, D)
    do = _load_rows(DO, bh * T * D, offs_m, offs_d, T, D)
    delta = tl.load(Delta + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros((BLOCK, BLOCK_D), tl.float32)
    far_start = tl.where(phase < 0, 0, phase)
    far_step = tl.where(phase < 0, 1, STRIDE)
    for kb in range(far_start, qb - LOCAL + 1, far_step):
        dq = _dq_block(q, do, delta, dq, K, V, Lse, Docs, kv_base, bh, b, kb, offs_m, offs_d, scale, T,
                       D, BLOCK, HAS_DOCS)
    for kb in range(tl.maximum(qb - LOCAL + 1, 0), qb + 1):
        dq = _dq_block(q, do, delta, dq, K, V, Lse, Docs, kv_base, bh, b, kb, offs_m, offs_d, scale, T,
                       D, BLOCK, HAS_DOCS)
    tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=q_mask)


def _launch_args(q: torch.Tensor, pattern: S2Pattern, doc_ids: torch.Tensor | None) -> dict:
    return dict(D=q.shape[-1], BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), BLOCK=pattern.block_size,
                LOCAL=pattern.local_blocks, STRIDE=pattern.vert_stride, HAS_DOCS=doc_ids is not None)


class _S2Triton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, phases, scale, pattern):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, _ = q.shape
        docs = doc_ids.contiguous() if doc_ids is not None else q.new_empty(0, dtype=torch.int64)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(T, pattern.block_size), B * H)
        _s2_fwd[grid](q, k, v, docs, phases, out, lse, scale, T, H, pattern.group, **_launch_args(q, pattern, doc_ids))
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
        args = _launch_args(q, pattern, docs if ctx.has_docs else None)
        n_blocks = triton.cdiv(T, pattern.block_size)
        dq = torch.empty_like(q)
        dk = torch.empty(B, H, T, D, dtype=k.dtype, device=k.device)
        dv = torch.empty(B, H, T, D, dtype=v.dtype, device=v.device)
        _s2_dkdv[(n_blocks, B * H)](q, k, v, do, lse, delta, docs, phases, dk, dv, scale, T, H, G, n_blocks, **args)
        _s2_dq[(n_blocks, B * H)](q, k, v, do, lse, delta, docs, phases, dq, scale, T, H, G, **args)
        dk = dk.view(B, H // G, G, T, D).sum(2)
        dv = dv.view(B, H // G, G, T, D).sum(2)
        return dq, dk, dv, None, None, None, None


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                     doc_ids: torch.Tensor | None, scale: float, head_offset: int) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D)."""
    units = pattern.local_units(head_offset, q.shape[1])
    if len(units) != k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads need {len(units)} KV heads under the pattern, got {k.shape[1]}")
    if documents(doc_ids) is None:
        doc_ids = None
    phases = local_phases(pattern, head_offset, q.shape[1], q.device)
    return _S2Triton.apply(q, k, v, doc_ids, phases, scale, pattern)
