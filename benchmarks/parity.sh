#!/usr/bin/env bash
# Issue 5's loss parity: BF16 vs blockwise FP8 (same config, same seed), at several seeds, next to a control
# pair that differs only in rounding (bf16 without vs with the Triton kernels), all on one GPU at once.
#
#   OUT=$OUT bash benchmarks/parity.sh                      # 4 seeds, configs/parity-wikitext2.yaml, 600 steps
#
# Per seed: benchmarks/train_step.py --concurrent with the variants `kernels` (the baseline: bf16 + kernels),
# `fp8-blockwise+kernels` (the default FP8 path) and `bf16` (the control), on $CONFIG (default
# configs/parity-wikitext2.yaml: 17.7M parameters, 16 experts top-4, 32 x 256 characters of WikiText-2 a step) for
# $STEPS steps (the cosine schedule ends there), logged every 5 steps, evaluated once at the end over the whole
# validation split. Every seed runs at the
# same time as the others (small models: the GPU is shared, so the tokens/s columns are not speeds). Then
# benchmarks/parity_seeds.py prints FP8 vs the baseline and the control vs the baseline per seed (final
# training loss = mean of the last 40 logs, i.e. the last 200 steps; val loss over the whole split) and plots the
# curves. Everything lands in $OUT/parity.tgz; the tables in $OUT/parity_summary.md. WORK (default /tmp/parity):
# the scratch folder (emptied first), distinct for runs side by side.
set -uo pipefail
OUT=${OUT:-out}
SEEDS=${SEEDS:-1337 2 3 4}
STEPS=${STEPS:-600}
DEADLINE_S=${DEADLINE_S:-540}
CONFIG=${CONFIG:-configs/parity-wikitext2.yaml}
VARIANTS=${VARIANTS:-kernels fp8-blockwise+kernels bf16}   # without bf16: no control pair
W=${WORK:-/tmp/parity}
case "$W" in /|"$HOME"|.|"") echo "parity.sh: WORK=$W would be emptied; name a scratch folder" >&2; exit 2;; esac
rm -rf "$W"; mkdir -p "$W" "$OUT"
OUT=$(cd "$OUT" && pwd); W=$(cd "$W" && pwd)          # absolute: the script changes directory next
cd "$(dirname "$0")/.."
pids=()
for s in $SEEDS; do
  python3 benchmarks/train_step.py --config "$CONFIG" --concurrent --steps "$STEPS" --log-every "${LOG_EVERY:-5}" --last-n 40 \
    --baseline kernels --variants $VARIANTS --deadline-s "$DEADLINE_S" \
    --run-timeout-s "$DEADLINE_S" --min-run-s 1 --out "$W/seed$s" --work "$W/work$s" \
    --set train.eval_batches=100000 "run.seed=$s" ${PARITY_SET:-} > "$W/seed$s.log" 2>&1 &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
folders=(); for s in $SEEDS; do folders+=("$W/seed$s"); done
{
  echo "# Loss parity, $(date -u +%F), $CONFIG, $STEPS steps, seeds $SEEDS"
  echo
  echo "## FP8 blockwise (+ kernels) vs bf16 + kernels"
  python3 benchmarks/parity_seeds.py "${folders[@]}" --baseline kernels --variant fp8-blockwise+kernels \
    --last-n 40 --out "$W/parity_fp8.png"
  if [[ " $VARIANTS " == *" bf16 "* ]]; then
    echo
    echo "## Control: bf16 without the kernels vs bf16 + kernels (rounding only)"
    python3 benchmarks/parity_seeds.py "${folders[@]}" --baseline kernels --variant bf16 --last-n 40 \
      --out "$W/parity_control.png"
  fi
} > "$W/parity_summary.md" 2>&1
cat "$W/parity_summary.md"
for s in $SEEDS; do tail -n 30 "$W/seed$s.log"; done
rm -rf "$W"/work*
cp "$W/parity_summary.md" "$OUT/"
tar czf "$OUT/parity.tgz" -C "$W" .
if (( failed )); then echo "parity.sh: $failed of the seeds' runs failed (their logs are in parity.tgz)" >&2; exit 1; fi
