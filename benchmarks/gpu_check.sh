#!/usr/bin/env bash
# The GPU check, one script, about 7 minutes on an H100. Train step of each recipe's gated model at its own width
# (each row through its corner's sub-network), at full width, and ungated, on the recipe's training distribution,
# eager and torch.compile, bf16, tokens/s and MFU: tiny (N = 2) and four (N = 4), the reference recipe (DESIGN
# §1: dials between corners, so no row narrows) and GPT-2 small (124M, four sources). Generation tokens/s: KV cache
# vs none, a dial's sub-network, corners of 2 and 4 sources at their own width vs an ungated GPT, every mode
# through the engine. Many sources: a bank of N corners of the reference size (model.width = "corner") at N = 2, 16
# and 100 against one corner's ungated GPT. Results: JSON under $OUT.
#   OUT=runs/gpu_check bash benchmarks/gpu_check.sh          (SMALL=1: a seconds-long CPU dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMALL:-0}" = 1 ]; then  # the same commands at toy sizes, to try the script without a GPU
  STEP=(--steps 2 --warmup 1) CONFIGS=(tiny four) GEN=(--new-tokens 20 --repeats 1) GENCONF=(tiny)
else
  STEP=(--compile yes) CONFIGS=(tiny four reference gpt2) GEN=() GENCONF=(tiny reference)
fi
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv) | tee "$OUT/gpu.txt" || true
for c in "${CONFIGS[@]}"; do
  extra=()
  [ "$c" = gpt2 ] && [ "${SMALL:-0}" != 1 ] && extra=(--steps 10)
  $PY benchmarks/train_step.py --config "$c" "${STEP[@]}" "${extra[@]}" --json "$OUT/train_step_$c.json"
done
if [ "${SMALL:-0}" = 1 ]; then BANK=(--config tiny --sources 2,16 --steps 2 --warmup 1)
else BANK=(--config original --sources 2,16,100 --steps 10); fi
$PY benchmarks/train_step.py "${BANK[@]}" --json "$OUT/train_step_bank.json"
for c in "${GENCONF[@]}"; do
  $PY benchmarks/generate.py --config "$c" "${GEN[@]}" --json "$OUT/generate_$c.json"
done
