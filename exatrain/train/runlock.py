"""One run per run directory: rank 0 holds `run_dir/run.lock` while a run trains.

Two runs on one run_dir would interleave metrics.jsonl and race on checkpoints. The lock file is
created atomically (O_CREAT|O_EXCL, mode 0600) and records its holder: pid, host, Slurm job id and
restart count, start time. The trainer releases it when it closes, and an exception that escapes
releases it at interpreter exit. A holder that died without releasing it (SIGKILL, SIGTERM's default
action, a node failure) leaves a stale lock, which the next run takes over when
  - the holder ran on this host and its process is gone,
  - the holder's Slurm job has left the queue, or
  - this is the holder's own Slurm job, requeued (a later restart count): it resumes its own run.
Otherwise the run refuses with a message naming the holder. Every rank learns rank 0's outcome from
one broadcast, so no rank waits in a collective until the timeout when rank 0 refuses.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from exatrain.files import PRIVATE_MODE
from exatrain.launch.slurm import queue_state

LOCK_FILE = "run.lock"

log = logging.getLogger("exatrain")


class RunDirLocked(RuntimeError):
    """Another run holds the run directory; the message names it and how to proceed."""


class RunLock:
    """A held lock; `release` removes the file if it is still this holder's."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record = path, record
        atexit.register(self.release)

    def release(self) -> None:
        atexit.unregister(self.release)
        if _read(self.path) == self.record:
            self.path.unlink(missing_ok=True)


def _slurm_job() -> str:
    """This process's Slurm job as squeue and scancel name it: an array task as ARRAYID_TASK (its plain
    SLURM_JOB_ID can equal the array's id, which squeue answers for every task)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "job_id": _slurm_job(),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _stale(holder: dict[str, Any], me: dict[str, Any]) -> tuple[str | None, str | None]:
    """(why the holder's lock is stale or None, the holder's Slurm job state when asked)."""
    same_host = holder.get("host") == me["host"]
    if same_host and holder.get("pid") == me["pid"]:
        return "an earlier trainer of this process", None
    job = str(holder.get("job_id") or "")
    if job and job == me["job_id"] and me["restart"] > int(holder.get("restart", 0)):
        return f"Slurm job {job} was requeued", None
    if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return f"process {holder['pid']} has ended", None
    state = queue_state(job) if job else None
    if state == "":
        return f"Slurm job {job} has left the queue", state
    return None, state


def _message(path: Path, holder: dict[str, Any] | None, state: str | None) -> str:
    run_dir = path.parent
    if holder is None:
        return (f"run_dir {run_dir} is locked by another run, but its lock file {path} is unreadable; "
                f"if no run uses this directory, delete {path}")
    job = str(holder.get("job_id") or "")
    slurm = f", Slurm job {job}" + (f" ({state})" if state else "") if job else ""
    stop = f" (scancel {job})" if job else f" (kill {holder.get('pid')} on {holder.get('host')})"
    return (f"run_dir {run_dir} is in use by another run: pid {holder.get('pid')} on {holder.get('host')}{slurm}, "
            f"started {holder.get('started')} (lock file {path}). Wait for it to finish, stop it{stop}, or use "
            f"another run_dir; if that run is gone and left its lock behind, delete {path}")


def _set_aside(path: Path, holder: dict[str, Any]) -> None:
    """Remove a stale lock unless another run replaced it since we read it (then put it back)."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another run removed it first
    if _read(aside) != holder:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink()


def acquire(run_dir: Path | str) -> RunLock:
    """Take `run_dir`'s lock (creating the directory), taking over a stale one; else RunDirLocked."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = _me()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # being written right now, or corrupt
                time.sleep(1.0)
                holder = _read(path)
            if holder is None:
                if not path.exists():
                    continue
                raise RunDirLocked(_message(path, None, None)) from None
            reason, state = _stale(holder, me)
            if reason is None:
                raise RunDirLocked(_message(path, holder, state)) from None
            log.warning("run_dir %s: taking over the lock of pid %s on %s: %s", run_dir, holder.get("pid"),
                        holder.get("host"), reason)
            _set_aside(path, holder)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return RunLock(path, me)
    raise RunDirLocked(f"run_dir {run_dir}: another run keeps taking its lock {path}; is a second run starting?")


def hold_run_dir(run_dir: Path | str, rank: int) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises RunDirLocked with rank 0's message when it could not."""
    lock, error = None, ""
    if rank == 0:
        try:
            lock = acquire(run_dir)
        except RunDirLocked as exc:
            error = str(exc)
        except OSError as exc:  # e.g. a run_dir that cannot be created: the other ranks must hear of it too
            error = f"run_dir {run_dir}: cannot take its lock: {exc}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RunDirLocked(error if rank == 0 else f"rank 0 refused to start: {error}")
    return lock
