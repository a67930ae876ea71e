"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch.distributed as dist
from parallel_common import one_thread

LOCAL_CLUSTER = Path(__file__).resolve().parent.parent / "slurm" / "local-cluster.sh"


def _cluster(command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_CLUSTER), command], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local 4-node Slurm cluster (slurm/local-cluster.sh) for tests marked `slurm`.

    A cluster that is already up (e.g. from .ci/slurm-setup.sh) is reused and left running; otherwise
    this session installs and starts it, and stops it at the end. Skips, saying why, only where Slurm
    cannot be installed or started."""
    if _cluster("status", 60).returncode == 0:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip("the local Slurm test cluster is not running and starting it needs root "
                    "(sudo slurm/local-cluster.sh install && sudo slurm/local-cluster.sh up)")
    for step in ("install", "up"):
        proc = _cluster(step, 900)
        if proc.returncode != 0:
            _cluster("down", 120)
            pytest.skip(f"the local Slurm test cluster could not be started (slurm/local-cluster.sh {step} "
                        f"exited {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    yield
    _cluster("down", 120)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A tokenizer/token cache private to the test module: EXATRAIN_CACHE while the module runs."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXATRAIN_CACHE", str(path))
        yield path


@pytest.fixture
def single_process():
    """World-size-1 engines create a private single-rank process group; tear it down afterwards."""
    with one_thread():
        yield
    if dist.is_initialized():
        dist.destroy_process_group()
