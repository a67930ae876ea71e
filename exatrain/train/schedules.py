"""Learning-rate schedules as pure functions of tokens seen (DESIGN.md §8).

`Schedule.lr(tokens_seen, batch_seqs)` keeps no state, so resuming needs only the token
counter the checkpoint already stores, and a batch-size change mid-run is handled by
passing the new batch size. Every phase boundary is a token count:

- warmup: the first `warmup_steps * global_batch * seq_len` tokens (steps at the configured
  batch). The ramp is evaluated at the tokens seen *after* the step, so step 0 trains with a
  non-zero LR and the last warmup step reaches the peak.
- decay (wsd, power): the last `decay_fraction` of the total `steps * global_batch * seq_len`
  tokens, from the peak down to `min_lr_ratio * peak` (`decay_kind` shapes it).
- cosine decays over everything after warmup; constant never decays.

Power scheduler (Shen et al. 2024, arXiv:2408.13359): lr(n) = min(lr_max, β·a·n^b) with n tokens
seen and β the batch size in sequences; linear warmup to lr(N_warmup), the power phase, then
the decay phase starting from lr(N - N_decay). `optim.lr` is not used by it: a, b and lr_max set
the scale. Its "exponential" decay is the shifted exponential of the authors' dolomite-engine,
which reaches exactly `min_lr_ratio` (0 in the paper) at the end rather than approaching it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from exatrain.config import ConfigError, JobConfig

NAMES = ("constant", "cosine", "wsd", "power")
DECAY_KINDS = ("linear", "exponential", "cosine")


def decay_factor(kind: str, progress: float, floor: float) -> float:
    """Multiplier going from 1 at progress 0 to `floor` at progress 1."""
    p = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        shape = 1.0 - p
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    elif kind == "exponential":
        shape = (math.exp(1.0 - p) - 1.0) / (math.e - 1.0)
    else:
        raise ConfigError(f"schedule.decay_kind: got {kind!r}, expected one of {', '.join(DECAY_KINDS)}")
    return floor + (1.0 - floor) * shape


@dataclass(frozen=True)
class Schedule:
    name: str
    peak_lr: float
    seq_len: int
    total_tokens: int
    warmup_tokens: int
    decay_tokens: int
    decay_kind: str = "linear"
    min_lr_ratio: float = 0.0
    power_a: float = 4.0
    power_b: float = -0.51
    power_lr_max: float = 0.02

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ConfigError(f"schedule.name: got {self.name!r}, expected one of {', '.join(NAMES)}")
        if self.decay_kind not in DECAY_KINDS:
            raise ConfigError(f"schedule.decay_kind: got {self.decay_kind!r}, expected one of {', '.join(DECAY_KINDS)}")
        if self.name == "power" and self.power_b >= 0:
            raise ConfigError(f"schedule.power_b: must be negative (the LR decays as tokens^b), got {self.power_b}")

    @property
    def decay_start(self) -> int:
        """First token of the decay phase; never inside warmup."""
        return max(self.warmup_tokens, self.total_tokens - self.decay_tokens)

    def power_lr(self, tokens: float, batch_seqs: int) -> float:
        """min(lr_max, β·a·n^b); n = 0 is the cap (n^b diverges)."""
        if tokens <= 0:
            return self.power_lr_max
        return min(self.power_lr_max, batch_seqs * self.power_a * tokens**self.power_b)

    def lr(self, tokens_seen: int, batch_seqs: int) -> float:
        """Absolute LR for the step that starts after `tokens_seen` tokens and trains `batch_seqs` sequences."""
        if tokens_seen < self.warmup_tokens:
            ramp = min(1.0, (tokens_seen + batch_seqs * self.seq_len) / self.warmup_tokens)
            return ramp * self._peak(self.warmup_tokens, batch_seqs)
        if self.name == "constant":
            return self.peak_lr
        if self.name == "cosine":
            span = self.total_tokens - self.warmup_tokens
            progress = (tokens_seen - self.warmup_tokens) / span if span > 0 else 1.0
            return self.peak_lr * decay_factor("cosine", progress, self.min_lr_ratio)
        start = self.decay_start
        if tokens_seen < start:
            return self._peak(tokens_seen, batch_seqs)
        span = self.total_tokens - start
        progress = (tokens_seen - start) / span if span > 0 else 1.0
        return self._peak(start, batch_seqs) * decay_factor(self.decay_kind, progress, self.min_lr_ratio)

    def _peak(self, tokens: int, batch_seqs: int) -> float:
        return self.power_lr(tokens, batch_seqs) if self.name == "power" else self.peak_lr


def build_schedule(cfg: JobConfig) -> Schedule:
    """The job's schedule; total tokens = train.steps * train.global_batch * data.seq_len."""
    s = cfg.schedule
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    total = cfg.train.steps * tokens_per_step
    return Schedule(
        name=s.name,
        peak_lr=cfg.optim.lr,
        seq_len=cfg.data.seq_len,
        total_tokens=total,
        warmup_tokens=s.warmup_steps * tokens_per_step,
        decay_tokens=round(s.decay_fraction * total),
        decay_kind=s.decay_kind,
        min_lr_ratio=s.min_lr_ratio,
        power_a=s.power_a,
        power_b=s.power_b,
        power_lr_max=s.power_lr_max,
    )
