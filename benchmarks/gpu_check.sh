#!/bin/bash
# One prepared GPU check (benchmarks/gpu_check.py): run on any single-GPU node from the repository root,
# with the environment that has exatrain's dependencies active; prints one table for benchmarks/RESULTS.md.
#   bash benchmarks/gpu_check.sh          # < 10 min on one GPU
#   bash benchmarks/gpu_check.sh --dry    # CPU walk-through of every check at tiny sizes (Triton interpreted)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export EXATRAIN_CACHE="${EXATRAIN_CACHE:-${TMPDIR:-/tmp}/exatrain-gpu-check-${USER:-$(id -u)}}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-${USER:-$(id -u)}}"
if [[ " $* " == *" --dry "* ]]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CUDA_VISIBLE_DEVICES=""
fi
exec timeout "${GPU_CHECK_TIMEOUT_S:-600}" "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
