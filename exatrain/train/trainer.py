"""The training loop, assembled from components: engine, data, LR schedule, checkpointer, metrics and
callbacks. Methods plug in through narrow seams and never through an `if` in the loop:

- model converters swap modules before parallelisation (exatrain.model.convert; the build sequence is
  exatrain.parallel.parallelize);
- callbacks hook around steps, evaluations and checkpoints and checkpoint their own state
  (exatrain.train.callback; MeCo's cooldown is exatrain.train.meco);
- the engine runs the steps on any layout (exatrain.engine), the schedule gives each step's LR from the
  tokens seen (exatrain.train.schedules), the data loader is resumable (exatrain.data).

`train(cfg)` runs or resumes a job; `Trainer(cfg, callbacks)` builds one for finer control.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from exatrain.bench.flops import flops_per_token
from exatrain.bench.peak import peak_tflops
from exatrain.config import ConfigError, JobConfig, to_yaml
from exatrain.data import build_data, split_micro
from exatrain.data.batch import Batch
from exatrain.engine import StepStats, build_engine
from exatrain.files import write_private
from exatrain.launch.bootstrap import init_distributed
from exatrain.model.llama import build_model, count_params
from exatrain.parallel.dims import MESH_DIMS, ParallelDims
from exatrain.registry import CALLBACKS
from exatrain.train.callback import Callback
from exatrain.train.checkpoint import ENGINE, Checkpointer, Stateful, TrainState, list_checkpoints
from exatrain.train.deadline import DeadlineCallback
from exatrain.train.guard import weights_finite
from exatrain.train.metrics import MetricsLogger, peak_memory_bytes, throughput
from exatrain.train.runlock import hold_run_dir
from exatrain.train.schedules import build_schedule
from exatrain.train.watchdog import WatchdogCallback

log = logging.getLogger("exatrain")


# Why a run stops before train.steps, by precedence: a method's decision to end the run outranks a
# preemption (which a Slurm job answers by requeueing itself).
STOP_STATUSES = ("preempted", "stopped")
MAX_ROLLBACKS = 3  # rollbacks to one checkpoint before a spiking run is given up
# Process exit codes of `exatrain train` and exatrain.launch.job: a run checkpointed on SIGTERM (scancel, systemd,
# a Kubernetes eviction) exits EX_TEMPFAIL, "resume me", distinct from success, failure and a method's stop.
EXIT_COMPLETED, EXIT_STOPPED, EXIT_TERMINATED = 0, 3, 75


@dataclass
class TrainResult:
    status: str  # completed | preempted (resume it) | stopped (a method ended it, e.g. divergence)
    step: int
    final_loss: float
    run_dir: Path
    val_loss: float = float("nan")
    signal: str = ""  # the signal that stopped the run (SIGTERM, SIGUSR2), if one did


def exit_code(result: TrainResult) -> int:
    if result.status == "completed":
        return EXIT_COMPLETED
    return EXIT_TERMINATED if result.signal == "SIGTERM" else EXIT_STOPPED


def train(cfg: JobConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run (or resume) the job described by a loaded config; the process group it creates is torn down."""
    owns_group = not dist.is_initialized()
    trainer = None
    try:
        trainer = Trainer(cfg, callbacks)
        return trainer.fit()
    finally:
        if trainer is not None:
            trainer.close()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA/ROCm device is visible")
    return name


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)


