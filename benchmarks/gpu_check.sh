#!/usr/bin/env bash
# The GPU check, one script, about 6 minutes on an H100: reference-recipe train step gated vs ungated
# (eager and torch.compile, bf16), tokens/s and MFU; the GPT-2-small recipe's step, tokens/s and MFU;
# generation tokens/s with and without the KV cache and with a folded dial. Results: JSON under $OUT.
#   OUT=runs/gpu_check bash benchmarks/gpu_check.sh          (SMALL=1: a seconds-long CPU dry run)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMALL:-0}" = 1 ]; then  # the same commands at toy sizes, to try the script without a GPU
  REF=(--config tiny --steps 2 --warmup 1) GPT=(--config tiny --steps 2 --warmup 1) GEN=(--new-tokens 20 --repeats 1)
else
  REF=(--config reference --compile yes) GPT=(--config gpt2 --compile yes --steps 10) GEN=(--config reference)
fi
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv) | tee "$OUT/gpu.txt" || true
$PY benchmarks/train_step.py "${REF[@]}" --json "$OUT/train_step_reference.json"
$PY benchmarks/train_step.py "${GPT[@]}" --json "$OUT/train_step_gpt2.json"
$PY benchmarks/generate.py "${GEN[@]}" --json "$OUT/generate.json"
