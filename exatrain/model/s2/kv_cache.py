"""Per-layer KV caches for incremental decoding: a dense one, and S2's pruned one.

S2's strided blocks are fixed by absolute position, so once a block leaves the local window a
KV head needs it forever (it is on the head's stride) or never. The S2 cache therefore keeps a
ring of the last local_blocks * block_size tokens and, as each block leaves the ring, copies
it to a far store only for the KV heads whose stride it is on: about
local_blocks * block_size + T / vert_stride tokens per head instead of T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exatrain.model.attention import expand_kv
from exatrain.model.s2 import S2Attention
from exatrain.model.s2.pattern import S2Pattern


def _single_sequence(doc_ids: torch.Tensor | None) -> None:
    if doc_ids is not None:
        raise ValueError("KV-cache decoding runs one sequence per batch row; packed documents (doc_ids) are for training")


def cache_tokens(pattern: S2Pattern, max_len: int) -> int:
    """Tokens an S2 cache keeps per sparse KV head for sequences up to max_len (a dense one keeps max_len)."""
    bs, L = pattern.block_size, pattern.local_blocks
    n_blocks = -(-max_len // bs)
    far_blocks = max(0, -(-(n_blocks - L) // pattern.vert_stride))
    return (min(L, n_blocks) + far_blocks) * bs


class DenseLayerCache:
    """All keys and values of a layer, (B, Hkv, max_len, D)."""

    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int, dtype, device):
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            raise ValueError(f"KV cache is full: {self.length} + {n} tokens exceed max_len={self.k.shape[2]}")
        self.k[:, :, self.length:self.length + n] = k
        self.v[:, :, self.length:self.length + n] = v
        self.length += n

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
               scale: float, head_offset: int):
        _single_sequence(doc_ids)
        start = self.length
        self.store(k, v)
        keys, values = self.k[:, :, :self.length], self.v[:, :, :self.length]
        mask = torch.arange(self.length, device=q.device)[None, :] <= start + torch.arange(q.shape[2], device=q.device)[:, None]
        return F.scaled_dot_product_attention(q, expand_kv(keys, q.shape[1]), expand_kv(values, q.shape[1]),
                                              attn_mask=mask, scale=scale)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class S2LayerCache:
    """Local ring plus per-KV-head far blocks; dense units (num_dense_heads) get a DenseLayerCache.

    The prompt is attended with the layer's S2 attention in one call; afterwards tokens come one
    at a time.
    """

    def __init__(self, pattern: S2Pattern, units: range, batch: int, head_dim: int, max_len: int, dtype, device):
        self.pattern = pattern
        phases = [pattern.unit_phase[u] for u in units]
        self.n_dense = sum(p < 0 for p in phases)  # the last units
        self.phases = torch.tensor(phases[:len(phases) - self.n_dense], device=device)
        bs, L, V = pattern.block_size, pattern.local_blocks, pattern.vert_stride
        self.bs, self.L, self.V = bs, L, V
        self.window = min(L, -(-max_len // bs)) * bs
        U = len(phases) - self.n_dense
        self.far_k = torch.zeros(batch, U, cache_tokens(pattern, max_len) - self.window, head_dim, dtype=dtype,
                                 device=device)
        self.far_v = torch.zeros_like(self.far_k)
        self.far_count = [0] * U
        self.ring_k = torch.zeros(batch, U, self.window, head_dim, dtype=dtype, device=device)
        self.ring_v = torch.zeros_like(self.ring_k)
        self.ring_pos = torch.full((self.window,), -1, dtype=torch.long, device=device)
        self.dense = DenseLayerCache(batch, self.n_dense, head_dim, max_len, dtype, device) if self.n_dense else None
        self.max_len = max_len
        self.length = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, doc_ids: torch.Tensor | None = None,
               scale: float, head_offset: int):
        _single_sequence(doc_ids)
        T, ns, G = q.shape[2], len(self.far_count), self.pattern.group
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} + {T} tokens exceed max_len={self.max_len}")
        if self.length == 0:
            out = S2Attention(self.pattern)(q, k, v, doc_ids=None, scale=scale, head_offset=head_offset)
            if self.dense is not None:
                self.dense.store(k[:, ns:], v[:, ns:])
            self._fill(k[:, :ns], v[:, :ns])
            self.length = T
            return out
        if T != 1:
            raise ValueError("the S2 KV cache takes the whole prompt first, then one token per step")
        parts = []
        if self.far_count:
            parts.append(self._decode(q[:, :ns * G], k[:, :ns], v[:, :ns], scale))
        if self.dense is not None:
            parts.append(self.dense.attend(q[:, ns * G:], k[:, ns:], v[:, ns:], scale=scale,
                                           head_offset=head_offset + ns * G))
        self.length += 1
        return torch.cat(parts, dim=1)

    def _fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        T, bs = k.shape[2], self.bs
        last_far = (T - 1) // bs - self.L
        for u, phase in enumerate(self.phases.tolist()):
            blocks = torch.arange(phase, max(phase, last_far + 1), self.V, device=k.device)
            tokens = (blocks[:, None] * bs + torch.arange(bs, device=k.device)).flatten()
            self.far_k[:, u, :tokens.numel()] = k[:, u, tokens]
            self.far_v[:, u, :tokens.numel()] = v[:, u, tokens]
            self.far_count[u] = blocks.numel()
        pos = torch.arange(max(0, T - self.window), T, device=k.device)
        self.ring_k[:, :, pos % self.window] = k[:, :, pos]
        self.ring_v[:, :, pos % self.window] = v[:, :, pos]
        self.ring_pos[pos % self.window] = pos

    def _promote(self, block: int) -> None:
        """`block` just left the local window: keep it for the KV heads whose stride it is on."""
        bs = self.bs
        slots = (block * bs + torch.arange(bs, device=self.ring_k.device)) % self.window
        for u in (self.phases == block % self.V).nonzero().flatten().tolist():
            c = self.far_count[u]
            self.far_k[:, u, c * bs:(c + 1) * bs] = self.ring_k[:, u, slots]
            self.far_v[:, u, c * bs:(c + 1) * bs] = self.ring_v[:, u, slots]
            self.far_count[u] = c + 1

    def _decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        p, bs = self.length, self.bs
        if p % bs == 0 and p // bs >= self.L:
            self._promote(p // bs - self.L)
        slot = p % self.window
        self.ring_k[:, :, slot] = k[:, :, 0]
        self.ring_v[:, :, slot] = v[:, :, 0]
        self.ring_pos[slot] = p
        n_far = max(self.far_count, default=0) * bs
        keys = torch.cat([self.far_k[:, :, :n_far], self.ring_k], dim=2)
        values = torch.cat([self.far_v[:, :, :n_far], self.ring_v], dim=2)
        far_ok = torch.arange(n_far, device=q.device)[None, :] // bs < torch.tensor(self.far_count, device=q.device)[:, None]
        ring_ok = (self.ring_pos >= 0) & (self.ring_pos // bs > p // bs - self.L)
        mask = torch.cat([far_ok, ring_ok.expand(len(self.far_count), -1)], dim=1)
        mask = mask.repeat_interleave(self.pattern.group, dim=0)[None, :, None, :]
        return F.scaled_dot_product_attention(q, expand_kv(keys, q.shape[1]), expand_kv(values, q.shape[1]),
                                              attn_mask=mask, scale=scale)

    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in (self.far_k, self.far_v, self.ring_k, self.ring_v))
        return own + (self.dense.nbytes() if self.dense is not None else 0)
