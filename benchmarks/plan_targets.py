#!/usr/bin/env python
"""The manual's table of real-size plans: Llama-2-7B and -13B on each target of `alpaca train --dry-run --target`,
Stanford's recipe (128 examples per step, 3 epochs) on 52,000 Alpaca-length records. Prints a markdown table.

Run by hand (each plan compiles the real step for the target on simulated CPU devices: 15-30 s each):

    python benchmarks/plan_targets.py                       # the shared 999-record sample, repeated to 52,000
    python benchmarks/plan_targets.py --data my.jsonl --tokenizer ./llama-tokenizer --models 7b

With libtpu installed (`pip install -e '.[plan]'`), TPU targets are compiled by XLA:TPU itself, deviceless;
`--compare` plans each TPU target both ways (XLA:CPU's estimate with ALPACA_PLAN_COMPILER=cpu, then XLA:TPU) and
prints them side by side, with each compile's wall time (XLA:TPU takes 1-2 minutes for a 7B step on 2 cores):

    python benchmarks/plan_targets.py --compare --targets v3-8,v4-8,v5e-16,v5p-8 --models 7b

The data only sets the rows per step (the records' lengths); the model shapes come from the config.json files in
tests/assets/configs/. A plan that does not fit with every row of a step at once is planned again with one row per
device per forward pass (gradient accumulation), and both lines are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPACA = os.path.join(os.path.dirname(sys.executable), "alpaca")
MODELS = {"7b": "Llama-2-7b-hf", "13b": "Llama-2-13b-hf"}
# the row length for each target: long enough for Alpaca's examples, short enough that a step's 128 examples fill
# its rows on that many devices (`alpaca train --dry-run` shows the padding)
TARGETS = [("8xa100-80g", 1024), ("8xa100-40g", 1024), ("8xh100-80g", 1024), ("1xa100-80g", 2048),
           ("1xh200", 2048), ("v3-8", 1024), ("v3-32", 768), ("v4-8", 2048), ("v4-32", 1024), ("v5e-8", 1024),
           ("v5e-16", 1024), ("v5p-8", 2048)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.normpath(os.path.join(REPO, "..", "shared", "data", "alpaca_en_demo.json")))
    ap.add_argument("--tokenizer", default=os.path.normpath(os.path.join(REPO, "..", "shared", "tokenizers",
                                                                         "llama-sp-32k")))
    ap.add_argument("--records", type=int, default=52_000)
    ap.add_argument("--models", default="7b,13b")
    ap.add_argument("--targets", default=",".join(t for t, _ in TARGETS))
    ap.add_argument("--json", default=None, help="also write every plan here")
    ap.add_argument("--compare", action="store_true", help="TPU targets: XLA:CPU's estimate next to XLA:TPU's plan")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="plan-targets-")
    records = json.load(open(args.data)) if args.data.endswith(".json") else [
        json.loads(line) for line in open(args.data) if line.strip()]
    data = os.path.join(work, "data.jsonl")
    with open(data, "w") as f:
        for i in range(args.records):
            f.write(json.dumps(records[i % len(records)], ensure_ascii=False) + "\n")
    run = os.path.join(work, "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([ALPACA, "prepare", "--data", data, "--tokenizer", args.tokenizer, "--run-dir", run, "-q"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    lengths = dict(TARGETS)
    plans = []
    for model in args.models.split(","):
        for target in args.targets.split(","):
            if args.compare:
                plans += compare(run, model, target, lengths[target], env)
                continue
            for pdp in (None, 1):
                p = plan(run, model, target, lengths[target], pdp, env)
                if p is None:
                    break
                plans.append(p)
                if p["compiled"]["memory_per_device_gib"]["verdict"] == "fits":
                    break
    if args.json:
        json.dump(plans, open(args.json, "w"), indent=1)
    if args.compare:
        return print_comparison(plans)

    print("| model | target | rows of | rows / step | rows / device / pass | GiB per device (XLA:CPU) / usable | "
          "verdict | s / step at 40% MFU | hours for 3 epochs at 40% (60%) | compile (wall) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for p in plans:
        c, m = p["compiled"], p["compiled"]["memory_per_device_gib"]
        dp = p["mesh"]["data_parallel_fsdp"]
        per_pass = p["_pdp"] or p["rows_per_batch"] // dp
        three = 3 * c["epoch_hours_at_40_mfu"], 3 * c["epoch_hours_at_60_mfu"]
        print(f"| Llama-2-{p['_model'].upper()} | {p['platform']} | {p['seq_len']} | {p['rows_per_batch']} | "
              f"{per_pass} | {m['total']:.1f} / {m['target_usable']:.1f} | {m['verdict']} | "
              f"{c['step_seconds_at_40_mfu']:.2f} | {three[0]:.1f} ({three[1]:.1f}) | "
              f"{c['compile_seconds']:.0f} s ({p['_wall']:.0f} s) |")


def plan(run, model, target, seq_len, pdp, env):
    """One `alpaca train --dry-run --json --target` (None when it fails), with its wall time."""
    cmd = [ALPACA, "train", "--run-dir", run, "--model", os.path.join(REPO, "tests", "assets", "configs", MODELS[model]),
           "--dry-run", "--json", "--target", target, "--seq-len", str(seq_len)]
    if pdp:
        cmd += ["--per-device-rows", str(pdp)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        print(f"{model} {target}: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
        return None
    p = json.loads(proc.stdout)
    p["_model"], p["_pdp"], p["_wall"] = model, pdp, wall
    print(f"  {model} {target} pdp={pdp} {p['compiled']['compiler']}: "
          f"{p['compiled']['memory_per_device_gib']['verdict']} ({wall:.0f} s)", file=sys.stderr)
    return p


def compare(run, model, target, seq_len, env):
    """The XLA:CPU estimate and the XLA:TPU plan of the same step; again with one row per device per pass when
    XLA:TPU says it does not fit."""
    pairs = []
    for pdp in (None, 1):
        cpu = plan(run, model, target, seq_len, pdp, dict(env, ALPACA_PLAN_COMPILER="cpu"))
        tpu = plan(run, model, target, seq_len, pdp, env)
        if cpu is None or tpu is None:
            break
        pairs.append({**tpu, "_cpu": cpu})
        if tpu["compiled"]["memory_per_device_gib"]["verdict"] == "fits":
            break
    return pairs


def print_comparison(plans) -> None:
    print("| model | target | rows of | rows / device / pass | XLA:CPU GiB per device | XLA:CPU verdict | "
          "XLA:TPU GiB per device (arguments + temporaries) | XLA:TPU verdict | usable | compile wall: CPU / TPU |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: |")
    for p in plans:
        cpu, tpu = p["_cpu"]["compiled"]["memory_per_device_gib"], p["compiled"]["memory_per_device_gib"]
        per_pass = p["_pdp"] or p["rows_per_batch"] // p["mesh"]["data_parallel_fsdp"]
        detail = (f"at least {tpu['total']:.1f} (refused)" if tpu["refused"]
                  else f"{tpu['total']:.1f} ({tpu['arguments']:.1f} + {tpu['temporaries']:.1f})")
        print(f"| Llama-2-{p['_model'].upper()} | {p['platform']} | {p['seq_len']} | {per_pass} | "
              f"{cpu['accelerator_total']:.1f} | {cpu['verdict']} | {detail} | {tpu['verdict']} | "
              f"{tpu['target_usable']:.1f} | {p['_cpu']['_wall']:.0f} s / {p['_wall']:.0f} s |")


if __name__ == "__main__":
    main()
