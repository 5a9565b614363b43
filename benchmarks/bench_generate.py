#!/usr/bin/env python
"""Benchmark `alpaca generate`'s decoding (KV cache, core/decode.py) against recomputing the whole sequence per token
(the decoder before the cache) and against transformers' `generate` (torch, with its cache), on the same tiny
Llama-shaped model and the same prompts, greedy, one method after another in one run. Prints one table.

Run by hand (it measures and prints; it asserts nothing about speed), in an environment with torch
(`pip install -e ".[bench]"`):

    python benchmarks/bench_generate.py                   # hidden 64, 2 layers, context 2048
    python benchmarks/bench_generate.py --new-tokens 128 --batch 16

Rows:
- per-token time at position ~10 and ~1,000: (time to generate N new tokens - time to generate 1) / (N - 1), after
  a warm-up call of the same shapes, for one prompt of 10 and of 1,000 tokens. Flat with the position means the cost
  of a token does not grow with the sequence (a cache); growing means recomputation.
- tokens/s for one prompt, for a batch of prompts (10 to 1,000 tokens), and for the same prompts one at a time
  (batched and one-at-a-time outputs must be equal); then the same for a batch shaped like an evaluation set's
  (AlpacaEval's instructions are mostly 20 to 120 tokens; its answers run to hundreds of tokens): prompts of 20 to
  120 tokens, --answer-tokens new tokens each.
- the outputs of every method are compared token for token (greedy, no early stop).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    ap.add_argument("--batch", type=int, default=8, help="prompts in the batched rows (default 8)")
    ap.add_argument("--answer-tokens", type=int, default=256,
                    help="tokens generated per prompt for the batch of instruction-length prompts (default 256)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = ap.parse_args()

    import haliax as hax
    import jax
    import torch
    from levanter.models.llama import LlamaConfig
    from transformers import AutoModelForCausalLM

    from alpaca_cli.core import decode
    from alpaca_cli.core.demo_assets import asset
    from alpaca_cli.core.demo_model import write_random_hf_model
    from alpaca_cli.core.mesh import COMPUTE, local_mesh
    from alpaca_cli.core.models import open_base_model

    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-generate-")
    folder = write_random_hf_model(
        os.path.join(work, "model"), asset("demo_tokenizer"),
        LlamaConfig(max_seq_len=args.context, hidden_dim=args.hidden, intermediate_dim=3 * args.hidden,
                    num_layers=args.layers, num_heads=4, num_kv_heads=2), seed=0)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}; Llama hidden {args.hidden}, {args.layers} layers, context {args.context}; "
          f"greedy, {args.new_tokens} new tokens, no early stop")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # fixed lengths: every method generates every token
    rng = np.random.default_rng(0)
    vocab = len(tok)

    def prompt(n):
        return [1] + rng.integers(3, vocab, size=n - 1).tolist()

    short, long_ = prompt(10), prompt(1000)
    batch = [prompt(int(n)) for n in np.linspace(10, 1000, args.batch)]
    instructions = [prompt(int(n)) for n in np.linspace(20, 120, args.batch)]

    mesh = local_mesh(all_devices=True)
    with hax.partitioning.set_mesh(mesh), hax.axis_mapping(COMPUTE), open_base_model(folder) as base:
        lev_config = base.lev_config(args.context)
        model = base.converter(tok).load_pretrained(lev_config.model_type, ref=base.ref, config=lev_config,
                                                    axis_mapping=None, resize_vocab_to_match_tokenizer=False)

        # as `alpaca generate` does: the weights laid out once for the number of rows decoded together
        laid_out = {rows: decode.layout_for(model, rows) for rows in (1, args.batch)}

        def cached(prompts, n):
            return [g.tokens for g in decode.generate(laid_out[len(prompts)], prompts, max_new_tokens=n,
                                                      max_len=args.context, batch_size=len(prompts))]

        def uncached(prompts, n):
            return [g.tokens for g in decode.generate_uncached(model, prompts, max_new_tokens=n, max_len=args.context)]

        def transformers_generate(prompts, n):
            outs = []
            if len(prompts) == 1:
                ids = torch.tensor([prompts[0]])
                with torch.no_grad():
                    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                return [out[0, ids.shape[1]:].tolist()]
            width = max(len(p) for p in prompts)  # left padding, as transformers batches decoder-only models
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
            outs = [row[width:].tolist() for row in out]
            return outs

        methods = [("alpaca generate (KV cache, compiled loop)", cached),
                   ("recompute every token (no cache)", uncached),
                   ("transformers generate (torch, its cache)", transformers_generate)]
        n = args.new_tokens
        rows, outputs = [], {}
        for name, fn in methods:
            timings = {}
            for label, prompts in (("10", [short]), ("1000", [long_])):
                fn(prompts, n), fn(prompts, 1)  # warm-up (compiles)
                t0 = time.perf_counter()
                one = fn(prompts, 1)
                t1 = time.perf_counter()
                full = fn(prompts, n)
                t2 = time.perf_counter()
                timings[label] = ((t2 - t1) - (t1 - t0)) / (n - 1)
                timings[f"tps{label}"] = n / (t2 - t1)
                outputs[(name, label)] = full
                del one
            for key, prompts, m in (("batch", batch, n), ("evalset", instructions, args.answer_tokens)):
                if fn is uncached:
                    timings[key] = timings[f"{key}-serial"] = float("nan")  # too slow to matter
                    continue
                fn(prompts, m)
                for p in prompts:
                    fn([p], m)  # warm-up: every prompt length compiled once
                t0 = time.perf_counter()
                outputs[(name, key)] = fn(prompts, m)
                timings[key] = len(prompts) * m / (time.perf_counter() - t0)
                t0 = time.perf_counter()
                outputs[(name, f"{key}-serial")] = [fn([p], m)[0] for p in prompts]
                timings[f"{key}-serial"] = len(prompts) * m / (time.perf_counter() - t0)
            rows.append((name, timings))
            print(f"  measured: {name}", file=sys.stderr)

    print()
    print("| method | ms/token at ~10 | ms/token at ~1,000 | tokens/s, one 10-token prompt | tokens/s, one 1,000-token "
          f"prompt | tokens/s, {args.batch} prompts of 10-1,000 tokens in one batch | the same one at a time | "
          f"tokens/s, {args.batch} prompts of 20-120 tokens, {args.answer_tokens} new each, in one batch | "
          "the same one at a time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t in rows:
        rates = ("-" if np.isnan(t[k]) else f"{t[k]:,.0f}" for k in ("batch", "batch-serial", "evalset",
                                                                         "evalset-serial"))
        print(f"| {name} | {1000 * t['10']:.2f} | {1000 * t['1000']:.2f} | {t['tps10']:,.0f} | {t['tps1000']:,.0f} | "
              + " | ".join(rates) + " |")
    ref = methods[2][0]
    print()
    for name, _ in methods[:2]:
        keys = ["10", "1000"] + (["batch", "evalset"] if (name, "batch") in outputs else [])
        same = all(outputs[(name, k)] == outputs[(ref, k)] for k in keys)
        print(f"{name}: outputs equal transformers' token for token: {same}")
    for name, _ in (methods[0], methods[2]):
        same = all(outputs[(name, k)] == outputs[(name, f"{k}-serial")] for k in ("batch", "evalset"))
        print(f"{name}: batched outputs equal one-at-a-time outputs: {same}")


if __name__ == "__main__":
    main()
