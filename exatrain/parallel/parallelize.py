"""The one build sequence that turns a meta-device model into this rank's trainable parts.

    convert -> pipeline split -> per part: TP/SP -> activation checkpointing -> compile -> FSDP -> init

1. convert: `model.converters` swap or add modules (FP8 / simulated-precision Linears, SeND masks) on
   the whole meta model, so every later step sees the converted modules (exatrain.model.convert).
2. pipeline split: this rank's stages, cut from layer ranges (exatrain.parallel.pipeline).
3. tensor + sequence parallelism: DTensor plans over the `tp` mesh dim (exatrain.parallel.tensor_parallel).
4. activation checkpointing per block (exatrain.parallel.activation_checkpoint).
5. torch.compile per block.
6. FSDP2 over the data-parallel mesh dims (exatrain.parallel.data_parallel), unless the job uses
   ZeRO-1 (`parallel.zero_stage=1`: parameters stay replicated, the optimizer shards its states;
   exatrain.engine.optimizer). With train.dtype=bf16_params FSDP2 gathers bf16 parameters
   from fp32 shards; without FSDP the engine casts the parameters to bf16 after building its optimizer,
   whose fp32 master copies keep the full-precision weights.
7. init: allocate the local shards and fill them ("parallel.init"):
     full     every rank builds the full model on CPU from train.seed with `materialize` and keeps
              its slice of each tensor: bit-identical to the single-process init for any layout
              (host memory: one full fp32 copy per rank; fine up to a few billion parameters).
     sharded  allocate only the local shards and init them in place from train.seed: memory
              O(params / ranks), reproducible for a given layout but not equal across layouts.

torch 2.13 caveats handled here: TP + compile needs the embedding output cloned (DESIGN.md §11) and
the AOTAutograd cache off (its warm hits give wrong TP+SP gradients; cold compiles are exact); the
split backward of zero-bubble schedules gives wrong weight gradients when FSDP re-shards after
forward, so those schedules keep parameters gathered (zero_stage 3 runs as 2).
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
import torch._functorch.config
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from exatrain.config import JobConfig
from exatrain.engine.base import clean_fqn
from exatrain.interop.hf import load_init_from
from exatrain.model.convert import convert_model
from exatrain.model.llama import materialize
from exatrain.parallel.activation_checkpoint import apply_activation_checkpointing
from exatrain.parallel.data_parallel import apply_fsdp, dp_mesh_of
from exatrain.parallel.dims import SPLIT_BACKWARD_SCHEDULES, ParallelDims
from exatrain.parallel.pipeline import split_model
from exatrain.parallel.tensor_parallel import apply_tensor_parallel

log = logging.getLogger("exatrain")


def uses_fsdp(cfg: JobConfig, dims: ParallelDims) -> bool:
    return dims.dp_enabled and cfg.parallel.zero_stage != 1


def parallelize(model: nn.Module, cfg: JobConfig, dims: ParallelDims, mesh: DeviceMesh,
                device: torch.device) -> tuple[list[int], list[nn.Module]]:
    """This rank's pipeline stage indices and their parallelised, initialised parts."""
    p, t = cfg.parallel, cfg.train
    convert_model(model, cfg)
    full = full_init_state(model, t.seed) if p.init == "full" else None
    if dims.pp_enabled:
        stage_ids, parts = split_model(model, dims, mesh, p.pp_schedule, list(p.pp_stage_layers))
    else:
        stage_ids, parts = [0], [model]
    split_backward = dims.pp_enabled and p.pp_schedule in SPLIT_BACKWARD_SCHEDULES
    zero_stage = p.zero_stage
    if split_backward and dims.dp_enabled and zero_stage == 3:
        log.warning("parallel.pp_schedule=%s: FSDP keeps parameters gathered until backward "
                    "(zero_stage 3 runs as 2)", p.pp_schedule)
        zero_stage = 2
    for stage, part in zip(stage_ids, parts):
        if dims.tp_enabled:
            apply_tensor_parallel(part, mesh["tp"], p.sequence_parallel, p.loss_parallel,
                                  compile_workaround=t.compile)
        apply_activation_checkpointing(part, t.activation_checkpointing, split_backward)
        if t.compile:
            if dims.tp_enabled:
                torch._functorch.config.enable_autograd_cache = False
            for block in part.layers.values():
                block.compile()
        if uses_fsdp(cfg, dims):
            apply_fsdp(part, dp_mesh_of(mesh, dims), zero_stage, fsdp_param_dtype(t.dtype))
        part.to_empty(device=device)
        part.tie_weights()  # to_empty unties plain (non-DTensor) parameters
        if full is not None:
            load_full_tensors(part, full)
        else:
            init_sharded(part, stage, t.seed, mesh, dims, device)
    return stage_ids, parts


def fsdp_param_dtype(dtype: str) -> torch.dtype | None:
    """train.dtype=bf16_params under FSDP2: bf16 all-gathered parameters, fp32 sharded master weights and fp32
    gradient reduction (MixedPrecisionPolicy). bf16 (autocast) keeps fp32 parameters; exatrain.engine.native."""
    return torch.bfloat16 if dtype == "bf16_params" else None


def full_init_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the single-process init, by FQN (tied weights under both names);
    model.init_from's weights replace the random ones."""
    ref = materialize(copy.deepcopy(model), "cpu", seed)
    load_init_from(ref)
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
