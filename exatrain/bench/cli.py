"""`exatrain plan` and `exatrain bench gemm|comm|scaling`: the flags and the commands (exatrain.cli registers
them as subcommands).

    exatrain plan CONFIG [overrides] --devices N [--cluster frontier] [--cap-gib X] [--top K]
                  [--measure K --steps S] [--emit-overrides]
    exatrain bench gemm [CONFIG [overrides]] [--cluster NAME] [--dtype bf16] [--device cuda]
    exatrain bench comm [--nproc N] [--ranks-per-node R] [--cluster NAME]     (torchrun / srun, or --nproc)
    exatrain bench scaling CONFIG [overrides] --devices 1,2,4,8 [--mode weak|strong|both] [--layouts ...]
                           [--cluster NAME --nodes 1,2,4] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

from exatrain.config import DEFAULT_CONFIG, ConfigError, split_config_args


def _config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?", default=None if optional else DEFAULT_CONFIG,
                   help="YAML config (path, or a name under exatrain/configs/)"
                        + ("; without it, square GEMMs only" if optional else f"; default {DEFAULT_CONFIG}"))
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.dim=512")


def _config(args: argparse.Namespace):
    from exatrain.config import load_config

    return load_config(*split_config_args([args.config, *args.overrides]))


def _compute_dtype(dtype: str) -> str:
    """train.dtype -> the dtype the GEMMs run in: bf16_params computes in bf16 like autocast."""
    return "fp32" if dtype == "fp32" else "bf16"


def _cluster(name: str, dtype: str):
    from exatrain.bench.hardware import load_cluster

    try:
        return load_cluster(name, _compute_dtype(dtype))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# --- plan ------------------------------------------------------------------------------------------


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--devices", type=int, required=True, help="number of devices (ranks) to plan for")
    p.add_argument("--cluster", default=None, help="hardware facts: frontier, nvidia, a100 (built in) or a profile "
                   "measured with `exatrain bench gemm|comm` (local); default launch.cluster")
    p.add_argument("--cap-gib", type=float, default=None, help="memory cap per device (default 90%% of its memory)")
    p.add_argument("--top", type=int, default=10, help="layouts to show")
    p.add_argument("--max-micro-batch", type=int, default=8, help="largest micro-batch to consider")
    p.add_argument("--measure", type=int, default=0, metavar="K",
                   help="run the top K layouts locally (torchrun, one process per device) and print predicted "
                        "vs measured step time and memory")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measured layout (after 1 warm-up step)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measured layout")
    p.add_argument("--emit-overrides", action="store_true",
                   help="print each proposal as `exatrain train` overrides")
    p.add_argument("--out", default="runs/plan", help="run directories of --measure")
    p.set_defaults(func=cmd_plan)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def measure_layouts(config: str, base: list[str], cfg, layouts: list, out: Path, steps: int, timeout: float,
                    echo=print) -> list[tuple[dict | None, str]]:
    """Run each layout locally for 1 warm-up + `steps` timed steps + one live-bytes step; (bench.json, error)."""
    from exatrain.bench.layout import overrides
    from exatrain.bench.scaling import probe_overrides, run_local

    results = []
    for i, lay in enumerate(layouts):
        run_dir = (out / f"{i + 1}_{lay.describe().replace(' ', '_').replace('=', '').replace('/', '-')}").absolute()
        echo(f"measuring #{i + 1} {lay.describe()} on {lay.world} process(es) ...")
        results.append(run_local(config, base, [*overrides(cfg, lay), *probe_overrides(1, steps, 0, memory=True)],
                                 lay.world, run_dir, timeout, log=run_dir / "launch.log"))
    return results


def cmd_plan(args: argparse.Namespace) -> int:
    from exatrain.bench.layout import overrides
    from exatrain.bench.memory import GIB
    from exatrain.bench.micro import format_table
    from exatrain.bench.planner import format_plan, plan

    cfg = _config(args)
    cl = _cluster(args.cluster or cfg.launch.cluster, cfg.train.dtype)
    if args.cap_gib is None and cl.device.memory_gib <= 0:
        raise ConfigError(f"cluster {cl.name!r} has no device memory on record: pass --cap-gib or run "
                          "`exatrain bench gemm --cluster ...` on it")
    result = plan(cfg, args.devices, cl, cap_gib=args.cap_gib, top=max(args.top, args.measure),
                  max_micro_batch=args.max_micro_batch)
    shown = result.ranked[:args.top]
    print(format_plan(type(result)(shown, result.rejected, result.cap_gib, result.evaluated), cl,
                      f"{cfg.name} on {args.devices} devices of {cl.name}"))
    if args.emit_overrides:
        path, extra = split_config_args([args.config, *args.overrides])
        for i, c in enumerate(shown):
            print(f"# {i + 1}: {c.layout.describe()}\nexatrain train {path} {' '.join(extra)} "
                  f"{' '.join(overrides(cfg, c.layout))}".replace("  ", " "))
    if not args.measure:
        return 0 if result.ranked else 1
    if cl.name != "local":
        print(f"note: --measure runs on this machine (CPU, gloo) while predictions use {cl.name}'s facts; "
              "plan with --cluster local to compare like with like", file=sys.stderr)
    path, extra = split_config_args([args.config, *args.overrides])
    cands = result.ranked[:args.measure]
    got = measure_layouts(path, extra, cfg, [c.layout for c in cands], Path(args.out), args.steps, args.timeout)
    rows, pred, meas = [], [], []
    for i, (c, (res, err)) in enumerate(zip(cands, got)):
        if res is None:
            rows.append([i + 1, c.layout.describe(), f"{c.time.total:.3f}", "-", "-", f"{c.peak_gib * 1024:.0f}", "-",
                         "-", f"failed: {err[:80]}"])
            continue
        live = max(res["live_peak_bytes"])
        pred.append(c.time.total)
        meas.append(res["step_s"])
        rows.append([i + 1, c.layout.describe(), f"{c.time.total:.3f}", f"{res['step_s']:.3f}",
                     f"{res['step_s'] / c.time.total:.2f}", f"{c.memory.peak / 2**20:.0f}",
                     f"{live / 2**20:.0f}" if live else "-", f"{live / c.memory.peak:.2f}" if live else "-", "ok"])
    print()
    print(format_table(["#", "layout", "pred step s", "meas step s", "meas/pred", "pred peak MiB",
                        "meas peak MiB", "meas/pred", "status"], rows))
    if len(pred) >= 3:
        print(f"Spearman rank correlation of step times (predicted vs measured): {spearman(pred, meas):.2f}")
    print(f"measured peak: live tensor bytes of the largest rank (CPU); predicted: the planner's per-rank peak "
          f"({GIB / 2**20:.0f} MiB = 1 GiB)")
    return 0


# --- bench -----------------------------------------------------------------------------------------


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True)
    g = sub.add_parser("gemm", help="time GEMMs (squares, or a config's block GEMMs under TP) into the cluster cache")
    _config_args(g, optional=True)
    g.add_argument("--cluster", default="local", help="cache profile to write (default local)")
    g.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default: the config's, else bf16")
    g.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    g.add_argument("--tp", default="1,2,4,8", help="TP degrees whose GEMM shapes to time (with a config)")
    g.add_argument("--micro-batch", default="1", help="micro-batch sizes whose GEMM shapes to time (with a config)")
    g.add_argument("--repeats", type=int, default=5)
    g.set_defaults(func=cmd_bench_gemm)
    c = sub.add_parser("comm", help="collective and p2p α/β per scope into the cluster cache (under torchrun/srun, "
                                    "or --nproc N to start torchrun here)")
    c.add_argument("--nproc", type=int, default=0, help="start torchrun with N local processes (CPU: gloo)")
    c.add_argument("--ranks-per-node", type=int, default=0,
                   help="ranks per node (default: LOCAL_WORLD_SIZE / SLURM_NTASKS_PER_NODE; with --nproc half of N "
                        "so both scopes are measured)")
    c.add_argument("--cluster", default="local", help="cache profile to write (default local)")
    c.add_argument("--sizes", default="262144,1048576,4194304,16777216", help="message sizes in bytes")
    c.add_argument("--repeats", type=int, default=5)
    c.set_defaults(func=cmd_bench_comm)
    s = sub.add_parser("scaling", help="weak/strong scaling sweep over device counts and layouts (local or Slurm)")
    _config_args(s)
    s.add_argument("--devices", default="1,2,4", help="local process counts, e.g. 1,2,4,8")
    s.add_argument("--nodes", default="", help="with --cluster: node counts, e.g. 1,2,4 (one Slurm job per point)")
    s.add_argument("--cluster", default="", help="submit the points to Slurm with this profile (e.g. local, frontier)")
    s.add_argument("--one-at-a-time", action="store_true",
                   help="with --cluster: wait for each job before submitting the next (nodes sharing hardware)")
    s.add_argument("--mode", default="both", choices=("weak", "strong", "both"))
    s.add_argument("--layouts", nargs="+", default=["fsdp", "zero1"], metavar="SPEC",
                   help="layout specs (see exatrain/bench/scaling.py): e.g. fsdp zero1 tp2:zero1 pp2:fsdp plan")
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--steps", type=int, default=5, help="timed steps per point")
    s.add_argument("--profile", type=int, default=1, help="profiled steps per point (breakdown); 0 = none")
    s.add_argument("--timeout", type=float, default=900, help="seconds per point")
    s.add_argument("--out", default="", help="output directory (default runs/scaling/<config name>)")
    s.set_defaults(func=cmd_bench_scaling)


def cmd_bench_gemm(args: argparse.Namespace) -> int:
    import torch

    from exatrain.bench.micro import gemm, model_gemm_shapes

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes, dtype = None, args.dtype
    if args.config:
        cfg = _config(args)
        dtype = dtype or _compute_dtype(cfg.train.dtype)
        tps = tuple(int(x) for x in args.tp.split(","))
        mbs = tuple(int(x) for x in args.micro_batch.split(","))
        shapes = model_gemm_shapes(cfg, tps, mbs)
    gemm(shapes, dtype=dtype or "bf16", device=device, cluster=args.cluster, repeats=args.repeats)
    from exatrain.bench.hardware import cache_path

    print(f"cached in {cache_path(args.cluster)}")
    return 0


def cmd_bench_comm(args: argparse.Namespace) -> int:
    if args.nproc and "RANK" not in os.environ and "SLURM_STEP_ID" not in os.environ:
        rpn = args.ranks_per_node or max(1, args.nproc // 2)
        from exatrain.bench.scaling import torchrun_exatrain

        cmd = torchrun_exatrain(args.nproc, "bench", "comm", "--ranks-per-node", str(rpn), "--cluster", args.cluster,
                                "--sizes", args.sizes, "--repeats", str(args.repeats))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        return subprocess.run(cmd, env=env, check=False).returncode
    import torch
    import torch.distributed as dist

    from exatrain.bench.micro import comm
    from exatrain.launch.bootstrap import init_distributed

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    info = init_distributed(kind)
    if info.world_size < 2:
        raise ConfigError("bench comm needs at least 2 ranks: run it under torchrun/srun or pass --nproc N")
    rpn = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE")
                                     or info.world_size)
    try:
        comm(rpn, sizes=tuple(int(x) for x in args.sizes.split(",")), cluster=args.cluster, repeats=args.repeats,
             device=kind)
    finally:
        dist.destroy_process_group()
    return 0


def cmd_bench_scaling(args: argparse.Namespace) -> int:
    from exatrain.bench.scaling import parse_counts, sweep
    from exatrain.config import load_config

    path, extra = split_config_args([args.config, *args.overrides])
    cfg = load_config(path, extra)
    modes = ["weak", "strong"] if args.mode == "both" else [args.mode]
    nodes = None
    if args.cluster:
        from exatrain.config import LaunchConfig
        from exatrain.launch.slurm import make_plan

        nodes = parse_counts(args.nodes or "1")
        per_node = make_plan(LaunchConfig(cluster=args.cluster, nodes=1), cfg.name).world_size
        devices = [n * per_node for n in nodes]
    else:
        devices = parse_counts(args.devices)
    planner_cluster = None
    if "plan" in args.layouts:
        planner_cluster = _cluster(args.cluster or "local", cfg.train.dtype)
    out = Path(args.out or f"runs/scaling/{cfg.name}")
    points = sweep(path, extra, devices, modes, args.layouts, out, warmup=args.warmup, steps=args.steps,
                   profile=args.profile, timeout=args.timeout, cluster_name=args.cluster, nodes=nodes,
                   planner_cluster=planner_cluster, serial=args.one_at_a_time)
    ok = sum(p.status == "ok" for p in points)
    print(f"{ok} of {len(points)} points ran; report: {out / 'report.md'}")
    return 0 if ok else 1
