"""Block-sparse S2 attention for CPU: forward and backward touch only (nearly) attended blocks.

FlexAttention has no CPU backward in torch 2.13, so this is the CPU training path. The
attended keys of each query block split into dense pieces, each run by ATen's fused CPU
flash-attention kernel (`aten::_scaled_dot_product_flash_attention_for_cpu`, the one dense SDPA
uses; unlike SDPA it returns the log-sum-exp, and its backward op takes it):

* local: query blocks are grouped `c` at a time; a group reads the contiguous K/V span from
  `local_blocks - 1` blocks before it to its end, as an overlapping strided view of one
  front-padded K/V tensor (no copy). A static band mask keeps each block's own window, at
  (c + L - 1) / L of the exact local work.
* strided: a unit's strided blocks are gathered once into a compact set of about
  T / vert_stride keys that all query blocks share. A chunk of query blocks reads the prefix
  all its blocks may read without any mask, plus a short masked tail.

Pieces are merged with their log-sum-exps. The backward calls the kernel's backward on every
piece with the *merged* output and log-sum-exp, which yields exactly that piece's share of the
gradients, so nothing but O(T) state is kept. Under GQA all query heads of a group read the
same blocks (pattern.py): they are stacked as extra query rows and K/V is never repeated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from exatrain.model.attention import sdpa_attention
from exatrain.model.s2.pattern import S2Pattern
from exatrain.model.s2.phases import local_phases

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

NEG_INF = float("-inf")
# Query blocks per strided chunk, and the cap on the score elements of one local kernel call (32 MiB
# fp32): it bounds the doc mask and the kernel's copies of the overlapping K/V windows and their
# gradients, which the allocator then reuses instead of page-faulting fresh memory every call.
STRIDED_CHUNK = 8
LOCAL_ELEMENTS = 1 << 23


def blocksparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                          doc_ids: torch.Tensor | None, scale: float, head_offset: int) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D) -> (B, H, T, D). Dense units (num_dense_heads) run SDPA."""
    units = pattern.local_units(head_offset, q.shape[1])
    if len(units) != k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads need {len(units)} KV heads under the pattern, got {k.shape[1]}")
    phases = local_phases(pattern, head_offset, q.shape[1], q.device)
    n_dense = sum(pattern.unit_phase[u] < 0 for u in units)
    if n_dense == len(units) or -(-q.shape[2] // pattern.block_size) <= pattern.local_blocks:
        # Every causal block pair is attended: the pattern is dense causal attention.
        return sdpa_attention(q, k, v, doc_ids=doc_ids, scale=scale, head_offset=head_offset)
    G, ns = pattern.group, len(units) - n_dense  # dense units are the last ones
    sparse = _BlockSparse.apply(q[:, :ns * G], k[:, :ns], v[:, :ns], doc_ids, phases[:ns], scale, pattern)
    if n_dense == 0:
        return sparse
    dense = sdpa_attention(q[:, ns * G:], k[:, ns:], v[:, ns:], doc_ids=doc_ids, scale=scale,
                           head_offset=head_offset + ns * G)
    return torch.cat([sparse, dense], dim=1)


def local_group(pattern: S2Pattern) -> int:
    """Query blocks per local group: the band then costs at most 1.25x the exact local work."""
    return max(1, pattern.local_blocks // 4)


@dataclass
class _Piece:
    """One dense kernel call. `rows` maps a (N, nb*R, ...) row tensor to q's shape; `add_kv`
    adds the kernel's dK or dV onto the (padded, strided) gradient accumulators."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    rows: Callable[[torch.Tensor], torch.Tensor]
    add_kv: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
    starved_rows: bool = False  # some rows may have no key at all: the kernel then says lse = 0


class _Layout:
    """Shapes, padding, masks and the list of pieces, shared by forward and backward.

    Queries are (N, nb * R, D), N = batch * KV heads, R = group * block_size rows per query block
    (block-major, then head in group, then token). K/V are (N, front + nb * bs, D), padded in
    front by local_blocks - 1 blocks, plus a strided copy (N, ns * bs, D).
    """

    def __init__(self, q: torch.Tensor, U: int, doc_ids: torch.Tensor | None, phases: torch.Tensor,
                 pattern: S2Pattern):
        B, H, T, D = q.shape
        bs, L, V = pattern.block_size, pattern.local_blocks, pattern.vert_stride
        self.B, self.H, self.U, self.N, self.T, self.D, self.G = B, H, U, B * U, T, D, H // U
        self.bs, self.L, self.c = bs, L, local_group(pattern)
        self.nb = -(-T // bs)
        self.R = self.G * bs
        self.front = (L - 1) * bs
        self.dtype, self.device = q.dtype, q.device
        self.ns = -(-self.nb // V)
        self.stride_blocks = phases.to(self.device)[:, None] + V * torch.arange(self.ns, device=self.device)[None, :]
        # Past-the-end strided blocks are clamped for the gather; the block-causal mask drops them.
        self.stride_index = self.stride_blocks.clamp(max=self.nb - 1)
        self.has_docs = doc_ids is not None
        self._bands: dict[int, torch.Tensor] = {}  # additive local band per group width, past the start
        if self.has_docs:
            docs = F.pad(doc_ids, (0, self.nb * bs - T), value=-1)
            self.doc_rows = docs.reshape(B, self.nb, 1, bs).expand(B, self.nb, self.G, bs).reshape(B, self.nb * self.R)
            self.doc_keys = F.pad(docs, (self.front, 0), value=-2)
            self.doc_strided = docs.reshape(B, self.nb, bs)[:, self.stride_index].flatten(-2)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) -> (N, nb * R, D), zero-padded to whole blocks (no copy at all without GQA and padding)."""
        if self.nb * self.bs != self.T:
            x = F.pad(x, (0, 0, 0, self.nb * self.bs - self.T))
        x = x.reshape(self.B, self.U, self.G, self.nb, self.bs, self.D).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(self.N, self.nb * self.R, self.D).contiguous()

    def unblocks(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(self.B, self.U, self.nb, self.G, self.bs, self.D).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(self.B, self.H, self.nb * self.bs, self.D)[:, :, :self.T]

    def keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K or V (B, U, T, D) -> padded (N, front + nb*bs, D) and strided (N, ns*bs, D)."""
        padded = F.pad(x, (0, 0, self.front, self.nb * self.bs - self.T)).reshape(self.N, -1, self.D).contiguous()
        blocks = padded.view(self.B, self.U, -1, self.bs, self.D)
        strided = blocks[:, torch.arange(self.U, device=x.device)[:, None], self.stride_index + self.L - 1]
        return padded, strided.reshape(self.N, self.ns * self.bs, self.D)

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, NEG_INF)

    def _band(self, c: int, first_blocks: torch.Tensor) -> torch.Tensor:
        """Bool (groups, c*R, (c + L - 1)*bs): query block i of a group reads span blocks i .. i + L - 1,
        causal inside the last, and no span block before the sequence start."""
        bs, L = self.bs, self.L
        row = torch.arange(c * self.R, device=self.device)
        qi, qt = row // self.R, row % bs
        col = torch.arange((c + L - 1) * bs, device=self.device)
        kj, kt = col // bs, col % bs
        d = kj[None, :] - qi[:, None]
        band = (d >= 0) & (d < L) & ((d < L - 1) | (kt[None, :] <= qt[:, None]))
        return band[None] & (first_blocks[:, None, None] + kj[None, None, :] >= L - 1)

    def pieces(self, qb, kp, vp, ks, vs) -> Iterator[_Piece]:
        """Local groups first (every row has its diagonal there), then strided chunks."""
        c, nb = self.c, self.nb
        n_full = nb // c
        head = min(n_full, -(-(self.L - 1) // c))
        spans = [(0, head, c), (head, n_full, c), (n_full, n_full + (nb % c > 0), nb % c)]
        for g_lo, g_hi, width in spans:
            if g_hi == g_lo:
                continue
            step = max(1, LOCAL_ELEMENTS // (self.N * width * self.R * (width + self.L) * self.bs))
            for g in range(g_lo, g_hi, step):
                yield self._local(qb, kp, vp, g, min(g + step, g_hi), width)
        for a in range(self.L, nb, STRIDED_CHUNK):
            yield from self._strided(qb, ks, vs, a, min(a + STRIDED_CHUNK, nb))

    def _local(self, qb, kp, vp, g_lo: int, g_hi: int, width: int) -> _Piece:
        """Groups [g_lo, g_hi) of `width` blocks each (the last group alone may be narrower)."""
        N, D, bs, R, c, n = self.N, self.D, self.bs, self.R, self.c, g_hi - g_lo
        span = (width + self.L - 1) * bs
        a0 = g_lo * c
        if a0 >= self.L - 1 and not self.has_docs:  # clear of the sequence start: one band for all groups
            if width not in self._bands:
                self._bands[width] = self._additive(self._band(width, torch.tensor([a0], device=self.device))[None])
            mask = self._bands[width]
        else:
            mask = self._additive(self._local_allowed(a0, n, width, span))

        def window(x):
            return x.as_strided((N, n, span, D), (x.stride(0), width * bs * D, D, 1), x.storage_offset() + a0 * bs * D)

        def rows(x):
            return x[:, a0 * R:(a0 + n * width) * R].unflatten(1, (n, width * R))

        def add_kv(padded, strided, grad):
            blocks = padded.view(N, -1, bs, D)
            grad = grad.reshape(N, n, width + self.L - 1, bs, D)
            for j in range(width + self.L - 1):
                blocks[:, a0 + j:a0 + j + n * width:width] += grad[:, :, j]

        return _Piece(rows(qb), window(kp), window(vp), mask, rows, add_kv)

    def _local_allowed(self, a0: int, n: int, width: int, span: int) -> torch.Tensor:
        """Bool (1 or N, n, width*R, span): the band of groups starting at block a0, within documents."""
        first = a0 + width * torch.arange(n, device=self.device)
        allowed = self._band(width, first if a0 < self.L - 1 else first[:1])[None]
        if self.has_docs:
            R, bs = self.R, self.bs
            q_docs = self.doc_rows[:, a0 * R:(a0 + n * width) * R].view(self.B, n, width * R, 1)
            k_docs = self.doc_keys[:, a0 * bs:a0 * bs + (n - 1) * width * bs + span].unfold(1, span, width * bs)
            same = (q_docs == k_docs[:, :, None, :])[:, None].expand(self.B, self.U, n, width * R, span)
            allowed = allowed & same.reshape(self.N, n, width * R, span)
        return allowed

    def _strided(self, qb, ks, vs, a: int, b: int) -> Iterator[_Piece]:
        """Query blocks [a, b): the strided prefix every block reads (no mask), then the masked tail."""
        B, U, R, bs, D = self.B, self.U, self.R, self.bs, self.D
        n_full = int((self.stride_blocks <= a - self.L).sum(1).min())
        n_all = int((self.stride_blocks <= b - 1 - self.L).sum(1).max())

        def rows(x):
            return x[:, a * R:b * R].unflatten(0, (B, U))

        for lo, hi in ((0, n_full), (n_full, n_all)):
            if hi == lo:
                continue
            allowed = None
            if lo == n_full:
                q_blocks = torch.arange(a, b, device=self.device).repeat_interleave(R)
                allowed = (self.stride_blocks[:, None, lo:hi] <= (q_blocks - self.L)[None, :, None])
                allowed = allowed.repeat_interleave(bs, dim=-1)[None]
            if self.has_docs:
                same = self.doc_rows[:, None, a * R:b * R, None] == self.doc_strided[:, :, None, lo * bs:hi * bs]
                allowed = same if allowed is None else allowed & same
            mask = None if allowed is None else self._additive(allowed)

            def add_kv(padded, strided, grad, lo=lo, hi=hi):
                strided[:, lo * bs:hi * bs] += grad.reshape(self.N, (hi - lo) * bs, D)

            k = ks[:, lo * bs:hi * bs].unflatten(0, (B, U))
            v = vs[:, lo * bs:hi * bs].unflatten(0, (B, U))
            yield _Piece(rows(qb), k, v, mask, rows, add_kv, starved_rows=True)


def _scatter_strided(dst: torch.Tensor, strided: torch.Tensor, lay: _Layout) -> None:
    """Add strided-key gradients (N, ns*bs, D) onto the padded K/V gradient (N, front + nb*bs, D)."""
    n = dst.shape[1] // lay.bs
    blocks = dst.view(lay.B, lay.U * n, lay.bs, lay.D)
    idx = (torch.arange(lay.U, device=dst.device)[:, None] * n + lay.stride_index + lay.L - 1).flatten()
    blocks.index_add_(1, idx, strided.view(lay.B, lay.U * lay.ns, lay.bs, lay.D))


class _BlockSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, phases, scale, pattern):
        lay = _Layout(q, k.shape[1], doc_ids, phases, pattern)
        qb = lay.blocks(q)
        kp, ks = lay.keys(k)
        vp, vs = lay.keys(v)
        acc_dtype = torch.promote_types(q.dtype, torch.float32)  # merge bf16 pieces in fp32
        out = torch.zeros(qb.shape, dtype=acc_dtype, device=qb.device)
        lse = torch.full(qb.shape[:-1], NEG_INF, dtype=acc_dtype, device=qb.device)
        for p in lay.pieces(qb, kp, vp, ks, vs):
            o, l = _flash_fwd(p.q, p.k, p.v, attn_mask=p.mask, scale=scale)
            if p.starved_rows and p.mask is not None:
                l = l.masked_fill(p.mask.amax(-1) == NEG_INF, NEG_INF)
            o_acc, l_acc = p.rows(out), p.rows(lse)
            l_new = torch.logaddexp(l_acc, l)
            o_acc.mul_((l_acc - l_new).exp_().unsqueeze(-1)).add_(o * (l - l_new).exp_().unsqueeze(-1))
            l_acc.copy_(l_new)
        out = out.to(q.dtype)
        # The padded and strided K/V, not k and v: the backward would otherwise rebuild them (two padded copies
        # and two gathers).
        ctx.save_for_backward(qb, kp, ks, vp, vs, out, lse, doc_ids, phases)
        ctx.n_kv = k.shape[1]
        ctx.scale, ctx.pattern = scale, pattern
        return lay.unblocks(out)

    @staticmethod
    def backward(ctx, grad_out):
        qb, kp, ks, vp, vs, out, lse, doc_ids, phases = ctx.saved_tensors
        lay = _Layout(grad_out, ctx.n_kv, doc_ids, phases, ctx.pattern)
        do = lay.blocks(grad_out)
        dq = torch.zeros_like(qb)
        dkp, dvp = torch.zeros_like(kp), torch.zeros_like(vp)
        dks, dvs = torch.zeros_like(ks), torch.zeros_like(vs)
        for p in lay.pieces(qb, kp, vp, ks, vs):
            gq, gk, gv = _flash_bwd(p.rows(do), p.q, p.k, p.v, p.rows(out), p.rows(lse), 0.0, False,
                                    attn_mask=p.mask, scale=ctx.scale)
            p.rows(dq).add_(gq)
            p.add_kv(dkp, dks, gk)
            p.add_kv(dvp, dvs, gv)
        _scatter_strided(dkp, dks, lay)
        _scatter_strided(dvp, dvs, lay)
        dk = dkp[:, lay.front:lay.front + lay.T].view(lay.B, lay.U, lay.T, lay.D)
        dv = dvp[:, lay.front:lay.front + lay.T].view(lay.B, lay.U, lay.T, lay.D)
        return lay.unblocks(dq), dk, dv, None, None, None, None
