"""The time-limit stop (exatrain.train.deadline), SIGTERM handling and the hang watchdog
(exatrain.train.watchdog): the decision logic on synthetic clocks, then real runs."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from exatrain.config import ConfigError, load_config
from exatrain.train import trainer
from exatrain.train.callback import Callback
from exatrain.train.checkpoint import list_checkpoints
from exatrain.train.deadline import Deadline, DeadlineCallback, job_end_time, parse_squeue_end, slurm_duration_s
from exatrain.train.watchdog import Watchdog, current_collective, watchdog_seconds
from helpers import REPO, TINY, env, losses, torchrun_cmd

TESTS = Path(__file__).resolve().parent


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_deadline_stops_when_one_more_iteration_and_a_save_would_not_fit():
    d = Deadline(end=1000.0, margin=1.5, save_s=20.0)
    assert not d.should_stop(0.0), "no decision before an iteration was measured"
    d.observe_iteration(10.0)
    assert d.needed_s() == 1.5 * (10 + 20)
    assert not d.should_stop(1000.0 - 45.0) and d.should_stop(1000.0 - 44.9)
    d.observe_save(40.0)  # a measured save replaces the assumed one
    assert d.save_s == 40.0 and d.should_stop(1000.0 - 74.9) and not d.should_stop(1000.0 - 75.0)
    d.observe_iteration(30.0)
    d.observe_iteration(5.0)
    assert d.iteration_s == 30.0, "the running max, not the latest"
    for _ in range(50):
        d.observe_iteration(5.0)
    assert d.iteration_s == 5.0, "a slow warm-up iteration is forgotten after the window"
    assert "left before the time limit" in d.describe(900.0)


def test_job_end_time_sources():
    assert job_end_time({"SLURM_JOB_END_TIME": "1800000000"}) == 1800000000.0
    assert job_end_time({}) is None, "outside Slurm there is no deadline"
    got = job_end_time({"SLURM_JOB_ID": "42"}, squeue=lambda job: "2026-11-29T23:10:00|1-02:03:04\n")
    assert got == datetime.fromisoformat("2026-11-29T23:10:00").timestamp() + 26 * 3600 + 3 * 60 + 4
    assert parse_squeue_end("2026-11-29T23:10:00|2:00") == datetime.fromisoformat("2026-11-29T23:12:00").timestamp()
    assert slurm_duration_s("2:00:00") == 7200 and slurm_duration_s("UNLIMITED") is None
    assert job_end_time({"SLURM_JOB_ID": "42"}, squeue=lambda job: "N/A|UNLIMITED\n") is None

    def broken(job):
        raise subprocess.CalledProcessError(1, "squeue")
    assert job_end_time({"SLURM_JOB_ID": "42"}, squeue=broken) is None


def test_config_checks():
    with pytest.raises(ConfigError, match="launch.stop_margin"):
        load_config("tiny.yaml", ["launch.stop_margin=0.5"])
    with pytest.raises(ConfigError, match="parallel.watchdog_s"):
        load_config("tiny.yaml", ["parallel.timeout_s=60", "parallel.watchdog_s=60"])
    assert watchdog_seconds(load_config("tiny.yaml", ["parallel.timeout_s=60"])) == 30


class SlowClock(Callback):
    """Each step takes 10 s and each checkpoint 5 s on the shared fake clock."""

    def __init__(self, clock: Clock):
        self.clock = clock

    def on_step_end(self, t, stats, record):
        self.clock.t += 10.0

    def on_checkpoint(self, t, path):
        self.clock.t += 5.0


def test_deadline_callback_checkpoints_before_the_limit(tmp_path):
    """End 100 s after the start, 10 s steps, an assumed 20 s save, margin 1.5: more than 45 s must be left
    before each further step, so the run stops with a checkpoint after step 6 (40 s left)."""
    clock = Clock()
    end = clock.t + 100.0
    cb = DeadlineCallback(1.5, 20.0, clock=clock, end_time=lambda: end)
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}", "train.steps=50", "checkpoint.every=0",
                                    "launch.stop_margin=0"])
    result = trainer.train(cfg, callbacks=[SlowClock(clock), cb])
    assert result.status == "preempted" and result.step == 6
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "step_00000006"
    assert clock.t < end, "the checkpoint was written before the time limit"
    assert cb.deadline.save_s == 5.0, "the stop checkpoint's write time is measured"


def test_an_end_time_already_past_is_ignored():
    clock = Clock()
    cb = DeadlineCallback(1.5, 20.0, clock=clock, end_time=lambda: clock.t - 5)
    cb.on_train_start(SimpleNamespace(info=SimpleNamespace(rank=0)))
    assert cb.deadline is None


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if max(losses(run_dir), default=0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the run never reached step {step}: {proc.communicate()}")


def test_sigterm_checkpoints_and_exits_75(tmp_path):
    """SIGTERM (scancel, systemd, Kubernetes) mid-run: finish the step, checkpoint, exit 75 (EXIT_TERMINATED)."""
    cmd = [sys.executable, "-m", "exatrain", "train", "tiny.yaml", f"run_dir={tmp_path}", *TINY,
           "train.steps=100000", "checkpoint.every=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(tmp_path / "cache"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, proc, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == trainer.EXIT_TERMINATED == 75, err[-3000:]
    step = int(out.split("step ")[1].split(",")[0])
    assert out.startswith("preempted") and "received SIGTERM" in err
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == f"step_{step:08d}"


def test_watchdog_reports_a_stall_once_with_stacks(tmp_path):
    clock, stream = Clock(0.0), io.StringIO()
    dog = Watchdog(5.0, rank=3, report_dir=tmp_path / "watchdog", clock=clock, stream=stream)
    dog.beat("step 7 in train step")
    clock.t = 4.9
    assert dog.check() is None
    clock.t = 6.0
    line = dog.check()
    assert line == "exatrain watchdog: rank 3 stalled for 6.0 s at step 7 in train step"
    assert dog.check() is None, "one report per stall"
    dog.report(line)
    assert (tmp_path / "watchdog" / "rank3.txt").read_text().startswith(line)
    assert "most recent call first" in (tmp_path / "watchdog" / "rank3.txt").read_text(), "faulthandler stacks"
    dog.beat("step 8 in train step")
    clock.t = 20.0
    assert "step 8" in dog.check(), "a new stall is reported again"
    assert current_collective(sys._getframe()) == ""


@pytest.mark.slow
def test_watchdog_names_the_stalled_rank_and_the_waiting_collective(tmp_path):
    """Two gloo ranks, rank 1 sleeps 6 s at the end of step 3: both report within watchdog_s=1.5; rank 0 is
    waiting in a collective, rank 1 (the culprit) is not."""
    e = {**env(tmp_path / "cache"), "PYTHONPATH": f"{REPO}:{TESTS}", "EXATRAIN_TEST_SLOW_RANK": "1",
         "EXATRAIN_TEST_SLOW_STEP": "3", "EXATRAIN_TEST_SLOW_S": "6"}
    cmd = torchrun_cmd(2, tmp_path, "train.steps=5", "checkpoint.every=0", "plugins=[slow_step_plugin]",
                       "train.callbacks=[slow_step]", "parallel.watchdog_s=1.5", "parallel.timeout_s=120")
    proc = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rank0 = (tmp_path / "watchdog" / "rank0.txt").read_text()
    rank1 = (tmp_path / "watchdog" / "rank1.txt").read_text()
    assert "rank 0 stalled" in rank0 and "at step 3 after train step" in rank0, rank0[:2000]
    assert "collective all_reduce (trainer.py:" in rank0.splitlines()[0]
    assert "rank 1 stalled" in rank1 and "at step 3 in train step" in rank1
    assert "collective" not in rank1.splitlines()[0]
    assert "slow_step_plugin.py" in rank1, "rank 1's stack shows where it is stuck"
    assert "exatrain watchdog: rank 1 stalled" in proc.stderr
