"""End-to-end launches on the local Slurm test cluster (slurm/local-cluster.sh).

Every job of this module is submitted at once by one fixture, so they overlap their queue, start-up
and requeue waits on the two shared cores; each test then waits for its own. Two watcher threads act
on running jobs as soon as they have trained a step: one sends the pre-time-limit signal, one kills a
rank the way a failed node would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exatrain.config import load_config
from exatrain.launch.submit import JobFailed, SubmittedRun, prepare, submit, wait
from helpers import REPO, TINY, losses, torchrun_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# A fixed MFU denominator skips the trainer's GEMM peak probe on every rank: start-up is what these jobs cost.
FAST = [*TINY, "metrics.peak_tflops=1"]
DP = ["train.global_batch=8", "train.micro_batch=2"]  # 4 ranks x 2 rows
LONG = ["train.steps=40", "checkpoint.every=0", "train.global_batch=8", "train.micro_batch=4"]  # 2 ranks
WAIT_S = 240


def _step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (OSError, json.JSONDecodeError):  # not written yet, or a line being written
        return 0


def _when_training(run_dir: Path, action, min_step: int = 2, timeout: float = WAIT_S) -> threading.Thread:
    """Run `action()` in a thread once the run at run_dir has logged `min_step` training steps."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _step(run_dir) < min_step:
            time.sleep(0.1)
        action()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _rank_pid(job_id: str, rank: int) -> int:
    """PID of a rank's Python process, found by its Slurm environment (all nodes are this machine)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            comm = (proc / "comm").read_text().strip()
        except (OSError, ValueError):
            continue
        if comm.startswith("python") and env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank) \
                and "SLURM_STEP_ID" in env:
            return int(proc.name)
    raise LookupError(f"no process for rank {rank} of job {job_id}")


def _api_submit(run_dir: Path, *overrides: str, sweep: tuple[str, ...] = ()) -> list[SubmittedRun]:
    cfg = load_config("tiny.yaml", [f"run_dir={run_dir}", *FAST, *overrides])
    return submit(prepare(cfg, sweep))


@dataclass
class Launched:
    root: Path
    dp: list[SubmittedRun] = field(default_factory=list)
    torchrun_dp: subprocess.Popen | None = None
    sweep: list[SubmittedRun] = field(default_factory=list)
    preempted: list[SubmittedRun] = field(default_factory=list)
    failing_cli: subprocess.Popen | None = None
    killed: list[SubmittedRun] = field(default_factory=list)
    template_job: str = ""
    events: dict[str, str] = field(default_factory=dict)


def _popen(cmd: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)


def _launch_cli(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "exatrain", "launch", "--cluster", "local", "--wait", *args,
            "tiny.yaml", f"run_dir={run_dir}", *FAST]


@pytest.fixture(scope="module")
def launched(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    L = Launched(root)
    with pytest.MonkeyPatch.context() as mp:
        # Jobs inherit the submitter's environment (sbatch --export=ALL): one shared data cache.
        mp.setenv("EXATRAIN_CACHE", str(root / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("PYTHONPATH", str(REPO))
        mp.setenv("EXATRAIN_PYTHON", sys.executable)  # for the sbatch template, whatever PATH has
        mp.chdir(REPO)
        try:
            _launch_all(L)
            yield L
        finally:
            for p in (L.failing_cli, L.torchrun_dp):
                if p is not None and p.poll() is None:
                    p.kill()
            jobs = [r.job_id for r in L.preempted + L.killed + L.dp + L.sweep] + [L.template_job]
            subprocess.run(["scancel", *[j for j in jobs if j]], capture_output=True)


def _launch_all(L: Launched) -> None:
    root = L.root
    L.preempted = _api_submit(root / "preempt", *LONG, "launch.tasks_per_node=2")
    L.killed = _api_submit(root / "killed", *LONG, "launch.tasks_per_node=2")
    L.dp = _api_submit(root / "dp", *DP, "launch.nodes=2", "launch.tasks_per_node=2")
    L.sweep = _api_submit(root / "sweep", "launch.tasks_per_node=1", sweep=("optim.lr=1e-3,2e-3,4e-3",))
    # vocab_size below the tokenizer's: every rank raises inside train() after start-up.
    L.failing_cli = _popen(_launch_cli(root / "failing", "--tasks-per-node", "1") + ["model.vocab_size=7"],
                           root / "failing.log")
    # The template runs the preempted job's config uninterrupted: the reference for its losses.
    L.template_job = subprocess.run(
        ["sbatch", "--parsable", "-o", str(root / "template-%j.out"), "slurm/local.sbatch", "tiny.yaml",
         f"run_dir={root / 'template'}", *FAST, *LONG], capture_output=True, text=True, check=True).stdout.strip()

    def preempt():
        L.events["signalled_at"] = str(_step(root / "preempt"))
        subprocess.run(["scancel", "--signal=USR2", L.preempted[0].job_id], check=True)

    def kill_rank_1():
        os.kill(_rank_pid(L.killed[0].job_id, 1), signal.SIGKILL)
        L.events["killed_at"] = str(_step(root / "killed"))

    _when_training(root / "preempt", preempt)
    _when_training(root / "killed", kill_rank_1)
    L.torchrun_dp = _popen(torchrun_cmd(4, root / "torchrun_dp", "metrics.peak_tflops=1", *DP),
                           root / "torchrun_dp.log")


def _finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    rc = proc.wait(timeout=WAIT_S)
    return rc, log.read_text()


def test_dp_2_nodes_x_2_tasks_matches_torchrun(launched):
    L = launched
    (result,) = wait(L.dp, timeout_s=WAIT_S)
    assert result.status == "completed" and result.step == 12
    rc, ref_out = _finish(L.torchrun_dp, L.root / "torchrun_dp.log")
    assert rc == 0, ref_out
    slurm_losses, ref_losses = losses(L.root / "dp"), losses(L.root / "torchrun_dp")
    assert sorted(slurm_losses) == list(range(1, 13))
    assert slurm_losses == ref_losses
    assert result.final_loss == ref_losses[12]
    # The run directory has the code/config snapshot, the job id and a log per rank.
    launch = L.root / "dp" / "launch"
    assert (launch / "config.yaml").exists() and (launch / "code.json").exists()
    job_id = json.loads((launch / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]
    assert job_id == L.dp[0].job_id
    assert all((L.root / "dp" / "logs" / f"{job_id}_{r}_log.out").exists() for r in range(4))


def test_array_sweep_of_3_runs(launched):
    runs = launched.sweep
    results = wait(runs, timeout_s=WAIT_S)
    assert [r.status for r in results] == ["completed"] * 3
    assert len({r.job_id.split("_")[0] for r in runs}) == 1  # one job array
    assert [r.job_id.split("_")[1] for r in runs] == ["0", "1", "2"]
    final = [losses(run.run_dir)[12] for run in runs]
    assert len(set(final)) == 3  # different learning rates, different runs
    for run, lr in zip(runs, ("0.001", "0.002", "0.004")):
        assert f"lr: {lr}" in (run.run_dir / "launch" / "config.yaml").read_text()
        assert (run.run_dir / "logs" / f"{run.job_id}_0_log.out").exists()
    assert (launched.root / "sweep" / "optim.lr=2e-3").resolve() == launched.root / "sweep" / "1"


def _wait_sacct(job_id: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while True:
        state = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True,
                               text=True).stdout.strip()
        if state not in ("", "PENDING", "RUNNING", "COMPLETING", "REQUEUED") or time.monotonic() > deadline:
            return state
        time.sleep(1)


def test_sbatch_template_runs_without_python_submission(launched):
    job = launched.template_job
    state = _wait_sacct(job)
    out = (launched.root / f"template-{job}.out").read_text()
    assert state == "COMPLETED", out
    assert "0: exatrain: completed at step 40" in out  # srun --label prefixes rank 0's line
    assert sorted(losses(launched.root / "template")) == list(range(1, 41))


def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_loss(launched):
    L = launched
    (result,) = wait(L.preempted, timeout_s=WAIT_S)
    assert result.status == "completed" and result.step == 40
    run_dir = L.root / "preempt"
    job_id = L.preempted[0].job_id
    assert _wait_sacct(job_id) == "COMPLETED"  # result files can come before Slurm's job end
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert history[0] == "REQUEUED" and history[-1] == "COMPLETED", history
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["resumed_from"] for r in records if "resumed_from" in r]
    assert resumed and 0 < resumed[0] < 40, f"signalled at step {L.events.get('signalled_at')}: {resumed}"
    err = (run_dir / "logs" / f"{job_id}_0_log.err").read_text()
    assert "restart 0" in err and "restart 1" in err
    # Same losses, step for step, as the same config run uninterrupted (the sbatch template's job).
    assert _wait_sacct(L.template_job) == "COMPLETED"
    assert losses(run_dir) == losses(L.root / "template")
    assert result.final_loss == losses(L.root / "template")[40]


def test_failing_job_surfaces_its_error_to_the_submitter(launched):
    rc, out = _finish(launched.failing_cli, launched.root / "failing.log")
    assert rc == 1, out
    assert "ended FAILED" in out
    assert "first failure: rank" in out and "model.vocab_size=7" in out
    assert "traceback of rank" in out


def test_killed_rank_ends_the_job_with_rank_and_reason(launched):
    t0 = time.monotonic()
    with pytest.raises(JobFailed) as err:
        wait(launched.killed, timeout_s=WAIT_S)
    report = str(err.value)
    assert "killed_at" in launched.events, "the watcher never saw the job train"
    assert re.search(r"first failure: rank 1 on node\d: Killed", report), report
    assert "ended FAILED" in report
    assert time.monotonic() - t0 < 120  # the other rank did not sit in a collective until the timeout

