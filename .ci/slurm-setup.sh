#!/usr/bin/env bash
# Install and start the local 4-node Slurm test cluster; idempotent (a running cluster is left as is).
# The Slurm tests reuse a running cluster; without one they start it themselves or skip saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash slurm/local-cluster.sh install
bash slurm/local-cluster.sh up
