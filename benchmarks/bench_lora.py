#!/usr/bin/env python
"""LoRA against full fine-tuning, side by side in one run: the same tiny Llama-shaped model, the same prepared
examples, the same steps; step time, peak memory of the process, checkpoint size. Then the compiled plan's memory per
device of Llama-2-7B, full and LoRA, on one A100-80GB (`--dry-run --target`). Prints one table; asserts nothing.

    python benchmarks/bench_lora.py                         # hidden 256, 4 layers, 64 steps
    python benchmarks/bench_lora.py --hidden 512 --steps 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPACA = os.path.join(os.path.dirname(sys.executable), "alpaca")
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r)")


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--skip-plan", action="store_true", help="leave out the 7B compiled plans")
    args = ap.parse_args()

    from levanter.models.llama import LlamaConfig

    from alpaca_cli.core.demo_assets import asset
    from alpaca_cli.core.demo_model import write_random_hf_model

    work = tempfile.mkdtemp(prefix="bench-lora-")
    model = write_random_hf_model(os.path.join(work, "model"), asset("demo_tokenizer"),
                                  LlamaConfig(max_seq_len=512, hidden_dim=args.hidden, intermediate_dim=3 * args.hidden,
                                              num_layers=args.layers, num_heads=8, num_kv_heads=4))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    prepared = os.path.join(work, "prepared")
    subprocess.run([ALPACA, "prepare", "--data", "demo", "--tokenizer", "demo", "--run-dir", prepared, "-q"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    rows = []
    for name, extra in (("full fine-tuning", []), (f"LoRA rank {args.lora_r}", ["--lora-r", str(args.lora_r)])):
        run = os.path.join(work, name.split()[0])
        subprocess.run(["cp", "-r", prepared, run], check=True)
        cmd = [sys.executable, "-c", PEAK, ALPACA, "train", "--run-dir", run, "--model", model, "--seq-len", "256",
               "--batch-size", "16", "--steps", str(args.steps), "--precision", "p=f32,c=bfloat16", "-q", *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        peak_kib = int(proc.stderr.strip().splitlines()[-1])
        metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        step_s = statistics.median(m["step_seconds"] for m in metrics[2:])
        manifest = json.load(open(os.path.join(run, "manifest.json")))["stages"]["train"]
        ckpt = os.path.join(run, manifest["final_checkpoint"])
        plan = manifest["plan"]
        rows.append((name, plan["trainable_parameters"], plan["parameters"], step_s, peak_kib / 1024,
                     dir_bytes(ckpt) / 2**20, metrics[-1]["loss"]))
        print(f"  measured {name}", file=sys.stderr)

    print(f"# tiny Llama: hidden {args.hidden}, {args.layers} layers, {args.steps} steps of 16 demo examples, rows of "
          "256, parameters float32, compute bfloat16; 2 CPU cores\n")
    print("| method | trained parameters | step time (median) | peak RSS of the process | checkpoint | last loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, trained, total, step_s, peak, ckpt_mib, loss in rows:
        print(f"| {name} | {trained:,} of {total:,} ({100 * trained / total:.1f}%) | {1000 * step_s:.0f} ms | "
              f"{peak:,.0f} MiB | {ckpt_mib:.2f} MiB | {loss:.3f} |")

    if args.skip_plan:
        return
    tok = os.path.join(work, "tok32k")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(asset("demo_tokenizer"))
    t.add_tokens([f"<unused_{i}>" for i in range(32000 - len(t))])
    t.save_pretrained(tok)
    run7b = os.path.join(work, "run7b")
    subprocess.run([ALPACA, "prepare", "--data", "demo", "--tokenizer", tok, "--run-dir", run7b, "-q"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    print("\n| Llama-2-7B on 1xa100-80g, rows of 2048, one row per pass | arguments | temporaries (CPU-only float32 "
          "copies) | GiB per device on the accelerator | verdict |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, extra in (("full fine-tuning", []), (f"LoRA rank {args.lora_r}", ["--lora-r", str(args.lora_r)])):
        out = subprocess.run([ALPACA, "train", "--run-dir", run7b, "--model",
                              os.path.join(REPO, "tests", "assets", "configs", "Llama-2-7b-hf"), "--dry-run", "--json",
                              "--target", "1xa100-80g", "--seq-len", "2048", "--per-device-rows", "1", *extra],
                             env=env, capture_output=True, text=True, check=True).stdout
        m = json.loads(out)["compiled"]["memory_per_device_gib"]
        print(f"| {name} | {m['arguments']:.1f} | {m['temporaries']:.1f} ({m['cpu_upcast']:.1f}) | "
              f"{m['accelerator_total']:.1f} | {m['verdict']} |")


if __name__ == "__main__":
    main()
