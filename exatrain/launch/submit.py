"""Submit training runs to Slurm through submitit, and wait for them.

    plan = prepare(load_config("tiny.yaml", ["launch.nodes=2"]), sweep=["optim.lr=1e-4,3e-4"])
    print(plan.describe())           # what --dry-run prints
    runs = submit(plan)              # one job, or one job array for a sweep
    results = wait(runs)             # TrainResult per run; JobFailed names the failing ranks

Layout: a single run keeps everything in its run_dir (submitit's per-rank logs, pickles and batch
script in run_dir/logs). A sweep's run_dir holds the array's shared logs/ and one run directory per
point, named by array index (run_dir/0, run_dir/1, ...; a symlink named by the point's overrides
points at each), each with its launch/ snapshot, checkpoints and logs/ links to its own ranks' logs,
so a requeued array task resumes its own point.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import pickle_load

from exatrain.config import ConfigError, JobConfig, finalize_config, to_dict, with_overrides
from exatrain.launch import snapshot, sweep
from exatrain.launch.job import TrainJob
from exatrain.launch.preflight import check_rocm, check_storage
from exatrain.launch.slurm import ACTIVE_STATES, SlurmPlan, load_profile, make_plan, queue_state, render_sbatch


class JobFailed(RuntimeError):
    """One or more runs did not complete; the message has each failing rank's error and the log paths."""


class RunDirBusy(RuntimeError):
    """A job submitted earlier into the run directory is still queued or running."""


@dataclass
class RunSpec:
    cfg: JobConfig
    run_dir: Path
    point: list[str]  # this run's sweep overrides ([] for a single run)


@dataclass
class LaunchPlan:
    slurm: SlurmPlan
    runs: list[RunSpec]
    root: Path  # the run_dir, or the sweep's parent directory
    folder: Path  # submitit's folder: root/logs
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def is_array(self) -> bool:
        return len(self.runs) > 1

    def sbatch_script(self) -> str:
        return render_sbatch(self.slurm, self.folder, self.python, len(self.runs) if self.is_array else 0)

    def describe(self) -> str:
        s = self.slurm
        gpus = f", {s.gpus_per_node} GPUs/node (one per task)" if s.gpus_per_node else ""
        lines = [f"# cluster {s.cluster}: {s.nodes} node(s) x {s.tasks_per_node} tasks = {s.world_size} ranks{gpus}, "
                 f"{s.cpus_per_task} CPUs/task, {s.time_min} min, stop signal {s.signal_s} s before the limit",
                 f"# {'job array of ' + str(len(self.runs)) + ' runs' if self.is_array else 'run'} under {self.root}"]
        for i, run in enumerate(self.runs):
            lines.append(f"#   [{i}] {run.run_dir}  {' '.join(run.point)}".rstrip())
        job = "%A_%a" if self.is_array else "%j"
        lines += [f"# per-rank logs: {self.folder}/{job}_<rank>_log.{{out,err}}", "", self.sbatch_script()]
        return "\n".join(lines)


def _check_layout(cfg: JobConfig, world_size: int) -> None:
    """Fail at submission, not after the queue wait, when the parallel layout cannot fit the job."""
    from exatrain.parallel.dims import ParallelDims

    try:
        ParallelDims.from_config(cfg, world_size)
    except ValueError as exc:
        raise ConfigError(f"the job has {world_size} ranks: {exc}") from None


def _torch_hip() -> str | None:
    import torch

    return torch.version.hip


def prepare(cfg: JobConfig, sweep_axes: Sequence[str] = ()) -> LaunchPlan:
    """Resolve cluster profile, sweep points and run directories; touches nothing on disk.

    `cfg` is a parsed, unresolved config (exatrain.config.parse_config): each point is resolved after its
    overrides, so values derived from a swept key (the FFN width of a swept model.dim) follow it."""
    profile = load_profile(cfg.launch.cluster)
    slurm = make_plan(cfg.launch, cfg.name, profile)
    root = Path(cfg.run_dir).absolute()
    axes = sweep.parse_axes(sweep_axes)
    if any(key.startswith("launch.") for key, _ in axes):
        raise ConfigError("sweep: the points of a sweep share one job array, so launch.* cannot vary "
                          "(submit one launch per shape instead)")
    points = sweep.expand(axes)
    if len(points) == 1:
        runs = [RunSpec(finalize_config(with_overrides(cfg, [*points[0], f"run_dir={root}"])), root, points[0])]
    else:
        runs = [RunSpec(finalize_config(with_overrides(cfg, [*p, f"run_dir={root / str(i)}"])), root / str(i), p)
                for i, p in enumerate(points)]
    check_rocm(profile, _torch_hip())
    for run in runs:
        _check_layout(run.cfg, slurm.world_size)
        check_storage(run.cfg, profile)
    return LaunchPlan(slurm, runs, root, root / "logs")


