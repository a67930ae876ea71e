"""A training callback that measures a run for `exatrain bench scaling` and `exatrain plan --measure`.

Enable it with `plugins=[exatrain.bench.probe] train.callbacks=[bench_probe]`; the `bench:` config section
sets the phases. Steps run in this order (train.steps = the sum):

  warm-up   bench.warmup_steps, not measured (allocator, thread pools, lazy optimizer state);
  timed     every remaining step: wall time from a barrier before the step to a barrier after it
            (so a step costs what the slowest rank needs), no profiler attached; also the step minus the
            largest run-queue wait of any rank's training thread (Linux schedstat): an estimate of the step
            time without CPU contention from other processes (`step_s_uncontended`, for shared CPU machines;
            delays of the gloo threads it waits on are not removed);
  profile   bench.profile_steps under torch.profiler, classified into compute / collectives /
            pipeline bubble / other (`classify`); the fractions describe the timed steps' median;
  memory    with bench.memory_step, one more step with live tensor bytes tracked (CPU: exatrain.bench.measure
            .LiveBytes; GPU: the allocator's peak is read after the timed steps anyway).

Rank 0 writes run_dir/bench.json (`BENCH_FILE`) at the end of a completed run: the layout, step times
(median, spread), tokens/s (global and per device), model TFLOP/s per device and MFU with the formula and
the peak named, peak memory per rank, and the breakdown per rank.

Breakdown method. On CPU (gloo) the "device" is the training thread: at each instant of a profiled step it
is computing (inside an aten op's own time), communicating (inside a c10d/gloo op or a functional
collective's wait, or blocked between ops while a collective or p2p transfer it issued is in flight on a
gloo worker thread), or doing anything else (Python, hooks, data, the optimizer's Python loop: "other").
On GPU the CUDA kernel timeline is classified instead: compute kernels, NCCL/RCCL kernels with no compute
kernel running (exposed communication), and idle. Communication is split by name into collectives
(all-reduce, all-gather, reduce-scatter, broadcast, barrier) and point-to-point (send/recv). Under pipeline
parallelism a stage waits for its neighbour inside p2p receives (and idles on GPU), so the p2p share plus,
on GPU, the idle share is reported as the pipeline bubble. Limits: communication that overlaps compute is
counted as compute (it is hidden); a p2p wait includes the transfer itself (the bubble is an upper bound
when activations are large); profiling adds per-op overhead (steps are not timed while profiling); on CPU
the compute share of oversubscribed processes includes time the OS gave to other ranks.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from exatrain.bench.flops import flops_per_token_by_convention, mfu_formula
from exatrain.config import ConfigError, JobConfig
from exatrain.registry import CALLBACKS
from exatrain.train.callback import Callback
from exatrain.train.metrics import peak_memory_bytes, throughput

log = logging.getLogger("exatrain")

BENCH_FILE = "bench.json"
PHASES = ("warmup", "timed", "profile", "memory")
STEP_MARK = "exatrain_bench_step"
P2P = ("send", "recv", "sendrecv")
COMM = ("c10d", "gloo", "nccl", "rccl", "_c10d_functional", "wait_tensor", "barrier", "all_reduce", "allreduce",
        "all_gather", "allgather", "reduce_scatter", "reducescatter", "broadcast", "record_param_comms", "all_to_all")


def comm_kind(name: str) -> str | None:
    """"p2p", "collective" or None (not communication) for a profiler event or kernel name."""
    low = name.lower()
    if low.startswith("aten::"):  # aten::broadcast_tensors and friends are local ops
        return None
    if any(k in low for k in COMM):
        return "p2p" if any(k in low for k in P2P) else "collective"
    return None


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _subtract(segments: list[tuple[float, float]], holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Parts of disjoint sorted `segments` not covered by the union `holes` (sorted, disjoint)."""
    out, j = [], 0
    for a, b in segments:
        cur = a
        while j < len(holes) and holes[j][1] <= cur:
            j += 1
        k = j
        while k < len(holes) and holes[k][0] < b:
            if holes[k][0] > cur:
                out.append((cur, holes[k][0]))
            cur = max(cur, holes[k][1])
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


def _overlap(segments: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in segments) - sum(b - a for a, b in _subtract(segments, cover))


