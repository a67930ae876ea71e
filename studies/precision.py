"""Precision stability study at CPU scale ("To FP8 and Back Again", Lee et al. 2024; DESIGN.md §7).

Claims to reproduce in shape: reducing exponent bits destabilises training far more than reducing mantissa bits,
and fewer bits narrow the range of learning rates that train well.

A grid formats x learning rates x seeds of one tiny model (exatrain/configs/studies/precision.yaml): every GEMM
operand of the transformer blocks (activations, weights, output gradients) is rounded to a simulated ExMy format
(mantissa truncation as in the paper, exponent range clamped, fp32 accumulation and master weights; the LM head and
embeddings stay fp32). Each point is one training run with the divergence detector (non-finite loss, or a loss over
2x the median of the previous 20, after 20 steps; the run then stops) and logit sharpness every 50 steps.

The grid is one job array, laid out as `exatrain launch --sweep` lays out a sweep (run_dir/<index>/, one point
each), so the same collection works for both ways of running it:

    python studies/precision.py --jobs 2                     # local subprocesses, at most 2 at a time
    python studies/precision.py --slurm --cluster local      # one Slurm job array (exatrain.launch.submit)
    python studies/precision.py --slurm --dry-run            # print the array's plan, submit nothing
    python studies/precision.py --collect                    # tables and heatmaps from finished runs only

A rerun skips points that already finished (their divergence.json says completed or diverged). Output:
studies/out/precision.{json,md,png}; run directories under runs/studies/precision/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from exatrain.config import load_config, parse_config
from exatrain.launch import sweep
from exatrain.train.exmy import ExMy
from exatrain.train.metrics import read_metrics
from exatrain.train.stability import DIVERGENCE_FILE

CONFIG = "studies/precision.yaml"  # shipped in exatrain/configs/
OUT = REPO / "studies" / "out"
ROOT = REPO / "runs" / "studies" / "precision"

# E8 with shrinking mantissa (the paper's E8M7 -> E8M5 -> E8M4 -> E8M3), then E5 and E4 exponents.
FORMATS = ("fp32", "e8m7", "e8m5", "e8m4", "e8m3", "e5m7", "e5m4", "e5m3", "e4m7", "e4m3")
LRS = ("3e-4", "1e-3", "3e-3", "1e-2", "3e-2")
SEEDS = ("0", "1", "2")
# nats: a cell "trains well" at margin m if it did not diverge and its median final val loss is within m of fp32's
# best cell; the width of that LR range per format is reported for each margin
MARGINS = (0.1, 0.25, 0.5)
FORMAT_KEY, LR_KEY, SEED_KEY = "precision.simulated.format", "optim.lr", "train.seed"


def axes(formats, lrs, seeds) -> list[str]:
    return [f"{FORMAT_KEY}={','.join(formats)}", f"{LR_KEY}={','.join(lrs)}", f"{SEED_KEY}={','.join(seeds)}"]


def points_of(formats, lrs, seeds) -> list[list[str]]:
    """The sweep's points in array order (index i runs in root/i), as exatrain.launch.submit.prepare orders them."""
    return sweep.expand(sweep.parse_axes(axes(formats, lrs, seeds)))


def finished(run_dir: Path) -> bool:
    path = run_dir / DIVERGENCE_FILE
    if not path.exists():
        return False
    info = json.loads(path.read_text())
    return info["status"] == "completed" or info["diverged"]


# ---------------------------------------------------------------- running


