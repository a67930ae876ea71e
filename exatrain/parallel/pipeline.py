"""Pipeline parallelism with torch.distributed.pipelining: stages cut from layer ranges.

A stage is a copy of the (meta-device) Transformer that keeps only its layers; the first
stage keeps the embedding, the last the final norm and output head. Layers keep their global
names ("layers.7"), so parameter FQNs and checkpoints do not depend on the pipeline layout.
Virtual stages: rank r owns stages r, r+pp, ... ("loop" order), or r and 2pp-1-r for the
V-shaped zero-bubble schedule, which puts the first and last stage on rank 0.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import _PipelineSchedule, get_schedule_class

from exatrain.parallel.dims import SINGLE_STAGE_SCHEDULES, V_SCHEDULES, ParallelDims


def stage_layer_counts(n_layers: int, n_stages: int, explicit: list[int]) -> list[int]:
    """Explicit counts, or a balanced split with the remainder on the first stages (the last stage also
    runs the output head and loss, which dominate small models)."""
    if explicit:
        return list(explicit)
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if i < extra else 0) for i in range(n_stages)]


def stage_owner(stage: int, dims: ParallelDims, schedule: str) -> int:
    """The pp rank that runs `stage`."""
    if schedule in V_SCHEDULES and stage >= dims.pp:
        return dims.n_stages - 1 - stage
    return stage % dims.pp


def local_stage_ids(pp_rank: int, dims: ParallelDims, schedule: str) -> list[int]:
    return [s for s in range(dims.n_stages) if stage_owner(s, dims, schedule) == pp_rank]


def cut_stage(model: nn.Module, stage: int, counts: list[int]) -> nn.Module:
    """A copy of `model` keeping only stage `stage`'s layers (cheap: the model is still on meta)."""
    part = copy.deepcopy(model)
    first = sum(counts[:stage])
    keep = {str(i) for i in range(first, first + counts[stage])}
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage != 0:
        part.tok_embeddings = None
    if stage != len(counts) - 1:
        part.norm = None
        part.output = None
    return part


def split_model(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, schedule: str,
                explicit_counts: list[int]) -> tuple[list[int], list[nn.Module]]:
    """This rank's stage indices and their model parts."""
    counts = stage_layer_counts(len(model.layers), dims.n_stages, explicit_counts)
    ids = local_stage_ids(mesh.get_local_rank("pp"), dims, schedule)
    return ids, [cut_stage(model, i, counts) for i in ids]


def build_schedule(parts: list[nn.Module], stage_ids: list[int], dims: ParallelDims, mesh: DeviceMesh,
                   device: torch.device, schedule: str, loss_fn: Callable) -> _PipelineSchedule:
    """Wrap the (already parallelised and materialised) parts as stages and build the schedule.

    scale_grads=False: the loss is already normalised by the global label count.
    """
    group = mesh.get_group("pp")
    stages = [PipelineStage(part, idx, dims.n_stages, device, group=group) for idx, part in zip(stage_ids, parts)]
    cls = get_schedule_class(schedule)
    if schedule in SINGLE_STAGE_SCHEDULES:
        return cls(stages[0], n_microbatches=dims.pp_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=dims.pp_microbatches, loss_fn=loss_fn, scale_grads=False)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def forward_only(parts: list[nn.Module], stage_ids: list[int], dims: ParallelDims, schedule: str,
                 group: dist.ProcessGroup, tokens: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """Run one batch through the stages without pipelining; returns the output on the last stage's rank.

    Used for evaluation with V-shaped schedules: torch 2.13's ZBV schedule executes its
    backward-input actions in `eval()` and fails. Activations travel with a small shape/dtype
    header so no shape inference is needed.
    """
    me = dist.get_rank(group)
    by_id = dict(zip(stage_ids, parts))
    h: torch.Tensor | None = None
    for s in range(dims.n_stages):
        if stage_owner(s, dims, schedule) != me:
            continue
        prev = stage_owner(s - 1, dims, schedule) if s > 0 else me
        x = tokens if s == 0 else h if prev == me else _recv(group, prev, tokens.device)
        h = by_id[s](x, **kwargs)
        nxt = stage_owner(s + 1, dims, schedule) if s + 1 < dims.n_stages else me
        if nxt != me:
            _send(h, group, nxt)
    return h if dims.n_stages - 1 in by_id else None


def _send(t: torch.Tensor, group: dist.ProcessGroup, dst: int) -> None:
    header = torch.tensor([*t.shape, _DTYPES.index(t.dtype)], dtype=torch.long, device=t.device)
    dist.send(torch.tensor([header.numel()], device=t.device), group=group, group_dst=dst)
    dist.send(header, group=group, group_dst=dst)
    dist.send(t.contiguous(), group=group, group_dst=dst)


def _recv(group: dist.ProcessGroup, src: int, device: torch.device) -> torch.Tensor:
    n = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(n, group=group, group_src=src)
    header = torch.zeros(int(n), dtype=torch.long, device=device)
    dist.recv(header, group=group, group_src=src)
    out = torch.empty(header[:-1].tolist(), dtype=_DTYPES[int(header[-1])], device=device)
    dist.recv(out, group=group, group_src=src)
    return out
