"""Shared test utilities: tiny job overrides and subprocess launches that cannot hang the suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from exatrain.train.callback import Callback

REPO = Path(__file__).resolve().parent.parent

TINY = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.max_seq_len=64",
    "data.seq_len=64", "train.global_batch=4", "train.micro_batch=2", "train.steps=12",
    "train.eval_every=0", "train.eval_batches=1", "checkpoint.every=4", "schedule.warmup_steps=2",
    "metrics.tensorboard=false", "metrics.progress_bar=false", "metrics.log_every=1",
]


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "EXATRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(cmd: list[str], cache: Path, timeout: float = 300, check: bool = True,
        env_override: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, cwd=REPO, env=env_override or env(cache), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def train_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "exatrain", "train", "tiny.yaml", f"run_dir={run_dir}", *TINY, *overrides]


def torchrun_cmd(nproc: int, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
            "-m", "exatrain", "train", "tiny.yaml", f"run_dir={run_dir}", *TINY, *overrides]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step from metrics.jsonl; a resumed run's later record for a step wins."""
    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind", "train") == "train" and "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def kill_after_checkpoint(cmd: list[str], run_dir: Path, step: int, env: dict[str, str], timeout: float = 240) -> None:
    """Start a training command and SIGKILL it as soon as its step-`step` checkpoint is complete."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    deadline = time.time() + timeout
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.exists(), f"the run never reached its step-{step} checkpoint"


def torchrun_worker(worker: Path, nproc: int, spec: object, tmp: Path, timeout: float,
                    extra_env: dict[str, str] | None = None, out_name: str = "out.json") -> Path:
    """Run `worker SPEC.json OUT` under torchrun with `spec` written as JSON; return OUT.

    The launch runs in its own session so a timeout kills every rank; a failure or timeout fails the test
    with the output's tail. PYTHONPATH puts this checkout first, so the ranks import the code under test."""
    import pytest

    tmp.mkdir(parents=True, exist_ok=True)
    spec_path, out = tmp / "spec.json", tmp / out_name
    spec_path.write_text(json.dumps(spec))
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO),
               **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(worker), str(spec_path), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{nproc}-process launch of {worker.name} timed out after {timeout}s; "
                    f"output tail:\n{output[-20000:]}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"{nproc}-process launch of {worker.name} failed (rc={proc.returncode}); "
                    f"output tail:\n{output[-20000:]}")
    return out


def run_worker_cases(cases: list[dict], run_one, write) -> None:
    """Inside a torchrun worker: run each case on the initialised process group and have rank 0 `write`
    {name: record}. A case that raises records {"error": traceback} and the other cases still run."""
    import traceback

    import torch.distributed as dist

    rank = dist.get_rank()
    results = {}
    for case in cases:
        start = time.perf_counter()
        try:
            record = run_one(case)
            record["seconds"] = round(time.perf_counter() - start, 2)
        except Exception:  # noqa: BLE001 - reported per case; other cases still run
            record = {"error": f"rank {rank}: {traceback.format_exc()}"}
            print(record["error"], file=sys.stderr, flush=True)
        results[case["name"]] = record
        if rank == 0:
            print(f"case {case['name']}: {record}", flush=True)
    if rank == 0:
        write(results)
    dist.barrier()
    dist.destroy_process_group()


class StopAfter(Callback):
    """Requests a stop (as a preemption signal would, or a method ending the run) once `step` steps are done."""

    def __init__(self, step: int, status: str = "preempted"):
        self.step, self.status = step, status
        self.name = f"stop_after_{status}"

    def on_step_end(self, t, stats, record):
        if t.state.step == self.step:
            t.request_stop("test stop", self.status)
