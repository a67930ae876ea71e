"""Runs and launches under misuse: two runs on one run_dir, requeued jobs, shell injection through
cluster profiles, secrets in saved configs, dry-run fidelity, and config values that make no sense.
Each case asserts the message a user sees."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from submitit.core.utils import JobPaths, cloudpickle_dump

from exatrain.config import ConfigError, load_config, parse_config
from exatrain.launch import submit as submit_mod
from exatrain.launch.slurm import load_profile, make_plan
from exatrain.launch.submit import JobFailed, RunDirBusy, SubmittedRun, prepare, submit, wait
from exatrain.train import runlock, trainer
from exatrain.train.runlock import LOCK_FILE, RunDirLocked, acquire
from helpers import REPO, TINY, run, torchrun_cmd


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def sleeper():
    """A live process on this host that is not us: a lock holder that is still running."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def hold(run_dir: Path, pid: int, host: str | None = None, job_id: str = "", restart: int = 0) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "job_id": job_id,
                                "restart": restart, "started": "2026-01-01T00:00:00"}))
    return path


# --- one run per run directory -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)


def test_lock_refuses_a_live_holder_then_takes_over_once_it_died(tmp_path, sleeper):
    path = hold(tmp_path, sleeper.pid)
    with pytest.raises(RunDirLocked, match=rf"run_dir {tmp_path} is in use by another run: pid {sleeper.pid} on "
                                           rf"{socket.gethostname()}, .*kill {sleeper.pid}.*delete {path}"):
        acquire(tmp_path)
    sleeper.kill()
    sleeper.wait()
    lock = acquire(tmp_path)  # the holder is gone: a stale lock
    assert json.loads(path.read_text())["pid"] == os.getpid() and mode(path) == 0o600
    lock.release()
    assert not path.exists()


def test_lock_left_by_a_sigkilled_run_is_taken_over(tmp_path):
    code = f"from exatrain.train.runlock import acquire; acquire({str(tmp_path)!r}); print('held', flush=True); " \
           "import time; time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunDirLocked, match=f"pid {proc.pid}"):
        acquire(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    acquire(tmp_path).release()


@pytest.mark.parametrize("state, taken", [("RUNNING", False), ("PENDING", False), ("", True)])
def test_lock_of_a_slurm_job_on_another_node(tmp_path, monkeypatch, state, taken):
    monkeypatch.setattr(runlock, "queue_state", lambda job: state)
    hold(tmp_path, 4242, host="node9", job_id="123")
    if taken:
        acquire(tmp_path).release()  # the job has left the queue: its lock is stale
        return
    with pytest.raises(RunDirLocked, match=rf"pid 4242 on node9, Slurm job 123 \({state}\).*scancel 123"):
        acquire(tmp_path)


@pytest.mark.parametrize("array", [False, True])
def test_requeued_job_takes_over_its_own_lock(tmp_path, monkeypatch, array):
    asked = []
    monkeypatch.setattr(runlock, "queue_state", lambda job: asked.append(job) or "RUNNING")
    job = "97_0" if array else "123"  # an array task is named ARRAYID_TASK (its SLURM_JOB_ID may be 97)
    hold(tmp_path, 4242, host="node9", job_id=job, restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "124")
    with pytest.raises(RunDirLocked, match=rf"Slurm job {job} \(RUNNING\).*scancel {job}"):  # another job: refused
        acquire(tmp_path)
    assert asked == [job]
    monkeypatch.setenv("SLURM_JOB_ID", "97" if array else "123")
    if array:
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "97")
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = acquire(tmp_path)
    assert lock.record["job_id"] == job and lock.record["restart"] == 1
    lock.release()


def test_unreadable_lock_is_refused_and_release_keeps_a_foreign_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock.time, "sleep", lambda s: None)
    (tmp_path / LOCK_FILE).write_text("")
    with pytest.raises(RunDirLocked, match=f"lock file {tmp_path / LOCK_FILE} is unreadable; if no run uses this "
                                           f"directory, delete {tmp_path / LOCK_FILE}"):
        acquire(tmp_path)
    (tmp_path / LOCK_FILE).unlink()
    lock = acquire(tmp_path)
    hold(tmp_path, 1, host="elsewhere")  # replaced behind our back: not ours to remove
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()


