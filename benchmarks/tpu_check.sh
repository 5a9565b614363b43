#!/usr/bin/env bash
# The TPU check in one call, ready to run blind on a single-host TPU VM (v4-8, v5e-8, v5p-8, v3-8): the 7B-width
# step (benchmarks/gpu_check.py's train part: Llama-2-7B's width, --layers layers) trained on the host's chips for
# tokens/s, MFU and peak HBM, next to the deviceless plan of the same step for the same slice (its plan part:
# XLA:TPU through libtpu, on simulated CPU devices, as `alpaca train --dry-run --target` compiles it).
#
#   bash benchmarks/tpu_check.sh OUTDIR                 on the TPU VM: installs the tpu extra (jax[tpu], libtpu) if
#                                                       JAX sees no TPU, names the slice from TPU_ACCELERATOR_TYPE
#                                                       (or --target v4-8), writes OUTDIR/gpu_check.{json,md}
#   bash benchmarks/tpu_check.sh OUTDIR --cpu           here, on CPU with a tiny model: the same script end to end,
#                                                       planned for one v5e chip (XLA:TPU when libtpu is installed)
#
# Further arguments go to gpu_check.py (--layers, --rows, --steps, --budget ...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: tpu_check.sh OUTDIR [--cpu] [--target v4-8] [gpu_check.py options]}"
shift
PY="${PYTHON:-python3}"
CPU=0
TARGET=""
prev=""
for arg in "$@"; do
  [[ "$arg" == "--cpu" ]] && CPU=1
  [[ "$prev" == "--target" ]] && TARGET="$arg"
  prev="$arg"
done
ARGS=("$@")
if [[ $CPU == 0 ]]; then
  if ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "tpu")' 2>/dev/null; then
    "$PY" -m pip install -q -e ".[tpu,plan]"
  fi
  if [[ -z "$TARGET" ]]; then
    TARGET="${TPU_ACCELERATOR_TYPE:-}"
    if [[ "$TARGET" == v5litepod-* ]]; then TARGET="v5e-${TARGET#v5litepod-}"; fi
    [[ -n "$TARGET" ]] || { echo "no TPU_ACCELERATOR_TYPE: name the slice with --target v4-8" >&2; exit 2; }
    ARGS+=(--target "$TARGET")
  fi
  "$PY" -c 'import jax; print(jax.devices())'
else
  PY="${PYTHON:-$(command -v python)}"
  [[ -n "$TARGET" ]] || ARGS+=(--target "tpu:v5e:1x1")
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$OUT" --only env,data,train,plan "${ARGS[@]}"