def run_local(points: list[list[str]], root: Path, jobs: int, extra: list[str]) -> None:
    """Every unfinished point as `python -m exatrain train`, at most `jobs` at a time, one thread each."""
    todo = [(i, p) for i, p in enumerate(points) if not finished(root / str(i))]
    print(f"{len(points) - len(todo)} of {len(points)} runs already finished; running {len(todo)} with --jobs {jobs}",
          flush=True)
    if not todo:
        return
    # Tokenize the corpus once here, so parallel first runs do not race to build the same cache.
    from exatrain.data import build_data

    build_data(load_config(CONFIG, extra), 0, 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()

    def one(i: int, point: list[str]) -> tuple[int, int, float]:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "exatrain", "train", CONFIG, *point, *extra, f"run_dir={root / str(i)}",
               "checkpoint.resume=never"]
        (root / str(i)).mkdir(parents=True, exist_ok=True)
        with open(root / str(i) / "train.log", "w") as log:
            rc = subprocess.run(cmd, check=False, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=3600).returncode
        return i, rc, time.perf_counter() - t0

    done = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in as_completed([pool.submit(one, i, p) for i, p in todo]):
            i, rc, secs = fut.result()
            done += 1
            status = "ok" if rc in (0, 3) else f"FAILED rc={rc} (see {root / str(i) / 'train.log'})"
            print(f"[{done}/{len(todo)}] run {i} {' '.join(points[i])}: {secs:.0f}s {status}; "
                  f"elapsed {time.perf_counter() - start:.0f}s", flush=True)


def run_slurm(formats, lrs, seeds, root: Path, extra: list[str], cluster: str, dry_run: bool) -> None:
    """One job array through exatrain.launch.submit (the machinery behind `exatrain launch --sweep`)."""
    from exatrain.launch.submit import JobFailed, prepare, submit, wait

    cfg = parse_config(CONFIG, [f"run_dir={root}", *extra])
    if cluster:
        cfg.launch.cluster = cluster
    plan = prepare(cfg, axes(formats, lrs, seeds))
    if dry_run:
        print(plan.describe())
        return
    runs = submit(plan)
    print(f"submitted {len(runs)} runs as job array {runs[0].job_id.split('_')[0]}", flush=True)
    try:
        wait(runs, poll_s=10)
    except JobFailed as exc:  # collect what finished; the report says which runs failed and why
        print(f"some runs failed:\n{exc}", file=sys.stderr)


# ---------------------------------------------------------------- collecting


def collect_run(run_dir: Path, point: list[str]) -> dict | None:
    values = dict(p.split("=", 1) for p in point)
    div_path, metrics = run_dir / DIVERGENCE_FILE, run_dir / "metrics.jsonl"
    if not div_path.exists() or not metrics.exists():
        return None
    div = json.loads(div_path.read_text())
    train = read_metrics(metrics, "train")
    evals = read_metrics(metrics, "eval")
    losses = [r["loss"] for r in train if r.get("loss") is not None]
    return {
        "format": values[FORMAT_KEY], "lr": float(values[LR_KEY]), "seed": int(values[SEED_KEY]),
        "diverged": div["diverged"], "diverged_at": div["step"], "reason": div["reason"],
        "steps": div["steps_done"], "status": div["status"],
        "final_train": statistics.mean(losses[-20:]) if losses else math.nan,
        "val_loss": evals[-1]["val_loss"] if evals and evals[-1].get("val_loss") is not None else math.nan,
        "sharpness": [[r["step"], r["sharpness_phi"]] for r in train if r.get("sharpness_phi") is not None],
    }


