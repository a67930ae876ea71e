"""Weak and strong scaling sweeps over device counts and layouts: `exatrain bench scaling`.

    exatrain bench scaling CONFIG [overrides] --devices 1,2,4,8 --mode both --layouts fsdp zero1 tp2:zero1
    exatrain bench scaling CONFIG [overrides] --cluster local --nodes 1,2,4 --layouts fsdp

Each point (mode x layout x device count) is one `exatrain train` run with the measurement callback
(exatrain.bench.probe): warm-up steps, timed steps, profiled steps. Locally a point is a torchrun with N
processes; with --cluster it is one Slurm job of N nodes (all points are submitted at once through
exatrain.launch.submit and waited for one by one). Weak scaling keeps the batch per device fixed (the
config's global batch at the smallest device count, scaled with N); strong scaling keeps the global batch.
A point that the trainer's validator refuses, that crashes or times out is recorded with its reason and
the sweep goes on. Results: report.md (a table with every point's layout), results.json and PNG plots
(throughput vs devices with the ideal line, weak and strong efficiency, MFU) in the output directory.

Layout specs (--layouts), ':'-joined tokens, the devices left over going to data parallelism:
  fsdp | zero2 | zero1 | ddp | ds1 | ds2 | ds3   data parallelism: FSDP2 (zero_stage 3 / 2), native ZeRO-1,
                                                 replication (dp_replicate), DeepSpeed ZeRO-1/2/3
  tpK | ppK | tp | pp                            fixed degrees (tp / pp alone: every device)
  gpipe | 1f1b | i1f1b | zb | zbv                pipeline schedule (default 1F1B)
  mbK | acnone | acsel | acfull                  micro-batch (per pipeline micro-batch under PP), recompute
  plan                                           the planner's best layout for N devices on the cluster profile
e.g. `zero1:tp2:pp2:acfull`. Efficiency at N is tokens/s per device at N over tokens/s per device at the
smallest N that ran (weak: fixed work per device; strong: fixed total work, so this is speed-up / (N/N0)).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from exatrain.bench.layout import Layout, check, overrides
from exatrain.config import ConfigError, JobConfig, load_config, parse_config

PROBE = ["plugins=[exatrain.bench.probe]", "train.callbacks=[bench_probe]", "train.eval_every=0",
         "train.eval_batches=1", "checkpoint.every=0", "checkpoint.save_final=false", "metrics.tensorboard=false",
         "metrics.progress_bar=false", "metrics.log_every=1"]
SCHEDULES = {"gpipe": ("GPipe", 1), "1f1b": ("1F1B", 1), "i1f1b": ("Interleaved1F1B", 2),
             "zb": ("InterleavedZeroBubble", 2), "zbv": ("ZBVZeroBubble", 2)}
DP_KINDS = {"fsdp": ("native", 3), "zero2": ("native", 2), "zero1": ("native", 1), "ddp": ("native", 3),
            "ds1": ("deepspeed", 1), "ds2": ("deepspeed", 2), "ds3": ("deepspeed", 3)}
AC = {"acnone": "none", "acsel": "selective", "acfull": "full"}


def probe_overrides(warmup: int, steps: int, profile: int, memory: bool = False) -> list[str]:
    """Overrides that run the measurement callback: `steps` timed steps after `warmup`, then `profile`."""
    total = warmup + steps + profile + int(memory)
    return [*PROBE, f"train.steps={total}", f"bench.warmup_steps={warmup}", f"bench.profile_steps={profile}",
            f"bench.memory_step={str(memory).lower()}"]


def resolve_spec(spec: str, cfg: JobConfig, devices: int, cluster=None) -> Layout:
    """The Layout a spec names for `devices` ranks (see the module docstring); ValueError if it cannot."""
    if spec == "plan":
        from exatrain.bench.planner import plan

        if cluster is None:
            raise ValueError("layout 'plan' needs a cluster profile with hardware facts")
        best = plan(cfg, devices, cluster, top=1)
        if not best.ranked:
            raise ValueError(f"the planner found no layout for {devices} devices under {best.cap_gib:.0f} GiB")
        return best.ranked[0].layout
    tp = pp = 1
    engine, zero, rep = "native", 3, False
    schedule, v, mb, ac = "1F1B", 1, 0, cfg.train.activation_checkpointing
    for tok in spec.split(":"):
        if tok in DP_KINDS:
            (engine, zero), rep = DP_KINDS[tok], tok == "ddp"
        elif tok in SCHEDULES:
            schedule, v = SCHEDULES[tok]
        elif tok in AC:
            ac = AC[tok]
        elif tok in ("tp", "pp"):
            tp, pp = (devices, pp) if tok == "tp" else (tp, devices)
        elif tok[:2] in ("tp", "pp", "mb") and tok[2:].isdigit():
            value = int(tok[2:])
            tp, pp, mb = (value, pp, mb) if tok[:2] == "tp" else (tp, value, mb) if tok[:2] == "pp" else (tp, pp, value)
        else:
            raise ValueError(f"unknown layout token {tok!r} in {spec!r} (see `exatrain bench scaling --help`)")
    if devices % (tp * pp):
        raise ValueError(f"{spec}: tp{tp} x pp{pp} does not divide {devices} devices")
    dp = devices // (tp * pp)
    if engine == "deepspeed" and (tp > 1 or pp > 1):
        raise ValueError(f"{spec}: DeepSpeed runs data parallelism only")
    gbs = cfg.train.global_batch
    if not mb:
        mb = 1 if pp > 1 else max(1, min(cfg.train.micro_batch, gbs // dp))
    shard, replicate = (1, dp) if rep else (dp, 1)
    return Layout(tp, pp, shard, replicate, v if pp > 1 else 1, schedule, engine, zero, mb, ac)


@dataclass
class Point:
    mode: str  # weak | strong
    spec: str
    devices: int
    nodes: int
    global_batch: int
    layout: str = ""
    status: str = "pending"  # ok | invalid | failed
    error: str = ""
    run_dir: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.mode}_{self.spec.replace(':', '-')}_{self.devices}"


def _tail(text: str, n: int = 1500) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors[-1] if errors else "\n".join(lines[-5:]))[-n:]


def torchrun_exatrain(nproc: int, *args: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node=nproc -m exatrain ARGS...` with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "exatrain", *args]


def run_local(config: str, base: list[str], extra: list[str], nproc: int, run_dir: Path, timeout: float,
              log: Path | None = None) -> tuple[dict | None, str]:
    """`torchrun --nproc-per-node=nproc -m exatrain train config ...`; returns (bench.json, error)."""
    cmd = torchrun_exatrain(nproc, "train", config, *base, *extra, f"run_dir={run_dir}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    bench = run_dir / "bench.json"
    if proc.returncode != 0 or not bench.exists():
        return None, f"exit {proc.returncode}: {_tail(proc.stderr + proc.stdout)}"
    return json.loads(bench.read_text()), ""


def plan_points(cfg: JobConfig, specs: list[str], devices: list[int], modes: list[str],
                nodes: list[int] | None = None) -> list[Point]:
    """Every (mode, spec, device count). Weak: global batch x N / N0; strong: the config's global batch."""
    n0 = min(devices)
    out = []
    for mode in modes:
        for spec in specs:
            for i, n in enumerate(devices):
                gbs = cfg.train.global_batch * n // n0 if mode == "weak" else cfg.train.global_batch
                if mode == "weak" and cfg.train.global_batch * n % n0:
                    gbs = -1
                out.append(Point(mode, spec, n, nodes[i] if nodes else 1, gbs))
    return out


