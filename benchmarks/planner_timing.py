"""Validate the planner's step-time ranking (and its memory model) on real CPU runs.

    python benchmarks/planner_timing.py [--steps 4] [--skip-calibration]     # ~10 min on 2 CPU cores

1. Calibrates the `local` cluster profile with exatrain's own micro-benchmarks into
   benchmarks/out/local_profile/local.json: `exatrain bench gemm` on the model's GEMM shapes (TP 1 and 2,
   every micro-batch used below, fp32) plus memory bandwidth, and `exatrain bench comm --nproc 2` (gloo α/β
   between the two ranks of one "node").
2. Runs each layout below with `exatrain train` under torchrun (1 or 2 processes, one per core) and the
   measurement callback: 1 warm-up step, `--steps` timed steps (median), one step with live tensor bytes;
   `--rounds` interleaved rounds, keeping each layout's fastest median (the machine is shared).
3. Compares the planner's predicted step time (exatrain.bench.timing on the calibrated profile) with the
   measured median: Spearman rank correlation over all layouts and the error table; and its per-rank peak
   with the measured live-tensor peak.
Writes benchmarks/out/planner_timing.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
PROFILE = OUT / "local_profile"
sys.path.insert(0, str(ROOT))

from exatrain.bench.cli import measure_layouts, spearman
from exatrain.bench.hardware import load_cluster
from exatrain.bench.layout import Layout, check
from exatrain.bench.memory import Kernels, estimate_memory
from exatrain.bench.timing import estimate_step_time
from exatrain.config import load_config

MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.max_seq_len=256",
         "model.tie_embeddings=false", "data.seq_len=256", "train.global_batch=8", "train.dtype=fp32"]
LAYOUTS = [  # (description, layout)
    ("one process", Layout(micro_batch=8)),
    ("one process, 4 accumulation steps", Layout(micro_batch=2)),
    ("one process, full recompute", Layout(micro_batch=8, activation_checkpointing="full")),
    ("one process, selective recompute", Layout(micro_batch=8, activation_checkpointing="selective")),
    ("FSDP2 ZeRO-3", Layout(dp_shard=2, micro_batch=4)),
    ("FSDP2 ZeRO-2", Layout(dp_shard=2, micro_batch=4, zero_stage=2)),
    ("native ZeRO-1", Layout(dp_shard=2, micro_batch=4, zero_stage=1)),
    ("native ZeRO-1, full recompute", Layout(dp_shard=2, micro_batch=4, zero_stage=1, activation_checkpointing="full")),
    ("replicated (HSDP 2x1)", Layout(dp_replicate=2, micro_batch=4)),
    ("DeepSpeed ZeRO-2", Layout(dp_shard=2, micro_batch=4, engine="deepspeed", zero_stage=2)),
    ("TP2 + SP", Layout(tp=2, micro_batch=8)),
    ("TP2 without SP", Layout(tp=2, micro_batch=8, sequence_parallel=False)),
    ("PP2 1F1B", Layout(pp=2, micro_batch=1)),
    ("PP2 GPipe", Layout(pp=2, micro_batch=2, schedule="GPipe")),
    ("PP2 ZBV", Layout(pp=2, micro_batch=1, schedule="ZBVZeroBubble", virtual_stages=2)),
]


def calibrate() -> None:
    PROFILE.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "EXATRAIN_BENCH_DIR": str(PROFILE), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    mbs = ",".join(str(mb) for mb in sorted({lay.micro_batch for _, lay in LAYOUTS}))
    subprocess.run([sys.executable, "-m", "exatrain", "bench", "gemm", "tiny.yaml", *MODEL, "--tp", "1,2",
                    "--micro-batch", mbs, "--dtype", "fp32", "--repeats", "5"], env=env, check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "exatrain", "bench", "comm", "--nproc", "2", "--ranks-per-node", "2",
                    "--sizes", "4096,16384,65536,262144,1048576,4194304,16777216", "--repeats", "9"], env=env, check=True,
                   cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="measure every layout this often, interleaved; keep the "
                    "fastest median (the machine is shared)")
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="use the runs already measured under runs/planner_timing")
    args = ap.parse_args()
    if not args.skip_calibration:
        calibrate()
    cl = load_cluster("local", "fp32", PROFILE)
    cfg = load_config("tiny.yaml", MODEL)
    for desc, lay in LAYOUTS:
        assert check(cfg, lay) is None, (desc, check(cfg, lay))
    runs = ROOT / "runs" / "planner_timing"
    if args.reuse:  # predictions again (e.g. after re-calibrating) against the runs already measured
        rounds = [[_load(runs / str(i), j, lay) for j, (_, lay) in enumerate(LAYOUTS)] for i in range(args.rounds)]
    else:
        rounds = [measure_layouts("tiny.yaml", MODEL, cfg, [lay for _, lay in LAYOUTS], runs / str(i), args.steps, 900)
                  for i in range(args.rounds)]
    got = []
    for runs in zip(*rounds):  # per layout, the round least disturbed by other load on the machine
        ok = [r for r in runs if r[0] is not None]
        got.append(min(ok, key=lambda r: r[0]["step_s_uncontended"]) if ok else runs[0])
    rows = []
    for (desc, lay), (res, err) in zip(LAYOUTS, got):
        t = estimate_step_time(cfg, lay, cl)
        mem = estimate_memory(cfg, lay, Kernels.for_device("cpu"))
        row = {"name": desc, "layout": lay.describe(), "world": lay.world, "pred_s": t.total,
               "pred_breakdown": t.breakdown(), "error": err}
        if res is not None and lay.engine == "deepspeed":  # its flat buffers live outside the live-bytes tracker
            row.update(meas_s=res["step_s_uncontended"], wall_s=res["step_s"], mem_ratio=[])
        elif res is not None:
            peaks = res["live_peak_bytes"]
            by_rank = [mem.ranks[pp].peak for pp in res["pp_ranks"]]
            row.update(meas_s=res["step_s_uncontended"], wall_s=res["step_s"],
                       mem_ratio=[m / p for m, p in zip(peaks, by_rank)], live_peak=peaks, pred_peak=by_rank)
        rows.append(row)
    ok = [r for r in rows if "meas_s" in r]
    rho = spearman([r["pred_s"] for r in ok], [r["meas_s"] for r in ok])
    no_tp = [r for r in ok if not r["layout"].startswith("tp2")]
    rho_no_tp = spearman([r["pred_s"] for r in no_tp], [r["meas_s"] for r in no_tp])
    errors = sorted(abs(r["meas_s"] / r["pred_s"] - 1) for r in ok)
    pred_rank = {id(r): i + 1 for i, r in enumerate(sorted(ok, key=lambda r: r["pred_s"]))}
    meas_rank = {id(r): i + 1 for i, r in enumerate(sorted(ok, key=lambda r: r["meas_s"]))}
    for r in ok:
        r["pred_rank"], r["meas_rank"] = pred_rank[id(r)], meas_rank[id(r)]
    result = {"spearman": rho, "spearman_without_tp": rho_no_tp, "n_without_tp": len(no_tp),
              "median_abs_error": errors[len(errors) // 2], "cluster": {"gemm": cl.gemm.source, "intra": cl.intra.source,
                                           "alpha_us": cl.intra.alpha_s * 1e6, "bw_gbs": cl.intra.bw_gbs,
                                           "hbm_gbs": cl.gemm.hbm_gbs, "op_us": cl.op_s * 1e6,
                                           "dtensor_us": cl.dtensor_op_s * 1e6, "overlap": cl.overlap,
                                           "alpha_us_per_op": {op: a * 1e6 for op, a, _ in cl.intra.ops},
                                           "tp_alpha_us": {op: a * 1e6 for op, a, _ in (cl.tp_link.ops if cl.tp_link
                                                                                        else ())},
                                           "tp_bw_gbs": {op: b for op, _, b in (cl.tp_link.ops if cl.tp_link
                                                                              else ())}}, "rows": rows}
    (OUT / "planner_timing.json").write_text(json.dumps(result, indent=1))
    md = report(result)
    (OUT / "planner_timing.md").write_text(md)
    print(md)


def _load(directory: Path, index: int, lay: Layout) -> tuple[dict | None, str]:
    name = f"{index + 1}_{lay.describe().replace(' ', '_').replace('=', '')}"
    for path in (directory / name.replace("/", "-") / "bench.json", directory / name / "bench.json"):
        if path.exists():
            return json.loads(path.read_text()), ""
    return None, f"no {directory / name}"


def _residuals(result: dict) -> str:
    """What the model charges for TP and FSDP2 (each term from a micro-benchmark or a count) and how far the
    measured TP and FSDP2 rows still are from it."""
    c = result["cluster"]
    tp = c.get("tp_alpha_us", {})
    ratios = {r["name"]: r["meas_s"] / r["pred_s"] for r in result["rows"] if "meas_s" in r}
    tp_r = [v for k, v in ratios.items() if k.startswith("TP2")]
    fsdp_r = [v for k, v in ratios.items() if k.startswith(("FSDP2", "replicated"))]
    text = ("TP collectives are priced as `bench comm` times them through DTensor.redistribute (per call α "
            + ", ".join(f"{op.replace('_', '-')} {a:.0f} µs" for op, a in tp.items())
            + ": DTensor's planning, the functional collective's copy and the dim-1 gather/scatter copies on top of "
            "gloo), in the numbers a dispatch-mode count of a real TP2 step gives (with SP 4 all-gathers + 4 "
            "reduce-scatters per block, without SP 7 all-reduces: q, k, v, w1 and w3 each reduce their own input "
            "gradient); FSDP2 per unit (4 blocks + the root, one collective each) with its copy-in, copy-out and "
            "chunk_cat traffic; a collective on a one-core rank hides only the measured overlap fraction of itself. ")
    if tp_r and fsdp_r:
        text += (f"Still under-predicted: TP2 by {min(tp_r):.2f}-{max(tp_r):.2f}x and FSDP2/HSDP by "
                 f"{min(fsdp_r):.2f}-{max(fsdp_r):.2f}x (see RESULTS.md for what a profile attributes it to).")
    return text


def report(result: dict) -> str:
    c = result["cluster"]
    lines = ["## Planner step-time ranking vs measured CPU runs", "",
             ("`python benchmarks/planner_timing.py`. Model: dim 256, 4 layers, 8 heads (4 KV), seq 256, vocab 4096, "
              "global batch 8, fp32 AdamW; 1 or 2 gloo processes on a 2-core machine shared with other work. "
              f"Profile `local` measured by exatrain's micro-benchmarks ({c['gemm']}; gloo α = {c['alpha_us']:.0f} µs, "
              f"β = {c['bw_gbs']:.2f} GB/s; elementwise bandwidth {c['hbm_gbs']:.1f} GB/s; host {c.get('op_us', 0):.1f} µs per op, +{c.get('dtensor_us', 0):.1f} µs per DTensor op; overlap {c.get('overlap', 0):.2f}). Measured: median of the timed "
              "steps without CPU contention (barrier to barrier, minus the largest run-queue wait of any rank's "
              "training thread, Linux schedstat; wall-clock median in brackets; the faster of two interleaved rounds); memory: live tensor bytes of each rank over one step "
              "(exatrain.bench.measure.LiveBytes) vs the planner's peak for that rank."), "",
             (f"**Spearman rank correlation, predicted vs measured step time: {result['spearman']:.2f}** "
             f"over {sum('meas_s' in r for r in result['rows'])} layouts; {result['spearman_without_tp']:.2f} over the "
             f"{result['n_without_tp']} without tensor parallelism; median |measured/predicted − 1| = "
             f"{result['median_abs_error']:.0%}."), "",
             _residuals(result), "",
             ("| layout | procs | predicted s | measured s | meas/pred | rank pred | rank meas | predicted: compute / TP / "
             "bubble / DP / optimizer | memory meas/pred per rank |"),
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        b = r["pred_breakdown"]
        parts = " / ".join(f"{100 * b[k]:.0f}%" for k in ("compute", "tp_comm", "bubble", "dp_comm", "optimizer"))
        if "meas_s" not in r:
            lines.append(f"| {r['name']}: {r['layout']} | {r['world']} | {r['pred_s']:.3f} | failed: {r['error'][:80]} "
                         f"| | | | {parts} | |")
            continue
        mem = ", ".join(f"{x:.2f}" for x in r["mem_ratio"]) or "n/a (DeepSpeed)"
        lines.append(f"| {r['name']}: {r['layout']} | {r['world']} | {r['pred_s']:.3f} | {r['meas_s']:.3f} "
                     f"({r['wall_s']:.3f}) | {r['meas_s'] / r['pred_s']:.2f} | {r['pred_rank']} | "
                     f"{r['meas_rank']} | {parts} | {mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
