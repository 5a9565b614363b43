#!/usr/bin/env python
"""What the machine-independent plan costs, and what a resume on another mesh costs.

Run by hand, never by tests:

    python benchmarks/bench_elastic.py                  # padding, losses, restore times (tiny model, CPU)
    python benchmarks/bench_elastic.py --skip-restore   # the padding table alone (seconds)

1. Padding. The Alpaca sample (../shared/data/alpaca_en_demo.json, 999 records, repeated to --records) prepared with
   the Llama-2 tokenizer, packed into rows of 2,048 tokens, 128 examples per step, 3 epochs: the padding of today's
   plan (rows per step from the data alone, then empty rows up to a multiple of the devices) against the
   device-specific planner alpaca had before (git bfb536a: rows per step rounded up to a multiple of the devices and
   filled by the packer) at 1, 8, 32 and 256 data-parallel devices.
2. Losses. The demo model trained on 4 devices without a stop, against the same run killed after a checkpoint on 4
   devices, resumed on 2, killed again, resumed on 8 with --tensor-parallel 2 (float32): every step's loss.
3. Restore. A tiny model trained on 4 simulated CPU devices, killed after a checkpoint, resumed on the same 4 devices
   and on 2: the "state restored in X s" of each resume (Levanter's checkpoint read onto the mesh, plus the trainer's
   state set-up), best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
sys.path.insert(0, REPO)
ALPACA = os.path.join(os.path.dirname(sys.executable), "alpaca")
OLD_PLANNER = "bfb536a"


def env(devices: int) -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return e


def old_planner():
    """core/plan.py as it was before the plan stopped depending on the devices (read from git, not copied)."""
    text = subprocess.run(["git", "-C", REPO, "show", f"{OLD_PLANNER}:alpaca_cli/core/plan.py"], check=True,
                          capture_output=True, text=True).stdout
    module = types.ModuleType("old_plan")
    sys.modules["old_plan"] = module  # dataclasses look their module up
    exec(compile(text, "old_plan.py", "exec"), module.__dict__)
    return module


def padding_table(work: str, records: int) -> None:
    import numpy as np

    from alpaca_cli.core import cache as cachemod
    from alpaca_cli.core.plan import make_plan, rows_per_batch
    from alpaca_cli.rundir import open_run

    data = json.load(open(os.path.join(SHARED, "data", "alpaca_en_demo.json")))
    path = os.path.join(work, "alpaca.json")
    json.dump((data * (records // len(data) + 1))[:records], open(path, "w"))
    run = os.path.join(work, "prepared")
    subprocess.run([ALPACA, "prepare", "--data", path, "--tokenizer", os.path.join(SHARED, "tokenizers", "llama-sp-32k"),
                    "--run-dir", run, "-q"], check=True, env=env(1))
    cache = cachemod.open_run_cache(open_run(run))
    lengths, trained = cache.lengths(), cache.trained_tokens()
    args = dict(seq_len=2048, pack=True, batch_size=128, epochs=3.0, steps=None, seed=0)
    new = make_plan(lengths, trained, **args)
    old = old_planner()
    print(f"\n{len(lengths):,} examples, {float(np.mean(lengths)):.0f} tokens on average; rows of 2,048, 128 examples "
          "per step, 3 epochs\n")
    print("| devices | before: rows/step | steps | padding | now: plan rows/step | rows/batch | steps | padding | "
          "difference |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for devices in (1, 8, 32, 256):
        o = old.make_plan(lengths, trained, row_multiple=devices, **args)
        batch = rows_per_batch(new.rows_per_step, devices)
        pad_new, pad_old = new.padding_on(batch), o.padding_fraction
        print(f"| {devices} | {o.rows_per_step} | {o.steps} | {100 * pad_old:.2f}% | {new.rows_per_step} | {batch} | "
              f"{new.steps} | {100 * pad_new:.2f}% | {100 * (pad_new - pad_old):+.2f} points |")


def kill_at(run: str, args: list, devices: int, checkpoint: str) -> None:
    proc = subprocess.Popen([ALPACA, "train", "--run-dir", run, *args, "-q"], env=env(devices), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(os.path.join(run, "checkpoints", checkpoint, "alpaca-seal.json")):
        if proc.poll() is not None:
            raise SystemExit("training ended before its checkpoint")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def losses(run: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl")) if line.strip()]


def loss_table(work: str) -> None:
    base = os.path.join(work, "losses")
    subprocess.run([ALPACA, "prepare", "--data", "demo", "--tokenizer", "demo", "--run-dir", base, "-q"], check=True,
                   env=env(1))
    args = ["--model", "demo", "--seq-len", "256", "--batch-size", "16", "--epochs", "3", "--checkpoint-every", "3",
            "--precision", "p=f32,c=f32"]
    straight, resumed = os.path.join(work, "straight"), os.path.join(work, "resumed")
    shutil.copytree(base, straight)
    shutil.copytree(base, resumed)
    subprocess.run([ALPACA, "train", "--run-dir", straight, *args, "-q"], check=True, env=env(4))
    kill_at(resumed, args, 4, "step-3")
    kill_at(resumed, args, 2, "step-6")
    subprocess.run([ALPACA, "train", "--run-dir", resumed, *args, "--tensor-parallel", "2", "-q"], check=True,
                   env=env(8))
    from alpaca_cli.rundir import open_run

    segments = open_run(resumed).train.segments
    where = {}
    for seg in segments:
        for step in range(seg.start_step + 1, seg.end_step + 1):
            where[step] = f"{seg.devices} devices" + (f", TP {seg.tensor_parallel}" if seg.tensor_parallel > 1 else "")
    print("\n| step | 4 devices, no stop | resumed run | trained on | relative difference |")
    print("| ---: | ---: | ---: | --- | ---: |")
    for step, (a, b) in enumerate(zip(losses(straight), losses(resumed)), start=1):
        print(f"| {step} | {a:.7f} | {b:.7f} | {where.get(step, '?')} | {abs(a - b) / abs(a):.1e} |")


def restore_times(work: str, repeats: int) -> None:
    base = os.path.join(work, "restore")
    subprocess.run([ALPACA, "prepare", "--data", "demo", "--tokenizer", "demo", "--run-dir", base, "-q"], check=True,
                   env=env(1))
    args = ["--model", "demo", "--seq-len", "256", "--batch-size", "16", "--epochs", "3", "--checkpoint-every", "2"]
    kill_at(base, args, 4, "step-2")
    print("\n| resumed on | state restored (best of %d) | whole resume command |" % repeats)
    print("| --- | ---: | ---: |")
    for devices, label in ((4, "the same 4 devices"), (2, "2 devices (another mesh)")):
        best, wall = float("inf"), float("inf")
        for i in range(repeats):
            run = os.path.join(work, f"resume-{devices}-{i}")
            shutil.copytree(base, run)
            t0 = time.time()
            out = subprocess.run([ALPACA, "train", "--run-dir", run, *args], env=env(devices), capture_output=True,
                                 text=True, check=True)
            wall = min(wall, time.time() - t0)
            m = re.search(r"state restored in ([0-9.]+) s", out.stderr)
            best = min(best, float(m.group(1)))
        print(f"| {label} | {best:.1f} s | {wall:.0f} s |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=999)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-restore", action="store_true", help="the padding table alone")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-elastic-")
    try:
        padding_table(work, a.records)
        if not a.skip_restore:
            loss_table(work)
            restore_times(work, a.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
