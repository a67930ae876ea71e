"""Rank bootstrap: launcher detection from the environment, and real 2-rank starts under mpirun and torchrun."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exatrain.launch.bootstrap import LaunchEnvError, RankInfo, detect_rank, slurm_hostnames, slurm_port

REPO = Path(__file__).resolve().parent.parent

SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "frontier[00012-00013,00020]",
        "SLURM_JOB_NODELIST": "frontier[00012-00013,00020]"}


def test_single_process():
    assert detect_rank({}) == RankInfo(0, 1, 0, "single")


def test_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    assert detect_rank(env) == RankInfo(3, 4, 1, "torchrun", "h0", 29500)


def test_srun_master_is_first_node_and_port_from_job(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _: None)  # the built-in node-list parser, not scontrol
    info = detect_rank(SRUN)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (5, 8, 1, "srun")
    assert info.master_addr == "frontier00012"
    assert info.master_port == slurm_port("4242", "0") and 10000 <= info.master_port < 30000
    assert slurm_port("4242", "1") != info.master_port  # a second step in the same job
    assert detect_rank({**SRUN, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}).master_addr == "10.0.0.1"


def test_slurm_batch_script_without_srun_is_one_process():
    env = {k: v for k, v in SRUN.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST")}
    assert detect_rank({**env, "SLURM_PROCID": "0"}).launcher == "single"


def test_mpirun_openmpi_and_mpich():
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert detect_rank(ompi) == RankInfo(1, 2, 1, "mpirun")
    assert detect_rank({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}) == RankInfo(2, 4, 0, "mpirun")


def test_torchrun_wins_over_the_launcher_it_runs_under():
    env = {**SRUN, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert detect_rank(env).launcher == "torchrun"


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "needs MASTER_ADDR and MASTER_PORT"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside world size"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "not the matching size"),
    ({"PMI_SIZE": "2"}, "not the matching rank"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_PROCID"}, "SLURM_PROCID is not set"),
    ({k: v for k, v in SRUN.items() if "NODELIST" not in k}, "SLURM_JOB_NODELIST is set"),
])
def test_half_configured_launcher_is_a_clear_error(env, message):
    with pytest.raises(LaunchEnvError, match=message):
        detect_rank(env)


def test_nodelist_parser(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _: None)
    assert slurm_hostnames("node[1-3,7],gpu01,x[08-10]-ib") == \
        ["node1", "node2", "node3", "node7", "gpu01", "x08-ib", "x09-ib", "x10-ib"]


ALLREDUCE = """
import torch, torch.distributed as dist
from exatrain.launch.bootstrap import init_distributed
info = init_distributed("cpu", 60)
t = torch.tensor([float(info.rank + 1)])
dist.all_reduce(t)
print(f"{info.launcher} rank={info.rank} size={info.world_size} local={info.local_rank} sum={t.item():g}")
dist.destroy_process_group()  # exiting with a live gloo group can abort ("terminate called without an active exception")
"""


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_mpirun_two_ranks_all_reduce_via_mpi4py():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'exatrain[mpi]')")
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    out = _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-c", ALLREDUCE])
    assert sorted(l for l in out.splitlines() if l.startswith("mpirun")) == \
        ["mpirun rank=0 size=2 local=0 sum=3", "mpirun rank=1 size=2 local=1 sum=3"]


def test_torchrun_two_ranks_all_reduce():
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                "--no-python", sys.executable, "-c", ALLREDUCE])
    assert sorted(l for l in out.splitlines() if l.startswith("torchrun")) == \
        ["torchrun rank=0 size=2 local=0 sum=3", "torchrun rank=1 size=2 local=1 sum=3"]
