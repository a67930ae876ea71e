"""`exatrain plan` and `exatrain bench scaling`: layout specs, the profiler-timeline breakdown, the report
(with failed points), the CLI; one local torchrun sweep, one planner --measure run, one Slurm point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, env

from exatrain.bench.layout import Layout
from exatrain.bench.probe import STEP_MARK, classify_cpu, shares
from exatrain.bench.scaling import Point, efficiencies, resolve_spec, write_report
from exatrain.cli import main
from exatrain.config import load_config

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.max_seq_len=64",
        "data.seq_len=64", "model.tie_embeddings=false", "train.global_batch=8", "train.micro_batch=4"]


def _ev(name, start, end, thread=1, parent=None):
    e = SimpleNamespace(name=name, thread=thread, time_range=SimpleNamespace(start=start, end=end), cpu_children=[],
                        cpu_parent=parent, device_type=torch.autograd.DeviceType.CPU)
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def test_cpu_timeline_breakdown():
    """Own time of aten ops is compute, of c10d ops and functional-collective waits communication; gaps on the
    training thread count as communication while a gloo worker runs a collective or transfer, else other."""
    step = _ev(STEP_MARK, 0, 100)
    mm = _ev("aten::mm", 0, 40, parent=step)
    _ev("c10d::allreduce_", 40, 42, parent=step)
    add = _ev("aten::add", 70, 90, parent=step)
    wait = _ev("_c10d_functional::wait_tensor", 72, 80, parent=add)
    worker = _ev("gloo:all_reduce", 41, 60, thread=2)
    p2p = _ev("gloo:recv", 60, 65, thread=3)
    got = classify_cpu([step, mm, *step.cpu_children[1:], wait, worker, p2p])
    assert got == pytest.approx({"compute": 52e-6, "collective": (2 + 18 + 8) * 1e-6, "p2p": 5e-6,
                                 "other": 15e-6})
    assert shares(got, pp=2, gpu=False)["bubble"] == pytest.approx(0.05)
    assert shares(got, pp=1, gpu=False)["comm"] == pytest.approx(0.33)


def test_layout_specs():
    cfg = load_config(None, TINY + ["model.n_heads=4", "model.n_kv_heads=2", "train.global_batch=16"])
    assert resolve_spec("zero1:tp2:pp2:acfull", cfg, 8) == Layout(2, 2, 2, 1, 1, "1F1B", "native", 1, 1, "full")
    assert resolve_spec("tp", cfg, 4) == Layout(tp=4, micro_batch=4)
    assert resolve_spec("ddp:mb2", cfg, 4) == Layout(dp_replicate=4, micro_batch=2)
    assert resolve_spec("pp2:zbv", cfg, 2) == Layout(pp=2, virtual_stages=2, schedule="ZBVZeroBubble")
    for bad, msg in (("ds1:tp2", "data parallelism only"), ("tp3", "does not divide"), ("wat", "unknown")):
        with pytest.raises(ValueError, match=msg):
            resolve_spec(bad, cfg, 4)


def _result(tps: float, world: int) -> dict:
    return {"tokens_per_s": tps, "tokens_per_s_per_device": tps / world, "tflops_per_device": 1.0, "mfu": 0.3,
            "step_s": 1.0, "step_p10": 0.9, "step_p90": 1.1, "peak_mem_bytes": 2**30, "live_peak_bytes": [2**20],
            "breakdown": {"compute": 0.7, "comm": 0.2, "bubble": 0.0, "other": 0.1}, "nodes": 1,
            "mfu_formula": "6N", "peak_tflops": 1.0, "peak_source": "test"}


def test_report_keeps_failed_points(tmp_path):
    pts = [Point("strong", "fsdp", 1, 1, 8, "tp1 pp1 dp1", "ok", result=_result(100.0, 1)),
           Point("strong", "fsdp", 2, 1, 8, "tp1 pp1 dp2", "ok", result=_result(150.0, 2)),
           Point("strong", "fsdp", 4, 1, 8, "tp1 pp1 dp4", "failed", "exit 1: RuntimeError: boom"),
           Point("weak", "pp2", 1, 1, 8, "", "invalid", "pp2: tp1 x pp2 does not divide 1 devices")]
    assert efficiencies(pts) == {"strong_fsdp_1": 1.0, "strong_fsdp_2": 0.75}
    write_report(pts, tmp_path, {"config": "tiny.yaml", "overrides": [], "cluster": "local torchrun", "warmup": 1,
                                 "steps": 2, "profile": 1})
    md = (tmp_path / "report.md").read_text()
    assert "| strong | fsdp | tp1 pp1 dp2 | 2 | 1 | 8 | 150 | 75 | 0.75 |" in md and "1.000 ± 0.100 | nan" in md
    assert "failed: exit 1: RuntimeError: boom" in md and "invalid: pp2" in md and "2 of 4 points ran" in md
    assert all((tmp_path / f"{n}.png").stat().st_size > 0 for n in ("throughput", "efficiency", "mfu"))
    assert len(json.loads((tmp_path / "results.json").read_text())["points"]) == 4


def test_cli_plan_proposes_native_zero1_with_overrides(capsys):
    assert main(["plan", "22b-frontier.yaml", "--devices", "16", "--cluster", "frontier", "--top", "3",
                 "--emit-overrides", "--max-micro-batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "layouts evaluated" in out
    assert out.count("exatrain train 22b-frontier.yaml") == 3 and "parallel.zero_stage=" in out


def test_bf16_params_plans_against_the_bf16_peak():
    """The Frontier recipes run train.dtype=bf16_params, which computes in bf16: plan and bench gemm must use the
    bf16 GEMM peak, not fp32's."""
    from exatrain.bench.cli import _cluster

    assert _cluster("frontier", "bf16_params").gemm.peak_tflops == _cluster("frontier", "bf16").gemm.peak_tflops
    assert _cluster("frontier", "bf16").gemm.peak_tflops > _cluster("frontier", "fp32").gemm.peak_tflops


