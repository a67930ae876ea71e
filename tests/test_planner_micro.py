"""Micro-benchmarks (exatrain.bench.micro): the α/β fit, the per-cluster JSON cache that the time model
reads back, and one real gloo run of `comm` under torchrun (4 ranks as 2 "nodes" of 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, env

from exatrain.bench.hardware import cache_path, load_cluster
from exatrain.bench.micro import (
    effective_bytes,
    fit_alpha_beta,
    gemm,
    model_gemm_shapes,
)
from exatrain.config import load_config


def test_fit_recovers_alpha_beta():
    alpha, beta = 25e-6, 40.0
    samples = [(effective_bytes(op, s, 8), alpha + effective_bytes(op, s, 8) / (beta * 1e9))
               for op in ("all_reduce", "all_gather", "p2p") for s in (2**16, 2**20, 2**24)]
    a, b = fit_alpha_beta(samples)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)
    with pytest.raises(ValueError, match="larger messages"):
        fit_alpha_beta([(1.0, 2.0), (2.0, 1.0)])
    # relative weighting: 30% noise on the largest message barely moves α (an unweighted fit's α goes negative)
    noisy = [(x, t * (1.3 if x == max(x for x, _ in samples) else 1.0)) for x, t in samples]
    assert fit_alpha_beta(noisy)[0] == pytest.approx(alpha, rel=0.2)


def test_gemm_cache_feeds_the_time_model(tmp_path, capsys):
    rows = gemm([(64, 64, 64), (128, 128, 128)], dtype="fp32", cluster="frontier", repeats=2, directory=tmp_path)
    assert len(rows) == 2 and all(r["tflops"] > 0 for r in rows)
    assert "TFLOP/s" in capsys.readouterr().out
    data = json.loads(cache_path("frontier", tmp_path).read_text())
    assert [r["m"] for r in data["gemm"]["fp32"]["rows"]] == [64, 128]
    cl = load_cluster("frontier", dtype="fp32", directory=tmp_path)
    assert cl.measured == ["host overhead", "memory bandwidth", "gemm"] and cl.gemm.hbm_gbs == data["hbm_gbs"] > 0
    assert cl.op_s == data["host"]["op_s"] > 0 and cl.host_serial
    measured = 2 * 128**3 / rows[1]["seconds"]
    assert 2 * 128**3 / cl.gemm.time(128, 128, 128, 4) == pytest.approx(measured, rel=1e-9)
    gemm([(64, 64, 64), (128, 128, 128)], dtype="fp32", cluster="local", repeats=1, directory=tmp_path)
    local = load_cluster("local", dtype="fp32", directory=tmp_path)  # no built-in facts: measured only
    assert local.device.memory_gib > 0 and local.gemm.peak_tflops > 0 and local.devices_per_node == 2


def test_model_gemm_shapes_cover_tp():
    cfg = load_config("22b-frontier.yaml")
    shapes = model_gemm_shapes(cfg, tps=(1, 8))
    assert (2048, 16384 // 8, 6144) in shapes and (2048, 6144, 16384) in shapes and (2048, 50304 // 8, 6144) in shapes


WORKER = """
import sys, torch.distributed as dist
from pathlib import Path
from exatrain.bench.micro import comm
dist.init_process_group("gloo")
comm(2, sizes=(2**18, 2**20, 2**22), cluster="local", repeats=3, directory=Path(sys.argv[1]))
dist.destroy_process_group()
"""


def test_comm_under_torchrun_fits_both_scopes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "intra: α" in proc.stdout and "inter: α" in proc.stdout
    fits = json.loads(cache_path("local", tmp_path).read_text())["comm"]
    assert fits["inter"]["bw_gbs"] == pytest.approx(2 * fits["inter"]["group_bw_gbs"])
    assert {r["op"] for r in fits["intra"]["rows"]} == {"all_reduce", "all_gather", "reduce_scatter", "p2p"}
    assert 0.0 <= fits["overlap"]["fraction"] <= 1.0 and "overlap:" in proc.stdout
    cl = load_cluster("local", dtype="fp32", directory=tmp_path)
    assert cl.overlap == fits["overlap"]["fraction"] and cl.intra.alpha_s == fits["intra"]["alpha_s"]
    assert cl.shared_hbm_gbs == fits["shared_hbm_gbs"]["gbs"] > 0
    tp = fits["tp"]["ops"]  # collectives through DTensor.redistribute, as TP issues them: priced by cl.tp_link
    assert {r["op"] for r in fits["tp"]["rows"]} == {"all_gather", "reduce_scatter", "all_reduce"}
    assert cl.tp_link is not None and "comm.tp" in cl.measured
    for op, f in tp.items():
        assert cl.tp_link.time(op, 2**20, 2, calls=3) == pytest.approx(
            3 * f["alpha_s"] + (2.0 if op == "all_reduce" else 1.0) * 0.5 * 2**20 / (f["bw_gbs"] * 1e9))
    ar = fits["intra"]["ops"]["all_reduce"]  # per-operation fits drive the collective cost
    assert cl.intra.time("all_reduce", 2**20, 2) == pytest.approx(ar["alpha_s"] + 2**20 / (ar["bw_gbs"] * 1e9))
