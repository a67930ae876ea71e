"""The training engine: parallelises a meta-device model for a layout and runs optimizer steps.

One code path serves every layout, a single process included: split into pipeline stages,
tensor-parallel plans, activation checkpointing, compile, FSDP2, then materialise. The loss of
a step is sum(token CE over the global batch) / global label count, and data-parallel
gradients are summed, so loss, gradients and updates equal one process running the whole
global batch, whatever the layout and gradient-accumulation split.

Initial weights ("parallel.init"):
  full     every rank builds the full model on CPU from train.seed with `materialize` and keeps
           its slice of each tensor: bit-identical to the single-process init for any layout
           (host memory: one full fp32 copy per rank; fine up to a few billion parameters).
  sharded  meta -> shard -> allocate only the local shards -> init in place from train.seed:
           memory O(params / ranks), reproducible for a given layout but not equal across layouts.

Precision: train.dtype=bf16 uses FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 sharded master
weights and fp32 gradient reduction) when data parallelism is on, else bf16 autocast; the loss is
always computed in fp32. train.compile compiles each block; under TP the embedding output is
cloned to avoid torch 2.13's TP+compile gradient bug (DESIGN.md §11), and the AOTAutograd cache is
turned off because its warm hits give wrong TP+SP gradients (cold compiles are exact).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from dataclasses import dataclass
from typing import Protocol

import torch
import torch._functorch.config
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import loss_parallel

from exatrain.config import JobConfig
from exatrain.model.llama import materialize
from exatrain.parallel.activation_checkpoint import apply_activation_checkpointing
from exatrain.parallel.data_parallel import apply_fsdp, dp_mesh_of
from exatrain.parallel.dims import SPLIT_BACKWARD_SCHEDULES, V_SCHEDULES, ParallelDims
from exatrain.parallel.pipeline import build_schedule, forward_only, split_model
from exatrain.parallel.tensor_parallel import apply_tensor_parallel
from exatrain.train.mup import param_groups

log = logging.getLogger("exatrain")

IGNORE_INDEX = -100
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")
_OPTIM_SD = StateDictOptions(flatten_optimizer_state_dict=True)


class Batch(Protocol):
    """What the engine reads from a data-loader batch: (B, T) long tensors, labels -100 = ignored."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None
    doc_ids: torch.Tensor | None


@dataclass(frozen=True)
class StepStats:
    """Global values of one optimizer step, identical on every rank (grad_norm is before clipping)."""

    loss: float
    grad_norm: float
    skipped: bool = False  # non-finite gradients: no optimizer step was taken


def clean_fqn(name: str) -> str:
    """Parameter name without wrapper prefixes (AC, compile): the layout-independent FQN."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy in fp32; works on vocab-sharded DTensor logits under loss_parallel."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def model_inputs(b: Batch, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tokens and the model's keyword inputs on `device`; positions are always given (pipeline stages
    split every keyword tensor into micro-batches)."""
    tokens = b.tokens.to(device)
    positions = b.positions if b.positions is not None else torch.arange(tokens.shape[1]).expand_as(tokens)
    kwargs = {"positions": positions.to(device)}
    if b.doc_ids is not None:
        kwargs["doc_ids"] = b.doc_ids.to(device)
    return tokens, kwargs


def build_optimizer(part: nn.Module, cfg: JobConfig) -> torch.optim.Optimizer:
    groups = param_groups(part, cfg)
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


def full_init_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the single-process init, by FQN (tied weights under both names)."""
    ref = materialize(copy.deepcopy(model), "cpu", seed)
    return {**dict(ref.named_parameters(remove_duplicate=False)), **dict(ref.named_buffers(remove_duplicate=False))}


@torch.no_grad()
def load_full_tensors(part: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy each rank's slice of the full tensors into the part's (possibly DTensor) storage, without comms."""
    for name, t in itertools.chain(part.named_parameters(), part.named_buffers()):
        src = full[clean_fqn(name)].to(t.device)
        if isinstance(t, DTensor):
            t.to_local().copy_(distribute_tensor(src, t.device_mesh, t.placements, src_data_rank=None).to_local())
        else:
            t.copy_(src)


