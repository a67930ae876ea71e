"""The stride phases of a rank's local KV heads as a device tensor, built once per layout.

Every S2 layer of every micro-batch needs them; building them from a Python list each call would copy
host memory to the GPU each time, so they are cached per (pattern, head shard, device).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from exatrain.model.s2.pattern import S2Pattern


@lru_cache(maxsize=64)
def local_phases(pattern: S2Pattern, head_offset: int, n_heads: int, device: torch.device) -> torch.Tensor:
    """int32 (local KV heads,): each unit's residue mod vert_stride, -1 for a dense unit (pattern.unit_phase)."""
    units = pattern.local_units(head_offset, n_heads)
    return torch.tensor([pattern.unit_phase[u] for u in units], dtype=torch.int32, device=device)
