"""muP coordinate check: activation scale vs width, standard parametrization vs muP.

Trains a 2-layer model at each width for a few AdamW steps on a fixed random batch (same base
LR for every width) and plots mean |coordinate| of each activation against width, one line per
step. Flat lines mean the parametrization transfers across width; under SP they climb.

    python benchmarks/mup_coord_check.py            # ~1 min on 2 CPU cores
Writes benchmarks/out/mup_coord_check.{png,json}.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from exatrain.config import load_config  # noqa: E402
from exatrain.train.mup import coord_check  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
KEYS = ("embedding", "attention", "ffn", "residual", "logits")


def slope(record: dict[int, dict[str, list[float]]], key: str) -> float:
    """Least-squares slope of log2(activation) vs log2(width) at the last step: 0 = flat."""
    xs = [math.log2(w) for w in record]
    ys = [math.log2(record[w][key][-1]) for w in record]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--base-dim", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)  # small matmuls: extra OpenMP threads mostly wait at barriers on shared cores
    common = ["model.n_layers=2", "model.vocab_size=512", "data.seq_len=32", "model.max_seq_len=32",
              f"model.mup.base_dim={args.base_dim}", f"optim.lr={args.lr}"]
    results = {name: coord_check(load_config(None, [*common, f"model.mup.enabled={name == 'mup'}"]),
                                 args.widths, steps=args.steps)
               for name in ("sp", "mup")}
    slopes = {name: {k: round(slope(rec, k), 3) for k in KEYS} for name, rec in results.items()}

    fig, axes = plt.subplots(2, len(KEYS), figsize=(3.2 * len(KEYS), 6), sharex=True)
    for row, (name, rec) in enumerate(results.items()):
        for col, key in enumerate(KEYS):
            ax = axes[row, col]
            for t in range(args.steps + 1):
                ax.plot(args.widths, [rec[w][key][t] for w in args.widths], marker="o", ms=3,
                        color=plt.cm.viridis(t / max(args.steps, 1)), label=f"step {t}")
            ax.set(xscale="log", yscale="log", title=f"{name.upper()} {key} (slope {slopes[name][key]:+.2f})")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(args.widths, [str(w) for w in args.widths])
            if col == 0:
                ax.set_ylabel("mean |x|")
            if row == 1:
                ax.set_xlabel("width")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"muP coordinate check: AdamW lr={args.lr}, base_dim={args.base_dim}")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "mup_coord_check.png", dpi=110)
    payload = {"widths": args.widths, "steps": args.steps, "lr": args.lr, "base_dim": args.base_dim,
               "final_step_slope_log2": slopes,
               "records": {name: {str(w): r for w, r in rec.items()} for name, rec in results.items()}}
    (OUT / "mup_coord_check.json").write_text(json.dumps(payload, indent=1))
    for name in results:
        print(name, " ".join(f"{k}={v:+.2f}" for k, v in slopes[name].items()))


if __name__ == "__main__":
    main()
