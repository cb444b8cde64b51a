#!/usr/bin/env bash
# Issue 22's GPU item: the `voices` recipe (20 real sources) at the reference size, one script, meant for about
# 8 minutes of one H100. Each source's corner is DESIGN's reference network (6 layers x 6 heads x 384, context 256,
# batches of 64), a quarter of it shared by all (model.width = "corner"), trained for STEPS steps (default 1,500);
# then its `joint` and `alone_<s>` baselines (ungated GPTs of one corner's size: every source for the same steps,
# and each source alone for its share of them) and `abcgpt eval` against them (corner - joint, corner - alone,
# regret, the style curve on sampled edges, fluency under the joint judge). Isolation needs `without_<s>`
# baselines, six more runs of STEPS steps: WITHOUT=6 adds them (about twice the time).
# Results under $OUT: report/ (report.json, report.md, its PNGs), each run's metrics.jsonl and log, timings.json.
#   OUT=runs/gpu_voices bash benchmarks/gpu_voices.sh          (SMALL=1: a CPU dry run at toy size, a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_voices}
PY=${PY:-python3}
STEPS=${STEPS:-1500}
WITHOUT=${WITHOUT:-0}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMALL:-0}" = 1 ]; then  # the same commands at a toy size, to try the script without a GPU
  STEPS=20
  SIZE=(model.n_layer=1 model.n_head=2 model.n_embd=32 model.block_size=32 train.batch_size=8 train.eval_batches=1)
  EVAL=(--quick)
else
  SIZE=(model.n_layer=6 model.n_head=6 model.n_embd=384 model.block_size=256 train.batch_size=64 train.lr=1e-3
        train.min_lr=1e-4 train.warmup_steps=100 train.eval_batches=20)
  EVAL=()
fi
SETS=()
for s in "${SIZE[@]}" train.eval_every=$STEPS train.checkpoint_every=500 train.log_every=50 data.dir="$OUT/data"; do
  SETS+=(--set "$s")
done
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv) | tee "$OUT/gpu.txt" || true
only='joint,alone_*'
if [ "$WITHOUT" -gt 0 ]; then
  # the first WITHOUT sources of the recipe, in its order
  names=$($PY -c "from abcgpt.config import load_recipe; print(','.join('without_' + s.name for s in load_recipe('voices').data.sources[:$WITHOUT]))")
  only="$only,$names"
fi
timings="$OUT/timings.txt"
: > "$timings"
timed() {  # timed NAME COMMAND...: run it, log its output to $OUT/NAME.log, add its seconds to timings.txt
  local name=$1 t0=$SECONDS
  shift
  "$@" > "$OUT/$name.log" 2>&1
  echo "$name $((SECONDS - t0))" | tee -a "$timings"
}
timed prepare $PY -m abcgpt prepare --config voices --set data.dir="$OUT/data"
timed train $PY -m abcgpt train --config voices "${SETS[@]}" --set train.steps="$STEPS" --out "$OUT/voices"
timed baselines $PY -m abcgpt baselines --config voices "${SETS[@]}" --steps "$STEPS" --only "$only" \
  --out "$OUT/baselines"
timed eval $PY -m abcgpt eval --ckpt "$OUT/voices" --baselines "$OUT/baselines" --out "$OUT/report" "${EVAL[@]}"
$PY - "$timings" "$OUT/timings.json" <<'EOF'
import json, sys
pairs = [line.split() for line in open(sys.argv[1]) if line.strip()]
json.dump({name: int(secs) for name, secs in pairs}, open(sys.argv[2], "w"), indent=1)
EOF
# what comes back: the report and each run's metrics (not the checkpoints)
for run in "$OUT"/voices "$OUT"/baselines/*/; do
  [ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" "$OUT/metrics_$(basename "$run").jsonl"
done
rm -rf "$OUT/voices" "$OUT/baselines" "$OUT/data" "$OUT"/*.lock
echo "done: $OUT/report/report.md"
