"""Toy-scale check of the Power scheduler's claim (Shen et al. 2024, arXiv:2408.13359; DESIGN.md §8).

Claim: with muP, one Power-scheduler setting (a, b, lr_max) works across batch sizes and token
budgets, whereas a cosine peak LR tuned at one setting does not transfer. Here: a 2-layer muP model
on the embedded corpus (byte tokens), batch β ∈ {8, 16} sequences × budget T ∈ {T0, 2·T0} tokens,
the same warmup tokens and the same held-out sequences for every run. Arms:

- cosine: peak LR swept at the reference setting (β=8, T0), the best carried to the other three;
- power: `a` swept at the reference setting the same way (b=-0.51 and lr_max=0.02 kept), the best
  carried. The paper's a=4 is one point of that sweep.

Every cell is the mean over SEEDS (init seeds); the spread between seeds is reported next to it,
because at this scale it is as large as the effects being measured.

    python studies/power_scheduler.py        # ~15 min on 2 idle CPU cores; finished runs are reused
Writes studies/out/power_scheduler.{json,png,md}; run directories go to runs/studies/.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from exatrain.config import load_config, to_yaml  # noqa: E402
from exatrain.train.metrics import read_metrics  # noqa: E402
from exatrain.train.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = "studies/power_scheduler.yaml"  # shipped in exatrain/configs/
OUT = REPO / "studies" / "out"
RUNS = REPO / "runs" / "studies" / "power_scheduler"

REF_BATCH = 8
REF_STEPS = 150
BATCHES = (8, 16)
BUDGET_MULTS = (1, 2)
WARMUP_REF_STEPS = 10
EVAL_SEQS = 128
SEEDS = (0, 1)
COSINE_LRS = (1e-3, 2e-3, 4e-3, 8e-3)
COSINE_MIN_RATIO = 0.1
POWER_AS = (0.015, 0.03, 0.06, 0.12, 4.0)


@dataclass(frozen=True)
class Setting:
    batch: int
    tokens: int

    @property
    def label(self) -> str:
        return f"β={self.batch}, T={self.tokens / 1e3:.0f}k"


def arm_overrides(kind: str, value: float) -> list[str]:
    if kind == "cosine":
        return ["schedule.name=cosine", f"optim.lr={value}", f"schedule.min_lr_ratio={COSINE_MIN_RATIO}"]
    return ["schedule.name=power", f"schedule.power_a={value}"]


def run(kind: str, value: float, setting: Setting, seq_len: int, seed: int) -> dict:
    """One training run of an arm ("cosine" with peak LR `value`, "power" with a = `value`).

    A finished run leaves result.json in its run directory and is reused while its resolved
    config is unchanged, so an interrupted study (or a widened sweep) only runs what is missing.
    """
    tokens_per_step = setting.batch * seq_len
    run_dir = RUNS / f"{kind}_{value:g}_b{setting.batch}_t{setting.tokens}_s{seed}"
    cfg = load_config(CONFIG, [
        f"run_dir={run_dir}", f"train.seed={seed}", f"train.global_batch={setting.batch}",
        f"train.micro_batch={setting.batch}", f"train.steps={setting.tokens // tokens_per_step}",
        f"schedule.warmup_steps={WARMUP_REF_STEPS * REF_BATCH // setting.batch}",
        f"train.eval_batches={EVAL_SEQS // setting.batch}", *arm_overrides(kind, value)])
    config_text = to_yaml(cfg)
    cached = run_dir / "result.json"
    if cached.exists() and json.loads(cached.read_text())["config"] == config_text:
        return json.loads(cached.read_text())["result"]
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    res = train(cfg)
    recs = read_metrics(run_dir / "metrics.jsonl", "train")
    result = {"val_loss": res.val_loss, "final_train_loss": res.final_loss, "seconds": time.perf_counter() - t0,
              "curve": [[r["tokens_seen"], r["loss"], r["lr"]] for r in recs]}
    if res.status == "completed":
        cached.write_text(json.dumps({"config": config_text, "result": result}))
    return result


def cell(kind: str, value: float, setting: Setting, seq_len: int) -> dict:
    """Seed-averaged val loss of one (arm, setting), with the per-seed values and seed 0's curve."""
    runs = [run(kind, value, setting, seq_len, seed) for seed in SEEDS]
    losses = [r["val_loss"] for r in runs]
    return {"val_loss": statistics.fmean(losses), "val_losses": losses, "spread": max(losses) - min(losses),
            "curve": runs[0]["curve"]}