def _prepare(point: Point, cfg: JobConfig, cluster) -> list[str] | None:
    """The point's layout overrides, or None with point.status/error set when it cannot run."""
    if point.global_batch <= 0:
        point.status, point.error = "invalid", f"weak scaling: batch x {point.devices} is not an integer multiple"
        return None
    cfg = replace(cfg, train=replace(cfg.train, global_batch=point.global_batch))
    try:
        lay = resolve_spec(point.spec, cfg, point.devices, cluster)
    except ValueError as exc:
        point.status, point.error = "invalid", str(exc)
        return None
    point.layout = lay.describe()
    reason = check(cfg, lay)
    if reason:
        point.status, point.error = "invalid", f"validator: {reason}"
        return None
    return overrides(cfg, lay)


def sweep(config: str, base: list[str], devices: list[int], modes: list[str], specs: list[str], out: Path, *,
          warmup: int = 2, steps: int = 5, profile: int = 1, timeout: float = 900, cluster_name: str = "",
          nodes: list[int] | None = None, planner_cluster=None, serial: bool = False, echo=print) -> list[Point]:
    """Run every point (locally, or as Slurm jobs with `cluster_name` and `nodes`) and write the report."""
    cfg = load_config(config, base)
    points = plan_points(cfg, specs, devices, modes, nodes)
    probe = probe_overrides(warmup, steps, profile)
    peak_note = ""
    if cfg.metrics.peak_tflops <= 0 and cluster_name in ("", "local") and not _cuda():
        # CPU: one GEMM probe for the whole sweep, so every point's MFU has the same denominator
        import torch

        from exatrain.bench.peak import peak_tflops

        info = peak_tflops(torch.device("cpu"), cfg.train.dtype)
        probe.append(f"metrics.peak_tflops={info.tflops:.6g}")
        peak_note = f"{info.source}, measured once by the sweep"
    runs = out / "runs"
    todo = []
    for pt in points:
        lay = _prepare(pt, cfg, planner_cluster)
        pt.run_dir = str((runs / pt.key).absolute())
        if lay is None:
            echo(f"[{pt.key}] {pt.status}: {pt.error}")
        else:
            todo.append((pt, lay))
    if cluster_name:
        _run_slurm(config, base, todo, probe, cluster_name, timeout, echo, serial)
    else:
        for pt, lay in todo:
            echo(f"[{pt.key}] {pt.layout} on {pt.devices} process(es), global batch {pt.global_batch} ...")
            t0 = time.monotonic()
            result, err = run_local(config, base, [*lay, *probe], pt.devices, Path(pt.run_dir), timeout,
                                    log=Path(pt.run_dir) / "launch.log")
            _finish(pt, result, err, echo, time.monotonic() - t0)
    write_report(points, out, {"config": config, "overrides": base, "devices": devices, "modes": modes,
                               "layouts": specs, "cluster": f"Slurm ({cluster_name} profile, one job per point"
                               f"{', one at a time' if serial else ''})" if cluster_name else "local torchrun",
                               "nodes": nodes,
                               "warmup": warmup, "steps": steps, "profile": profile, "peak_note": peak_note})
    return points


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _finish(pt: Point, result: dict | None, err: str, echo, seconds: float) -> None:
    if result is None:
        pt.status, pt.error = "failed", err
        echo(f"[{pt.key}] failed: {err}")
        return
    pt.status, pt.result = "ok", result
    echo(f"[{pt.key}] {result['tokens_per_s']:,.0f} tokens/s, step {result['step_s']:.3f} s ({seconds:.0f} s wall)")


