# OLCF Frontier environment for exatrain ranks: modules, the RCCL network plugin, RCCL/libfabric
# settings, node-local MIOpen cache. Sourced by slurm/frontier.sbatch; keep in step with
# exatrain/configs/clusters/frontier.yaml (tests/test_launch.py checks that both set the same variables).
module load PrgEnv-gnu/8.6.0
module load rocm/6.2.4
module load craype-accel-amd-gfx90a

# aws-ofi-rccl: RCCL over libfabric on Slingshot; point EXATRAIN_RCCL_PLUGIN_DIR at a build for the loaded ROCm.
[ -n "$EXATRAIN_RCCL_PLUGIN_DIR" ] || EXATRAIN_RCCL_PLUGIN_DIR=/lustre/orion/world-shared/stf218/sajal/software/aws-ofi-rccl/src/.libs
export LD_LIBRARY_PATH="$EXATRAIN_RCCL_PLUGIN_DIR:$LD_LIBRARY_PATH"

export NCCL_SOCKET_IFNAME="hsn0"
export GLOO_SOCKET_IFNAME="hsn0"
export NCCL_NET_GDR_LEVEL="3"
export NCCL_CROSS_NIC="1"
export TORCH_NCCL_HIGH_PRIORITY="1"
export FI_MR_CACHE_MONITOR="kdreg2"
export FI_CXI_DEFAULT_CQ_SIZE="131072"
export FI_CXI_DEFAULT_TX_SIZE="2048"
export FI_CXI_RX_MATCH_MODE="hybrid"
export MIOPEN_USER_DB_PATH="/tmp/miopen-$USER-$SLURM_JOB_ID"
export MIOPEN_CUSTOM_CACHE_DIR="/tmp/miopen-$USER-$SLURM_JOB_ID"
export OMP_NUM_THREADS="7"