def summarize(runs: list[dict], formats, lrs) -> dict:
    """Per (format, lr) cell: diverged/total, median steps to divergence, final val loss (median, spread over
    seeds, non-diverged runs), final sharpness; per format: the learning rates that train well."""
    by_cell: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in runs:
        by_cell[(r["format"], r["lr"])].append(r)
    cells = {}
    for f in formats:
        for lr in map(float, lrs):
            rs = by_cell.get((f, lr), [])
            ok = [r for r in rs if not r["diverged"] and math.isfinite(r["val_loss"])]
            div = [r for r in rs if r["diverged"]]
            vals = [r["val_loss"] for r in ok]
            phis = [r["sharpness"][-1][1] for r in ok if r["sharpness"]]
            cells[f"{f}@{lr:g}"] = {
                "format": f, "lr": lr, "runs": len(rs), "diverged": len(div),
                "median_diverged_at": statistics.median([r["diverged_at"] for r in div]) if div else None,
                "val_loss": statistics.median(vals) if vals else None,
                "val_spread": (max(vals) - min(vals)) if len(vals) > 1 else None,
                "val_std": statistics.stdev(vals) if len(vals) > 1 else None,
                "sharpness": statistics.median(phis) if phis else None,
            }
    ref = [c["val_loss"] for c in cells.values() if c["format"] == "fp32" and c["val_loss"] is not None]
    best = min(ref) if ref else None
    formats_summary = {}
    for f in formats:
        fc = [c for c in cells.values() if c["format"] == f]
        vals = [c["val_loss"] for c in fc if c["val_loss"] is not None]
        fmt = None if f == "fp32" else ExMy.parse(f)
        formats_summary[f] = {
            "exponent_bits": 8 if fmt is None else fmt.exponent_bits,
            "mantissa_bits": 23 if fmt is None else fmt.mantissa_bits,
            "good_lrs": {str(m): [c["lr"] for c in fc if best is not None and c["val_loss"] is not None
                                  and c["diverged"] == 0 and c["val_loss"] <= best + m] for m in MARGINS},
            "best_val": min(vals) if vals else None,
            "diverged": sum(c["diverged"] for c in fc), "runs": sum(c["runs"] for c in fc),
        }
    return {"cells": cells, "formats": formats_summary, "fp32_best": best, "margins": list(MARGINS)}


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(result: dict) -> str:
    s, formats, lrs = result["summary"], result["formats"], [float(x) for x in result["lrs"]]
    lines = [f"# Precision stability study ({result['model']})", "",
             (f"{len(result['runs'])} runs: {len(formats)} formats x {len(lrs)} learning rates x {len(result['seeds'])} "
             f"seeds, {result['steps']} steps each ({result['total_seconds'] / 60:.0f} min wall, --jobs "
             f"{result['jobs']}). Simulated GEMM operands (input, weight, output gradient) of every block Linear; "
             "mantissa truncated, exponent range clamped, fp32 accumulation and master weights; LM head and "
             "embeddings fp32."), "",
             "## Stability table", "",
             ("Cell: diverged/total | median step of divergence | final val loss (median over seeds, non-diverged) "
             "± half the seed range | final logit sharpness φ (median)."), "",
             "| format | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for f in formats:
        row = []
        for lr in lrs:
            c = s["cells"][f"{f}@{lr:g}"]
            spread = f" ±{c['val_spread'] / 2:.3f}" if c["val_spread"] is not None else ""
            at = f" @{c['median_diverged_at']:g}" if c["median_diverged_at"] is not None else ""
            row.append(f"{c['diverged']}/{c['runs']}{at} · {_fmt(c['val_loss'])}{spread} · φ {_fmt(c['sharpness'], '.3f')}")
        lines.append(f"| {f} | " + " | ".join(row) + " |")
    margins = s["margins"]
    lines += ["", (f"## Learning rates that train well (no divergence, median final val loss within m nats of fp32's "
              f"best cell, {_fmt(s['fp32_best'])})"), "",
              "| format | exponent bits | mantissa bits | " + " | ".join(f"m = {m:g}" for m in margins)
              + " | best val loss | diverged runs |",
              "|---|---:|---:|" + "---|" * len(margins) + "---:|---:|"]
    for f in formats:
        fs = s["formats"][f]
        good = [", ".join(f"{x:g}" for x in fs["good_lrs"][str(m)]) or "none" for m in margins]
        lines.append(f"| {f} | {fs['exponent_bits']} | {fs['mantissa_bits']} | " + " | ".join(good)
                     + f" | {_fmt(fs['best_val'])} | {fs['diverged']}/{fs['runs']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import patheffects

    s, formats, lrs = result["summary"], result["formats"], [float(x) for x in result["lrs"]]

    def grid(key, default=np.nan):
        return np.array([[s["cells"][f"{f}@{lr:g}"][key] if s["cells"][f"{f}@{lr:g}"][key] is not None else default
                          for lr in lrs] for f in formats], dtype=float)

    runs = grid("runs", 0)
    panels = [("diverged fraction", grid("diverged", 0) / np.maximum(runs, 1), "Reds", ".2f", (0, 1)),
              (f"final val loss − fp32 best ({_fmt(s['fp32_best'])})", grid("val_loss") - (s["fp32_best"] or 0),
               "viridis", ".2f", (None, None)),
              ("final logit sharpness φ", grid("sharpness"), "magma", ".3f", (None, None))]
    fig, axes_ = plt.subplots(1, 3, figsize=(16, 0.45 * len(formats) + 2))
    for ax, (title, data, cmap, spec, (lo, hi)) in zip(axes_, panels):
        im = ax.imshow(data, cmap=cmap, aspect="auto", vmin=lo, vmax=hi)
        ax.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs])
        ax.set_yticks(range(len(formats)), formats)
        ax.set(xlabel="learning rate", title=title)
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, format(v, spec), ha="center", va="center", fontsize=7, color="white",
                        path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Simulated GEMM formats x learning rate (tiny Llama, CPU); rows: E8 mantissa 7→3, then E5, E4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def collect(points: list[list[str]], root: Path, formats, lrs, seeds, meta: dict) -> dict:
    runs = [r for i, p in enumerate(points) if (r := collect_run(root / str(i), p)) is not None]
    cfg = load_config(CONFIG)
    m = cfg.model
    result = {"model": f"dim {m.dim}, {m.n_layers} layers, seq {cfg.data.seq_len}, batch {cfg.train.global_batch}",
              "formats": list(formats), "lrs": list(lrs), "seeds": list(seeds), "runs": runs,
              "missing": len(points) - len(runs), **meta}
    result["summary"] = summarize(runs, formats, lrs)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "precision.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (OUT / "precision.md").write_text(md)
    plot(result, OUT / "precision.png")
    print(md)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--lrs", nargs="+", default=list(LRS))
    ap.add_argument("--seeds", nargs="+", default=list(SEEDS))
    ap.add_argument("--steps", type=int, default=0, help="train.steps (0: the config's)")
    ap.add_argument("--root", type=Path, default=ROOT, help="sweep directory (one run directory per point)")
    ap.add_argument("--jobs", type=int, default=1, help="local runs at a time")
    ap.add_argument("--slurm", action="store_true", help="submit one job array instead of running locally")
    ap.add_argument("--cluster", default="", help="cluster profile for --slurm (default: the config's)")
    ap.add_argument("--dry-run", action="store_true", help="with --slurm: print the plan, submit nothing")
    ap.add_argument("--collect", action="store_true", help="only collect finished runs")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args(argv)
    extra = [*args.overrides, *([f"train.steps={args.steps}"] if args.steps else [])]
    points = points_of(args.formats, args.lrs, args.seeds)
    root = args.root.absolute()
    start = time.perf_counter()
    if args.slurm:
        run_slurm(args.formats, args.lrs, args.seeds, root, extra, args.cluster, args.dry_run)
        if args.dry_run:
            return 0
    elif not args.collect:
        run_local(points, root, args.jobs, extra)
    timing = root / "study_time.json"  # the running time, kept for a later --collect
    if not args.collect:
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start, "jobs": args.jobs}))
    spent = json.loads(timing.read_text()) if timing.exists() else {"seconds": math.nan, "jobs": args.jobs}
    steps = load_config(CONFIG, extra).train.steps
    collect(points, root, args.formats, args.lrs, args.seeds,
            {"steps": steps, "jobs": spent["jobs"], "total_seconds": spent["seconds"], "overrides": extra})
    return 0


if __name__ == "__main__":
    sys.exit(main())
