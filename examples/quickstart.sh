#!/usr/bin/env bash
# The whole pipeline, offline, on CPU, on the built-in demo: a 48-record data set written for this project, a
# Llama-2-style SentencePiece tokenizer and a tiny Llama-shaped model created locally (180k parameters).
# prepare -> train -> export (verified against transformers when torch is installed) -> generate -> eval.
# Usage: bash examples/quickstart.sh [RUN_DIR]      (default: $TMPDIR/alpaca-quickstart; rerunning it reuses the run)
set -euo pipefail
RUN="${1:-${TMPDIR:-/tmp}/alpaca-quickstart}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
start=$(date +%s)

echo "== alpaca prepare (run directory: $RUN)"
alpaca prepare --data demo --tokenizer demo --run-dir "$RUN"

echo "== alpaca train"
# A randomly initialised model needs a far larger learning rate than the recipe's 2e-5 for a fine-tune.
alpaca train --run-dir "$RUN" --model demo --seq-len 256 --batch-size 16 --epochs 40 \
  --learning-rate 3e-3 --precision p=f32,c=f32

echo "== alpaca export"
if python -c "import torch" 2>/dev/null; then verify=--verify; else verify=; fi
alpaca export --run-dir "$RUN" --overwrite $verify   # --overwrite: a rerun replaces its earlier export

echo "== alpaca generate"
echo '$ alpaca generate "What is the capital of Kenya?"'
alpaca generate "What is the capital of Kenya?" --run-dir "$RUN"
echo '$ alpaca generate "Give the plural of the noun." --input child --from-export '"$RUN/hf"
alpaca generate "Give the plural of the noun." --input child --run-dir "$RUN" --from-export "$RUN/hf"

echo "== alpaca eval (loss and EOS-stop rate on the demo records it was trained on)"
alpaca eval --data demo --run-dir "$RUN"

echo "== done in $(( $(date +%s) - start )) s; see: alpaca status --run-dir $RUN"