@dataclass
class SubmittedRun:
    run_dir: Path
    point: list[str]
    job: submitit.Job

    @property
    def job_id(self) -> str:
        return self.job.job_id


def _link_array_task(plan: LaunchPlan, index: int, run: RunSpec, job: submitit.Job) -> None:
    """A job array shares one submitit folder (root/logs); give each point's run directory links to its
    own per-rank logs, and the sweep directory a readable name for each point."""
    logs = run.run_dir / "logs"
    logs.mkdir(exist_ok=True)
    for rank in range(plan.slurm.world_size):
        for path in (job.task(rank).paths.stdout, job.task(rank).paths.stderr):
            if not (logs / path.name).is_symlink():
                (logs / path.name).symlink_to(path)
    name = plan.root / re.sub(r"[^\w.=,+-]", "_", ",".join(run.point))
    if not name.is_symlink() and not name.exists():
        name.symlink_to(str(index))


def last_job_id(run_dir: Path) -> str | None:
    """The job id of the latest submission recorded in run_dir/launch/jobs.jsonl."""
    try:
        lines = (run_dir / "launch" / "jobs.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return str(json.loads(line)["job_id"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def check_run_dirs_free(plan: LaunchPlan) -> None:
    """Refuse to submit into a run directory whose previous job is still queued or running: the two
    would share its checkpoints (the run lock would stop the second one only once it starts)."""
    for run in plan.runs:
        job = last_job_id(run.run_dir)
        state = queue_state(job) if job else None
        if state in ACTIVE_STATES:
            raise RunDirBusy(f"run_dir {run.run_dir}: job {job} submitted into it is still {state} "
                             f"(launch/jobs.jsonl); wait for it, cancel it (scancel {job}), use another run_dir, "
                             "or pass --force to queue this one anyway")


def submit(plan: LaunchPlan, force: bool = False) -> list[SubmittedRun]:
    """Snapshot code and config into each run directory, then submit one job or one job array.
    Raises RunDirBusy when a run directory's previous job is still in the queue, unless `force`."""
    if not force:
        check_run_dirs_free(plan)
    for run in plan.runs:
        snapshot.write_snapshot(run.run_dir, run.cfg)
    plan.folder.mkdir(parents=True, exist_ok=True)  # Slurm does not create --output directories
    executor = submitit.SlurmExecutor(folder=plan.folder, python=plan.python)
    executor.update_parameters(**plan.slurm.executor_parameters())
    calls = [TrainJob(to_dict(run.cfg), run.cfg.launch.max_requeues) for run in plan.runs]
    if plan.is_array:
        with executor.batch():
            jobs = [executor.submit(call) for call in calls]
    else:
        jobs = [executor.submit(calls[0])]
    out = []
    for i, (run, job) in enumerate(zip(plan.runs, jobs)):
        if plan.is_array:
            _link_array_task(plan, i, run, job)
        snapshot.record_submission(run.run_dir, {
            "job_id": job.job_id, "cluster": plan.slurm.cluster, "nodes": plan.slurm.nodes,
            "tasks_per_node": plan.slurm.tasks_per_node, "point": run.point,
            "logs": str(job.paths.folder), "sbatch": str(job.paths.submission_file)})
        out.append(SubmittedRun(run.run_dir, run.point, job))
    return out


# --- waiting and failure reports -------------------------------------------------------------


def sacct_state(job_id: str, settle_s: float = 30.0) -> tuple[str, str]:
    """(State, ExitCode) of the job allocation as accounting records it, once it has left RUNNING.

    Result files can appear before Slurm has finished tearing the job down; give it `settle_s`."""
    deadline = time.monotonic() + settle_s
    while True:
        out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"],
                             capture_output=True, text=True, timeout=60)
        state, _, code = (out.stdout.strip().splitlines() or ["UNKNOWN|?"])[-1].partition("|")
        if state not in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED") or time.monotonic() > deadline:
            return state, code
        time.sleep(1)


def _rank_outcomes(job: submitit.Job) -> dict[int, tuple[str, Any, float]]:
    """rank -> (kind, value, file time) for every rank that wrote a result ("success" or "error")."""
    out = {}
    for rank in range(job.num_tasks):
        path = job.task(rank).paths.result_pickle
        if path.exists():
            kind, value = pickle_load(path)
            out[rank] = (kind, value, path.stat().st_mtime)
    return out


