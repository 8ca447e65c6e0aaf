#!/usr/bin/env bash
# One node: torchrun with one process per GPU (or NPROC processes on CPU/gloo).
#   launch/torchrun.sh [--config FILE] [key=value ...]
#   NPROC=4 launch/torchrun.sh parallel.ep=4        # CPU: 4 gloo processes
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=1
  fi
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
exec torchrun --standalone --nproc-per-node "$NPROC" -m moetrain.train "$@"
