"""Parallel degrees of a job and the one DeviceMesh that carries them.

Every layout rule is checked in `ParallelDims.from_config`, before any process group exists,
so a bad layout fails in milliseconds on every rank with a message saying what to change
instead of hanging or crashing inside a collective minutes later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from exatrain.config import ConfigError, JobConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
V_SCHEDULES = ("ZBVZeroBubble",)
SPLIT_BACKWARD_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    virtual_stages: int = 1
    pp_microbatches: int = 1

    @property
    def dp_size(self) -> int:
        """Data-parallel degree seen by the data loader (replicate x shard)."""
        return self.dp_replicate * self.dp_shard

    @property
    def n_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_config(cls, cfg: JobConfig, world_size: int) -> ParallelDims:
        """Infer the -1 degree and validate the whole layout against `world_size` and the model."""
        p, m, t = cfg.parallel, cfg.model, cfg.train
        degrees = {k: getattr(p, k) for k in MESH_DIMS}
        degrees = _infer_degrees(degrees, world_size)
        pp, dp_rep, dp_shard, tp = (degrees[k] for k in MESH_DIMS)
        dp = dp_rep * dp_shard
        layout = f"pp={pp} dp_replicate={dp_rep} dp_shard={dp_shard} tp={tp}"

        if tp > 1:
            kv = m.n_kv_heads or m.n_heads
            _check(m.n_heads % tp == 0, f"parallel.tp={tp} must divide model.n_heads={m.n_heads}: "
                   f"choose tp from {_divisors(m.n_heads)}")
            _check(kv % tp == 0, f"parallel.tp={tp} must divide the KV heads (model.n_kv_heads={kv}): "
                   f"choose tp from {_divisors(kv)} or raise model.n_kv_heads")
            _check(m.ffn_hidden % tp == 0, f"parallel.tp={tp} must divide the FFN hidden size model.ffn_hidden="
                   f"{m.ffn_hidden}: change model.ffn_hidden or model.multiple_of")
            _check(m.vocab_size % tp == 0,
                   f"parallel.tp={tp} must divide model.vocab_size={m.vocab_size} (embedding/output are "
                   f"vocab-sharded): set model.vocab_multiple_of to a multiple of {tp} to pad the vocabulary")
            if p.sequence_parallel:
                _check(cfg.data.seq_len % tp == 0, f"data.seq_len={cfg.data.seq_len} must be a multiple of "
                       f"parallel.tp={tp} with sequence parallelism; change it or set parallel.sequence_parallel=false")

        v = p.pp_virtual_stages
        _check(v >= 1, f"parallel.pp_virtual_stages={v} must be >= 1")
        n_mb = 1
        if pp > 1:
            _check(not m.tie_embeddings, f"parallel.pp={pp}: tied embeddings cannot be split across pipeline "
                   "stages (the embedding lives on the first stage, the output head on the last); "
                   "set model.tie_embeddings=false")
            sched = p.pp_schedule
            if sched in SINGLE_STAGE_SCHEDULES:
                _check(v == 1, f"parallel.pp_schedule={sched} runs one stage per rank; set "
                       "parallel.pp_virtual_stages=1 or use Interleaved1F1B/InterleavedZeroBubble/ZBVZeroBubble")
            elif sched in V_SCHEDULES:
                _check(v == 2, f"parallel.pp_schedule={sched} needs exactly 2 stages per rank; "
                       "set parallel.pp_virtual_stages=2")
            n_stages = pp * v
            if p.pp_stage_layers:
                sl = list(p.pp_stage_layers)
                _check(len(sl) == n_stages, f"parallel.pp_stage_layers has {len(sl)} entries but there are "
                       f"{n_stages} stages (pp={pp} x pp_virtual_stages={v}): give one layer count per stage")
                _check(all(n >= 0 for n in sl), "parallel.pp_stage_layers entries must be >= 0")
                _check(sum(sl) == m.n_layers, f"parallel.pp_stage_layers sums to {sum(sl)} but model.n_layers="
                       f"{m.n_layers}: the counts must add up to the number of layers")
            else:
                _check(m.n_layers >= n_stages, f"model.n_layers={m.n_layers} cannot fill {n_stages} pipeline "
                       f"stages (pp={pp} x pp_virtual_stages={v}): lower parallel.pp or pp_virtual_stages, "
                       "or give parallel.pp_stage_layers explicitly")
            n_mb = p.pp_microbatches or t.micro_batch
            _check(t.micro_batch % n_mb == 0, f"parallel.pp_microbatches={n_mb} must divide train.micro_batch="
                   f"{t.micro_batch} (each micro-batch is split into pipeline micro-batches)")
            if sched == "1F1B":
                _check(n_mb >= pp, f"parallel.pp_schedule=1F1B needs parallel.pp_microbatches >= pp={pp}, got "
                       f"{n_mb}: raise pp_microbatches (and train.micro_batch) or use GPipe")
            if sched in ("Interleaved1F1B", "InterleavedZeroBubble"):
                _check(n_mb % pp == 0, f"parallel.pp_schedule={sched} needs parallel.pp_microbatches to be a "
                       f"multiple of pp={pp}, got {n_mb}")
        else:
            _check(v == 1, f"parallel.pp_virtual_stages={v} needs parallel.pp > 1")
            _check(not p.pp_stage_layers, "parallel.pp_stage_layers is set but parallel.pp=1: remove it")

        _check(t.global_batch % (t.micro_batch * dp) == 0,
               f"train.global_batch={t.global_batch} must be a multiple of train.micro_batch={t.micro_batch} x "
               f"data-parallel size {dp} (dp_replicate={dp_rep} x dp_shard={dp_shard}) = {t.micro_batch * dp}: "
               f"change global_batch, micro_batch or the layout")

        if p.engine == "deepspeed":
            _check(tp == 1 and pp == 1, f"parallel.engine=deepspeed supports data parallelism only here "
                   f"(got {layout}); set parallel.tp=1 parallel.pp=1 or use parallel.engine=native")
            _check(dp_rep == 1, "parallel.engine=deepspeed has no replicate dimension: put all data-parallel "
                   "ranks in parallel.dp_shard and set parallel.dp_replicate=1")
        elif p.zero_stage == 1 and dp > 1:
            _check(dp_rep == 1, "parallel.zero_stage=1 (ZeRO-1) shards optimizer states over parallel.dp_shard; "
                   f"set parallel.dp_replicate=1 and parallel.dp_shard={dp} (got dp_replicate={dp_rep})")
        if t.compile and p.engine == "deepspeed":
            raise ConfigError("train.compile=true is not supported with parallel.engine=deepspeed; "
                              "set train.compile=false or use parallel.engine=native")
        return cls(pp, dp_rep, dp_shard, tp, world_size, v if pp > 1 else 1, n_mb)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """One mesh with dims (pp, dp_replicate, dp_shard, tp); size-1 dims are kept so names always resolve.

        At world size 1 without a process group a private single-rank gloo group is created, so the same
        code path (and DTensor/DCP utilities) work in a plain `python` process.
        """
        if not dist.is_initialized():
            if self.world_size != 1:
                raise RuntimeError(f"world_size={self.world_size} but torch.distributed is not initialised; "
                                   "call exatrain.launch.bootstrap.init_distributed first")
            backend = "gloo" if device_type == "cpu" else f"cpu:gloo,{device_type}:nccl"
            device_id = None if device_type == "cpu" else torch.device(device_type, torch.cuda.current_device())
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(f"layout was validated for world_size={self.world_size} but the process group "
                               f"has {dist.get_world_size()} ranks")
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)

    def dp_rank(self, mesh: DeviceMesh) -> int:
        """This rank's index among the data-parallel ranks (what the data loader shards by)."""
        return mesh.get_local_rank("dp_replicate") * self.dp_shard + mesh.get_local_rank("dp_shard")

    def describe(self) -> str:
        return (f"pp={self.pp}(v={self.virtual_stages}, microbatches={self.pp_microbatches}) "
                f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} tp={self.tp} world={self.world_size}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _infer_degrees(degrees: dict[str, int], world_size: int) -> dict[str, int]:
    _check(world_size >= 1, f"world_size={world_size} must be >= 1")
    unknown = [k for k, v in degrees.items() if v == -1]
    _check(len(unknown) <= 1, f"only one of parallel.{{tp,pp,dp_shard,dp_replicate}} may be -1 (infer), got "
           f"{', '.join('parallel.' + k for k in unknown)}")
    known = math.prod(v for v in degrees.values() if v != -1)
    if unknown:
        _check(world_size % known == 0, f"world size {world_size} is not divisible by the product of the fixed "
               f"degrees ({_fmt(degrees)} = {known}): change them so their product divides {world_size}")
        degrees = {**degrees, unknown[0]: world_size // known}
    else:
        _check(known == world_size, f"parallel degrees {_fmt(degrees)} multiply to {known} but the world size is "
               f"{world_size}: make the product equal the number of processes, or set one degree "
               "(usually parallel.dp_shard) to -1 to infer it")
    return degrees


def _fmt(degrees: dict[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in degrees.items() if v != -1) or "none"