def _expand_tasks(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def srun_task_errors(log: str) -> list[tuple[int, str, str]]:
    """(rank, node, what) from srun's `srun: error: node2: task 3: Killed` lines, in the order srun saw
    the tasks end: the first one is where a failure started, the rest were taken down after it."""
    out = []
    for m in re.finditer(r"^srun: error: (\S+): tasks? ([\d,-]+): (.*)$", log, re.M):
        out += [(rank, m.group(1), m.group(3).strip()) for rank in _expand_tasks(m.group(2))]
    return out


def failure_report(run: SubmittedRun) -> str:
    """Which rank failed first and why (its traceback), what happened to the others, and Slurm's view."""
    job = run.job
    state, code = sacct_state(job.job_id)
    lines = [f"job {job.job_id} ({run.run_dir}) ended {state}, exit code {code}"]
    outcomes = _rank_outcomes(job)
    errors = {r: o for r, o in outcomes.items() if o[0] == "error"}
    main_err = job.task(0).paths.stderr  # also the batch script's stderr, where srun reports dead tasks
    log = main_err.read_text(errors="replace") if main_err.exists() else ""
    starts = list(re.finditer(r"^exatrain: rank \d+/\d+ on .*restart \d+$", log, re.M))
    log = log[starts[-1].start():] if starts else log  # a requeued job's log has every attempt
    task_errors = srun_task_errors(log)
    if task_errors:
        first, node, what = task_errors[0]
    elif errors:
        first = min(errors, key=lambda r: errors[r][2])
        node, what = "?", "raised"
    else:
        first = None
    if first is not None:
        reason = errors[first][1].strip().splitlines()[-1] if first in errors else \
            "no Python error: killed by a signal (out of memory, node failure, or an external kill)"
        reason = re.sub(r"^\S*RankFailed: rank \d+/\d+ on \S+ failed: ", "", reason)
        lines.append(f"  first failure: rank {first} on {node}: {what}: {reason}")
        others = sorted((set(errors) | {t for t, _, _ in task_errors}) - {first})
        if others:
            lines.append(f"  then ranks {', '.join(map(str, others))} ended with it")
        if first in errors:
            tb = errors[first][1].strip().splitlines()
            lines += [f"  traceback of rank {first}:", *("    " + t for t in tb[-25:])]
    missing = sorted(set(range(job.num_tasks)) - set(outcomes))
    if missing:
        lines.append(f"  no result from rank(s) {', '.join(map(str, missing))}")
    lines += ["  " + ln for ln in log.splitlines() if re.match(r"(srun|slurmstepd)\S*: error", ln)][-12:]
    lines.append(f"  logs: {job.paths.folder}/{job.job_id}_<rank>_log.{{out,err}}")
    return "\n".join(lines)


def _requeued_state(run: SubmittedRun) -> str | None:
    """The queue state of a job that submitit counts as finished, when Slurm has in fact requeued it: NODE_FAIL
    or PREEMPTED of a --requeue job (submitit keeps the first state it saw as final), or an attempt that
    checkpointed on SIGTERM because Slurm was requeueing it (`scontrol requeue`, preemption in REQUEUE mode);
    None when the job really ended."""
    outcomes = _rank_outcomes(run.job)
    if (len(outcomes) == run.job.num_tasks and all(o[0] == "success" for o in outcomes.values())
            and getattr(outcomes[0][1], "status", None) != "preempted"):
        return None
    state = queue_state(run.job_id)
    return state if state in ACTIVE_STATES else None


def wait(runs: Sequence[SubmittedRun], poll_s: float = 2.0, timeout_s: float | None = None,
         on_state: Callable[[SubmittedRun, str], None] | None = None) -> list[Any]:
    """Block until every run has finished; return their TrainResults (rank 0's) in order.

    Requeued jobs (preemption, time limit, node failure) are waited through: the queue is asked before
    a job is reported. Raises JobFailed with a report for every run that failed, was cancelled, or
    ended without a result."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    states: dict[str, str] = {}
    pending = list(runs)
    while pending:
        submitit.SlurmJob.watcher.update()
        for run in list(pending):
            state = run.job.state
            if run.job.done():
                requeued = _requeued_state(run)
                if requeued is None:
                    pending.remove(run)
                else:
                    state = requeued
            if on_state and state != "UNKNOWN" and states.get(run.job_id) != state:  # UNKNOWN: not in sacct yet
                on_state(run, state)
            states[run.job_id] = state
        if pending:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout_s} s: "
                                   f"{', '.join(r.job_id for r in pending)}")
            time.sleep(poll_s)
    results, reports = [], []
    for run in runs:
        outcomes = _rank_outcomes(run.job)
        if len(outcomes) == run.job.num_tasks and all(o[0] == "success" for o in outcomes.values()):
            results.append(outcomes[0][1])
        else:
            reports.append(failure_report(run))
    if reports:
        raise JobFailed("\n".join(reports))
    return results
