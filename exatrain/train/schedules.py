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

Each schedule is registered by name (`schedule.name`) as its post-warmup shape `(schedule, tokens_seen,
batch_seqs) -> lr`; the warmup ramps linearly to the shape's value at the end of warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from exatrain.config import MAX_LR, ConfigError, JobConfig, require
from exatrain.registry import SCHEDULES, config_validator

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
        SCHEDULES.get(self.name)  # an unknown name fails here, naming the registered ones
        if self.decay_kind not in DECAY_KINDS:
            raise ConfigError(f"schedule.decay_kind: got {self.decay_kind!r}, expected one of {', '.join(DECAY_KINDS)}")
        if self.name == "power" and self.power_b >= 0:
            raise ConfigError(f"schedule.power_b: must be negative (the LR decays as tokens^b), got {self.power_b}")

    @property
    def shape(self) -> LRShape:
        return SCHEDULES.get(self.name)

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
            return ramp * self.shape(self, self.warmup_tokens, batch_seqs)
        return self.shape(self, tokens_seen, batch_seqs)

    def stable_then_decay(self, peak: Callable[[int], float], tokens_seen: int) -> float:
        """`peak(tokens)` until the decay phase, then decay from `peak(decay_start)` (WSD and Power)."""
        start = self.decay_start
        if tokens_seen < start:
            return peak(tokens_seen)
        span = self.total_tokens - start
        progress = (tokens_seen - start) / span if span > 0 else 1.0
        return peak(start) * decay_factor(self.decay_kind, progress, self.min_lr_ratio)


LRShape = Callable[[Schedule, int, int], float]


@SCHEDULES.register("constant")
def constant(s: Schedule, tokens_seen: int, batch_seqs: int) -> float:
    return s.peak_lr


@SCHEDULES.register("cosine")
def cosine(s: Schedule, tokens_seen: int, batch_seqs: int) -> float:
    """Cosine from the peak at the end of warmup to min_lr_ratio · peak at the end of the run."""
    span = s.total_tokens - s.warmup_tokens
    progress = (tokens_seen - s.warmup_tokens) / span if span > 0 else 1.0
    return s.peak_lr * decay_factor("cosine", progress, s.min_lr_ratio)


@SCHEDULES.register("wsd")
def wsd(s: Schedule, tokens_seen: int, batch_seqs: int) -> float:
    """Warmup-stable-decay: the peak until the last decay_fraction of the tokens."""
    return s.stable_then_decay(lambda _tokens: s.peak_lr, tokens_seen)


@SCHEDULES.register("power")
def power(s: Schedule, tokens_seen: int, batch_seqs: int) -> float:
    """Power scheduler: min(lr_max, β·a·n^b) until the decay phase (optim.lr unused)."""
    return s.stable_then_decay(lambda tokens: s.power_lr(tokens, batch_seqs), tokens_seen)


@config_validator
def validate_schedule(cfg: JobConfig) -> None:
    s = cfg.schedule
    require(s.decay_kind in DECAY_KINDS, "schedule.decay_kind", f"got {s.decay_kind!r}, expected one of "
            f"{', '.join(DECAY_KINDS)}")
    require(s.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
    require(0.0 <= s.decay_fraction < 1.0, "schedule.decay_fraction", "must be in [0, 1)")
    require(0.0 <= s.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]")
    require(s.power_b < 0, "schedule.power_b", f"must be negative (the LR decays as tokens^b), got {s.power_b}")
    require(math.isfinite(s.power_a) and s.power_a > 0, "schedule.power_a", "must be a finite positive number")
    require(math.isfinite(s.power_lr_max) and 0 < s.power_lr_max <= MAX_LR, "schedule.power_lr_max",
            f"must be a finite number in (0, {MAX_LR:g}] (the power schedule's learning-rate cap), got {s.power_lr_max}")


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
