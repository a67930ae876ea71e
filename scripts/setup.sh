#!/usr/bin/env bash
# Create .venv and install exatrain with the test/dev extras, from the project's own files.
# Torch is the CPU wheel here (pinned <2.14 in pyproject); on clusters install the CUDA/ROCm
# build of the same version first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# mpi4py builds against an MPI implementation; Debian's OpenMPI when we may install it.
if ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing OpenMPI (libopenmpi-dev, openmpi-bin) for mpi4py"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
  else
    echo "[setup] no mpicc and cannot apt-get: skipping the mpirun bootstrap extra (mpi4py)"
    NO_MPI=1
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch>=2.13,<2.14"
extras="dev"
[ -n "${NO_MPI:-}" ] || extras="dev,mpi"
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[$extras]"
echo "[setup] done: $(.venv/bin/python -c 'import torch, exatrain; print("torch", torch.__version__, "exatrain", exatrain.__version__)')"
