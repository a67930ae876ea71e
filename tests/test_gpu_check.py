"""benchmarks/gpu_check.sh --dry: every check of the prepared GPU check runs its code path on CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO


def test_gpu_check_dry_walks_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "EXATRAIN_CACHE": str(tmp_path / "cache"),
           "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry", "--reps", "1", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    checks = json.loads(out.read_text())["checks"]
    assert list(checks) == ["s2_triton", "s2_speed", "flash_numerics", "train_bf16", "train_fp8", "mfu_1b"]
    assert all(c["status"] == "ok" for c in checks.values()), checks
    assert checks["s2_triton"]["data"]["dq"] < 1e-3 and checks["mfu_1b"]["data"]["tokens_per_s"] > 0
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(checks), "one header and one row per check, ready to paste"