def classify_cpu(events, mark: str = STEP_MARK) -> dict[str, float]:
    """Seconds of compute / collective / p2p / other on the thread that ran the `mark`ed steps (see the module
    docstring). `events` are torch.profiler FunctionEvents (objects with name, thread, time_range, cpu_children)."""
    steps = [e for e in events if e.name == mark]
    if not steps:
        return {}
    thread = steps[0].thread
    windows = _union([(e.time_range.start, e.time_range.end) for e in steps])
    acc = {"compute": 0.0, "collective": 0.0, "p2p": 0.0, "other": 0.0}
    busy: list[tuple[float, float]] = []
    for e in events:
        if e.thread != thread or e.name == mark or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        span = [(e.time_range.start, e.time_range.end)]
        children = _union([(c.time_range.start, c.time_range.end) for c in e.cpu_children])
        own = _subtract(span, children)
        t = _overlap(own, windows)
        kind = comm_kind(e.name)
        if kind is None:
            kind = "compute" if e.name.startswith("aten::") else "other"
        acc[kind] += t
        if e.cpu_parent is None or e.cpu_parent.name == mark:
            busy.append((e.time_range.start, e.time_range.end))
    # between ops: blocked on a collective / transfer in flight on a worker thread, or anything else
    gaps = _subtract(windows, _union(busy))
    flights = {kind: _union([(e.time_range.start, e.time_range.end) for e in events
                             if e.thread != thread and comm_kind(e.name) == kind]) for kind in ("p2p", "collective")}
    p2p = _overlap(gaps, flights["p2p"])
    rest = _subtract(gaps, flights["p2p"])
    coll = _overlap(rest, flights["collective"])
    acc["p2p"] += p2p
    acc["collective"] += coll
    acc["other"] += sum(b - a for a, b in gaps) - p2p - coll
    return {k: v / 1e6 for k, v in acc.items()}


def classify_gpu(events, mark: str = STEP_MARK) -> dict[str, float]:
    """Seconds of compute / exposed collective / exposed p2p / idle on the GPU within the marked steps."""
    steps = [e for e in events if e.name == mark and e.device_type == torch.autograd.DeviceType.CPU]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    if not steps or not kernels:
        return {}
    windows = _union([(e.time_range.start, e.time_range.end) for e in steps])
    compute = _union([(k.time_range.start, k.time_range.end) for k in kernels if comm_kind(k.name) is None])
    out = {"compute": _overlap(windows, compute)}
    free = _subtract(windows, compute)
    for kind in ("p2p", "collective"):
        spans = _union([(k.time_range.start, k.time_range.end) for k in kernels if comm_kind(k.name) == kind])
        out[kind] = _overlap(free, spans)
        free = _subtract(free, spans)
    out["other"] = sum(b - a for a, b in free)  # idle: launch gaps, host work, waiting for a neighbour
    return {k: v / 1e6 for k, v in out.items()}


def shares(seconds: dict[str, float], pp: int, gpu: bool) -> dict[str, float]:
    """Fractions of the profiled time: compute, comm (collectives), bubble (pipeline waits), other."""
    total = sum(seconds.values())
    if total <= 0:
        return {}
    bubble = seconds["p2p"] + (seconds["other"] if gpu and pp > 1 else 0.0)
    other = seconds["other"] - (seconds["other"] if gpu and pp > 1 else 0.0)
    comm = seconds["collective"] + (seconds["p2p"] if pp == 1 else 0.0)
    return {"compute": seconds["compute"] / total, "comm": comm / total,
            "bubble": (bubble if pp > 1 else 0.0) / total, "other": other / total}


