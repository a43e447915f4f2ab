#!/usr/bin/env bash
# One node, N GPUs, started by torchrun (Lightning reads torchrun's environment and starts no processes itself).
#   bash scripts/torchrun_fit.sh 4 -c configs/sample.yaml -c configs/gpu_af2.yaml -c configs/trainer/fsdp.yaml
# First argument: the number of GPUs (default: all visible); the rest goes to `protfold fit`, before the devices
# and nodes set here (so a config's `devices` does not override them). The recycling
# count, dropout seeds and data order do not depend on how the processes were started (docs/training.md).
set -euo pipefail
NGPUS=${1:-$(nvidia-smi -L | wc -l)}
shift || true
exec torchrun --standalone --nnodes 1 --nproc_per_node "$NGPUS" -m protfold.cli fit "$@" \
  --trainer.devices "$NGPUS" --trainer.num_nodes 1
