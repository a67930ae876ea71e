"""How the native engine's optimizer sees gradients: local (replicated or FSDP-sharded) or ZeRO-1.

Both strategies give the engine the same five steps per optimizer step: reduce the gradients over
data parallelism, this rank's share of the squared gradient norm, scale (clip), step, zero; and a
checkpoint state in one format (torch's flattened FQN-keyed optimizer state dict, tensors in each
parameter's own layout), so checkpoints move between strategies, layouts and engines.

- `LocalOptimizer`: AdamW over the parameters this rank holds. Without data parallelism, or with
  FSDP2 (which reduce-scatters gradients in backward), nothing is left to reduce.
- `ZeroOneOptimizer`: ZeRO-1, the Frontier paper's layout (DeepSpeed ZeRO-1 under Megatron TP/PP):
  parameters and gradients stay replicated over the data-parallel ranks, optimizer states are
  sharded. Each rank owns a contiguous 1/dp slice of every parameter's (TP-local) flattened tensor.
  Per step, gradients accumulated over micro-batches in full buffers are reduce-scattered (summed)
  into the owned slices in one collective, AdamW updates an fp32 master copy of the slices, and one
  all-gather writes the updated slices back into every replica. Memory per rank: parameters and
  gradients in full, 12 bytes per parameter of optimizer state (2 moments + fp32 master) / dp. A
  checkpoint gathers each parameter's states into its full TP-local layout, one rank-shard at a time
  in host memory, so it loads into any other layout; DP collectives are not overlapped with backward.

Low-precision parameters (train.dtype=bf16_params without FSDP): the engine builds a ZeroOneOptimizer (with
no data parallelism its slice is the whole tensor) while the parameters are still fp32, then casts them with
`cast_parameters`. The fp32 masters are the weights that matter: updates are computed on them and rounded once
into the bf16 parameters; checkpoints store them as optimizer state `master` next to the moments.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from exatrain.config import JobConfig
from exatrain.engine.base import local
from exatrain.train.optim import adamw, build_optimizer, param_groups, set_lr

OPTIM_STATE_DICT = StateDictOptions(flatten_optimizer_state_dict=True)
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _counts_once(p: torch.Tensor, coords: dict[str, int]) -> bool:
    """Whether this rank adds `p`'s local gradient to the norm: a tensor replicated over a mesh dim is
    counted by that dim's rank 0 only."""
    sharded_dims: set[str] = set()
    if isinstance(p, DTensor):
        sharded_dims = {d for d, pl in zip(p.device_mesh.mesh_dim_names, p.placements) if not pl.is_replicate()}
    return all(c == 0 for d, c in coords.items() if d not in sharded_dims)


def _sum_squares(grads: Iterable[tuple[torch.Tensor, torch.Tensor]], coords: dict[str, int]) -> torch.Tensor:
    """Σ‖g‖² in float64 over (placement reference, local gradient) pairs, each shard counted once on the mesh."""
    sq = torch.zeros((), dtype=torch.float64)
    for ref, g in grads:
        if _counts_once(ref, coords):
            sq += torch.linalg.vector_norm(g, dtype=torch.float64).cpu() ** 2
    return sq


class LocalOptimizer:
    """AdamW over this rank's parameters (replicated, TP DTensors or FSDP shards)."""

    def __init__(self, part: nn.Module, cfg: JobConfig, mesh: DeviceMesh):
        self.part = part
        self.optimizer = build_optimizer(part, cfg)
        self.coords = {d: mesh.get_local_rank(d) for d in ("dp_replicate", "dp_shard", "tp")}

    def reduce_grads(self) -> None:
        """Gradients are already reduced (FSDP2 in backward) or need no reduction (no data parallelism)."""

    def grad_sq_sum(self) -> torch.Tensor:
        return _sum_squares(((p.grad, local(p.grad)) for p in self.part.parameters() if p.grad is not None),
                            self.coords)

    @torch.no_grad()
    def scale_grads(self, coef: float) -> None:
        for p in self.part.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    def step(self, lr: float) -> None:
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.part, self.optimizer, options=OPTIM_STATE_DICT)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.part, self.optimizer, state, options=OPTIM_STATE_DICT)