def _run_slurm(config: str, base: list[str], todo: list, probe: list[str], cluster: str, timeout: float, echo,
               serial: bool = False) -> None:
    """One job per point (a job array cannot vary launch.nodes), all submitted before waiting on any; `serial`
    waits for each before submitting the next (nodes that share hardware, like the local test cluster)."""
    if serial:
        for item in todo:
            _run_slurm(config, base, [item], probe, cluster, timeout, echo)
        return
    from exatrain.launch.submit import JobFailed, prepare, submit, wait

    submitted = []
    for pt, lay in todo:
        try:
            cfg = parse_config(config, [*base, *lay, *probe, f"run_dir={pt.run_dir}", f"launch.cluster={cluster}",
                                        f"launch.nodes={pt.nodes}", "launch.tasks_per_node=0"])
            plan = prepare(cfg)
            if plan.slurm.world_size != pt.devices:
                raise ConfigError(f"{pt.nodes} node(s) of the {cluster} profile give {plan.slurm.world_size} ranks, "
                                  f"not {pt.devices}")
            run = submit(plan)[0]
            echo(f"[{pt.key}] {pt.layout}: job {run.job_id} ({pt.nodes} node(s), {pt.devices} ranks)")
            submitted.append((pt, run, time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - a point that cannot be submitted is reported, not fatal
            pt.status, pt.error = "failed", f"submission: {type(exc).__name__}: {exc}"
            echo(f"[{pt.key}] {pt.error}")
    for pt, run, t0 in submitted:
        try:
            wait([run], timeout_s=timeout)
            bench = Path(pt.run_dir) / "bench.json"
            result = json.loads(bench.read_text()) if bench.exists() else None
            _finish(pt, result, "" if result else "no bench.json", echo, time.monotonic() - t0)
        except (JobFailed, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                run.job.cancel(check=False)
            _finish(pt, None, str(exc).strip().splitlines()[0] + _first_failure(str(exc)), echo, 0.0)


def _first_failure(report: str) -> str:
    for line in report.splitlines():
        if "first failure" in line:
            return "; " + line.strip()
    return ""


# --- report ---------------------------------------------------------------------------------------


def efficiencies(points: list[Point]) -> dict[str, float]:
    """point key -> tokens/s per device relative to the smallest device count of its (mode, spec) that ran."""
    out = {}
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        if p.status == "ok":
            groups.setdefault((p.mode, p.spec), []).append(p)
    for pts in groups.values():
        base = min(pts, key=lambda p: p.devices)
        for p in pts:
            out[p.key] = p.result["tokens_per_s_per_device"] / base.result["tokens_per_s_per_device"]
    return out


def _fmt_mem(r: dict) -> str:
    live = [x for x in r.get("live_peak_bytes", []) if x]
    return f"{r['peak_mem_bytes'] / 2**30:.2f}" + (f" ({max(live) / 2**20:.0f} MiB live)" if live else "")


def write_report(points: list[Point], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    eff = efficiencies(points)
    (out / "results.json").write_text(json.dumps({"meta": meta, "points": [asdict(p) for p in points],
                                                  "efficiency": eff}, indent=1))
    plots = plot(points, eff, out)
    ok = [p for p in points if p.status == "ok"]
    r0 = ok[0].result if ok else {}
    lines = [f"# Scaling: {meta['config']} {' '.join(meta['overrides'])}".rstrip(), "",
             (f"Runs: {meta['cluster']}; per point {meta['warmup']} warm-up + {meta['steps']} timed + "
             f"{meta['profile']} profiled steps (exatrain.bench.probe). Weak scaling keeps the batch per device "
             "(the global batch grows with the devices), strong scaling the global batch. Step time: median of "
             "the timed steps, ± half the p10-p90 spread, barrier to barrier; uncontended: the same minus the "
             "largest run-queue wait of any rank's training thread (CPU time other processes took; Linux "
             "schedstat). Throughput, efficiency and MFU use the wall-clock step."),
             "", (f"MFU = {r0.get('mfu_formula', 'model FLOPs / (devices x peak)')}; peak: "
             f"{r0.get('peak_tflops', float('nan')):.3g} TFLOP/s per device "
             f"({meta.get('peak_note') or r0.get('peak_source', 'n/a')}). "
             f"Memory: {r0.get('peak_mem_kind', 'peak')} of the largest rank, GiB."),
             "", ("Breakdown (% of profiled step time, mean over ranks): compute, comm = exposed collectives, "
             "bubble = pipeline waits (p2p; idle too on GPU), other = Python/framework/optimizer/data; see "
             "exatrain/bench/probe.py for the method and its limits."), "",
             ("| mode | layout spec | layout | devices | nodes | global batch | tokens/s | tokens/s/dev | eff | "
             "TFLOP/s/dev | MFU | step s | uncontended s | peak mem | compute | comm | bubble | other | status |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in points:
        if p.status != "ok":
            lines.append(f"| {p.mode} | {p.spec} | {p.layout or '-'} | {p.devices} | {p.nodes} | {p.global_batch} | "
                         + " | ".join(["-"] * 13) + f" | {p.status}: {p.error.replace('|', '/')[:300]} |")
            continue
        r, b = p.result, p.result.get("breakdown") or {}
        spread = (r["step_p90"] - r["step_p10"]) / 2
        mfu = f"{r['mfu']:.2%}" if r.get("mfu") else "n/a"
        lines.append(f"| {p.mode} | {p.spec} | {p.layout} | {p.devices} | {r.get('nodes', p.nodes)} | "
                     f"{p.global_batch} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | "
                     f"{eff.get(p.key, float('nan')):.2f} | {r['tflops_per_device']:.4g} | {mfu} | "
                     f"{r['step_s']:.3f} ± {spread:.3f} | {r.get('step_s_uncontended', float('nan')):.3f} | "
                     f"{_fmt_mem(r)} | "
                     + " | ".join(f"{100 * b[k]:.0f}%" if k in b else "-" for k in ("compute", "comm", "bubble", "other"))
                     + " | ok |")
    failed = [p for p in points if p.status != "ok"]
    lines += ["", f"{len(ok)} of {len(points)} points ran" + (f"; {len(failed)} did not (reasons in the table)."
                                                               if failed else "."), ""]
    lines += [f"![{name}]({name}.png)" for name in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def plot(points: list[Point], eff: dict[str, float], out: Path) -> list[str]:
    """throughput.png, efficiency.png, mfu.png; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        if p.status == "ok":
            groups.setdefault((p.mode, p.spec), []).append(p)
    if not groups:
        return []
    for pts in groups.values():
        pts.sort(key=lambda p: p.devices)
    written = []
    modes = sorted({m for m, _ in groups})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for (m, spec), pts in groups.items():
            if m != mode:
                continue
            xs = [p.devices for p in pts]
            line, = ax.plot(xs, [p.result["tokens_per_s"] for p in pts], "o-", label=spec)
            ideal = pts[0].result["tokens_per_s_per_device"]
            ax.plot(xs, [ideal * x for x in xs], "--", color=line.get_color(), alpha=0.5)
        ax.set(yscale="log", xlabel="devices", ylabel="tokens/s (global)",
               title=f"{mode} scaling (dashed: ideal from the smallest run)")
        _devices_axis(ax, groups)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    written.append("throughput")
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for (m, spec), pts in groups.items():
            if m == mode:
                ax.plot([p.devices for p in pts], [eff[p.key] for p in pts], "o-", label=spec)
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set(xlabel="devices", ylabel="efficiency (tokens/s per device vs the smallest run)",
               title=f"{mode} scaling efficiency", ylim=(0, 1.2))
        _devices_axis(ax, groups)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "efficiency.png", dpi=110)
    plt.close(fig)
    written.append("efficiency")
    if any(p.result.get("mfu") for pts in groups.values() for p in pts):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for (mode, spec), pts in groups.items():
            ax.plot([p.devices for p in pts], [100 * (p.result.get("mfu") or math.nan) for p in pts], "o-",
                    label=f"{mode} {spec}")
        ax.set(xlabel="devices", ylabel="MFU %", title="model FLOPs utilisation")
        _devices_axis(ax, groups)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "mfu.png", dpi=110)
        plt.close(fig)
        written.append("mfu")
    return written


def _devices_axis(ax, groups: dict) -> None:
    ticks = sorted({p.devices for pts in groups.values() for p in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()


def parse_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"expected comma-separated counts such as 1,2,4,8, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise ConfigError(f"counts must be >= 1, got {text!r}")
    return counts
