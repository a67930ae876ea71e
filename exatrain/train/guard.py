"""Guards against non-finite weights and loss spikes (DESIGN.md §10).

- `weights_finite(engine)`: whether every rank's weights are finite (collective). The trainer asks it when a
  step was skipped for non-finite gradients (a run whose weights went non-finite would otherwise skip every
  step from then on), and the checkpointer before every save (a non-finite checkpoint is never written, so
  retention never deletes the newest finite one).
- `train.spike_policy` (callback `spike_guard`): a step whose loss exceeds `spike_threshold` x the median of the
  previous `spike_window` accepted losses (after `spike_warmup` steps) is a spike. skip: the engine drops that
  step's update (native engine; the loss is known before the optimizer step). rollback: the trainer reloads
  the newest checkpoint except the data loader, so training continues from the last good weights on the
  batches after the spike. Spikes do not enter the median, so one spike does not raise the bar.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import deque
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from exatrain.config import JobConfig, TrainConfig, require
from exatrain.engine.base import all_reduce_sums
from exatrain.registry import CALLBACKS, config_resolver, config_validator
from exatrain.train.callback import Callback

log = logging.getLogger("exatrain")

SPIKE_POLICIES = ("none", "skip", "rollback")


@torch.no_grad()
def weights_finite(engine: Any) -> bool:
    """True when no rank holds a non-finite parameter (all-reduced, so every rank gets the same answer)."""
    params = [p for part in engine.model_parts for p in part.parameters()]
    ok = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in params)
    return all_reduce_sums([float(not ok)])[0] == 0


class SpikeGuard(Callback):
    """See the module docstring; config `train.spike_*`."""

    name = "spike_guard"

    def __init__(self, cfg: TrainConfig):
        self.policy, self.threshold, self.warmup = cfg.spike_policy, cfg.spike_threshold, cfg.spike_warmup
        self.history: deque[float] = deque(maxlen=cfg.spike_window)

    def median(self, step: int) -> float | None:
        """The bar's base, or None while the rule does not apply yet."""
        return statistics.median(self.history) if step > self.warmup and self.history else None

    def is_spike(self, step: int, loss: float) -> bool:
        return self._spike_median(step, loss) is not None

    def _spike_median(self, step: int, loss: float) -> float | None:
        """The running median `loss` spikes over, or None when it is no spike."""
        median = self.median(step)
        return median if median is not None and math.isfinite(loss) and loss > self.threshold * median else None

    def on_train_start(self, trainer: Any) -> None:
        if self.policy == "skip":
            trainer.engine.skip_if = lambda loss: self.is_spike(trainer.state.step + 1, loss)

    def on_step_end(self, trainer: Any, stats: Any, record: dict[str, Any]) -> None:
        step = trainer.state.step
        median = self._spike_median(step, stats.loss)
        if median is not None:
            record["spike"] = 1
            reason = f"loss spike {stats.loss:.4g} > {self.threshold} x running median {median:.4g} at step {step}"
            if self.policy == "skip":
                log.warning("%s: update skipped", reason)
            else:
                trainer.request_rollback(reason)
        elif math.isfinite(stats.loss):
            self.history.append(stats.loss)

    def state_dict(self) -> dict[str, Any]:
        return {"history": json.dumps(list(self.history))}  # one string: DCP stores it whole, whatever its length

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(json.loads(state["history"]), maxlen=self.history.maxlen)


CALLBACKS.register("spike_guard", lambda job: SpikeGuard(job.train))


@config_resolver
def add_spike_guard(cfg: JobConfig) -> None:
    if cfg.train.spike_policy != "none" and "spike_guard" not in cfg.train.callbacks:
        cfg.train.callbacks.insert(0, "spike_guard")


@config_validator
def validate_spike_guard(cfg: JobConfig) -> None:
    t = cfg.train
    require(t.spike_policy in SPIKE_POLICIES, "train.spike_policy",
            f"got {t.spike_policy!r}, expected one of {', '.join(SPIKE_POLICIES)}")
    require(math.isfinite(t.spike_threshold) and t.spike_threshold > 1.0, "train.spike_threshold",
            f"must be a finite multiple of the running median > 1, got {t.spike_threshold}")
    require(t.spike_window >= 1, "train.spike_window", f"must be >= 1, got {t.spike_window}")
    require(t.spike_warmup >= 0, "train.spike_warmup", f"must be >= 0, got {t.spike_warmup}")
    require(t.spike_policy != "skip" or cfg.parallel.engine == "native", "train.spike_policy",
            "skip drops an update before the optimizer step, which only parallel.engine=native exposes; "
            "use rollback with DeepSpeed")
    require(t.spike_policy != "rollback" or cfg.checkpoint.every > 0, "train.spike_policy",
            "rollback reloads the newest checkpoint: set checkpoint.every > 0")
    require("spike_guard" not in t.callbacks or t.spike_policy != "none", "train.callbacks",
            "the spike_guard callback is configured by train.spike_policy: set it to skip or rollback")
