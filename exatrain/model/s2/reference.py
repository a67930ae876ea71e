"""Exact S2 attention: dense softmax attention under the token-level pattern mask.

O(T^2) in time and memory; the ground truth every fast path is tested against.
"""

from __future__ import annotations

import torch

from exatrain.model.attention import causal_document_mask, reference_attention
from exatrain.model.s2.pattern import S2Pattern


def s2_mask(pattern: S2Pattern, seq_len: int, n_heads: int, head_offset: int, doc_ids: torch.Tensor | None,
            device=None) -> torch.Tensor:
    """Bool (B or 1, H, T, T): the pattern rows of the local heads, within documents."""
    units = pattern.local_units(head_offset, n_heads)
    mask = pattern.token_mask(seq_len, units, device).repeat_interleave(pattern.group, dim=0)[None]
    return mask & causal_document_mask(doc_ids, seq_len, device)


def reference_s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: S2Pattern, *,
                           doc_ids: torch.Tensor | None, scale: float, head_offset: int) -> torch.Tensor:
    mask = s2_mask(pattern, q.shape[2], q.shape[1], head_offset, doc_ids, q.device)
    return reference_attention(q, k, v, doc_ids=doc_ids, scale=scale, head_offset=head_offset, mask=mask)
