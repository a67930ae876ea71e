"""Sharded data parallelism with FSDP2 (`fully_shard`), one FSDP unit per transformer block.

zero_stage=3: parameters are re-sharded after forward and all-gathered again for backward
(ZeRO-3). zero_stage=2: they stay gathered from forward until backward (ZeRO-2-like: one
all-gather per step, more memory). A 2-D (dp_replicate, dp_shard) mesh gives HSDP: shard
inside a group, replicate across groups.
Gradients are summed, not averaged, across data-parallel ranks: the engine's loss is already
normalised by the global label count, which keeps every layout equal to one process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from exatrain.parallel.dims import ParallelDims


def dp_mesh_of(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP shards over: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) for HSDP."""
    return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def apply_fsdp(part: nn.Module, dp_mesh: DeviceMesh, zero_stage: int, param_dtype: torch.dtype | None) -> None:
    """Shard every block, then the part's root (embedding, final norm, output head) in place."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    reshard = zero_stage == 3
    for block in part.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(part, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    for module in part.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