def init_sharded(part: nn.Module, stage: int, seed: int, mesh: DeviceMesh, dims: ParallelDims,
                 device: torch.device) -> None:
    """Initialise the local shards in place. Different shards (stage, dp_shard, tp coordinates) draw from
    different seeds; replicas (dp_replicate) share one, so they stay identical. Deterministic per layout."""
    shard = (stage * dims.dp_shard + mesh.get_local_rank("dp_shard")) * dims.tp + mesh.get_local_rank("tp")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 1000003 * shard)
        part.init_weights()


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


def grad_norm(parts: list[nn.Module], mesh: DeviceMesh, device: torch.device) -> torch.Tensor:
    """Global L2 norm of all gradients with one all-reduce over the world (after `finalize_grads`).

    Each rank adds the squares of the gradient shards it holds; a tensor that is not sharded over a
    data/tensor mesh dim is replicated there, so only that dim's rank 0 counts it. Pipeline stages
    hold disjoint parameters and all count.
    """
    coords = {d: mesh.get_local_rank(d) for d in ("dp_replicate", "dp_shard", "tp")}
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for part in parts:
        for p in part.parameters():
            g = p.grad
            if g is None:
                continue
            sharded: set[str] = set()
            if isinstance(g, DTensor):
                sharded = {d for d, pl in zip(g.device_mesh.mesh_dim_names, g.placements) if not pl.is_replicate()}
                g = g.to_local()
            if all(c == 0 for d, c in coords.items() if d not in sharded):
                sq += torch.linalg.vector_norm(g, dtype=torch.float64) ** 2
    if mesh.size() > 1:
        dist.all_reduce(sq)
    return sq.sqrt().float().cpu()


