#!/usr/bin/env bash
# Run several GPU jobs in one device call, inside one deadline, and pack everything into $OUT.
#
#   DEADLINE_S=560 OUT=$OUT bash benchmarks/gpu_batch.sh tests attention kernels fp8
#
# Jobs (each logs to <job>.log; its files go under work/<job>/):
#   tests        the `gpu`-marked tests (real sizes) of tests/kernels tests/precision tests/model; TESTS_ARGS
#                replaces the selection: "tests/kernels tests/precision tests/model" runs every kernel test on
#                CUDA at its CPU shapes too (~450 s on an H200, most of it compiling fp32 attention variants)
#   attention    benchmarks/bench_attention.py at B=1, H=16 and 128, T=4096 (ATTN_ARGS adds flags, e.g. --sweep)
#   kernels      benchmarks/bench_kernels.py (KERNELS_ARGS adds flags)
#   fp8          benchmarks/bench_fp8.py (FP8_ARGS adds flags)
#   train_step   benchmarks/train_step.py on the tinyshakespeare config (TRAIN_STEP_ARGS adds flags)
#   train_big    benchmarks/train_step.py on a GPU-filling config, bf16 vs FP8 (TRAIN_BIG_ARGS adds flags)
#   train_v3     benchmarks/train_step.py on configs/fp8-v3-layers.yaml (DeepSeek-V3 layer widths, GEMM-heavy), kernels
#                vs FP8 blockwise / rowwise (TRAIN_V3_ARGS adds flags)
#   profile      benchmarks/profile_step.py: torch.profiler over a few steps of train_big's config, every variant
#                (top kernels, time per category, idle; Chrome traces) (PROFILE_ARGS adds flags, e.g.
#                --variants bf16 fp8-blockwise --steps 5)
#   tinyshakespeare  benchmarks/tinyshakespeare.sh (TS_LIMIT_S seconds, default 150)
#   ep           torchrun over all GPUs: benchmarks/bench_ep.py (EP_ARGS adds flags, e.g. --sections dispatch)
# A job that would start with less than 20 s left is skipped; a running one is stopped at the deadline.
# The device tool returns at most 8 files, so everything lands in $OUT/results.tgz, and the
# logs' tails in $OUT/summary.txt.
set -uo pipefail
OUT=${OUT:-out}
DEADLINE_S=${DEADLINE_S:-560}
START=$(date +%s)
W=/tmp/gpu_batch; rm -rf "$W"; mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }

job_cmd() {
  local d="$W/$1"; mkdir -p "$d"
  case $1 in
    tests) echo "python3 -m pytest -q -p no:cacheprovider --durations=8 ${TESTS_ARGS:--m gpu tests/kernels tests/precision tests/model}" ;;
    attention) echo "python3 benchmarks/bench_attention.py --batch 1 --heads 16 128 --out-dir $d ${ATTN_ARGS:-}" ;;
    kernels) echo "python3 benchmarks/bench_kernels.py --out $d ${KERNELS_ARGS:-}" ;;
    fp8) echo "python3 benchmarks/bench_fp8.py --out $d ${FP8_ARGS:-}" ;;
    train_step) echo "python3 benchmarks/train_step.py --out $d ${TRAIN_STEP_ARGS:-}" ;;
    train_big) echo "python3 benchmarks/train_step.py --out $d --config configs/scale-ep8.yaml --steps 30 \
--log-every 5 --variants bf16 fp8-blockwise fp8-rowwise --set parallel.ep=1 model.n_routed_experts=16 \
model.n_expert_groups=1 model.n_limited_groups=1 train.batch_size=2 ${TRAIN_BIG_ARGS:-}" ;;
    train_v3) echo "python3 benchmarks/train_step.py --out $d --config configs/fp8-v3-layers.yaml --steps 12 \
--log-every 3 --variants kernels fp8-blockwise+kernels fp8-rowwise ${TRAIN_V3_ARGS:-}" ;;
    profile) echo "python3 benchmarks/profile_step.py --out $d ${PROFILE_ARGS:-}" ;;
    tinyshakespeare) echo "env OUT=$d LIMIT_S=${TS_LIMIT_S:-150} bash benchmarks/tinyshakespeare.sh \
checkpoint.every=0 checkpoint.at_end=false ${TS_ARGS:-}" ;;
    ep) echo "torchrun --standalone --nproc-per-node $(nvidia-smi -L | wc -l) benchmarks/bench_ep.py --out $d ${EP_ARGS:-}" ;;
    *) echo "unknown job $1" >&2; return 1 ;;
  esac
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  date -u; } > "$W/device.txt" 2>&1
cat "$W/device.txt"

for job in "$@"; do
  cmd=$(job_cmd "$job") || continue
  t=$(left)
  if (( t < 20 )); then echo "== $job: skipped, ${t}s left" | tee -a "$W/summary.txt"; continue; fi
  echo "== $job (${t}s left): $cmd" | tee -a "$W/summary.txt"
  s=$(date +%s)
  timeout -k 5 "$t" bash -c "$cmd" > "$W/$job.log" 2>&1
  rc=$?
  echo "== $job: rc=$rc in $(( $(date +%s) - s ))s" | tee -a "$W/summary.txt"
  tail -n 60 "$W/$job.log" >> "$W/summary.txt"
done
tar czf "$OUT/results.tgz" -C "$W" .
cp "$W/summary.txt" "$OUT/summary.txt"
echo "packed $(du -h "$OUT/results.tgz" | cut -f1) into results.tgz"
