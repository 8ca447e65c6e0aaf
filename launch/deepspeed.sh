#!/usr/bin/env bash
# One node with the DeepSpeed engine (parallel.engine=deepspeed): the `deepspeed` launcher when it and
# GPUs are present, else torchrun with the environment DeepSpeed's launcher would set.
#   launch/deepspeed.sh [--config FILE] [key=value ...]
#   NGPUS=4 launch/deepspeed.sh --config configs/tinyshakespeare.yaml
#   LAUNCHER=torchrun NPROC=2 launch/deepspeed.sh ...     # force torchrun (e.g. CPU / gloo)
#   DRY_RUN=1 launch/deepspeed.sh ...                     # print the command instead of running it
# The trainer reads its rank from the environment, so the launcher is told not to append --local_rank.
set -euo pipefail
if [ -z "${NGPUS:-}" ]; then   # NPROC alone means CPU processes
  if [ -z "${NPROC:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NGPUS=$(nvidia-smi -L | grep -c '^GPU')
  else
    NGPUS=0
  fi
fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
LAUNCHER=${LAUNCHER:-auto}
if [ "$LAUNCHER" = auto ]; then
  if [ "$NGPUS" -gt 0 ] && command -v deepspeed >/dev/null 2>&1; then LAUNCHER=deepspeed; else LAUNCHER=torchrun; fi
fi
if [ "$LAUNCHER" = deepspeed ]; then
  CMD=(deepspeed --num_gpus "$NGPUS" --master_port "${MASTER_PORT:-29500}" --no_local_rank
       --module moetrain.train "$@" parallel.engine=deepspeed)
else
  if [ "$NGPUS" -gt 0 ]; then N=$NGPUS; else N=${NPROC:-1}; export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
  CMD=(torchrun --standalone --nproc-per-node "$N" -m moetrain.train "$@" parallel.engine=deepspeed)
fi
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