class NativeEngine:
    """FSDP2 + DTensor TP + torch pipelining; `model_parts` holds this rank's stages (1 without virtual stages)."""

    def __init__(self, model: nn.Module, cfg: JobConfig, dims: ParallelDims, mesh: DeviceMesh,
                 device: torch.device):
        self.cfg, self.dims, self.mesh, self.device = cfg, dims, mesh, device
        p, t = cfg.parallel, cfg.train
        self.loss_parallel = dims.tp_enabled and p.loss_parallel
        self.bf16 = t.dtype == "bf16"
        full = full_init_state(model, t.seed) if p.init == "full" else None

        if dims.pp_enabled:
            self.stage_ids, parts = split_model(model, dims, mesh, p.pp_schedule, list(p.pp_stage_layers))
        else:
            self.stage_ids, parts = [0], [model]
        split_backward = dims.pp_enabled and p.pp_schedule in SPLIT_BACKWARD_SCHEDULES
        zero_stage = p.zero_stage
        if split_backward and dims.dp_enabled and zero_stage == 3:
            # torch 2.13: the split (input/weight) backward of zero-bubble schedules yields wrong weight
            # gradients when FSDP re-shards after forward; keeping parameters gathered (ZeRO-2) is exact.
            log.warning("parallel.pp_schedule=%s: FSDP keeps parameters gathered until backward "
                        "(zero_stage 3 runs as 2)", p.pp_schedule)
            zero_stage = 2
        for stage, part in zip(self.stage_ids, parts):
            if dims.tp_enabled:
                apply_tensor_parallel(part, mesh["tp"], p.sequence_parallel, self.loss_parallel,
                                      compile_workaround=t.compile)
            apply_activation_checkpointing(part, t.activation_checkpointing, split_backward)
            if t.compile:
                if dims.tp_enabled:
                    # torch 2.13: a warm AOTAutograd cache hit returns wrong TP+SP block gradients (a cold
                    # compile is exact); the FX graph cache stays on, so recompiles remain fast.
                    torch._functorch.config.enable_autograd_cache = False
                for block in part.layers.values():
                    block.compile()
            if dims.dp_enabled:
                apply_fsdp(part, dp_mesh_of(mesh, dims), zero_stage, torch.bfloat16 if self.bf16 else None)
            part.to_empty(device=device)
            part.tie_weights()  # to_empty unties plain (non-DTensor) parameters
            if full is not None:
                load_full_tensors(part, full)
            else:
                init_sharded(part, stage, t.seed, mesh, dims, device)
        self.model_parts = parts
        self.optimizers = [build_optimizer(part, cfg) for part in parts]
        self.has_last_stage = dims.n_stages - 1 in self.stage_ids
        self.reports_loss = self.has_last_stage and mesh.get_local_rank("tp") == 0
        self.pp_group = mesh.get_group("pp") if dims.pp_enabled else None
        self._n_labels = 1
        self.schedule = (build_schedule(parts, self.stage_ids, dims, mesh, device, p.pp_schedule, self._pp_loss)
                         if dims.pp_enabled else None)

    def _context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if self.loss_parallel:
            stack.enter_context(loss_parallel())
        if self.bf16 and not self.dims.dp_enabled:
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
            return _local(loss.detach())
        schedule = self.cfg.parallel.pp_schedule
        if not train and schedule in V_SCHEDULES:
            out = forward_only(self.model_parts, self.stage_ids, self.dims, schedule, self.pp_group, tokens, kwargs)
            return _local(ce_sum(out, labels)) if out is not None else torch.zeros(())
        losses: list[torch.Tensor] = []
        args = (tokens,) if 0 in self.stage_ids else ()
        target = labels if self.has_last_stage else None
        if train:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        else:
            self.schedule.eval(*args, target=target, losses=losses, **kwargs)
        return sum((_local(x.detach()) for x in losses), torch.zeros(()))

    def _global_sum(self, local: torch.Tensor) -> float:
        """Sum of the loss over data-parallel ranks, counted once per (tp, pp) group."""
        value = local.double().cpu() if self.reports_loss else torch.zeros((), dtype=torch.float64)
        if dist.is_initialized() and self.dims.distributed:
            dist.all_reduce(value)
        return value.item()

    def train_step(self, micro_batches: list[Batch], n_label_tokens: int, lr: float) -> StepStats:
        self._n_labels = max(n_label_tokens, 1)
        local = torch.zeros(())
        for part in self.model_parts:
            part.train()
        with self._context():
            for b in micro_batches:
                local = local + self._run(b, train=True).float().cpu()
        finalize_grads(self.model_parts)
        norm = grad_norm(self.model_parts, self.mesh, self.device)
        if not torch.isfinite(norm):
            # The norm is global, so every rank skips together and weights and optimizer state stay intact.
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            return StepStats(loss=self._global_sum(local), grad_norm=norm.item(), skipped=True)
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            coef = min(1.0, clip / (norm.item() + 1e-6))
            if coef < 1.0:
                for part in self.model_parts:
                    for p in part.parameters():
                        if p.grad is not None:
                            p.grad.mul_(coef)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            opt.step()
            opt.zero_grad(set_to_none=True)
        return StepStats(loss=self._global_sum(local), grad_norm=norm.item())

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> tuple[float, int]:
        self._n_labels = 1
        for part in self.model_parts:
            part.eval()
        local, count = torch.zeros(()), 0
        with self._context():
            for b in micro_batches:
                local = local + self._run(b, train=False).float().cpu()
                count += int((b.labels != IGNORE_INDEX).sum())
        total = self._global_sum(local)
        n = self._global_sum(torch.tensor(float(count)))
        return total, int(round(n))

    def state_dict(self) -> dict[str, dict]:
        """{"model": FQN -> tensor, "optim": flattened FQN-keyed optimizer state}; DTensors stay sharded."""
        model, optim = {}, {}
        for part, opt in zip(self.model_parts, self.optimizers):
            model.update(get_model_state_dict(part))
            optim.update(get_optimizer_state_dict(part, opt, options=_OPTIM_SD))
        return {"model": model, "optim": optim}

    def load_state_dict(self, sd: dict[str, dict]) -> None:
        for part, opt in zip(self.model_parts, self.optimizers):
            own = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: sd["model"][k] for k in own})
            set_optimizer_state_dict(part, opt, sd["optim"], options=_OPTIM_SD)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x.to_local() if isinstance(x, DTensor) else x


def build_engine(model: nn.Module, cfg: JobConfig, dims: ParallelDims, mesh: DeviceMesh,
                 device: torch.device | str):
    """Parallelise `model` (built on meta by the trainer) for `dims` and return the engine.

    The layout is re-validated here because the trainer fills model.vocab_size after `from_config`.
    """
    ParallelDims.from_config(cfg, dims.world_size)
    device = torch.device(device)
    log.info("parallel layout: %s, engine %s", dims.describe(), cfg.parallel.engine)
    if cfg.parallel.engine == "deepspeed":
        from exatrain.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, dims, mesh, device)
    return NativeEngine(model, cfg, dims, mesh, device)
