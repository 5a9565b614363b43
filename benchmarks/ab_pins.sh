#!/usr/bin/env bash
# Old pins against new, side by side in one run: the same benchmarks (prepare, train packed, generate), each run
# under two checkouts with their own venvs, interleaved (old, new, old, new) so that the machine's load hits both.
# A checkout is a folder with the project and a .venv installed from it (`pip install -e ".[bench]"`); its own
# benchmarks/ scripts are run (they differ only where the Levanter API moved).
#
#   bash benchmarks/ab_pins.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS] > ab.txt
#
# e.g. OLD_CHECKOUT a `git worktree add` of the last commit on levanter 1.2.dev1644 (506ced8), NEW_CHECKOUT this one.
set -euo pipefail
old="$(cd "$1" && pwd)"; new="$(cd "$2" && pwd)"; rounds="${3:-2}"
data="${DATA:-$new/../shared/data/alpaca_en_demo.json}"; tok="${TOKENIZER:-$new/../shared/tokenizers/llama-sp-32k}"
for round in $(seq 1 "$rounds"); do
  for side in old new; do
    dir="${!side}"; py="$dir/.venv/bin/python"
    echo "=== round $round, $side: $dir ($("$py" -c 'from importlib.metadata import version as v
import sys
for d in ("levanter", "marin-levanter"):
    try: print(d, v(d), "jax", v("jax")); break
    except Exception: pass'))"
    (cd "$dir" && "$py" benchmarks/bench_prepare.py --data "$data" --tokenizer "$tok" --records 20000 \
        --skip-levanter --skip-stanford 2>&1 | grep -E '^[|│┃] +(method|alpaca prepare|of which|floor)' || true)
    (cd "$dir" && "$py" benchmarks/bench_train.py --data "$data" --tokenizer "$tok" --methods packed \
        --examples 512 2>&1 | grep -E '^(method|alpaca train)' || true)
    (cd "$dir" && "$py" benchmarks/bench_generate.py 2>&1 | grep -E '^\|' || true)
  done
done