def smooth(xs: list[float], k: int = 15) -> list[float]:
    return [statistics.fmean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def crossover_tokens(a: float, b: float, lr_max: float, batch: int) -> float:
    """Tokens below which min(lr_max, β·a·n^b) sits at lr_max."""
    return (lr_max / (batch * a)) ** (1.0 / b)


def plot(grid: dict[str, dict[str, dict]], labels: list[str], path: Path) -> None:
    fig, axes = plt.subplots(2, len(labels), figsize=(4 * len(labels), 7), sharex="col")
    for col, label in enumerate(labels):
        for (arm, cells), color in zip(grid.items(), ("tab:blue", "tab:red")):
            c = cells[label]
            toks = [p[0] / 1e3 for p in c["curve"]]
            axes[0, col].plot(toks, smooth([p[1] for p in c["curve"]]), color=color,
                              label=f"{arm}: val {c['val_loss']:.3f}±{c['spread'] / 2:.3f}")
            axes[1, col].plot(toks, [p[2] for p in c["curve"]], color=color)
        axes[0, col].set(title=label, ylabel="train loss, seed 0 (smoothed)")
        axes[0, col].legend(fontsize=7)
        axes[1, col].set(xlabel="tokens (k)", ylabel="LR", yscale="log")
    fig.suptitle("Power scheduler vs cosine, each tuned at β=8, T0 (toy muP model, embedded corpus, bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    labels, grid = result["settings"], result["grid"]
    best = {s: min(grid[arm][s]["val_loss"] for arm in grid) for s in labels}
    lines = ["# Power scheduler study (toy scale)", "",
             f"Model: {result['model']}. Warmup {result['warmup_tokens']} tokens for every run; final validation "
             f"loss (nats/byte) on the same {EVAL_SEQS} held-out sequences; each cell is the mean over seeds "
             f"{list(SEEDS)} ± half their spread. Hyperparameters tuned at {labels[0]}.", "",
             "| arm | " + " | ".join(labels) + " | mean regret |", "|---|" + "---|" * (len(labels) + 1)]
    for arm, cells in grid.items():
        regret = statistics.fmean(cells[s]["val_loss"] - best[s] for s in labels)
        vals = [f"{cells[s]['val_loss']:.3f} ± {cells[s]['spread'] / 2:.3f}" for s in labels]
        vals = [f"**{v}**" if cells[s]["val_loss"] == best[s] else v for v, s in zip(vals, labels)]
        lines.append(f"| {arm} | " + " | ".join(vals) + f" | {regret:+.3f} |")
    for name, header in (("cosine", "cosine peak LR"), ("power_a", "power a (b=-0.51, lr_max=0.02)")):
        lines += ["", f"| {header} | val loss at {labels[0]} |", "|---|---|"]
        lines += [f"| {v:g} | {c['val_loss']:.3f} ± {c['spread'] / 2:.3f} |" for v, c in result["sweeps"][name]]
    lines += ["", "Power LR sits at lr_max below these token counts (β·a·n^b ≥ lr_max):", ""]
    lines += [f"- a={a:g}, β={b}: {n:,.0f} tokens" for a, b, n in result["crossovers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    # One intra-op thread: on shared, oversubscribed cores OpenMP barriers make 2 threads 10-50x slower.
    torch.set_num_threads(1)
    base = load_config(CONFIG)
    seq = base.data.seq_len
    t0_tokens = REF_STEPS * REF_BATCH * seq
    settings = [Setting(b, m * t0_tokens) for b in BATCHES for m in BUDGET_MULTS]
    ref = settings[0]
    start = time.perf_counter()

    cos_sweep = {lr: cell("cosine", lr, ref, seq) for lr in COSINE_LRS}
    pow_sweep = {a: cell("power", a, ref, seq) for a in POWER_AS}
    best_lr = min(cos_sweep, key=lambda k: cos_sweep[k]["val_loss"])
    best_a = min(pow_sweep, key=lambda k: pow_sweep[k]["val_loss"])
    arms = {f"cosine (lr={best_lr:g})": ("cosine", best_lr), f"power (a={best_a:g})": ("power", best_a)}
    grid = {arm: {s.label: cell(kind, value, s, seq) for s in settings} for arm, (kind, value) in arms.items()}

    m, sc = base.model, base.schedule
    result = {
        "model": f"dim {m.dim}, {m.n_layers} layers, muP base_dim {m.mup.base_dim}, seq_len {seq}",
        "warmup_tokens": WARMUP_REF_STEPS * REF_BATCH * seq, "seeds": list(SEEDS),
        "settings": [s.label for s in settings], "grid": grid,
        "sweeps": {"cosine": [[lr, c] for lr, c in cos_sweep.items()],
                   "power_a": [[a, c] for a, c in pow_sweep.items()]},
        "crossovers": [[a, b, crossover_tokens(a, sc.power_b, sc.power_lr_max, b)]
                       for a in (4.0, best_a) for b in BATCHES],
        "total_seconds": time.perf_counter() - start,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    plot(grid, result["settings"], OUT / "power_scheduler.png")
    (OUT / "power_scheduler.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (OUT / "power_scheduler.md").write_text(md)
    print(md)
    print(f"total {result['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
