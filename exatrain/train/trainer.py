"""The training loop. It only knows narrow hooks: a model builder, a parallel engine, a data
loader, an LR schedule, a checkpointer and a metrics logger; each method of the papers plugs
in through one of them (S2 through the model, MeCo through the loader, muP through the
engine's param groups, the Power scheduler through the schedule)."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from exatrain.config import JobConfig, to_yaml
from exatrain.data import Batch, build_data
from exatrain.data.meco import metadata_enabled
from exatrain.launch.bootstrap import init_distributed
from exatrain.model.llama import build_model, count_params
from exatrain.parallel import ParallelDims, build_engine
from exatrain.parallel.checkpoint import Checkpointer, TrainState
from exatrain.train.metrics import MetricsLogger, peak_memory_bytes, throughput
from exatrain.train.schedules import build_schedule
from exatrain.bench.flops import flops_per_token
from exatrain.bench.peak import peak_tflops

log = logging.getLogger("exatrain")

_stop_reason: str | None = None


def request_stop(reason: str) -> None:
    """Ask the loop to checkpoint and return at the next step boundary (signal-handler safe)."""
    global _stop_reason
    _stop_reason = reason


@dataclass
class TrainResult:
    status: str
    step: int
    final_loss: float
    run_dir: Path
    val_loss: float = float("nan")


def device_type(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA/ROCm device is visible")
    return name


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)


def _all_reduce(value: float | int, op=dist.ReduceOp.SUM) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.item()


def _stop_agreed() -> str | None:
    """Signals reach ranks at different times; all ranks stop at the same step boundary."""
    flag = _all_reduce(1.0 if _stop_reason else 0.0, dist.ReduceOp.MAX)
    return (_stop_reason or "stop requested on another rank") if flag else None


def split_micro(batch: Batch, micro_batch: int) -> list[Batch]:
    rows = batch.tokens.shape[0]
    if rows % micro_batch:
        raise ValueError(f"rank batch of {rows} rows is not a multiple of train.micro_batch={micro_batch}")
    fields = ("tokens", "labels", "positions", "doc_ids")
    chunks = {f: getattr(batch, f).split(micro_batch) for f in fields}
    return [Batch(**{f: chunks[f][i] for f in fields}) for i in range(rows // micro_batch)]


def count_labels(micro: list[Batch], replicas: int) -> int:
    """Global number of trained tokens in this step: the loss is normalised by it on every layout.

    `replicas` ranks (tp × pp) see the same data rows, so their counts are divided out."""
    local = sum(int((b.labels != -100).sum()) for b in micro)
    return int(_all_reduce(local)) // replicas


def check_finite(stats, step: int, policy: str) -> None:
    """nan_policy=skip: a step whose gradients are non-finite was skipped by the engine (logged, counted in
    metrics as `skipped`); nan_policy=raise, or an engine that cannot skip, stops the run."""
    if math.isfinite(stats.loss) and math.isfinite(stats.grad_norm):
        return
    if stats.skipped and policy == "skip":
        log.warning("step %d: non-finite loss/gradients (loss %s, grad norm %s); optimizer step skipped",
                    step, stats.loss, stats.grad_norm)
        return
    where = "the weights are unchanged" if stats.skipped else "the weights may now be non-finite"
    raise FloatingPointError(f"step {step}: non-finite loss {stats.loss} / grad norm {stats.grad_norm} "
                             f"({where}); lower optim.lr or raise optim.grad_clip and resume from the last "
                             "checkpoint, or set train.nan_policy=skip to skip such steps")


def layout_of(dims: ParallelDims) -> dict[str, int]:
    return {k: getattr(dims, k) for k in ("pp", "dp_replicate", "dp_shard", "tp")}


def evaluate(engine, loader, cfg: JobConfig) -> dict[str, float]:
    total, count = 0.0, 0
    for batch in loader.iter_batches(cfg.train.eval_batches, cfg.train.global_batch):
        loss_sum, n = engine.eval_loss(split_micro(batch, cfg.train.micro_batch))
        total, count = total + loss_sum, count + n
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def train(cfg: JobConfig) -> TrainResult:
    """Run (or resume) the job described by `cfg`; the process group it creates is torn down on return."""
    owns_group = not dist.is_initialized()
    try:
        return _train(cfg)
    finally:
        _clear_stop()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: JobConfig) -> TrainResult:
    kind = device_type(cfg.train.device)
    info = init_distributed(kind, cfg.parallel.timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    setup_logging(info.rank)
    dims = ParallelDims.from_config(cfg, info.world_size)
    mesh = dims.build_mesh(device.type)
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.train.seed)

    cache_dir = Path(os.environ.get("EXATRAIN_CACHE", Path.home() / ".cache" / "exatrain"))
    data = build_data(cfg, dims.dp_rank(mesh), dims.dp_size, cache_dir)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.tokenizer.vocab_size
    elif cfg.model.vocab_size < data.tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{data.tokenizer.vocab_size}; set model.vocab_size=0 to use the tokenizer's")
    if info.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))

    model = build_model(cfg.model)
    n_params = count_params(model)
    engine = build_engine(model, cfg, dims, mesh, device)
    schedule = build_schedule(cfg)
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    state = TrainState()
    resume_from = ckpt.resume_path()
    if resume_from is not None:
        state = ckpt.load(resume_from, engine, data.train, cfg)
    resumed_step = state.step if resume_from is not None else -1
    if state.step >= cfg.train.steps:
        log.info("run already complete (step %d of %d): evaluating only; raise train.steps to train further",
                 state.step, cfg.train.steps)

    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    total_tokens = cfg.train.steps * tokens_per_step
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_tflops(device, cfg.train.dtype, cfg.metrics.peak_tflops)
    metrics = MetricsLogger(run_dir, cfg.metrics, info.rank, cfg.train.steps, start_step=state.step)
    layout = layout_of(dims)
    log.info("model: %.2fM params, layout %s, %d tokens/step, %d steps, peak %.3g TFLOP/s (%s)",
             n_params / 1e6, "·".join(f"{k}{v}" for k, v in layout.items()), tokens_per_step, cfg.train.steps,
             peak.tflops, peak.source)

    def checkpoint() -> None:
        ckpt.save(state.step, engine, data.train, state, cfg, layout)

    loss = float("nan")
    status = "completed"
    last_eval, last_eval_step = {}, -1
    while state.step < cfg.train.steps:
        reason = _stop_agreed()
        if reason:
            log.warning("stopping at step %d: %s", state.step, reason)
            checkpoint()
            status = "preempted"
            break
        t0 = time.perf_counter()
        if cfg.data.meco.enabled:
            data.train.set_metadata(metadata_enabled(cfg.data.meco, state.tokens_seen, total_tokens))
        micro = split_micro(data.train.next_batch(cfg.train.global_batch), cfg.train.micro_batch)
        n_labels = count_labels(micro, dims.tp * dims.pp)
        t_data = time.perf_counter() - t0
        lr = schedule.lr(state.tokens_seen, cfg.train.global_batch)
        stats = engine.train_step(micro, n_labels, lr)
        check_finite(stats, state.step + 1, cfg.train.nan_policy)
        loss = stats.loss
        state.step += 1
        state.tokens_seen += tokens_per_step
        elapsed = time.perf_counter() - t0
        metrics.log_step(state.step, {
            "loss": stats.loss, "grad_norm": stats.grad_norm, "lr": lr, "tokens_seen": state.tokens_seen,
            **({"skipped": 1} if stats.skipped else {}),
            **throughput(tokens_per_step, elapsed, fpt, peak, info.world_size),
            "peak_mem_gb": peak_memory_bytes(device) / 2**30, "data_wait_pct": 100 * t_data / elapsed,
        })
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0:
            last_eval, last_eval_step = evaluate(engine, data.val, cfg), state.step
            metrics.log_eval(state.step, last_eval)
        if cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0 and state.step < cfg.train.steps:
            checkpoint()

    val_loss = float("nan")
    if status == "completed":
        val = last_eval if last_eval_step == state.step else evaluate(engine, data.val, cfg)
        val_loss = val["val_loss"]
        if last_eval_step != state.step:
            metrics.log_eval(state.step, val)
        if cfg.checkpoint.save_final and state.step != resumed_step:
            checkpoint()
    metrics.close()
    return TrainResult(status, state.step, loss, run_dir, val_loss)


def _clear_stop() -> None:
    """A handled stop must not leak into the next `train` call of this process."""
    global _stop_reason
    _stop_reason = None
