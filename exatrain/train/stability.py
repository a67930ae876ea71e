"""Stability instruments for the precision studies (DESIGN.md §7), as callbacks the `precision:` section switches on.

- `sharpness` (precision.sharpness.every > 0): every N steps and at the last step, Keskar's logit sharpness φ_ε
  of the last-token logits on fixed validation rows (exatrain.eval.sharpness, closed-form maximiser), plus
  optionally the loss increase along seeded filter-normalised weight directions (single process only). The
  forward is the engine's own `eval_loss`, run on every rank, so it works on any layout: a forward hook on the
  output head captures this rank's logits (under loss parallelism a vocabulary shard, gathered over the TP group
  for the selected rows only; under pipeline parallelism only the last stage has them), the sums are all-reduced
  over the world, and every rank logs the same numbers: `sharpness_phi`, `sharpness_ce` (the last-token CE) and
  `weight_sharpness_mean` / `weight_sharpness_max` in the step record.
- `divergence` (precision.divergence.enabled): feeds every step's global loss to a DivergenceDetector
  (exatrain.train.divergence); the first event adds `diverged_at` to that step's record, is logged, and is
  written to run_dir/divergence.json (which on_train_end always writes, diverged or not, so a grid collects one
  file per run). action=stop asks the trainer to checkpoint and end the run for good (status "stopped": a Slurm
  job does not requeue it); a resumed diverged run stops again at once.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from exatrain.config import ConfigError, DivergenceConfig, JobConfig, SharpnessConfig
from exatrain.data.batch import Batch, split_micro
from exatrain.engine.base import all_reduce_sums, last_forward_calls
from exatrain.eval.sharpness import (
    LogitSharpness,
    WeightSharpness,
    last_positions,
    max_cross_entropy_in_box,
    perturbation_sharpness,
)
from exatrain.registry import CALLBACKS
from exatrain.train.callback import Callback
from exatrain.train.divergence import DivergenceDetector

log = logging.getLogger("exatrain")

DIVERGENCE_FILE = "divergence.json"


# ---------------------------------------------------------------- sharpness through an engine


@torch.no_grad()
def engine_logit_sharpness(engine: Any, micro_batches: list[Batch], epsilon: float) -> LogitSharpness:
    """φ_ε of the engine's model on `micro_batches` (this rank's rows of a fixed global batch). Collective: every
    rank calls it with its own rows; every rank gets the global value (rows of all data-parallel ranks).

    The output-head hook keeps, per call, the logits at the few distinct last-token positions of the batch, not
    the whole (rows, T, V) output. A pipeline schedule may run one extra forward first (torch's stage metadata
    inference, on placeholder inputs), so the rows are matched to the *last* calls afterwards."""
    per_batch = [last_positions(b.labels) for b in micro_batches]
    lasts = torch.cat(per_batch)
    targets = torch.cat([b.labels[torch.arange(len(b.labels)), last.clamp(min=0)]
                         for b, last in zip(micro_batches, per_batch)])
    positions = sorted(set(lasts[lasts >= 0].tolist())) or [0]
    column = {pos: i for i, pos in enumerate(positions)}
    captured: list[tuple[torch.Tensor, Any]] = []

    def capture(mult: float):
        def hook(_module, _inputs, out):
            local = out.to_local() if isinstance(out, DTensor) else out
            picked = local[:, torch.tensor(positions, device=local.device)].float() * mult  # (n, P, V_local)
            captured.append((picked, out if isinstance(out, DTensor) else None))
        return hook

    hooks = [part.output.register_forward_hook(capture(getattr(part, "logit_mult", 1.0)))
             for part in engine.model_parts if getattr(part, "output", None) is not None]
    try:
        engine.eval_loss(micro_batches)
    finally:
        for h in hooks:
            h.remove()
    ce_sum = worst_sum = rows = 0.0
    if captured:
        captured = last_forward_calls(captured, lambda call: len(call[0]), len(lasts), "sharpness")
        keep = lasts >= 0
        picked = torch.cat([c for c, _ in captured])
        z = picked[torch.arange(len(lasts))[keep], torch.tensor([column.get(int(p), 0) for p in lasts])[keep]]
        dt = captured[-1][1]
        if dt is not None:  # vocabulary shards (loss parallelism): gather the selected rows over TP
            vocab = dt.shape[-1]
            z = DTensor.from_local(z.contiguous(), dt.device_mesh, [Shard(1)], run_check=False,
                                   shape=torch.Size([z.shape[0], vocab]), stride=(vocab, 1)).full_tensor()
        z, t = z.cpu().double(), targets[keep]  # float64: φ is a small difference of two CE sums
        if getattr(engine, "reports_loss", True):  # one rank per (tp, pp) group counts its rows
            ce_sum = float(F.cross_entropy(z, t, reduction="sum"))
            worst_sum = float(max_cross_entropy_in_box(z, t, epsilon).sum())
            rows = float(len(t))
    ce_sum, worst_sum, rows = all_reduce_sums([ce_sum, worst_sum, rows])
    return LogitSharpness.of(ce_sum / max(rows, 1.0), worst_sum / max(rows, 1.0))


@torch.no_grad()
def engine_weight_sharpness(engine: Any, micro_batches: list[Batch], n_directions: int, radius: float,
                            seed: int) -> WeightSharpness:
    """Mean token CE increase along seeded filter-normalised weight directions, through `engine.eval_loss`
    (so autocast and GEMM converters apply). Plain parameters only: a single-process engine."""
    def loss() -> float:
        total, count = engine.eval_loss(micro_batches)
        return total / max(count, 1)

    params = [p for part in engine.model_parts for p in part.parameters()]
    return perturbation_sharpness(params, loss, n_directions, radius, seed)


class Sharpness(Callback):
    """See the module docstring; config `precision.sharpness`."""

    name = "sharpness"

    def __init__(self, cfg: SharpnessConfig, world_size: int):
        if cfg.weight_directions and world_size > 1:
            raise ConfigError(f"precision.sharpness.weight_directions: weight-perturbation sharpness perturbs plain "
                              f"(unsharded) weights and runs in single-process jobs only (this one has {world_size} "
                              "ranks); set it to 0, or measure a checkpoint in one process "
                              "(exatrain.eval.sharpness.weight_sharpness)")
        self.cfg = cfg
        self.micro_batches: list[Batch] = []

    @classmethod
    def from_job(cls, job: JobConfig) -> Sharpness:
        return cls(job.precision.sharpness, dist.get_world_size() if dist.is_initialized() else 1)

    def on_train_start(self, trainer: Any) -> None:
        t = trainer.cfg.train
        batches = trainer.data.val.iter_batches(self.cfg.batches, t.global_batch)
        self.micro_batches = [m for b in batches for m in split_micro(b, t.micro_batch)]

    def measure(self, trainer: Any) -> dict[str, float]:
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # stochastic rounding must not shift the training stream
            out = {}
            logit = engine_logit_sharpness(trainer.engine, self.micro_batches, self.cfg.epsilon)
            out.update(sharpness_phi=logit.phi, sharpness_ce=logit.loss)
            if self.cfg.weight_directions:
                w = engine_weight_sharpness(trainer.engine, self.micro_batches, self.cfg.weight_directions,
                                            self.cfg.weight_radius, self.cfg.direction_seed)
                out.update(weight_sharpness_mean=w.mean_increase, weight_sharpness_max=w.max_increase)
        return out

    def on_step_end(self, trainer: Any, stats: Any, record: dict[str, Any]) -> None:
        step = trainer.state.step
        if step % self.cfg.every == 0 or step == trainer.cfg.train.steps:
            record.update(self.measure(trainer))


CALLBACKS.register("sharpness", Sharpness.from_job)


# ---------------------------------------------------------------- divergence


def _number(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


class Divergence(Callback):
    """See the module docstring; config `precision.divergence`."""

    name = "divergence"

    def __init__(self, cfg: DivergenceConfig):
        self.cfg = cfg
        self.detector = DivergenceDetector(cfg.threshold, cfg.median_window, cfg.warmup)

    def reason(self) -> str:
        e = self.detector.event
        where = "" if e.median is None else f" > {self.cfg.threshold} x running median {e.median:.4g}"
        return f"diverged: {e.reason} {e.loss:.4g}{where} at step {e.step}"

    def on_train_start(self, trainer: Any) -> None:
        if self.detector.diverged and self.cfg.action == "stop":
            log.warning("divergence: this run %s (checkpointed); stopping again", self.reason())
            trainer.request_stop(self.reason(), status="stopped")

    def on_step_end(self, trainer: Any, stats: Any, record: dict[str, Any]) -> None:
        event = self.detector.observe(trainer.state.step, stats.loss)
        if event is None:
            return
        record["diverged_at"] = event.step
        log.warning("divergence: %s (action %s)", self.reason(), self.cfg.action)
        self.write(trainer, "diverged")
        if self.cfg.action == "stop":
            trainer.request_stop(self.reason(), status="stopped")

    def on_train_end(self, trainer: Any, status: str) -> None:
        self.write(trainer, status)

    def summary(self, steps_done: int, status: str) -> dict[str, Any]:
        e = self.detector.event
        return {"diverged": e is not None, "step": None if e is None else e.step,
                "reason": None if e is None else e.reason, "loss": None if e is None else _number(e.loss),
                "median": None if e is None else e.median, "steps_done": steps_done, "status": status,
                "rule": {k: v for k, v in asdict(self.cfg).items() if k != "enabled"}}

    def write(self, trainer: Any, status: str) -> None:
        if trainer.info.rank == 0:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            path = trainer.run_dir / DIVERGENCE_FILE
            path.write_text(json.dumps(self.summary(trainer.state.step, status), indent=1) + "\n")

    def state_dict(self) -> dict[str, Any]:
        # One JSON string: stored whole by DCP whatever the history length or whether an event exists.
        return {"detector": json.dumps(self.detector.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(json.loads(state["detector"]))


CALLBACKS.register("divergence", lambda job: Divergence(job.precision.divergence))
