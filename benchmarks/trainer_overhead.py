"""What the training loop costs on top of the model's own work: exatrain's trainer vs a minimal
hand-written PyTorch loop on the same model, batch and optimizer (AdamW + clipping).

The trainer's extra work per step is the data loader (packing real documents), the stop-flag and
label-count agreement, the LR schedule, the engine's bookkeeping (grad norm, clipping, parameter
groups), callbacks and a metrics record (JSONL + a log line) per step. The bar is overhead <= 5%.

Measured as *process CPU time* per step on one thread (time.process_time), so that other jobs on a
shared machine, which take wall-clock time but not this process's CPU time, cannot swamp the figure;
the two loops alternate `--repeats` times in one process and each repeat gives one ratio, reported
as the median with its range. The trainer's step time is taken by a callback between consecutive
`on_step_start` hooks, so it includes everything the loop does between steps (logging, checks).
Both loops use plain causal attention (data.document_masking=false): document-masked attention is a
feature with its own cost, not loop overhead.

    OMP_NUM_THREADS=1 python benchmarks/trainer_overhead.py [--steps 30] [--repeats 5] [--dim 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from exatrain.config import load_config
from exatrain.model.llama import build_model, materialize
from exatrain.train.callback import Callback
from exatrain.train.optim import build_optimizer, set_lr
from exatrain.train.trainer import train

OUT = Path(__file__).resolve().parent / "out"


class StepClock(Callback):
    """Process CPU time between consecutive step starts: one full iteration of the loop."""

    def __init__(self):
        self.marks: list[float] = []

    def on_step_start(self, trainer):
        self.marks.append(time.process_time())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def job(args, run_dir: str):
    return load_config("tiny.yaml", [
        f"run_dir={run_dir}", f"model.dim={args.dim}", f"model.n_layers={args.layers}",
        f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", f"train.steps={args.steps}",
        f"train.global_batch={args.batch}", f"train.micro_batch={args.batch}", "train.eval_every=0",
        "train.eval_batches=1", "checkpoint.every=0", "checkpoint.save_final=false", "data.document_masking=false",
        "metrics.tensorboard=false", "metrics.progress_bar=false", "metrics.log_every=1", "schedule.warmup_steps=5",
    ])


def trainer_step_times(args) -> list[float]:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as run_dir:
        train(job(args, run_dir), callbacks=[clock])
    return clock.step_times()[args.warmup:]


def plain_step_times(args) -> list[float]:
    """The same model, optimizer groups and LR, on random tokens, written as a plain loop."""
    cfg = job(args, "unused")
    model = materialize(build_model(cfg.model), "cpu", seed=0)
    opt = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    marks = []
    for _ in range(args.steps):
        marks.append(time.process_time())
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        set_lr(opt, cfg.optim.lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
    return [b - a for a, b in zip(marks, marks[1:])][args.warmup:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ours, plain, ratios = [], [], []
    for r in range(args.repeats):
        t = statistics.median(trainer_step_times(args))
        q = statistics.median(plain_step_times(args))
        ours.append(t)
        plain.append(q)
        ratios.append(t / q)
        print(f"repeat {r + 1}: trainer {1e3 * t:.1f} ms/step, plain {1e3 * q:.1f} ms/step, "
              f"overhead {100 * (t / q - 1):+.1f}%", flush=True)
    overhead = 100 * (statistics.median(ratios) - 1)
    lo, hi = 100 * (min(ratios) - 1), 100 * (max(ratios) - 1)
    tokens = args.batch * args.seq
    print(f"\n{'loop':<10}{'CPU ms/step':>14}{'tokens/CPU-s':>14}")
    for name, times in (("plain", plain), ("exatrain", ours)):
        med = statistics.median(times)
        print(f"{name:<10}{1e3 * med:>14.1f}{tokens / med:>14.0f}")
    print(f"overhead: {overhead:+.1f}% (median of {args.repeats} interleaved repeats; range {lo:+.1f}% .. {hi:+.1f}%; "
          "bar <= 5%)")
    OUT.mkdir(exist_ok=True)
    result = {"config": vars(args), "metric": "process CPU time per step, one thread",
              "trainer_cpu_s_per_step": ours, "plain_cpu_s_per_step": plain, "ratios": ratios,
              "overhead_pct_median": overhead, "overhead_pct_range": [lo, hi]}
    (OUT / "trainer_overhead.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