class ZeroOneOptimizer:
    """ZeRO-1 over the `dp_shard` mesh dim (see the module docstring)."""

    def __init__(self, part: nn.Module, cfg: JobConfig, mesh: DeviceMesh):
        self.part, self.cfg = part, cfg
        self.group = mesh.get_group("dp_shard")
        self.dp, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.coords = {d: mesh.get_local_rank(d) for d in ("dp_replicate", "tp")}
        groups = param_groups(part, cfg)
        self.params = [p for g in groups for p in g["params"]]
        self.chunks = [math.ceil(local(p).numel() / self.dp) for p in self.params]
        # param -> fp32 master copy of this rank's slice: what AdamW updates
        self.masters = {p: nn.Parameter(torch.empty(0)) for p in self.params}
        self._refresh_masters()
        for g in groups:
            g["params"] = [self.masters[p] for p in g["params"]]
        self.optimizer = adamw(groups, cfg)

    def _slice(self, i: int) -> slice:
        n, c = local(self.params[i]).numel(), self.chunks[i]
        return slice(min(self.rank * c, n), min((self.rank + 1) * c, n))

    @torch.no_grad()
    def _refresh_masters(self) -> None:
        """Copy the owned slices of the (replicated) parameters into the masters, e.g. after loading weights."""
        for i, p in enumerate(self.params):
            self.masters[p].data = local(p).detach().reshape(-1)[self._slice(i)].float().clone()

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """One reduce-scatter (sum) of all gradients into this rank's slices.

        The send buffer is (dp, Σ chunks): row r holds every parameter's r-th chunk, so rank r's slices
        arrive contiguous. Each full gradient is freed as soon as it is copied in, so the step holds about
        one full-size fp32 gradient copy at a time, not the gradients plus padded copies."""
        ref = local(self.params[0])
        full = torch.zeros(self.dp, sum(self.chunks), dtype=torch.float32, device=ref.device)
        col = 0
        for p, c in zip(self.params, self.chunks):
            if p.grad is not None:
                g = local(p.grad).reshape(-1)
                rows, rest = divmod(g.numel(), c)
                full[:rows, col:col + c].copy_(g[: rows * c].view(rows, c))
                if rest:
                    full[rows, col:col + rest].copy_(g[rows * c:])
                p.grad = None  # the full replicated gradient is not needed any more
            col += c
        mine = torch.empty(full.shape[1], dtype=full.dtype, device=full.device)
        dist.reduce_scatter_tensor(mine, full.view(-1), op=dist.ReduceOp.SUM, group=self.group)
        del full
        for i, (p, part) in enumerate(zip(self.params, mine.split(self.chunks))):
            s = self._slice(i)
            self.masters[p].grad = part[: s.stop - s.start]  # views of one buffer, 1/dp of the model

    def grad_sq_sum(self) -> torch.Tensor:
        return _sum_squares(((p, self.masters[p].grad) for p in self.params if self.masters[p].grad is not None),
                            self.coords)

    @torch.no_grad()
    def scale_grads(self, coef: float) -> None:
        for m in self.masters.values():
            if m.grad is not None:
                m.grad.mul_(coef)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """AdamW on the owned slices, then one all-gather of the updated slices into every replica."""
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        mine = torch.cat([torch.nn.functional.pad(self.masters[p].detach(), (0, c - self.masters[p].numel()))
                          for p, c in zip(self.params, self.chunks)])
        full = torch.empty(self.dp * mine.numel(), dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(full, mine, group=self.group)
        for p, col in zip(self.params, full.view(self.dp, -1).split(self.chunks, dim=1)):
            target = local(p)
            target.copy_(col.reshape(-1)[: target.numel()].view_as(target))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    def _gather(self, shard: torch.Tensor, i: int) -> torch.Tensor:
        """Every rank's slice of parameter i's state -> the full TP-local tensor (on CPU)."""
        c = self.chunks[i]
        padded = torch.nn.functional.pad(shard.detach().float(), (0, c - shard.numel()))
        full = torch.empty(self.dp * c, dtype=padded.dtype, device=padded.device)
        dist.all_gather_into_tensor(full, padded, group=self.group)
        target = local(self.params[i])
        return full[: target.numel()].view_as(target).cpu()

    def _shadow(self) -> torch.optim.Optimizer:
        """A plain AdamW over the real parameters, to speak torch's optimizer state-dict format."""
        groups = param_groups(self.part, self.cfg)
        shadow = adamw(groups, self.cfg)
        for g, mine in zip(shadow.param_groups, self.optimizer.param_groups):
            g.update({k: v for k, v in mine.items() if k != "params"})
        return shadow

    def _low_precision(self, p: torch.Tensor) -> bool:
        return local(p).dtype != torch.float32

    def state_dict(self) -> dict[str, Any]:
        """Moments (and, for low-precision parameters, the fp32 `master` weights) in full TP-local layout. With
        low-precision parameters every entry is written even before the first step, so a fresh optimizer's
        state dict (the target a checkpoint is loaded into) has the `master` keys."""
        return get_optimizer_state_dict(self.part, self._filled_shadow(), options=OPTIM_STATE_DICT)

    def _filled_shadow(self) -> torch.optim.Optimizer:
        """The shadow optimizer holding this optimizer's state gathered into each parameter's layout."""
        shadow = self._shadow()
        for i, p in enumerate(self.params):
            st = self.optimizer.state.get(self.masters[p])
            if not st and not self._low_precision(p):
                continue
            master = self.masters[p]
            entry = {"step": st["step"].detach().clone().cpu() if st else torch.zeros(())}
            shards = {key: st[key] if st else torch.zeros_like(master) for key in _MOMENTS}
            if self._low_precision(p):
                shards["master"] = master.detach()
            for key, shard in shards.items():
                full = self._gather(shard, i).to(local(p).device)
                entry[key] = DTensor.from_local(full, p.device_mesh, p.placements, run_check=False) \
                    if isinstance(p, DTensor) else full
            shadow.state[p] = entry
        return shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        low = [p for p in self.params if self._low_precision(p)]
        # Loading unflattens into the keys the shadow's state already has, so with low-precision parameters start
        # from filled entries (they have `master`); and torch's Optimizer.load_state_dict casts floating state to
        # its parameter's dtype, so load through fp32 stand-ins of those parameters.
        shadow = self._filled_shadow() if low else self._shadow()
        with _fp32_parameters(low):
            set_optimizer_state_dict(self.part, shadow, state, options=OPTIM_STATE_DICT)
        self._refresh_masters()
        for i, p in enumerate(self.params):
            src = shadow.state.get(p)
            if not src:
                continue
            s = self._slice(i)
            if "master" in src and self._low_precision(p):
                self.masters[p].data = local(src["master"]).reshape(-1)[s].float().clone()
            if "exp_avg" not in src:
                continue
            self.optimizer.state[self.masters[p]] = {
                "step": src["step"].detach().clone().float().cpu(),
                **{key: local(src[key]).reshape(-1)[s].float().clone() for key in _MOMENTS}}
        for g, loaded in zip(self.optimizer.param_groups, shadow.param_groups):
            g.update({k: v for k, v in loaded.items() if k != "params"})


@contextlib.contextmanager
def _fp32_parameters(params: list[nn.Parameter]) -> Iterator[None]:
    """Temporarily give `params` fp32 copies of their values (same Parameter objects), then their own tensors back."""
    held = [nn.Parameter(p.detach().float(), requires_grad=p.requires_grad) for p in params]
    for p, h in zip(params, held):
        torch.utils.swap_tensors(p, h)
    try:
        yield
    finally:
        for p, h in zip(params, held):
            torch.utils.swap_tensors(p, h)


@torch.no_grad()
def cast_parameters(parts: list[nn.Module], dtype: torch.dtype) -> None:
    """Cast every floating-point parameter to `dtype` in place (same Parameter objects, so optimizers, tied weights
    and DTensor placements are kept); buffers (RoPE tables, masks) stay as they are."""
    for part in parts:
        for p in part.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                torch.utils.swap_tensors(p, nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))


def build_optimizers(parts: list[nn.Module], cfg: JobConfig, mesh: DeviceMesh, zero_one: bool) -> list[Any]:
    cls = ZeroOneOptimizer if zero_one else LocalOptimizer
    return [cls(part, cfg, mesh) for part in parts]
