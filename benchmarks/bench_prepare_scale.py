#!/usr/bin/env python
"""`alpaca prepare` at scale: N Alpaca-like records (the shared 999-record sample, each record made distinct) as a
JSON Lines file, prepared in one process, on 1 worker, on every core, and on a two-node local Ray cluster, against
one plain tokenizer pass on one core; with each run's peak memory (the process and its workers together).

Run by hand, never by tests (speed is printed, never asserted):

    python benchmarks/bench_prepare_scale.py                              # 100,000 and 1,000,000 records
    python benchmarks/bench_prepare_scale.py --records 20000 --no-ray     # a quick look
    python benchmarks/bench_prepare_scale.py --tokenizer ./llama-tokenizer --data my.json

Columns: seconds (wall, the whole command: reading, both passes, the cache written), records per second, the time
against the plain pass (goal for 1 worker: at most 1.15x), the rate against the 1-worker rate (goal for N cores: at
least 0.8 x N), and the peak memory of the command's whole process tree (goal: within 1.3x from 100,000 to 1,000,000
records): resident (RSS, sampled every 0.1 s) and private (USS, every 1 s: without the shared pages a process maps,
such as the Ray object store's, where every result passes). The Ray rows need `pip install -e '.[ray]'`; the two
nodes (one CPU each) run on this machine, so they share its cores with the driver. The cluster is started for the Ray
rows only (an idle two-node cluster takes about a tenth of a core, measured here, which the other rows would lose) and
`ray stop --force` after each stops every Ray node on the machine (use --no-ray where another cluster runs).
`--how workers1,ray` runs only those rows (and the plain pass).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO, "..", "shared"))
ALPACA = os.path.join(os.path.dirname(sys.executable), "alpaca")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")

# One plain tokenizer pass on one core: the records streamed in batches, Stanford's prompt + output + eos tokenized
# with the fast tokenizer's batched call on one thread. The least any preparation of these records can do.
PLAIN_PASS = r"""
import json, sys
from transformers import AutoTokenizer
from alpaca_cli.config import STANFORD_PROMPT_INPUT, STANFORD_PROMPT_NO_INPUT
tok = AutoTokenizer.from_pretrained(sys.argv[2])
tokens = 0
def flush(batch):
    global tokens
    texts = [(STANFORD_PROMPT_INPUT if r.get("input") else STANFORD_PROMPT_NO_INPUT).format_map(r) + r["output"]
             + tok.eos_token for r in batch]
    tokens += sum(len(x) for x in tok(texts, return_attention_mask=False)["input_ids"])
batch = []
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        if line.strip():
            batch.append(json.loads(line))
            if len(batch) == 8192:
                flush(batch); batch = []
flush(batch)
print(tokens)
"""


def write_records(source: str, n: int, path: str) -> None:
    records = json.load(open(source)) if source.endswith(".json") else [json.loads(x) for x in open(source) if x.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            r = dict(records[i % len(records)])
            r["instruction"] = f"{r['instruction']} ({i})"  # distinct records, lengths as the sample's
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def measured(cmd: list[str], env: dict) -> tuple[float, tuple[float, float], str]:
    """(wall seconds, (peak resident and peak private memory in GiB of the command's process tree), its stdout).
    Private (USS): the pages only these processes hold; resident (RSS) also counts shared pages they touched,
    such as a Ray object store's, which belong to the store and are counted again in every process mapping them."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, peak_uss, done = 0, 0, threading.Event()

    def sample():
        nonlocal peak, peak_uss
        root, tick = psutil.Process(proc.pid), 0
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
                if tick % 10 == 0:  # reading each process's smaps costs more: once a second
                    peak_uss = max(peak_uss, sum(p.memory_full_info().uss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            tick += 1
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return time.time() - t0, (peak / 2**30, peak_uss / 2**30), out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(work: str) -> str:
    """A head and a second node on this machine, one CPU each (as the tests' cluster); its address."""
    port = free_port()
    node = ["--num-cpus=1", "--disable-usage-stats"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    with open(os.path.join(work, "ray.log"), "a") as log:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *node], check=True,
                       env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", *node], check=True, env=env, stdout=log,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return f"127.0.0.1:{port}"


def stop_ray() -> None:
    """Stops every Ray node on this machine: run the Ray rows where no other cluster runs."""
    subprocess.run([RAY, "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", default="100000,1000000")
    ap.add_argument("--data", default=os.path.join(SHARED, "data", "alpaca_en_demo.json"))
    ap.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "llama-sp-32k"))
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--how", default="plain,workers0,workers1,all,ray",
                    help="which rows (the plain pass always runs: the ratios are to it)")
    args = ap.parse_args()

    from alpaca_cli.core.parallel import available_cores

    cores = available_cores()
    work = tempfile.mkdtemp(prefix="bench-scale-")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    one_core = dict(env, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    rows = []
    how = set(args.how.split(","))
    if args.no_ray:
        how.discard("ray")
    if "ray" in how and not os.path.exists(RAY):
        sys.exit("the Ray rows need Ray: pip install -e '.[ray]' (or --no-ray)")
    try:
        for n in (int(x) for x in args.records.split(",")):
            data = os.path.join(work, f"records-{n}.jsonl")
            write_records(args.data, n, data)
            plain, plain_mem, _ = measured([sys.executable, "-c", PLAIN_PASS, data, args.tokenizer], one_core)
            rows.append((n, "plain tokenizer pass, 1 core", plain, plain_mem, None))
            runs = [("workers0", "alpaca prepare --workers 0 (this process)", ["--workers", "0"], one_core),
                    ("workers1", "alpaca prepare --workers 1", ["--workers", "1"], env),
                    ("all", f"alpaca prepare (every core: {cores})", [], env),
                    ("ray", "alpaca prepare --ray-address (2 nodes x 1 CPU)", ["--ray-address"], env)]
            for key, name, extra, run_env in runs:
                if key not in how:
                    continue
                run = os.path.join(work, f"run-{n}-{len(rows)}")
                try:
                    if key == "ray":
                        extra = [*extra, start_ray(work)]
                    seconds, mem, _ = measured([ALPACA, "prepare", "--data", data, "--tokenizer", args.tokenizer,
                                                "--run-dir", run, "-q", *extra], run_env)
                finally:
                    if key == "ray":
                        stop_ray()
                rows.append((n, name, seconds, mem, plain))
                subprocess.run(["rm", "-rf", run])
            os.remove(data)
    finally:
        subprocess.run(["rm", "-rf", work])
    print(f"\n{cores} cores; {args.tokenizer}\n")
    print("| records | how | seconds | records / s | x the plain pass's time | x the 1-worker rate "
          "| peak resident GiB | peak private GiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    one_worker = {n: s for n, name, s, _, _ in rows if name.endswith("--workers 1")}
    for n, name, seconds, (rss, uss), plain in rows:
        ratio = f"{seconds / plain:.2f}" if plain else ""
        speedup = f"{one_worker[n] / seconds:.2f}" if plain and n in one_worker else ""
        print(f"| {n:,} | {name} | {seconds:.0f} | {n / seconds:,.0f} | {ratio} | {speedup} | {rss:.2f} | {uss:.2f} |")


if __name__ == "__main__":
    main()
