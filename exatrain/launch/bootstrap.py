"""Rank bootstrap: find rank, world size and the rendezvous address from whichever launcher started
this process, then init torch.distributed.

The launcher is recognised from its environment, so the same command works under all three:
  torchrun  RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (env://)
  mpirun    OMPI_COMM_WORLD_* (Open MPI) or PMI_RANK / PMI_SIZE (MPICH); mpi4py gives rank and size,
            rank 0 picks a free port and broadcasts its address
  srun      SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS inside a job step; the master is the
            first node of the step, the port is derived from the job and step ids so every rank
            computes the same one without talking to the others
A Slurm batch script itself (no srun) has SLURM_PROCID but no SLURM_STEP_ID: that is one process.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete or inconsistent; the message says what is missing."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | mpirun | srun | single
    master_addr: str = ""
    master_port: int = 0


_MPI_RANK = ("OMPI_COMM_WORLD_RANK", "PMI_RANK")
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_MPI_LOCAL = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")


def _int(env: Mapping[str, str], key: str, launcher: str) -> int:
    try:
        return int(env[key])
    except KeyError:
        raise LaunchEnvError(f"{launcher}: {key} is not set") from None
    except ValueError:
        raise LaunchEnvError(f"{launcher}: {key}={env[key]!r} is not an integer") from None


def _first(env: Mapping[str, str], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in env), None)


def _checked(info: RankInfo, what: str) -> RankInfo:
    if info.world_size < 1 or not 0 <= info.rank < info.world_size:
        raise LaunchEnvError(f"{info.launcher}: rank {info.rank} is outside world size {info.world_size} ({what})")
    return info


def _torchrun(env: Mapping[str, str]) -> RankInfo:
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        have, miss = ("RANK", "WORLD_SIZE") if "RANK" in env else ("WORLD_SIZE", "RANK")
        raise LaunchEnvError(f"torchrun-style environment: {have} is set but {miss} is not")
    info = RankInfo(_int(env, "RANK", "torchrun"), _int(env, "WORLD_SIZE", "torchrun"),
                    int(env.get("LOCAL_RANK", 0)), "torchrun",
                    env.get("MASTER_ADDR", ""), int(env.get("MASTER_PORT", 0)))
    if info.world_size > 1 and not (info.master_addr and info.master_port):
        raise LaunchEnvError("torchrun-style environment: WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT")
    return _checked(info, "RANK/WORLD_SIZE")


def _mpirun(env: Mapping[str, str]) -> RankInfo:
    rank_key, size_key = _first(env, _MPI_RANK), _first(env, _MPI_SIZE)
    if rank_key is None or size_key is None:
        raise LaunchEnvError(f"mpirun: found {rank_key or size_key} but not the matching "
                             f"{'size' if rank_key else 'rank'} variable ({' / '.join(_MPI_SIZE if rank_key else _MPI_RANK)})")
    local_key = _first(env, _MPI_LOCAL)
    info = RankInfo(_int(env, rank_key, "mpirun"), _int(env, size_key, "mpirun"),
                    _int(env, local_key, "mpirun") if local_key else 0, "mpirun",
                    env.get("MASTER_ADDR", ""), int(env.get("MASTER_PORT", 0)))
    return _checked(info, f"{rank_key}/{size_key}")


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list (`node[1-3,7],gpu01`) with `scontrol show hostnames`.

    Where scontrol is not installed (unit tests, a login node without Slurm) a small parser of the
    same syntax is used instead."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    hosts: list[str] = []
    for group in _split_top_level(nodelist):
        prefix, _, rest = group.partition("[")
        if not rest:
            hosts.append(prefix)
            continue
        ranges, _, suffix = rest.partition("]")
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    groups, depth, start = [], 0, 0
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            groups.append(nodelist[start:i])
            start = i + 1
    groups.append(nodelist[start:])
    return [g for g in groups if g]


def slurm_port(job_id: str, step_id: str) -> int:
    """Same port on every rank of a step; distinct for concurrent jobs and steps sharing a node."""
    job = int(job_id) if job_id.isdigit() else 0
    step = int(step_id) if step_id.isdigit() else 0
    return 10000 + (job * 8 + step) % 20000


def _srun(env: Mapping[str, str]) -> RankInfo:
    size_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchEnvError("srun: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
    if "SLURM_JOB_ID" not in env:
        raise LaunchEnvError("srun: SLURM_JOB_ID is not set")
    addr = env.get("MASTER_ADDR") or slurm_hostnames(nodelist)[0]
    port = int(env.get("MASTER_PORT") or slurm_port(env["SLURM_JOB_ID"], env.get("SLURM_STEP_ID", "0")))
    info = RankInfo(_int(env, "SLURM_PROCID", "srun"), _int(env, size_key, "srun"),
                    _int(env, "SLURM_LOCALID", "srun"), "srun", addr, port)
    return _checked(info, f"SLURM_PROCID/{size_key}")


def detect_rank(env: Mapping[str, str] | None = None) -> RankInfo:
    """Which launcher started us and where this process sits; torchrun > mpirun > srun > single.

    torchrun comes first because it may itself run under srun or mpirun (one agent per node)."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        return _torchrun(env)
    if _first(env, _MPI_RANK + _MPI_SIZE):
        return _mpirun(env)
    if "SLURM_STEP_ID" in env:
        return _srun(env)
    return RankInfo(0, 1, 0, "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def mpi_rendezvous(info: RankInfo) -> RankInfo:
    """Rank, size and node-local rank from MPI itself; rank 0's address and a free port broadcast.

    Without mpi4py an explicit MASTER_ADDR/MASTER_PORT still works (ranks come from the environment)."""
    try:
        from mpi4py import MPI
    except ImportError:
        if info.master_addr and info.master_port:
            return info
        raise LaunchEnvError("launched by mpirun but mpi4py is not installed: pip install 'exatrain[mpi]', "
                             "or export MASTER_ADDR and MASTER_PORT to every rank") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if (rank, size) != (info.rank, info.world_size):
        raise LaunchEnvError(f"mpirun: MPI says rank {rank} of {size} but the environment says "
                             f"{info.rank} of {info.world_size}")
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    addr, port = info.master_addr, info.master_port
    if rank == 0 and not (addr and port):
        addr, port = socket.gethostname(), _free_port()
    addr, port = comm.bcast((addr, port), root=0)
    return replace(info, local_rank=local_rank, master_addr=addr, master_port=port)


def init_distributed(device_type: str, timeout_s: int = 600) -> RankInfo:
    """Detect the launcher, pick this rank's GPU, and join the process group (world size > 1).

    On GPUs the group is `cpu:gloo,cuda:nccl` so CPU-side collectives (stop flags, counters) work
    next to NCCL/RCCL ones. A GPU-bound task (`--gpu-bind=closest`) sees one device: local rank
    modulo the visible count picks it either way."""
    info = detect_rank()
    if info.launcher == "mpirun":
        info = mpi_rendezvous(info)
    device_id = None
    if device_type == "cuda" and torch.cuda.is_available():
        device_id = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device_id)
    if info.world_size > 1 and not dist.is_initialized():
        # Exported so libraries that read the torchrun variables (DeepSpeed, DCP) agree with us.
        os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                          MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port))
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        # device_id binds NCCL to this rank's GPU now (eager init) instead of guessing it at the first collective.
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    return info