@pytest.fixture
def cache(tmp_path_factory, monkeypatch) -> Path:
    path = tmp_path_factory.getbasetemp() / "guard-cache"
    monkeypatch.setenv("EXATRAIN_CACHE", str(path))
    return path


def test_trainer_refuses_a_locked_run_dir_and_writes_private_metadata(tmp_path, cache, sleeper):
    cfg = load_config("tiny.yaml", [*TINY, f"run_dir={tmp_path}", "train.steps=2", "checkpoint.every=0"])
    hold(tmp_path, sleeper.pid)
    with pytest.raises(RunDirLocked, match=f"in use by another run: pid {sleeper.pid}"):
        trainer.train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing written before the refusal
    (tmp_path / LOCK_FILE).unlink()
    assert trainer.train(cfg).status == "completed"
    assert not (tmp_path / LOCK_FILE).exists()  # released
    meta = next((tmp_path / "checkpoints").glob("step_*")) / "meta.json"
    assert mode(tmp_path / "config.yaml") == 0o600 and mode(meta) == 0o600


@pytest.mark.slow
def test_every_rank_fails_promptly_when_rank_0_refuses(tmp_path, cache, sleeper):
    hold(tmp_path, sleeper.pid)
    proc = run(torchrun_cmd(2, tmp_path, "parallel.timeout_s=600"), cache, timeout=180, check=False)
    assert proc.returncode != 0
    assert f"RunDirLocked: run_dir {tmp_path} is in use by another run: pid {sleeper.pid}" in proc.stderr
    assert "RunDirLocked: rank 0 refused to start: run_dir" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


# --- launches: requeue, busy run directories, dry-run fidelity --------------------------------


class FakeJob:
    """What wait() reads of a submitit job: a Slurm state submitit has cached as final."""

    def __init__(self, folder: Path, job_id: str = "77", state: str = "NODE_FAIL"):
        self.job_id, self.state, self.num_tasks = job_id, state, 1
        self.paths = JobPaths(folder, job_id)

    def task(self, rank: int):
        return type("Task", (), {"paths": JobPaths(self.paths.folder, self.job_id, rank)})()

    def done(self) -> bool:
        return True


@pytest.fixture
def no_sacct(monkeypatch):
    monkeypatch.setattr(submit_mod.submitit.SlurmJob.watcher, "update", lambda: None)
    monkeypatch.setattr(submit_mod, "sacct_state", lambda job_id: ("NODE_FAIL", "0:0"))


def test_wait_follows_a_requeued_job_instead_of_reporting_it_failed(tmp_path, monkeypatch, no_sacct):
    job = FakeJob(tmp_path)
    queue = iter(["REQUEUED", "PENDING", "RUNNING"])

    def queue_state(job_id):
        state = next(queue, "")
        if state == "RUNNING":  # the requeued attempt finishes
            cloudpickle_dump(("success", "result"), job.task(0).paths.result_pickle)
        return state

    monkeypatch.setattr(submit_mod, "queue_state", queue_state)
    seen = []
    assert wait([SubmittedRun(tmp_path, [], job)], poll_s=0, on_state=lambda r, s: seen.append(s)) == ["result"]
    assert seen[:2] == ["REQUEUED", "PENDING"]


