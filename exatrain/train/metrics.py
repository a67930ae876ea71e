"""Training metrics: a JSONL record per step, a human log line, TensorBoard scalars, a progress bar.

Only rank 0 touches files or the terminal; other ranks get a logger whose methods do nothing, so
the trainer calls it unconditionally. `run_dir/metrics.jsonl` is append-only: a run that finds it
non-empty appends and marks its first record with "resumed_from" (the number of steps already done,
0 for a restart from scratch); `read_metrics` applies that marker, so records a crashed attempt
wrote past its last checkpoint are superseded rather than rewritten. Keys the line formats:

    loss, grad_norm, lr, tokens_seen, tokens_per_s (per device), tflops (per device),
    mfu (fraction of peak, from `throughput`), peak_mem_gb (GiB), data_wait_pct (% of step time
    spent waiting for the next batch); eval: val_loss, val_ppl

Any other key is recorded too and printed generically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from exatrain.bench.peak import PeakInfo
from exatrain.config import MetricsConfig

log = logging.getLogger("exatrain")

METRICS_FILE = "metrics.jsonl"


def peak_memory_bytes(device: torch.device | str) -> int:
    """High-water mark of memory: CUDA allocator peak, or the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def throughput(tokens: int, seconds: float, flops_per_token: float, peak: PeakInfo, world_size: int) -> dict[str, float]:
    """Per-device rates for `tokens` processed by all `world_size` devices in `seconds`.

    MFU is model FLOPs (see exatrain.bench.flops) over the device's peak; NaN when the peak is unknown.
    """
    tokens_per_s = tokens / seconds / world_size
    tflops = tokens_per_s * flops_per_token / 1e12
    return {"tokens_per_s": tokens_per_s, "tflops": tflops,
            "mfu": tflops / peak.tflops if peak.tflops > 0 else math.nan}


def _count(v: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.2f}{suffix}"
    return f"{v:.0f}"


_LINE_FORMAT: dict[str, Callable[[float], str]] = {
    "loss": lambda v: f"loss {v:.4f}",
    "val_loss": lambda v: f"val_loss {v:.4f}",
    "val_ppl": lambda v: f"val_ppl {v:.2f}",
    "grad_norm": lambda v: f"grad_norm {v:.3f}",
    "lr": lambda v: f"lr {v:.2e}",
    "tokens_seen": lambda v: f"{_count(v)} tok",
    "tokens_per_s": lambda v: f"{v:,.0f} tok/s/dev",
    "tflops": lambda v: f"{v:.3g} TFLOP/s/dev",
    "mfu": lambda v: "MFU n/a" if math.isnan(v) else f"MFU {100 * v:.1f}%",
    "peak_mem_gb": lambda v: f"mem {v:.2f} GiB",
    "data_wait_pct": lambda v: f"data-wait {v:.1f}%",
}


def format_line(head: str, metrics: dict[str, float | None]) -> str:
    """`head | loss 2.3456 | ...`: known keys in a fixed order and format, then the rest as `key value`.

    None (a non-finite value after JSON cleaning) prints as nan.
    """
    num = {k: math.nan if v is None else float(v) for k, v in metrics.items()}
    parts = [head]
    parts += [fmt(num[k]) for k, fmt in _LINE_FORMAT.items() if k in num]
    parts += [f"{k} {v:.4g}" for k, v in num.items() if k not in _LINE_FORMAT]
    return " | ".join(parts)


def _json_value(v: Any) -> Any:
    """Plain JSON: tensors to numbers, non-finite floats to null (NaN/Infinity are not JSON)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(path: Path | str, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl as the latest attempt of each step saw them.

    A record carrying "resumed_from" = r drops earlier records with step > r (a crashed run logged
    them after its last checkpoint). A torn last line from a crash is skipped.
    """
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "resumed_from" in rec:
                records = [r for r in records if r["step"] <= rec["resumed_from"]]
            records.append(rec)
    return [r for r in records if kind is None or r["kind"] == kind]


def _console_loggers() -> list[logging.Logger]:
    """Loggers on exatrain's propagation path with a terminal handler.

    logging_redirect_tqdm adds a handler to every logger it is given, so passing one without a
    console handler would print each line twice (once there, once where it propagates to).
    """
    found, lg = [], log
    while lg is not None:
        if any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in lg.handlers):
            found.append(lg)
        lg = lg.parent if lg.propagate else None
    return found


def _open_tensorboard(log_dir: Path, purge_step: int | None):
    """A SummaryWriter, or None when tensorboard is not installed (it is an optional dev dependency)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return False
        f.seek(-1, 2)
        return f.read(1) != b"\n"


class MetricsLogger:
    """Rank 0 writes metrics.jsonl, TensorBoard events and the console; other ranks do nothing.

    `start_step` is the number of steps already completed (0 for a fresh run); the trainer then
    logs steps start_step + 1 .. total_steps.
    """

    def __init__(self, run_dir: Path, cfg: MetricsConfig, rank: int, total_steps: int, start_step: int = 0):
        if cfg.log_every < 1:
            raise ValueError(f"metrics.log_every must be >= 1, got {cfg.log_every}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.start_step = start_step
        self.enabled = rank == 0
        self._mark_resume = False
        self._first_step = True
        self._file = None
        self._tb = None
        self._bar = None
        self._stack = contextlib.ExitStack()
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_FILE
        # An earlier attempt wrote here (even one that never checkpointed): supersede it from start_step on.
        self._mark_resume = start_step > 0 or (path.exists() and path.stat().st_size > 0)
        self._file = open(path, "a", encoding="utf-8", buffering=1)
        if _ends_mid_line(path):  # a crash mid-write: start a fresh line so our records stay parseable
            self._file.write("\n")
        if cfg.tensorboard:
            # purge_step hides events an earlier attempt wrote past the point we resume from.
            self._tb = _open_tensorboard(run_dir / "tensorboard", start_step + 1 if self._mark_resume else None)
        if cfg.progress_bar and getattr(sys.stderr, "isatty", lambda: False)():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
            # Console log handlers write through tqdm.write while the bar lives, so lines don't break it.
            self._stack.enter_context(logging_redirect_tqdm(loggers=_console_loggers()))

    def _write(self, kind: str, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        values = {k: _json_value(v) for k, v in metrics.items()}
        record: dict[str, Any] = {"kind": kind, "step": step, "time": round(time.time(), 3)}
        if self._mark_resume:
            record["resumed_from"] = self.start_step
            self._mark_resume = False
        record.update(values)
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
        return values

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = self._write("train", step, metrics)
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
            if values.get("loss") is not None:
                self._bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        if self._first_step or step % self.cfg.log_every == 0 or step == self.total_steps:
            self._first_step = False
            log.info(format_line(f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}", values))

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        log.info(format_line(f"eval step {step}", self._write("eval", step, metrics)))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stack.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
