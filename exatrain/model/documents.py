"""Document boundaries of a micro-batch, derived once on the host.

Packed rows carry per-token document ids (B, T). Attention needs to know whether any row holds more than
one document, and flash-attn's varlen kernel needs `cu_seqlens` and `max_seqlen`. Deriving them from a GPU
tensor (`bool()`, `.max()`, `unique_consecutive`, `int()`) blocks the host until the GPU catches up; done in
every layer of every micro-batch, that drains the launch queue each time.

`to_device` moves the loader's host ids to the device and records their `Documents`, computed from the host
copy, so no backend ever syncs. `documents(doc_ids)` is what backends call: the recorded description, or
for ids nobody recorded (a pipeline stage's micro-batch slice, a direct model call) one computed on first
use and kept for that tensor, so the cost is one sync per micro-batch, not one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary


@dataclass(frozen=True)
class Documents:
    """Several documents in at least one row. `cu_seqlens` (int32, on the ids' device) are the document
    starts in the flattened (B * T) batch plus the end; `max_seqlen` is the longest document."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


_RECORDED = WeakTensorKeyDictionary()  # ids tensor -> Documents | None, alive as long as the tensor


def describe(doc_ids: torch.Tensor, device: torch.device | str | None = None) -> Documents | None:
    """None when every row is one document (plain causal attention), else the boundaries on `device`."""
    ids = doc_ids.cpu()
    starts = F.pad(ids[:, 1:] != ids[:, :-1], (1, 0), value=True).flatten()
    if int(starts.sum()) == ids.shape[0]:
        return None
    cu = F.pad(starts.nonzero().flatten(), (0, 1), value=starts.numel())
    return Documents(cu.to(torch.int32).to(device or doc_ids.device, non_blocking=True), int(cu.diff().max()))


def to_device(doc_ids: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The ids on `device`, with their `Documents` recorded from this (host) copy."""
    moved = doc_ids.to(device, non_blocking=True)
    _RECORDED[moved] = describe(doc_ids, device)
    return moved


@torch.compiler.disable
def documents(doc_ids: torch.Tensor | None) -> Documents | None:
    """The boundaries of `doc_ids` (None: one document per row), computed at most once per tensor."""
    if doc_ids is None:
        return None
    if doc_ids not in _RECORDED:
        _RECORDED[doc_ids] = describe(doc_ids)
    return _RECORDED[doc_ids]
