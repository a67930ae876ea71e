# OLCF Frontier environment for exatrain ranks: modules, the RCCL network plugin, RCCL/libfabric
# settings, node-local caches. Sourced by slurm/frontier.sbatch; keep in step with
# exatrain/configs/clusters/frontier.yaml (tests/test_launch.py checks that both set the same variables).
module load PrgEnv-gnu/8.6.0
module load rocm/6.2.4
module load craype-accel-amd-gfx90a
module load rccl-net-plugin

export NCCL_SOCKET_IFNAME="hsn0,hsn1,hsn2,hsn3"
export GLOO_SOCKET_IFNAME="hsn0"
export NCCL_NET_GDR_LEVEL="3"
export NCCL_CROSS_NIC="1"
export TORCH_NCCL_HIGH_PRIORITY="1"
export HSA_FORCE_FINE_GRAIN_PCIE="1"
export FI_MR_CACHE_MONITOR="kdreg2"
export FI_CXI_DEFAULT_CQ_SIZE="131072"
export FI_CXI_DEFAULT_TX_SIZE="2048"
export FI_CXI_RX_MATCH_MODE="hybrid"
# The alternative rendezvous protocol; needs `#SBATCH --network=disable_rdzv_get` (slurm/frontier.sbatch).
export FI_CXI_RDZV_PROTO="alt_read"
export FI_CXI_RDZV_THRESHOLD="0"
export FI_CXI_RDZV_GET_MIN="0"
export FI_CXI_RDZV_EAGER_SIZE="0"
export MIOPEN_USER_DB_PATH="${MIOPEN_USER_DB_PATH:-/tmp/miopen-$USER-$SLURM_JOB_ID}"
export MIOPEN_CUSTOM_CACHE_DIR="${MIOPEN_CUSTOM_CACHE_DIR:-/tmp/miopen-$USER-$SLURM_JOB_ID}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton-$USER-$SLURM_JOB_ID}"
export OMP_NUM_THREADS="7"

# Multi-node: the libfabric plugin or a loud failure, never RCCL's silent fallback to TCP sockets.
if [ "${SLURM_NNODES:-1}" -gt 1 ]; then export NCCL_NET="OFI"; fi
