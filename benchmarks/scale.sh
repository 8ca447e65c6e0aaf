#!/usr/bin/env bash
# Issue 7: the main command on N GPUs (torchrun -m moetrain.train, ep=N) -- equivalence against one process,
# then throughput of configs/scale-ep8.yaml in BF16 and FP8 (benchmarks/scale.py has the details).
#   NPROC=8 OUT=$OUT bash benchmarks/scale.sh                   # the 8 x H200 run: ~8-9 min, one device call
#   NPROC=4 bash benchmarks/scale.sh --cpu                      # CPU: 4 gloo processes, phase A only
#   NPROC=4 bash benchmarks/scale.sh --cpu --throughput-on-cpu  # CPU: + phase B on a tiny model
# Results: $OUT (or benchmarks/results/scale_<gpu|cpu>_<date>/): scale_<stamp>.md / .json and runs_<stamp>/*.
set -euo pipefail
cd "$(dirname "$0")/.."
# the lent GPU hosts need NVLink multicast (NVLS) off before anything initialises NCCL
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${NPROC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=$(nvidia-smi -L | wc -l)
  else
    NPROC=4
  fi
fi
export NPROC
# the GPU image has torch but not omegaconf: install it from wheels carried in .whl/ if needed
if ! "$PYTHON" -c 'import omegaconf' >/dev/null 2>&1 && [ -d .whl ]; then
  "$PYTHON" -m pip install -q --no-index --find-links .whl omegaconf
fi
export SCALE_SH_CMD="NPROC=$NPROC bash benchmarks/scale.sh $*"
args=(--nproc "$NPROC")
if [ -n "${OUT:-}" ]; then args+=(--out "$OUT"); fi
exec "$PYTHON" benchmarks/scale.py "${args[@]}" "$@"
