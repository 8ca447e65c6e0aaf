#!/usr/bin/env bash
# Issue 2's quality check on one GPU: the tinyshakespeare config (character level) against nanoGPT's
# baby GPT (val loss 1.47). Writes metrics.jsonl, config.yaml and the log to $OUT (or ./out).
#   bash benchmarks/tinyshakespeare.sh [key=value ...]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
LIMIT=${LIMIT_S:-540}   # SIGUSR1 after this many seconds: the trainer checkpoints and stops cleanly
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/device.txt"
timeout -s USR1 "$LIMIT" python3 -m moetrain.train --config configs/tinyshakespeare.yaml \
  run.dir=/tmp/ts data.cache_dir=/tmp/ts-data logging.progress=false resume=never "$@" 2>&1 | tee "$OUT/train.log"
cp /tmp/ts/metrics.jsonl /tmp/ts/config.yaml "$OUT/"
python3 - "$OUT/metrics.jsonl" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
vals = [(r["step"], r["val/loss"], r["cost/usd"], r.get("cost/gpu_hours")) for r in recs if r.get("val/loss") is not None]
best = min(vals, key=lambda v: v[1])
print("step  val/loss  usd  gpu_hours"); [print(*v) for v in vals]
print(f"best val/loss {best[1]:.4f} at step {best[0]}; final {vals[-1][1]:.4f} at step {vals[-1][0]}, ${vals[-1][2]:.4f}, {vals[-1][3]:.4f} GPU-hours")
PY
