"""Stop before the job's time limit with a checkpoint, from measured step and checkpoint times.

Slurm's pre-limit signal (`launch.signal_s`) comes at a fixed time: with 2-3 minute steps and a
multi-minute save it can arrive too late to finish the step and write the checkpoint, and a job
killed at its limit is neither checkpointed nor requeued. `Deadline` instead decides after every
step: stop now when the time left is less than `margin` x (the longest recent iteration + the
longest checkpoint write), because letting one more iteration run would leave no time to save.
The stop itself is the trainer's preemption path (checkpoint, requeue), reached through
`DeadlineCallback`, so the pre-limit signal remains only the fallback.

The job's end comes from SLURM_JOB_END_TIME (set by newer Slurm) or squeue's start time + time limit
(`%S|%l`; its end time `%e` is stale right after a requeue); outside a Slurm job there is none and the
callback does nothing.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any


from exatrain.config import JobConfig
from exatrain.engine.base import all_reduce_sums
from exatrain.train.callback import Callback, Trainer

log = logging.getLogger("exatrain")

WINDOW = 20  # iterations the running max covers: long enough for periodic evals, short enough to forget warm-up


class Deadline:
    """The stop decision for a job ending at `end` (epoch seconds). `save_s` is the checkpoint write time
    assumed until one is measured; iteration and save times are running maxima over the last WINDOW."""

    def __init__(self, end: float, margin: float, save_s: float):
        self.end, self.margin, self.assumed_save_s = end, margin, save_s
        self.iterations: deque[float] = deque(maxlen=WINDOW)
        self.saves: deque[float] = deque(maxlen=WINDOW)

    def observe_iteration(self, seconds: float) -> None:
        self.iterations.append(seconds)

    def observe_save(self, seconds: float) -> None:
        self.saves.append(seconds)

    @property
    def iteration_s(self) -> float:
        return max(self.iterations, default=0.0)

    @property
    def save_s(self) -> float:
        return max(self.saves, default=self.assumed_save_s)

    def needed_s(self) -> float:
        """Time one more iteration plus the stop checkpoint take, with the safety margin."""
        return self.margin * (self.iteration_s + self.save_s)

    def should_stop(self, now: float) -> bool:
        return bool(self.iterations) and self.end - now < self.needed_s()

    def describe(self, now: float) -> str:
        return (f"{self.end - now:.0f} s left before the time limit, less than {self.margin:g} x (iteration "
                f"{self.iteration_s:.1f} s + checkpoint {self.save_s:.1f} s)")


def slurm_duration_s(text: str) -> float | None:
    """Slurm's [days-][hours:]minutes:seconds as seconds; None for UNLIMITED, INVALID, N/A."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def parse_squeue_end(text: str) -> float | None:
    """squeue's `%S|%l` (start in local time, e.g. 2026-11-29T23:10:16|2:00) as the end in epoch seconds."""
    start, _, limit = text.strip().partition("|")
    seconds = slurm_duration_s(limit)
    try:
        return datetime.fromisoformat(start).timestamp() + seconds if seconds is not None else None
    except ValueError:
        return None


def job_end_time(environ: Mapping[str, str] = os.environ,
                 squeue: Callable[[str], str] | None = None) -> float | None:
    """When this Slurm job will be killed (epoch seconds), or None outside Slurm / with no time limit."""
    end = environ.get("SLURM_JOB_END_TIME", "")
    if end.isdigit() and int(end) > 0:
        return float(end)
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    query = squeue or _squeue_end
    try:
        return parse_squeue_end(query(job_id))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("deadline: cannot read job %s's end time from squeue (%s); relying on the stop signal",
                    job_id, exc)
        return None


def _squeue_end(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-o", "%S|%l", "-j", job_id], check=True, capture_output=True,
                          text=True, timeout=30).stdout


class DeadlineCallback(Callback):
    """Times every iteration (step start to next step start, minus any checkpoint in it) and every checkpoint
    write, and requests a preemption stop once `Deadline.should_stop`. Rank 0 reads the end time and shares
    it; every rank decides on its own clock and the trainer agrees on the stop at the next step boundary."""

    def __init__(self, margin: float, save_s: float, clock: Callable[[], float] = time.time,
                 end_time: Callable[[], float | None] = job_end_time):
        self.margin, self.assumed_save_s = margin, save_s
        self.clock, self.end_time = clock, end_time
        self.deadline: Deadline | None = None
        self._iter_start: float | None = None
        self._save_start: float | None = None
        self._saved_in_iter = 0.0

    @classmethod
    def from_job(cls, cfg: JobConfig) -> DeadlineCallback:
        return cls(cfg.launch.stop_margin, cfg.launch.save_s)

    def on_train_start(self, trainer: Trainer) -> None:
        end = self.end_time() if trainer.info.rank == 0 else None
        end = all_reduce_sums([end or 0.0])[0] or None  # rank 0's: the others add 0
        if end is not None and end <= self.clock():
            log.warning("deadline: the job's end time %s has passed already; relying on the stop signal", end)
            end = None
        if end is not None:
            self.deadline = Deadline(end, self.margin, self.assumed_save_s)
            log.info("deadline: job ends at %s; stopping with a checkpoint once the time left is under "
                     "%g x (iteration + checkpoint)", datetime.fromtimestamp(end).isoformat(timespec="seconds"),
                     self.margin)

    def on_step_start(self, trainer: Trainer) -> None:
        now = self.clock()
        if self.deadline is not None and self._iter_start is not None:
            self.deadline.observe_iteration(now - self._iter_start - self._saved_in_iter)
        self._iter_start, self._saved_in_iter = now, 0.0

    def on_step_end(self, trainer: Trainer, stats: Any, record: dict[str, Any]) -> None:
        now = self._save_start = self.clock()
        d = self.deadline
        if d is None:
            return
        if not d.iterations:  # the first iteration: its own step is all there is to go on
            d.observe_iteration(now - (self._iter_start or now))
        if d.should_stop(now):
            trainer.request_stop(f"deadline: {d.describe(now)}", "preempted")

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        # Measured from the end of the step: the save plus any evaluation before it, an upper bound.
        now = self.clock()
        if self.deadline is not None and self._save_start is not None:
            seconds = now - self._save_start
            self.deadline.observe_save(seconds)
            self._saved_in_iter += seconds
        self._save_start = now
