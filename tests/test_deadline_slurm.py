"""The time-limit stop on the local Slurm cluster: a job with a 2-minute limit, 3-second steps and no useful
pre-limit signal stops itself with a checkpoint before the limit (exatrain.train.deadline) and requeues."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from exatrain.config import load_config
from exatrain.launch.submit import prepare, submit
from exatrain.train.checkpoint import list_checkpoints
from helpers import REPO, TINY

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent


def test_slow_steps_checkpoint_before_the_time_limit_and_requeue(slurm_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("EXATRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{TESTS}")
    monkeypatch.setenv("EXATRAIN_TEST_SLOW_S", "3")  # every step of every rank
    run_dir = tmp_path / "run"
    cfg = load_config("tiny.yaml", [
        f"run_dir={run_dir}", *TINY, "metrics.peak_tflops=1", "train.steps=100000", "checkpoint.every=0",
        "plugins=[slow_step_plugin]", "train.callbacks=[slow_step]", "launch.tasks_per_node=1",
        # 2 minutes, and the pre-limit signal 1 s before it: too late to save, only the deadline can. Slurm
        # checks signal times every ~30 s, so the margin keeps the deadline's stop (at 40 s left) ahead of it.
        "launch.time_min=2", "launch.signal_s=1", "launch.save_s=5", "launch.stop_margin=5",
        "launch.max_requeues=1"])
    (run,) = submit(prepare(cfg))
    stderr = Path(run.job.paths.stderr)
    stdout = Path(run.job.paths.stdout)
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            if stderr.exists() and stderr.read_text().count("deadline: job ends at") >= 2:
                break  # the requeued attempt has started training
            time.sleep(2)
        else:
            pytest.fail(f"the job was not requeued within 7 min:\n{stdout.read_text()[-3000:] if stdout.exists() else ''}"
                        f"\n{stderr.read_text()[-5000:] if stderr.exists() else ''}")
    finally:
        subprocess.run(["scancel", run.job_id], capture_output=True)
    err, out = stderr.read_text(), stdout.read_text()
    assert "stopping at step" in err and "deadline:" in err and "left before the time limit" in err, err[-5000:]
    step = int(out.split("checkpointed at step ")[1].split(";")[0])
    assert f"requeueing job {run.job_id}" in out
    assert any(p.name == f"step_{step:08d}" for p in list_checkpoints(run_dir / "checkpoints"))
    assert "DUE TO TIME LIMIT" not in err, "the first attempt must end before Slurm kills it"
    first, second = (datetime.fromisoformat(part.split(";")[0]) for part in err.split("deadline: job ends at ")[1:3])
    assert (second - first).total_seconds() >= 60, "the requeued attempt gets its own time limit"