@pytest.mark.slow
def test_local_scaling_sweep_with_pipeline_bubble(tmp_path):
    """One torchrun point: pp2 on 2 processes, strong scaling; bench.json has the breakdown with a bubble."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "exatrain", "bench", "scaling", "tiny.yaml", *TINY, "--devices", "2", "--mode",
           "strong", "--layouts", "pp2", "--warmup", "1", "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["points"][0]
    assert res["status"] == "ok" and res["layout"].startswith("tp1 pp2 1F1B")
    r = res["result"]
    assert r["world"] == 2 and len(r["step_times"]) == 2 and r["mfu"] > 0 and r["peak_source"]
    both = r["mfu_by_convention"]
    assert r["flops_convention"] == "palm" and both["palm"] == pytest.approx(r["mfu"]) and both["megatron"] < r["mfu"]
    assert sum(r["breakdown"].values()) == pytest.approx(1.0) and r["breakdown"]["bubble"] > 0
    assert "| strong | pp2 | tp1 pp2 1F1B" in (out / "report.md").read_text()


@pytest.mark.slow
def test_plan_measure_runs_the_top_layout(tmp_path):
    """--measure 1 on one device: predicted vs measured step time and live-tensor peak, one process."""
    cache = tmp_path / "bench"
    gemm_cmd = [sys.executable, "-m", "exatrain", "bench", "gemm", "tiny.yaml", *TINY, "--tp", "1", "--repeats", "2"]
    e = {**env(tmp_path), "EXATRAIN_BENCH_DIR": str(cache)}
    assert subprocess.run(gemm_cmd, cwd=REPO, env=e, capture_output=True, timeout=300, check=False).returncode == 0
    cmd = [sys.executable, "-m", "exatrain", "plan", "tiny.yaml", *TINY, "--devices", "1", "--cluster", "local",
           "--measure", "1", "--steps", "2", "--out", str(tmp_path / "runs"), "--cap-gib", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("1 ") and ln.rstrip().endswith("ok"))
    ratio = row.split()[-2]
    assert 0.8 < float(ratio) < 1.25, row  # memory model vs live tensor bytes


@pytest.mark.slow
@pytest.mark.slurm
def test_scaling_point_on_slurm(slurm_cluster, tmp_path):
    """One point as a Slurm job on the local cluster (1 node x 2 ranks) through exatrain.launch.submit."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "exatrain", "bench", "scaling", "tiny.yaml", *TINY, "metrics.peak_tflops=1",
           "--cluster", "local", "--nodes", "1", "--mode", "strong", "--layouts", "zero1", "--warmup", "1",
           "--steps", "2", "--profile", "0", "--out", str(out), "--timeout", "400"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((Path(out) / "results.json").read_text())["points"][0]
    assert res["status"] == "ok" and res["result"]["world"] == 2 and res["result"]["nodes"] == 1
