#!/usr/bin/env bash
# The GPU check in one call (benchmarks/gpu_check.py says what it measures):
#
#   bash benchmarks/gpu_check.sh OUTDIR            on the GPU machine: installs .gpu/wheels (built beforehand by
#                                                  benchmarks/gpu_wheels.sh) with --no-deps beside the image's own
#                                                  jax, torch and transformers, then runs every part within 450 s
#   bash benchmarks/gpu_check.sh OUTDIR --cpu      here, on CPU, with a tiny model: the same script end to end
#
# Further arguments go to gpu_check.py (--layers, --rows, --steps, --budget, --only ...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: gpu_check.sh OUTDIR [--cpu] [gpu_check.py options]}"
shift
PY="${PYTHON:-python3}"
CPU=0
for arg in "$@"; do [[ "$arg" == "--cpu" ]] && CPU=1; done
if [[ $CPU == 0 ]]; then
  WHEELS=.gpu/wheels
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "no wheels in $WHEELS: run 'bash benchmarks/gpu_wheels.sh' on a machine with a package index first" >&2
    exit 2
  fi
  SITE="${ALPACA_GPU_SITE:-/tmp/alpaca-gpu-site}"
  rm -rf "$SITE"
  # the project itself runs from this checkout (PYTHONPATH below)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export TOKENIZERS_PARALLELISM=false
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  PY="${PYTHON:-$(command -v python)}"
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$OUT" "$@"