def all_reduce(value: float, op=dist.ReduceOp.SUM) -> float:
    """`value` combined over every rank (itself in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


def build_callbacks(cfg: JobConfig, extra: Sequence[Callback]) -> list[Callback]:
    """`train.callbacks` (the methods' own come first, added at config resolution), then `extra`, then the
    supervision callbacks (time-limit stop, hang watchdog)."""
    callbacks = [CALLBACKS.get(name)(cfg) for name in cfg.train.callbacks] + list(extra) + supervision(cfg)
    names = [callback_key(cb) for cb in callbacks]
    if len(set(names)) != len(names):
        raise ConfigError(f"train.callbacks: two callbacks share a checkpoint name: {names}")
    return callbacks


def supervision(cfg: JobConfig) -> list[Callback]:
    """The time-limit stop and the hang watchdog, on unless turned off (launch.stop_margin, parallel.watchdog_s)."""
    out: list[Callback] = []
    if cfg.launch.stop_margin:
        out.append(DeadlineCallback.from_job(cfg))
    if cfg.parallel.watchdog_s:
        out.append(WatchdogCallback.from_job(cfg))
    return out


def callback_key(cb: Callback) -> str:
    return f"callbacks.{getattr(cb, 'name', '') or type(cb).__name__}"


def check_finite(stats: StepStats, step: int, policy: str, engine: Any) -> None:
    """nan_policy=skip: a step whose gradients are non-finite was skipped by the engine (logged, counted in
    metrics as `skipped`) as long as the weights are finite; nan_policy=raise, non-finite weights (every later
    step would be skipped too), or an engine that cannot skip, stops the run."""
    if math.isfinite(stats.loss) and math.isfinite(stats.grad_norm):
        return
    if stats.skipped and policy == "skip":
        if not weights_finite(engine):
            raise FloatingPointError(f"step {step}: the weights themselves are non-finite, so every step would be "
                                     "skipped; lower optim.lr or raise optim.grad_clip and resume from the last "
                                     "checkpoint (a non-finite checkpoint is never written)")
        log.warning("step %d: non-finite loss/gradients (loss %s, grad norm %s); optimizer step skipped",
                    step, stats.loss, stats.grad_norm)
        return
    where = "the weights are unchanged" if stats.skipped else "the weights may now be non-finite"
    raise FloatingPointError(f"step {step}: non-finite loss {stats.loss} / grad norm {stats.grad_norm} "
                             f"({where}); lower optim.lr or raise optim.grad_clip and resume from the last "
                             "checkpoint, or set train.nan_policy=skip to skip such steps")


class Trainer:
    """One training job on this rank. Construction builds every component and resumes from the latest
    checkpoint; `fit()` runs the loop. Attributes callbacks may use: cfg, state, engine, data, dims,
    mesh, device, metrics, run_dir, and during a step `micro_batches` (this rank's); requests they may make:
    `request_stop` (checkpoint and end or pause the run) and `request_rollback` (reload the last good checkpoint)."""

    def __init__(self, cfg: JobConfig, callbacks: Sequence[Callback] = ()):
        self.cfg = cfg
        self._stop: tuple[str, str] | None = None  # (status, reason)
        self._rollback: str | None = None  # why a callback asked to reload the last good checkpoint
        self._rollbacks: dict[Path, int] = {}
        self._signal = ""  # the last stop signal received
        self._previous_handlers = self._install_stop_handlers(cfg.train.stop_signal)
        kind = device_type(cfg.train.device)
        self.info = init_distributed(kind, cfg.parallel.timeout_s)
        self.device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
        setup_logging(self.info.rank)
        self.dims = ParallelDims.from_config(cfg, self.info.world_size)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.run_dir = Path(cfg.run_dir)
        self.lock = hold_run_dir(self.run_dir, self.info.rank)  # before anything writes into run_dir
        torch.manual_seed(cfg.train.seed)

        self.data = build_data(cfg, self.dims.dp_rank(self.mesh), self.dims.dp_size)
        if self.data.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"{self.data.tokenizer.vocab_size}; set model.vocab_size=0 to use the tokenizer's")
        if self.info.rank == 0:  # hold_run_dir created run_dir
            write_private(self.run_dir / "config.yaml", to_yaml(cfg))

        self.callbacks = build_callbacks(cfg, callbacks)
        model = build_model(cfg.model)
        self._emit("on_build", model)
        self.n_params = count_params(model)
        self.engine = build_engine(model, cfg, self.dims, self.mesh, self.device)
        self.schedule = build_schedule(cfg)
        self.state = TrainState()
        self.micro_batches: list[Batch] = []
        self.checkpointer = Checkpointer(self.run_dir, cfg)
        resume_from = self.checkpointer.resume_path()
        if resume_from is not None:
            self.checkpointer.load(resume_from, self.checkpoint_states())
        self.saved_step = self.state.step if resume_from is not None else -1  # the step the newest checkpoint holds

        self.tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len, cfg.metrics.flops_convention)
        self.peak = peak_tflops(self.device, cfg.train.dtype, cfg.metrics.peak_tflops)
        self.metrics = MetricsLogger(self.run_dir, cfg.metrics, self.info.rank, cfg.train.steps,
                                     start_step=self.state.step)
        self.layout = {k: getattr(self.dims, k) for k in MESH_DIMS}
        log.info("model: %.2fM params, layout %s, %d tokens/step, %d steps, peak %.3g TFLOP/s (%s), "
                 "MFU in the %s FLOP convention", self.n_params / 1e6,
                 "·".join(f"{k}{v}" for k, v in self.layout.items()), self.tokens_per_step, cfg.train.steps,
                 self.peak.tflops, self.peak.source, cfg.metrics.flops_convention)

    # -- the loop

    def fit(self) -> TrainResult:
        """Train to `train.steps` (or until a stop request), evaluate, and write the final checkpoint."""
        if self.state.step >= self.cfg.train.steps:
            log.info("run already complete (step %d of %d): evaluating only; raise train.steps to train further",
                     self.state.step, self.cfg.train.steps)
        self._emit("on_train_start", self)
        status = "failed"
        try:
            result = self._run()
            status = result.status
        finally:
            self._emit("on_train_end", self, status)
        return result

    def _run(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        loss, last_eval, finite = float("nan"), None, True
        while state.step < cfg.train.steps:
            stop = self._stop_agreed()
            if stop:
                log.warning("stopping at step %d (%s): %s", state.step, *stop)
                if state.step != self.saved_step:  # e.g. a periodic checkpoint was just written at this step
                    self.save_checkpoint()
                return TrainResult(stop[0], state.step, loss, self.run_dir, signal=self._signal)
            self._emit("on_step_start", self)
            stats, record = self.train_step()
            loss, finite = stats.loss, math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
            self._emit("on_step_end", self, stats, record)
            self.metrics.log_step(state.step, record)
            if self._rollback is not None:
                self.roll_back()
                continue
            if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
                last_eval = (state.step, self.evaluate())
            if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and state.step < cfg.train.steps:
                self.save_checkpoint()
        if last_eval is None or last_eval[0] != state.step:
            last_eval = (state.step, self.evaluate())
        if cfg.checkpoint.save_final and state.step != self.saved_step:
            self.save_checkpoint()
        if not finite:
            raise FloatingPointError(f"the run ended with a non-finite loss or gradients at step {state.step} (its "
                                     "update was skipped; see `skipped` in metrics.jsonl); the data or the settings "
                                     "make non-finite values: check them before training further")
        return TrainResult("completed", state.step, loss, self.run_dir, last_eval[1]["val_loss"])

    def train_step(self) -> tuple[StepStats, dict[str, Any]]:
        """Draw the global batch, run one optimizer step, and return its stats and metrics record."""
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        self.micro_batches = split_micro(self.data.train.next_batch(cfg.train.global_batch), cfg.train.micro_batch)
        # tp x pp ranks see the same rows, so their counts are divided out of the global label count.
        n_labels = int(all_reduce(sum(b.n_labels for b in self.micro_batches))) // (self.dims.tp * self.dims.pp)
        t_data = time.perf_counter() - t0
        lr = self.schedule.lr(state.tokens_seen, cfg.train.global_batch)
        stats = self.engine.train_step(self.micro_batches, n_labels, lr)
        check_finite(stats, state.step + 1, cfg.train.nan_policy, self.engine)
        state.step += 1
        state.tokens_seen += self.tokens_per_step
        elapsed = time.perf_counter() - t0
        record = {
            "loss": stats.loss, "grad_norm": stats.grad_norm, "lr": lr, "tokens_seen": state.tokens_seen,
            **({"skipped": 1} if stats.skipped else {}),
            **throughput(self.tokens_per_step, elapsed, self.flops_per_token, self.peak, self.info.world_size),
            "peak_mem_gb": peak_memory_bytes(self.device) / 2**30, "data_wait_pct": 100 * t_data / elapsed,
        }
        return stats, record

    def evaluate(self) -> dict[str, float]:
        """Validation loss over `train.eval_batches` fixed batches; callbacks may add entries before logging."""
        cfg = self.cfg
        total, count = 0.0, 0
        for batch in self.data.val.iter_batches(cfg.train.eval_batches, cfg.train.global_batch):
            loss_sum, n = self.engine.eval_loss(split_micro(batch, cfg.train.micro_batch))
            total, count = total + loss_sum, count + n
        loss = total / max(count, 1)
        results = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        self._emit("on_eval", self, results)
        self.metrics.log_eval(self.state.step, results)
        return results

    def save_checkpoint(self) -> Path:
        path = self.checkpointer.save(self.state.step, self.checkpoint_states(),
                                      {"tokens_seen": self.state.tokens_seen, "layout": self.layout})
        self.saved_step = self.state.step
        self._emit("on_checkpoint", self, path)
        return path

    def checkpoint_states(self) -> dict[str, Stateful]:
        """What a checkpoint holds: model + optimizer, progress, the data position, each callback."""
        return {ENGINE: self.engine, "trainer": self.state, "data": self.data.train,
                **{callback_key(cb): cb for cb in self.callbacks if hasattr(cb, "state_dict")}}

    # -- rolling back

    def request_rollback(self, reason: str) -> None:
        """Reload the newest checkpoint, except the data loader's position, right after this step is logged:
        training goes on from the last good weights with the batches after the bad one (train.spike_policy)."""
        self._rollback = reason

    def roll_back(self) -> None:
        reason, self._rollback = self._rollback, None
        found = list_checkpoints(self.checkpointer.dir)
        if not found:
            raise FloatingPointError(f"{reason}: no checkpoint to roll back to yet; lower checkpoint.every or "
                                     "raise train.spike_warmup")
        path = found[-1]
        self._rollbacks[path] = self._rollbacks.get(path, 0) + 1
        if self._rollbacks[path] > MAX_ROLLBACKS:
            raise FloatingPointError(f"{reason}: already rolled back to {path} {MAX_ROLLBACKS} times and the loss "
                                     "keeps spiking; lower optim.lr or raise train.spike_threshold")
        self.checkpointer.load(path, {k: s for k, s in self.checkpoint_states().items() if k != "data"})
        self.saved_step = -1  # that checkpoint's data position is behind this run's: a stop must save again
        log.warning("%s: rolled back to %s (step %d); the data loader stays ahead, skipping the batches since",
                    reason, path, self.state.step)

    # -- stopping

    def request_stop(self, reason: str, status: str = "preempted") -> None:
        """Checkpoint and return at the next step boundary (safe to call from a signal handler). `status`
        "preempted" means resume later (a Slurm job requeues itself); "stopped" ends the run for good."""
        if status not in STOP_STATUSES:
            raise ValueError(f"stop status must be one of {STOP_STATUSES}, got {status!r}")
        if self._stop is None or STOP_STATUSES.index(status) >= STOP_STATUSES.index(self._stop[0]):
            self._stop = (status, reason)

    def _stop_agreed(self) -> tuple[str, str] | None:
        """Signals reach ranks at different times; all ranks stop at the same step boundary, with the
        highest-precedence status any rank asked for."""
        mine = STOP_STATUSES.index(self._stop[0]) + 1 if self._stop else 0
        agreed = int(all_reduce(float(mine), dist.ReduceOp.MAX))
        if not agreed:
            return None
        status = STOP_STATUSES[agreed - 1]
        reason = self._stop[1] if self._stop and self._stop[0] == status else f"{status} on another rank"
        return status, reason

    def _install_stop_handlers(self, name: str) -> list[tuple[signal.Signals, Any]]:
        """Slurm's pre-limit signal (or `scancel --signal`) and SIGTERM (scancel, systemd, Kubernetes) become a
        stop request; `close` restores the previous handlers. Handlers can only be set from the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return []

        def handle(num: int, _frame: Any) -> None:
            self._signal = signal.Signals(num).name
            self.request_stop(f"received {self._signal} (time limit, preemption or shutdown)")

        installed = []
        for signum in dict.fromkeys(signal.Signals[n] for n in (name, "SIGTERM") if n):
            previous = signal.signal(signum, handle)
            installed.append((signum, signal.SIG_DFL if previous is None else previous))
        return installed

    def close(self) -> None:
        """Flush metrics, give the stop signal back and release run_dir; safe to call on a half-built trainer."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None
        for signum, previous in getattr(self, "_previous_handlers", []):
            signal.signal(signum, previous)
        self._previous_handlers = []

    def _emit(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(*args)
