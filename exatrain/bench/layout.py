"""One parallel layout of a job, as the planner, the memory model and the time model see it.

A `Layout` is the handful of knobs the planner searches over (degrees, schedule, engine, micro-batch,
activation checkpointing); everything else (model, sequence, global batch, dtype) comes from the
job config. `to_config` writes a layout back into a `JobConfig` exactly as a user would, and
`check` runs the trainer's own validator on it, so the planner can never propose a layout that
`exatrain train` would refuse.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from exatrain.config import ConfigError, JobConfig
from exatrain.parallel.dims import ParallelDims

AC_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """tp·pp·dp_shard·dp_replicate ranks; `micro_batch` sequences per forward/backward (one pipeline
    micro-batch under PP). zero_stage: native 2/3 = FSDP2 (gather kept until backward / resharded after
    forward), native 1 = ZeRO-1 (replicated parameters and gradients, optimizer states sharded over
    dp_shard; composes with TP and PP: the Frontier paper's layout); deepspeed 1/2/3."""

    tp: int = 1
    pp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    virtual_stages: int = 1
    schedule: str = "1F1B"
    engine: str = "native"
    zero_stage: int = 3
    micro_batch: int = 1
    activation_checkpointing: str = "none"
    sequence_parallel: bool = True

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def sp(self) -> bool:
        """Sequence parallelism is only in effect with tensor parallelism."""
        return self.sequence_parallel and self.tp > 1

    @property
    def sharding(self) -> str:
        """What is sharded over data-parallel ranks: none | zero1 | zero2 | zero3 | fsdp2 | fsdp3."""
        if self.dp == 1:
            return "none"
        if self.engine == "deepspeed":
            return f"zero{self.zero_stage}"
        if self.dp_shard == 1:
            return "none"  # native with dp_shard=1: plain replication over dp_replicate, whatever zero_stage says
        return "zero1" if self.zero_stage == 1 else f"fsdp{self.zero_stage}"

    def microbatches(self, global_batch: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (pipeline micro-batches under PP,
        gradient-accumulation steps without)."""
        return global_batch // (self.dp * self.micro_batch)

    def describe(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.pp > 1:
            parts.append(f"{self.schedule}" + (f"(v{self.virtual_stages})" if self.virtual_stages > 1 else ""))
        if self.dp_replicate > 1:
            parts.append(f"rep{self.dp_replicate}")
        parts.append(f"dp{self.dp_shard}" if self.dp_replicate == 1 else f"shard{self.dp_shard}")
        parts.append({"none": "", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp2": "FSDP(z2)",
                      "fsdp3": "FSDP(z3)"}[self.sharding] + ("/ds" if self.engine == "deepspeed" else ""))
        parts.append(f"mb{self.micro_batch}")
        parts.append(f"ac={self.activation_checkpointing}")
        if self.tp > 1 and not self.sequence_parallel:
            parts.append("no-sp")
        return " ".join(p for p in parts if p and p != "/ds")


def from_config(cfg: JobConfig, world_size: int) -> Layout:
    """The layout a job config describes (the -1 degree inferred by the trainer's validator)."""
    dims = ParallelDims.from_config(cfg, world_size)
    p, t = cfg.parallel, cfg.train
    mb = t.micro_batch // dims.pp_microbatches if dims.pp > 1 else t.micro_batch
    return Layout(tp=dims.tp, pp=dims.pp, dp_shard=dims.dp_shard, dp_replicate=dims.dp_replicate,
                  virtual_stages=dims.virtual_stages, schedule=p.pp_schedule, engine=p.engine,
                  zero_stage=p.zero_stage, micro_batch=mb, activation_checkpointing=t.activation_checkpointing,
                  sequence_parallel=p.sequence_parallel)


def to_config(cfg: JobConfig, layout: Layout) -> JobConfig:
    """`cfg` with the layout written into it. Under PP one schedule step covers the whole per-rank batch
    (train.micro_batch = global_batch / dp, split into pp_microbatches pipeline micro-batches);
    without PP train.micro_batch is the layout's micro-batch and the rest is gradient accumulation."""
    out = copy.deepcopy(cfg)
    p, t = out.parallel, out.train
    if out.model.vocab_size <= 0:
        out.model.vocab_size = out.data.tokenizer.vocab_size
    p.tp, p.pp, p.dp_shard, p.dp_replicate = layout.tp, layout.pp, layout.dp_shard, layout.dp_replicate
    p.engine, p.zero_stage, p.sequence_parallel = layout.engine, layout.zero_stage, layout.sequence_parallel
    p.pp_schedule, p.pp_virtual_stages, p.pp_stage_layers = layout.schedule, layout.virtual_stages, []
    t.activation_checkpointing = layout.activation_checkpointing
    if layout.pp > 1:
        t.micro_batch = t.global_batch // layout.dp
        p.pp_microbatches = layout.microbatches(t.global_batch)
    else:
        t.micro_batch = layout.micro_batch
        p.pp_microbatches = 0
    return out


def overrides(cfg: JobConfig, layout: Layout) -> list[str]:
    """`to_config` as dotlist overrides, for a command line (`exatrain train CONFIG ...`)."""
    out = to_config(cfg, layout)
    p, t = out.parallel, out.train
    return [f"parallel.tp={p.tp}", f"parallel.pp={p.pp}", f"parallel.dp_shard={p.dp_shard}",
            f"parallel.dp_replicate={p.dp_replicate}", f"parallel.engine={p.engine}", f"parallel.zero_stage={p.zero_stage}",
            f"parallel.sequence_parallel={str(p.sequence_parallel).lower()}", f"parallel.pp_schedule={p.pp_schedule}",
            f"parallel.pp_virtual_stages={p.pp_virtual_stages}", f"parallel.pp_microbatches={p.pp_microbatches}",
            "parallel.pp_stage_layers=[]", f"train.micro_batch={t.micro_batch}",
            f"train.global_batch={t.global_batch}", f"train.activation_checkpointing={t.activation_checkpointing}"]


def check(cfg: JobConfig, layout: Layout) -> str | None:
    """None when the trainer accepts `layout` for `cfg`, else the validator's message."""
    if cfg.train.global_batch % (layout.dp * layout.micro_batch):
        return (f"train.global_batch={cfg.train.global_batch} is not a multiple of micro_batch={layout.micro_batch}"
                f" x dp={layout.dp}")
    try:
        ParallelDims.from_config(to_config(cfg, layout), layout.world)
    except ConfigError as exc:
        return str(exc)
    return None
