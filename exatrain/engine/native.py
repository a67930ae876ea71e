"""The native engine (`parallel.engine=native`): FSDP2 or ZeRO-1 + DTensor TP + torch pipelining on one
DeviceMesh.

One code path serves every layout, a single process included: exatrain.parallel.parallelize builds
this rank's parts; this module runs steps on them. `model_parts` holds this rank's pipeline stages
(one without virtual stages). Data parallelism is FSDP2 (`parallel.zero_stage` 2 or 3) or ZeRO-1
(`zero_stage=1`: replicated parameters, sharded optimizer states; exatrain.engine.optimizer).

Precision (train.dtype), the same on every layout; the loss is always computed in fp32:
  fp32         fp32 parameters and compute.
  bf16         autocast: bf16 matmuls, fp32 parameters, gradients and optimizer.
  bf16_params  bf16 parameters and compute with fp32 master weights: under FSDP2 its MixedPrecisionPolicy
               (fp32 shards, bf16 all-gathers, fp32 gradient reduce-scatter); otherwise the parameters are
               cast to bf16 and the ZeRO-1 optimizer keeps fp32 master slices (with no data parallelism its
               "slice" is the whole tensor), so updates are computed in fp32 and rounded once into the weights.
Precision of the GEMMs themselves (FP8, simulated formats) is a model converter (exatrain.train.precision).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from exatrain.config import JobConfig
from exatrain.data.batch import Batch
from exatrain.engine.base import StepStats, ce_sum, local, model_inputs
from exatrain.engine.optimizer import build_optimizers, cast_parameters
from exatrain.model.convert import converters_of
from exatrain.parallel.dims import V_SCHEDULES, ParallelDims
from exatrain.parallel.parallelize import parallelize, uses_fsdp
from exatrain.parallel.pipeline import build_schedule, forward_only
from exatrain.registry import ENGINES


def finalize_grads(parts: list[nn.Module]) -> None:
    """Give every DTensor gradient its parameter's placements before clipping and the optimizer step.

    Under sequence parallelism the norm weights' gradients come out Partial (one all-reduce here instead
    of one per optimizer op), and DTensor's embedding backward yields a replicated full-vocabulary
    gradient (sliced locally to this rank's rows, no communication).
    """
    for part in parts:
        for p in part.parameters():
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)


class NativeEngine:
    """FSDP2 + DTensor TP + torch pipelining; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: JobConfig, dims: ParallelDims, mesh: DeviceMesh,
                 device: torch.device):
        self.cfg, self.dims, self.mesh, self.device = cfg, dims, mesh, device
        p = cfg.parallel
        self.loss_parallel = dims.tp_enabled and p.loss_parallel
        self.autocast_bf16 = cfg.train.dtype == "bf16"
        self.stage_ids, self.model_parts = parallelize(model, cfg, dims, mesh, device)
        bf16_master = cfg.train.dtype == "bf16_params" and not uses_fsdp(cfg, dims)
        self.optimizers = build_optimizers(self.model_parts, cfg, mesh,
                                           zero_one=(dims.dp_enabled and p.zero_stage == 1) or bf16_master)
        if bf16_master:  # after the optimizer took its fp32 master copies
            cast_parameters(self.model_parts, torch.bfloat16)
        self.post_step_hooks = [c.after_optimizer_step for c in converters_of(cfg) if c.after_optimizer_step]
        self.has_last_stage = dims.n_stages - 1 in self.stage_ids
        self.reports_loss = self.has_last_stage and mesh.get_local_rank("tp") == 0
        self.pp_group = mesh.get_group("pp") if dims.pp_enabled else None
        self._n_labels = 1
        # Given the step's global loss before the optimizer step, True drops the update (train.spike_policy=skip).
        self.skip_if: Callable[[float], bool] | None = None
        self.schedule = (build_schedule(self.model_parts, self.stage_ids, dims, mesh, device, p.pp_schedule,
                                        self._pp_loss) if dims.pp_enabled else None)

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.loss_parallel:
            stack.enter_context(loss_parallel())
        if self.autocast_bf16:
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        return stack

    def _pp_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ce_sum(logits, labels) / self._n_labels

    def _run(self, b: Batch, train: bool) -> torch.Tensor:
        """Forward (+ backward when training) one micro-batch; returns this rank's share of the loss."""
        tokens, kwargs = model_inputs(b, self.device)
        labels = b.labels.to(self.device)
        if self.schedule is None:
            loss = ce_sum(self.model_parts[0](tokens, **kwargs), labels) / self._n_labels
            if train:
                loss.backward()
            return local(loss.detach())
        schedule = self.cfg.parallel.pp_schedule
        if not train and schedule in V_SCHEDULES:
            out = forward_only(self.model_parts, self.stage_ids, self.dims, schedule, self.pp_group, tokens, kwargs)
            return local(ce_sum(out, labels)) if out is not None else torch.zeros(())
        losses: list[torch.Tensor] = []
        args = (tokens,) if 0 in self.stage_ids else ()
        target = labels if self.has_last_stage else None
        if train:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        else:
            self.schedule.eval(*args, target=target, losses=losses, **kwargs)
        return sum((local(x.detach()) for x in losses), torch.zeros(()))

    def _global_sum(self, value: torch.Tensor) -> float:
        """Sum of the loss over data-parallel ranks, counted once per (tp, pp) group."""
        value = value.double().cpu() if self.reports_loss else torch.zeros((), dtype=torch.float64)
        if dist.is_initialized() and self.dims.distributed:
            dist.all_reduce(value)
        return value.item()

    def train_step(self, micro_batches: list[Batch], n_label_tokens: int, lr: float) -> StepStats:
        self._n_labels = max(n_label_tokens, 1)
        loss = torch.zeros(())
        for part in self.model_parts:
            part.train()
        with self._context():
            for b in micro_batches:
                loss = loss + self._run(b, train=True).float().cpu()
        finalize_grads(self.model_parts)
        for opt in self.optimizers:
            opt.reduce_grads()
        norm = self._grad_norm()
        total = self._global_sum(loss)
        if not math.isfinite(norm) or (self.skip_if is not None and self.skip_if(total)):
            # The norm and loss are global, so every rank skips together; weights and optimizer state stay intact.
            for opt in self.optimizers:
                opt.zero_grad()
            return StepStats(loss=total, grad_norm=norm, skipped=True)
        clip = self.cfg.optim.grad_clip
        coef = clip / (norm + 1e-6) if clip > 0 else 1.0
        for opt in self.optimizers:
            if coef < 1.0:
                opt.scale_grads(coef)
            opt.step(lr)
            opt.zero_grad()
        for hook in self.post_step_hooks:
            for part in self.model_parts:
                hook(part, self.cfg)
        return StepStats(loss=total, grad_norm=norm)

    def _grad_norm(self) -> float:
        """Global L2 norm of all gradients (before clipping) with one all-reduce over the world: each rank
        adds the squares of the gradient pieces it alone counts (exatrain.engine.optimizer)."""
        sq = sum((opt.grad_sq_sum() for opt in self.optimizers), torch.zeros((), dtype=torch.float64))
        if self.mesh.size() > 1:
            sq = sq.to(self.device)
            dist.all_reduce(sq)
        return float(sq.sqrt().float())

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> tuple[float, int]:
        self._n_labels = 1
        for part in self.model_parts:
            part.eval()
        loss, count = torch.zeros(()), 0
        with self._context():
            for b in micro_batches:
                loss = loss + self._run(b, train=False).float().cpu()
                count += b.n_labels
        total = self._global_sum(loss)
        n = self._global_sum(torch.tensor(float(count)))
        return total, int(round(n))

    def state_dict(self) -> dict[str, dict]:
        """{"model": FQN -> tensor, "optim": flattened FQN-keyed optimizer state}; DTensors stay sharded."""
        model, optim = {}, {}
        for part, opt in zip(self.model_parts, self.optimizers):
            model.update(get_model_state_dict(part))
            optim.update(opt.state_dict())
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for part, opt in zip(self.model_parts, self.optimizers):
            own = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: state["model"][k] for k in own})
            opt.load_state_dict(state["optim"])


ENGINES.register("native", NativeEngine)
