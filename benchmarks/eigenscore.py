"""EigenScore: exact eigvalsh vs the Chebyshev EES (SeND's Algorithm 1) vs SLQ, error and time.

Embeddings are LLM-like: a component shared by all K samples (hidden states of one prompt's
answers have a large common part) plus features with power-law scales, so after INSIDE's centring
the covariance spectrum spans λmax/α ≥ 1e4 with most eigenvalues near α. Every method starts from
the raw (K, d) embeddings (`exatrain.eval.eigenscore.eigenscore`), float64. The estimators run at
the paper's budget, M = 20 products × N_z = 20 probes (Chebyshev: Gaussian probes, as the paper;
SLQ: Rademacher, and Gaussian for a like-for-like comparison). Error = |estimate − exact| in nats,
mean and max over the repeats (each repeat draws other probes). Time is process CPU time on one
thread, methods interleaved, median of `--reps`. The crossover is the K (log-interpolated on the
grid) from which an estimator is faster than exact for every larger K of the grid.

    python benchmarks/eigenscore.py                      # K 10..3000 x d 256,1024,4096: ~3 min
    python benchmarks/eigenscore.py --ks 10,100 --ds 256 --reps 2
Writes benchmarks/out/eigenscore.{json,png,md} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from exatrain.eval.eigenscore import eigenscore, exact_eigenscore, largest_eigenvalue, prepare

OUT = Path(__file__).resolve().parent / "out"
ALPHA = 1e-3
METHODS = {  # name: keyword arguments of `eigenscore`
    "exact": {"method": "exact"},
    "chebyshev": {"method": "chebyshev", "probe": "gaussian"},
    "slq": {"method": "slq", "probe": "rademacher"},
    "slq_gaussian": {"method": "slq", "probe": "gaussian"},
}


def embeddings(K: int, d: int, seed: int) -> torch.Tensor:
    """(K, d): shared component (scale 1) + Gaussian features with scales (j + 1)^-0.7."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(1, d, generator=g, dtype=torch.float64)
    scales = (torch.arange(d, dtype=torch.float64) + 1) ** -0.7
    return shared + torch.randn(K, d, generator=g, dtype=torch.float64) * scales


def cpu_time(fn) -> tuple[float, float]:
    t0 = time.process_time()
    value = fn()
    return value, time.process_time() - t0


def crossover(ks: list[int], exact: list[float], est: list[float]) -> float | None:
    """Smallest K (log-interpolated) from which `est` stays faster than `exact` on the grid."""
    faster = [e < x for e, x in zip(est, exact)]
    if not faster[-1]:
        return None
    i = len(ks) - 1
    while i > 0 and faster[i - 1]:
        i -= 1
    if i == 0:
        return float(ks[0])
    r0 = math.log(est[i - 1] / exact[i - 1])  # > 0: slower
    r1 = math.log(est[i] / exact[i])  # < 0: faster
    t = r0 / (r0 - r1)
    return math.exp(math.log(ks[i - 1]) + t * (math.log(ks[i]) - math.log(ks[i - 1])))


def bench(ks: list[int], ds: list[int], reps: int) -> dict:
    rows = []
    for d in ds:
        for K in ks:
            z = embeddings(K, d, seed=K * 7919 + d)
            x = prepare(z)
            exact = exact_eigenscore(x, ALPHA)
            kappa = largest_eigenvalue(x) / ALPHA
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            errors: dict[str, list[float]] = {m: [] for m in METHODS}
            names = list(METHODS)
            for rep in range(reps):
                for m in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
                    value, seconds = cpu_time(lambda z=z, rep=rep, m=m: eigenscore(z, ALPHA, seed=rep, **METHODS[m]))
                    times[m].append(seconds)
                    errors[m].append(abs(value - exact))
            row = {"d": d, "K": K, "exact": exact, "lambda_max_over_alpha": kappa,
                   "gram": "KxK" if K <= d else "dxd"}
            for m in METHODS:
                row[f"{m}_s"] = statistics.median(times[m])
                row[f"{m}_err_mean"] = statistics.fmean(errors[m])
                row[f"{m}_err_max"] = max(errors[m])
            rows.append(row)
            print(f"d={d:5d} K={K:5d} λmax/α={kappa:9.3g} exact={exact:8.3f}  "
                  + "  ".join(f"{m} {row[f'{m}_s'] * 1e3:8.1f} ms err {row[f'{m}_err_mean']:.3g}" for m in METHODS),
                  flush=True)
    cross = {}
    for d in ds:
        sub = [r for r in rows if r["d"] == d]
        for m in METHODS:
            if m != "exact":
                cross[f"{m}@d={d}"] = crossover([r["K"] for r in sub], [r["exact_s"] for r in sub],
                                                [r[f"{m}_s"] for r in sub])
    return {"rows": rows, "crossover_K": cross, "alpha": ALPHA, "moments": 20, "probes": 20, "reps": reps,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__}


def markdown(result: dict) -> str:
    est = [m for m in METHODS if m != "exact"]
    head = "| d | K | λmax/α | exact ES | exact ms | " + " | ".join(f"{m} ms | {m} err (mean/max)" for m in est) + " |"
    note = (f"M = 20 products × 20 probes, α = {result['alpha']}, {result['reps']} repeats, one thread, "
            "process CPU time (median); error in nats vs exact.")
    lines = ["## EigenScore: exact vs Chebyshev (EES) vs SLQ", "", note, "", head,
             "|" + "---|" * (5 + 2 * len(est))]
    for r in result["rows"]:
        cells = [f"{r['d']}", f"{r['K']}", f"{r['lambda_max_over_alpha']:.2g}", f"{r['exact']:.3f}",
                 f"{r['exact_s'] * 1e3:.1f}"]
        for m in est:
            cells += [f"{r[f'{m}_s'] * 1e3:.1f}", f"{r[f'{m}_err_mean']:.3f} / {r[f'{m}_err_max']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Crossover K (estimator faster than exact from there on): "
              + ", ".join(f"{k}: {'never on this grid' if v is None else f'{v:.0f}'}"
                          for k, v in result["crossover_K"].items())]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"exact": "-", "chebyshev": "--", "slq": ":", "slq_gaussian": "-."}
    for d in sorted({r["d"] for r in result["rows"]}):
        sub = [r for r in result["rows"] if r["d"] == d]
        ks = [r["K"] for r in sub]
        color = ax_t._get_lines.get_next_color()
        for m, style in styles.items():
            ax_t.plot(ks, [r[f"{m}_s"] for r in sub], style, color=color, marker="o", ms=3, label=f"{m} d={d}")
            if m != "exact":
                ax_e.plot(ks, [max(r[f"{m}_err_mean"], 1e-6) for r in sub], style, color=color, marker="o", ms=3,
                          label=f"{m} d={d}")
    for ax, title, ylabel in ((ax_t, "time (1 thread)", "CPU seconds"), (ax_e, "error vs exact (K <= 20: exact trace; floor 1e-6)", "mean |error| (nats)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (samples)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=6, ncol=3)
    fig.suptitle("EigenScore: exact eigvalsh vs Chebyshev EES vs SLQ (M=20, N_z=20)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="10,30,100,300,1000,3000")
    ap.add_argument("--ds", default="256,1024,4096")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = bench([int(k) for k in args.ks.split(",")], [int(d) for d in args.ds.split(",")], args.reps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eigenscore.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (args.out / "eigenscore.md").write_text(md)
    plot(result, args.out / "eigenscore.png")
    print(md)


if __name__ == "__main__":
    main()
