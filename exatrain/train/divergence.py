"""Divergence detection for the stability studies (DESIGN.md §7): a pure function of the loss sequence.

A run has diverged at the first step whose loss is non-finite, or, once `warmup` steps have passed, exceeds
`threshold` times the median of the previous `window` losses. The median (not the mean) keeps one earlier spike
from raising the bar, and the warmup skips the early steep descent, where a relative rule means nothing. The
first event (step, reason, loss, median) is kept; the state round-trips through checkpoints, so a resumed run
flags the same step as an uninterrupted one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from exatrain.config import ConfigError

NON_FINITE = "non-finite loss"
SPIKE = "loss spike"


@dataclass(frozen=True)
class Divergence:
    step: int
    reason: str                 # NON_FINITE or SPIKE
    loss: float
    median: float | None        # the running median it was compared with (None for non-finite)


class DivergenceDetector:
    def __init__(self, threshold: float = 2.0, window: int = 50, warmup: int = 100,
                 key: str = "precision.divergence"):
        if not (math.isfinite(threshold) and threshold > 1.0):
            raise ConfigError(f"{key}.threshold: must be a finite number > 1 (a multiple of the running median), "
                              f"got {threshold}")
        if window < 1:
            raise ConfigError(f"{key}.median_window: must be >= 1, got {window}")
        if warmup < 0:
            raise ConfigError(f"{key}.warmup: must be >= 0, got {warmup}")
        self.threshold, self.window, self.warmup = threshold, window, warmup
        self.history: deque[float] = deque(maxlen=window)
        self.event: Divergence | None = None

    @property
    def diverged(self) -> bool:
        return self.event is not None

    def observe(self, step: int, loss: float) -> Divergence | None:
        """Feed one step's loss; returns the Divergence on the step it is first detected, else None."""
        found = None
        if not math.isfinite(loss):
            found = Divergence(step, NON_FINITE, loss, None)
        elif step >= self.warmup and self.history:
            median = statistics.median(self.history)
            if loss > self.threshold * median:
                found = Divergence(step, SPIKE, loss, median)
        if math.isfinite(loss):
            self.history.append(loss)
        if found is not None and self.event is None:
            self.event = found
            return found
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "event": None if self.event is None else asdict(self.event),
                "threshold": self.threshold, "window": self.window, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore history and event; the rule itself comes from the config (a changed window keeps the newest losses)."""
        self.history = deque(state["history"], maxlen=self.window)
        self.event = None if state["event"] is None else Divergence(**state["event"])