def test_wait_reports_a_job_that_really_ended(tmp_path, monkeypatch, no_sacct):
    monkeypatch.setattr(submit_mod, "queue_state", lambda job_id: "")
    with pytest.raises(JobFailed, match="job 77 .* ended NODE_FAIL, exit code 0:0"):
        wait([SubmittedRun(tmp_path, [], FakeJob(tmp_path))], poll_s=0)


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` on PATH that keeps the submitted script and answers with job id 4242."""
    bindir, kept = tmp_path / "bin", tmp_path / "submitted.sh"
    bindir.mkdir()
    (bindir / "sbatch").write_text(f'#!/bin/bash\ncp "$1" {kept}\necho "Submitted batch job 4242"\n')
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return kept


def local_plan(run_dir: Path):
    return prepare(parse_config("tiny.yaml", [f"run_dir={run_dir}", "launch.cluster=local", "launch.nodes=2",
                                              "train.micro_batch=1", "train.global_batch=16"]))


def test_dry_run_prints_exactly_the_submitted_script(tmp_path, fake_sbatch, monkeypatch):
    monkeypatch.setattr(submit_mod, "queue_state", lambda job_id: None)
    plan = local_plan(tmp_path / "my runs" / "a$b")  # a folder that needs quoting
    printed = plan.describe()
    run_ = submit(plan)[0]
    submitted = fake_sbatch.read_text()
    assert printed.endswith("\n\n" + submitted) and run_.job_id == "4242"
    launch = plan.runs[0].run_dir / "launch"
    assert json.loads((launch / "jobs.jsonl").read_text())["job_id"] == "4242"
    assert {p.name: mode(p) for p in launch.iterdir()} == {
        name: 0o600 for name in ("config.yaml", "code.json", "jobs.jsonl", *(["code.diff"] if (launch / "code.diff")
                                                                           .exists() else []))}


@pytest.mark.parametrize("state", ["PENDING", "RUNNING", "REQUEUED"])
def test_launch_refuses_a_run_dir_whose_job_is_still_queued(tmp_path, fake_sbatch, monkeypatch, capsys, state):
    from exatrain.cli import main

    run_dir = tmp_path / "run"
    (run_dir / "launch").mkdir(parents=True)
    (run_dir / "launch" / "jobs.jsonl").write_text(json.dumps({"job_id": "31"}) + "\n")
    monkeypatch.setattr(submit_mod, "queue_state", lambda job_id: state if job_id == "31" else "")
    with pytest.raises(RunDirBusy, match=rf"run_dir {run_dir}: job 31 submitted into it is still {state} "
                                         r"\(launch/jobs.jsonl\).*scancel 31.*--force"):
        submit(local_plan(run_dir))
    assert not fake_sbatch.exists()
    args = ["launch", "--cluster", "local", "tiny.yaml", f"run_dir={run_dir}"]
    assert main(args) == 1 and "job 31 submitted into it is still" in capsys.readouterr().err
    assert main(["launch", "--force", *args[1:]]) == 0 and fake_sbatch.exists()
    assert "submitted job 4242" in capsys.readouterr().out


# --- cluster profile env: no shell injection -----------------------------------------------------


def test_profile_env_values_cannot_run_commands(tmp_path):
    pwned = tmp_path / "pwned"
    profile = tmp_path / "evil.yaml"
    profile.write_text(textwrap.dedent(f"""\
        env:
          A: "$(touch {pwned})"
          B: "`touch {pwned}`; touch {pwned}"
          C: 'quote " backslash \\\\ dollar $'
          D: /tmp/cache-$USER-$SLURM_JOB_ID
          E: \\${{E:-/tmp/e-$USER}}
          F: \\${{F:-$(touch {pwned})}}
        """))
    cfg = parse_config("tiny.yaml", [f"launch.cluster={profile}"])
    lines = make_plan(cfg.launch, "x").setup
    script = "\n".join([*lines, 'printf "%s\\n" "$A" "$B" "$C" "$D" "$E" "$F"'])
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], "USER": "me", "SLURM_JOB_ID": "9"}).stdout
    assert not pwned.exists()
    assert out.splitlines() == [f"$(touch {pwned})", f"`touch {pwned}`; touch {pwned}",
                                'quote " backslash \\\\ dollar $', "/tmp/cache-me-9", "/tmp/e-me",
                                f"${{F:-$(touch {pwned})}}"]


@pytest.mark.parametrize("key", ["A-B", "X;touch /tmp/x", "1ABC", "É"])
def test_profile_env_keys_must_be_shell_identifiers(tmp_path, key):
    profile = tmp_path / "bad.yaml"
    profile.write_text(json.dumps({"env": {key: "1"}}))
    with pytest.raises(ConfigError, match=f"cluster profile env: {key!r} is not a valid variable name"):
        make_plan(parse_config("tiny.yaml", [f"launch.cluster={profile}"]).launch, "x")


# --- secrets -------------------------------------------------------------------------------------


def test_environment_values_do_not_reach_saved_configs(tmp_path, monkeypatch):
    monkeypatch.setenv("EXATRAIN_TEST_TOKEN", "s3cret")
    with pytest.raises(ConfigError, match=r"^name: \$\{oc.env:...\} is not supported, since config values are saved "
                                          r"in the run directory; pass the value as an override"):
        load_config("tiny.yaml", ["name=${oc.env:EXATRAIN_TEST_TOKEN}"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  paths: ['${oc.env:EXATRAIN_TEST_TOKEN}']\n")
    with pytest.raises(ConfigError, match=r"^data.paths.0: \$\{oc.env"):
        load_config(cfg_file)
    monkeypatch.setenv("EXATRAIN_CACHE", str(tmp_path / "cache"))  # still honoured for the default cache_dir
    assert load_config("tiny.yaml").data.cache_dir == str(tmp_path / "cache")


# --- validation gaps -----------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("train.eval_batches=0", "train.eval_batches: must be >= 1 (the final evaluation uses it), got 0"),
    ("train.eval_every=-1", "train.eval_every: must be >= 0 (0 = evaluate at the end only), got -1"),
    ("parallel.timeout_s=0", "parallel.timeout_s: must be > 0 seconds, got 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0, got -0.1"),
])
def test_validation_gaps(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config("tiny.yaml", [override])
    assert str(exc.value) == message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just words\n", "str"), ("3\n", "int")])
def test_yaml_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    for load in (lambda: load_config(path), lambda: load_profile(str(path))):
        with pytest.raises(ConfigError) as exc:
            load()
        assert str(exc.value) == f"{path}: the top level must be a mapping of keys (key: value), got a {kind}"


def test_local_cluster_has_a_random_private_password_and_stays_on_localhost(tmp_path):
    script = REPO / "slurm" / "local-cluster.sh"
    text = script.read_text()
    assert "exatrain-local" not in text and "StoragePass=$db_pass" in text
    assert "--bind-address=127.0.0.1" in text and "CommunicationParameters=NoInAddrAny" in text

    def password(name: str) -> str:  # the script's own db_password function, on a scratch state file
        code = f'eval "$(sed -n "/^db_password() {{/,/^}}/p" {script})"; DB_PASS_FILE={tmp_path / name}; db_password'
        return subprocess.run(["bash", "-c", code], capture_output=True, text=True, check=True).stdout

    first = password("a")
    assert len(first) >= 20 and password("a") == first and password("b") != first
    assert mode(tmp_path / "a") == 0o600


@pytest.mark.slurm
@pytest.mark.slow
def test_scontrol_requeue_is_followed_and_the_requeued_job_takes_over_its_lock(slurm_cluster, tmp_path, monkeypatch):
    """A running job requeued by the controller (as after a node failure) is killed without releasing its
    run lock; its next attempt takes the lock over and finishes, and --wait reports it completed."""
    for key, value in (("EXATRAIN_CACHE", str(tmp_path / "cache")), ("OMP_NUM_THREADS", "1"),
                       ("PYTHONPATH", str(REPO))):
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    run_dir = tmp_path / "run"
    cfg = load_config("tiny.yaml", [f"run_dir={run_dir}", *TINY, "metrics.peak_tflops=1", "train.steps=40",
                                    "checkpoint.every=0", "train.global_batch=8", "train.micro_batch=4",
                                    "launch.cluster=local", "launch.tasks_per_node=1"])
    (job,) = submit(prepare(cfg))
    try:
        metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 240
        while time.monotonic() < deadline and len(metrics.read_text().splitlines() if metrics.exists() else []) < 3:
            time.sleep(0.2)
        held = json.loads((run_dir / LOCK_FILE).read_text())
        assert held["job_id"] == job.job_id and held["restart"] == 0
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True)
        states: list[str] = []
        (result,) = wait([job], timeout_s=300, on_state=lambda run, state: states.append(state))
    finally:
        subprocess.run(["scancel", job.job_id], capture_output=True)
    assert result.status == "completed" and result.step == 40, states
    err = (run_dir / "logs" / f"{job.job_id}_0_log.err").read_text()
    assert "restart 0" in err and "restart 1" in err
    assert not (run_dir / LOCK_FILE).exists()


def test_unwritable_run_dir_is_a_lock_refusal(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirLocked, match=f"run_dir {tmp_path / 'file' / 'run'}: cannot take its lock: "):
        runlock.hold_run_dir(tmp_path / "file" / "run", rank=0)
