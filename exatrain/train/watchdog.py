"""Hang watchdog: say which rank stalled, at which step and in which collective, before the timeout kills it.

A stalled rank (a dead GPU, a rank stuck in data loading, a collective the others never join) shows up
only as a process-group timeout `parallel.timeout_s` later, on every rank, with no hint of who started
it. Each rank's `Watchdog` thread instead watches a progress marker the trainer's hooks move (`beat`);
after `parallel.watchdog_s` without a move it reports once per stall, to stderr and to
run_dir/watchdog/rank<R>.txt:

    exatrain watchdog: rank 1 stalled for 2.0 s at step 3 in train step, collective all_reduce (engine/native.py:88)

followed by every thread's Python stack (faulthandler). The rank that is not in a collective is the
one holding the others up. The watchdog never kills the job: the timeout and srun still do that.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from exatrain.config import JobConfig
from exatrain.train.callback import Callback, Trainer

TORCH_DISTRIBUTED = os.sep + os.path.join("torch", "distributed") + os.sep


def watchdog_seconds(cfg: JobConfig) -> float:
    """parallel.watchdog_s, with -1 meaning half the collective timeout."""
    p = cfg.parallel
    return p.timeout_s / 2 if p.watchdog_s == -1 else float(p.watchdog_s)


def current_collective(frame: FrameType | None) -> str:
    """The torch.distributed call a stack is in (its c10d API name, e.g. all_reduce) and the line outside
    torch.distributed that made it; '' if none."""
    stack = []  # innermost first
    while frame is not None:
        stack.append(frame)
        frame = frame.f_back
    inside = [i for i, f in enumerate(stack) if TORCH_DISTRIBUTED in f.f_code.co_filename]
    if not inside:
        return ""
    c10d = [i for i in inside if stack[i].f_code.co_filename.endswith("distributed_c10d.py")]
    name = stack[(c10d or inside)[0]].f_code.co_name
    outer = inside[-1] + 1
    caller = f"{Path(stack[outer].f_code.co_filename).name}:{stack[outer].f_lineno}" if outer < len(stack) else "?"
    return f"collective {name} ({caller})"


class Watchdog:
    """A daemon thread reporting when `beat` has not been called for `timeout_s` (`clock` in seconds)."""

    def __init__(self, timeout_s: float, rank: int, report_dir: Path | None,
                 clock: Callable[[], float] = time.monotonic, stream: TextIO | None = None):
        self.timeout_s, self.rank, self.report_dir = timeout_s, rank, report_dir
        self.clock, self.stream = clock, stream
        self.where = "start-up"
        self.last = clock()
        self.reported = False
        self.watched = threading.main_thread()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, where: str) -> None:
        self.where, self.last, self.reported = where, self.clock(), False

    def check(self) -> str | None:
        """The report line if the watched thread has stalled (once per stall), else None."""
        idle = self.clock() - self.last
        if self.reported or idle < self.timeout_s:
            return None
        self.reported = True
        collective = current_collective(sys._current_frames().get(self.watched.ident))
        return (f"exatrain watchdog: rank {self.rank} stalled for {idle:.1f} s at {self.where}"
                f"{', ' + collective if collective else ''}")

    def report(self, line: str) -> None:
        streams: list[TextIO] = [self.stream or sys.stderr]
        opened = None
        if self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            opened = open(self.report_dir / f"rank{self.rank}.txt", "a")
            streams.append(opened)
        try:
            for stream in streams:
                print(line, file=stream, flush=True)
                try:
                    faulthandler.dump_traceback(stream, all_threads=True)
                except (AttributeError, ValueError, OSError):  # a stream without a file descriptor
                    pass
                stream.flush()
        finally:
            if opened is not None:
                opened.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="exatrain-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        poll = min(max(self.timeout_s / 10, 0.05), 5.0)
        while not self._stop.wait(poll):
            line = self.check()
            if line:
                self.report(line)


class WatchdogCallback(Callback):
    """Moves the watchdog's marker at every step boundary, evaluation and checkpoint."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.dog: Watchdog | None = None

    @classmethod
    def from_job(cls, cfg: JobConfig) -> WatchdogCallback:
        return cls(watchdog_seconds(cfg))

    def on_train_start(self, trainer: Trainer) -> None:
        self.dog = Watchdog(self.timeout_s, trainer.info.rank, trainer.run_dir / "watchdog")
        self.dog.beat(f"step {trainer.state.step + 1} (first step)")
        self.dog.start()

    def _beat(self, where: str) -> None:
        if self.dog is not None:
            self.dog.beat(where)

    def on_step_start(self, trainer: Trainer) -> None:
        self._beat(f"step {trainer.state.step + 1} in train step")

    def on_step_end(self, trainer: Trainer, stats: Any, record: dict[str, Any]) -> None:
        self._beat(f"step {trainer.state.step} after train step (eval, checkpoint or stop agreement)")

    def on_eval(self, trainer: Trainer, results: dict[str, float]) -> None:
        self._beat(f"step {trainer.state.step} after evaluation")

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        self._beat(f"step {trainer.state.step} after checkpoint")

    def on_train_end(self, trainer: Trainer, status: str) -> None:
        if self.dog is not None:
            self.dog.stop()
            self.dog = None