def run_delay() -> float:
    """Seconds the training thread has spent runnable but waiting for a CPU (Linux schedstat; 0 elsewhere).
    Only this thread: summing the gloo threads too over-corrects, since they mostly wait while it computes."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class BenchProbe(Callback):
    """See the module docstring."""

    name = "bench_probe"

    def __init__(self, cfg: JobConfig):
        b = cfg.bench
        self.warmup, self.profile_steps, self.memory_step = b.warmup_steps, b.profile_steps, int(b.memory_step)
        self.timed = cfg.train.steps - self.warmup - self.profile_steps - self.memory_step
        if self.timed < 1:
            raise ConfigError(f"train.steps={cfg.train.steps} leaves no timed step after bench.warmup_steps="
                              f"{self.warmup}, bench.profile_steps={self.profile_steps} and memory_step="
                              f"{bool(self.memory_step)}: raise train.steps")
        self.times: list[float] = []
        self.delays: list[float] = []  # per timed step: the training thread's run-queue wait (CPU contention)
        self._d0 = 0.0
        self.seconds: dict[str, float] = {}
        self.live_peak = 0
        self._t0 = 0.0
        self._prof = None
        self._mark = None
        self._live = None

    def _phase(self, step: int) -> str:
        if step < self.warmup:
            return "warmup"
        if step < self.warmup + self.timed:
            return "timed"
        if step < self.warmup + self.timed + self.profile_steps:
            return "profile"
        return "memory"

    def on_step_start(self, trainer) -> None:
        step = trainer.state.step
        phase = self._phase(step)
        _sync(trainer.device)
        if phase == "timed" and step == self.warmup and trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        if phase == "profile":
            if self._prof is None:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
                self._prof = profile(activities=acts)
                self._prof.__enter__()
            self._mark = torch.profiler.record_function(STEP_MARK)
            self._mark.__enter__()
        if phase == "memory" and trainer.device.type == "cpu":
            from exatrain.bench.measure import LiveBytes, live_tensors

            self._live = LiveBytes(live_tensors(trainer.engine))
            self._live.__enter__()
        self._d0 = run_delay()
        self._t0 = time.perf_counter()

    def on_step_end(self, trainer, stats, record: dict[str, Any]) -> None:
        phase = self._phase(trainer.state.step - 1)
        if self._mark is not None:
            self._mark.__exit__(None, None, None)
            self._mark = None
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self.live_peak, self._live = self._live.peak, None
        _sync(trainer.device)
        dt = time.perf_counter() - self._t0
        delay = run_delay() - self._d0
        record["bench_phase"] = PHASES.index(phase)  # metrics records hold numbers only
        record["bench_step_s"] = dt
        if phase == "timed":
            self.times.append(dt)
            self.delays.append(delay)
        if phase == "profile" and trainer.state.step == self.warmup + self.timed + self.profile_steps:
            self._prof.__exit__(None, None, None)
            events = self._prof.events()
            gpu = trainer.device.type == "cuda"
            self.seconds = (classify_gpu(events) if gpu else {}) or classify_cpu(events)
            self._prof = None

    def on_train_end(self, trainer, status: str) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
        if status != "completed" or not self.times:
            return
        dims = trainer.dims
        mine = {"rank": trainer.info.rank, "pp_rank": trainer.mesh.get_local_rank("pp"),
                "peak_mem_bytes": peak_memory_bytes(trainer.device), "live_peak_bytes": self.live_peak,
                "seconds": self.seconds, "shares": shares(self.seconds, dims.pp, trainer.device.type == "cuda")
                if self.seconds else {}, "times": self.times, "delays": self.delays}
        ranks: list = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
        if trainer.info.rank != 0:
            return
        summary = summarize(trainer, ranks)
        Path(trainer.run_dir, BENCH_FILE).write_text(json.dumps(summary, indent=1))
        log.info("bench: step %.3f s (median of %d), %.0f tokens/s, MFU %s", summary["step_s"],
                 len(self.times), summary["tokens_per_s"], f"{summary['mfu']:.2%}" if summary["mfu"] else "n/a")


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(trainer, ranks: list[dict]) -> dict[str, Any]:
    """bench.json: everything `exatrain bench scaling` tabulates and plots for one point."""
    import os

    cfg, dims = trainer.cfg, trainer.dims
    times = ranks[0]["times"]  # barrier-to-barrier: the same on every rank
    step = statistics.median(times)
    # without CPU contention: minus the largest run-queue wait any rank's training thread had in the step
    dedicated = [t - max(r["delays"][i] for r in ranks) for i, t in enumerate(times)]
    tokens = trainer.tokens_per_step
    world = dims.world_size
    peak = trainer.peak
    rates = throughput(tokens, step, trainer.flops_per_token, peak, world)
    by_convention = {c: throughput(tokens, step, f, peak, world)["mfu"]
                     for c, f in flops_per_token_by_convention(cfg.model, cfg.data.seq_len).items()}
    mean_shares = {}
    measured = [r["shares"] for r in ranks if r["shares"]]
    if measured:
        mean_shares = {k: statistics.fmean(s[k] for s in measured) for k in measured[0]}
    p = cfg.parallel
    return {
        "name": cfg.name, "world": world, "nodes": int(os.environ.get("SLURM_NNODES", "1")),
        "layout": {"tp": dims.tp, "pp": dims.pp, "dp_shard": dims.dp_shard, "dp_replicate": dims.dp_replicate,
                   "engine": p.engine, "zero_stage": p.zero_stage, "pp_schedule": p.pp_schedule if dims.pp > 1 else "",
                   "virtual_stages": dims.virtual_stages, "micro_batch": cfg.train.micro_batch,
                   "pp_microbatches": dims.pp_microbatches if dims.pp > 1 else 0,
                   "activation_checkpointing": cfg.train.activation_checkpointing, "dtype": cfg.train.dtype},
        "global_batch": cfg.train.global_batch, "seq_len": cfg.data.seq_len, "tokens_per_step": tokens,
        "params": trainer.n_params, "device": trainer.device.type,
        "step_times": times, "step_s": step, "step_p10": _quantile(times, 0.1), "step_p90": _quantile(times, 0.9),
        "step_min": min(times), "step_max": max(times),
        "step_times_uncontended": dedicated, "step_s_uncontended": statistics.median(dedicated),
        "run_delay_s": [statistics.median(r["delays"]) for r in ranks],
        "tokens_per_s": tokens / step, "tokens_per_s_per_device": rates["tokens_per_s"],
        "flops_per_token": trainer.flops_per_token, "tflops_per_device": rates["tflops"],
        "peak_tflops": peak.tflops, "peak_source": peak.source,
        "mfu": None if math.isnan(rates["mfu"]) else rates["mfu"],
        "flops_convention": cfg.metrics.flops_convention, "mfu_formula": mfu_formula(cfg.metrics.flops_convention),
        "mfu_by_convention": {c: None if math.isnan(v) else v for c, v in by_convention.items()},
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in ranks),
        "peak_mem_kind": "CUDA allocator peak" if trainer.device.type == "cuda" else "process peak RSS",
        "live_peak_bytes": [r["live_peak_bytes"] for r in ranks],
        "pp_ranks": [r["pp_rank"] for r in ranks],
        "breakdown": mean_shares, "breakdown_ranks": [r["shares"] for r in ranks],
        "breakdown_seconds": [r["seconds"] for r in ranks],
    }


@CALLBACKS.register("bench_probe")
def build(cfg: JobConfig) -> BenchProbe:
    return BenchProbe(cfg)
