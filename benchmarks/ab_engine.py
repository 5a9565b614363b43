#!/usr/bin/env python
"""Our decoder (core/decode.py, as `alpaca generate` runs it) against Levanter's InferenceEngine (paged KV cache,
levanter/inference/engine.py) on the same random tiny Llama, float32, greedy, a fixed number of new tokens, for one
prompt and for a batch of prompts, in one process. Prints one table; asserts nothing about speed.

    python benchmarks/ab_engine.py                      # hidden 256, 4 layers, 64 new tokens, 1 and 8 prompts
    python benchmarks/ab_engine.py --new-tokens 128 --batch 16 --rounds 5
    python benchmarks/ab_engine.py --long 1000          # also one prompt of 1,000 tokens (context raised to 2048)

The prompts are random ids of the demo tokenizer's vocabulary: one of 60 tokens; --batch of 20 to 100 tokens. EOS is
ignored (ours: no eos ids; the engine: no stop tokens), so every row generates exactly --new-tokens tokens. Per case,
each method is set up, called twice untimed (the engine compiles again on its second call), then the methods are
timed in turn, --rounds times, the best kept. Each engine is sized for its case as a deployment would tune it:
max_seqs and tokens per decoding round = the rows, one prefill buffer just wider than the prompts, --new-tokens
rounds per compiled loop (one host round trip), its KV cache in float32 (its default is bfloat16).
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
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--context", type=int, default=512,
                    help="the model's max_seq_len and both decoders' (default 512; raised to hold --long)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="prompts in the batched case (default 8)")
    ap.add_argument("--page-size", type=int, default=64, help="the engine's tokens per KV page (default 64)")
    ap.add_argument("--rounds", type=int, default=3, help="timed calls per method and case; the best is kept")
    ap.add_argument("--long", type=int, default=0, help="also one prompt of this many tokens (default: none)")
    args = ap.parse_args()
    while args.context <= args.long + args.new_tokens:
        args.context *= 2

    import haliax as hax
    import jax
    import jax.numpy as jnp
    from importlib.metadata import version

    from levanter.inference.engine import InferenceEngine, InferenceEngineConfig, Request
    from levanter.inference.jit_scheduler import SeqDecodingParams
    from levanter.models.llama import LlamaConfig
    from transformers import AutoTokenizer

    from alpaca_cli.core import decode
    from alpaca_cli.core.demo_assets import asset
    from alpaca_cli.core.demo_model import write_random_hf_model
    from alpaca_cli.core.mesh import COMPUTE, local_mesh
    from alpaca_cli.core.models import open_base_model

    folder = write_random_hf_model(
        os.path.join(tempfile.mkdtemp(prefix="ab-engine-"), "model"), asset("demo_tokenizer"),
        LlamaConfig(max_seq_len=args.context, hidden_dim=args.hidden, intermediate_dim=3 * args.hidden,
                    num_layers=args.layers, num_heads=4, num_kv_heads=2), seed=0)
    tok = AutoTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)

    def prompt(n):
        return [1] + rng.integers(3, len(tok), size=n - 1).tolist()

    n = args.new_tokens
    cases = [("1 prompt of 60 tokens", [prompt(60)]),
             (f"{args.batch} prompts of 20-100 tokens", [prompt(int(k)) for k in np.linspace(20, 100, args.batch)])]
    if args.long:
        cases.append((f"1 prompt of {args.long:,} tokens", [prompt(args.long)]))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"marin-levanter {version('marin-levanter')}; Llama hidden {args.hidden}, {args.layers} layers, "
          f"vocab {len(tok)}, float32; greedy, {n} new tokens, no early stop; best of {args.rounds}")

    def seconds(f):
        start = time.perf_counter()
        out = f()
        return time.perf_counter() - start, out

    with hax.partitioning.set_mesh(local_mesh()), hax.axis_mapping(COMPUTE), open_base_model(folder) as base:
        cfg = base.lev_config(args.context)
        model = base.converter(tok).load_pretrained(cfg.model_type, ref=base.ref, config=cfg, axis_mapping=None,
                                                    resize_vocab_to_match_tokenizer=False)

        def ours(prompts):
            laid = decode.layout_for(model, len(prompts))  # as `alpaca generate` does, once per batch size

            def run():
                return [g.tokens for g in decode.generate(laid, prompts, max_new_tokens=n, max_len=args.context,
                                                          batch_size=len(prompts))]
            return run

        def engine(prompts):
            rows, total = len(prompts), sum(len(p) for p in prompts)
            pages_per_seq = -(-args.context // args.page_size)
            eng = InferenceEngine.from_model_with_config(
                model=model, tokenizer=tok, axis_resources=COMPUTE,
                config=InferenceEngineConfig(
                    max_seq_len=args.context, page_size=args.page_size, max_pages=rows * pages_per_seq,
                    max_seqs=rows, max_tokens_per_round=rows, max_seqs_in_prefill=rows,
                    max_prefill_size=-(-total // 16) * 16, max_queued_tokens=max(rows, 16), max_rounds=n,
                    max_stop_seqs=0, max_stop_tokens=0, compute_dtype=jnp.float32))

            def run():
                reqs = [Request(prompt_tokens=list(p), request_id=i, n_generations=1,
                                decode_params=SeqDecodingParams(
                                    max_num_tokens=jnp.array(len(p) + n, dtype=jnp.int32), stop_tokens=None,
                                    temperature=jnp.array(0.0, dtype=jnp.float32),
                                    top_p=jnp.array(1.0, dtype=jnp.float32), key=jax.random.PRNGKey(i)))
                        for i, p in enumerate(prompts)]
                return [list(t) for t in eng.generate(reqs).tokens]
            return run

        methods = [("core/decode.py", ours), ("InferenceEngine", engine)]
        results = {}  # (case, method) -> dict
        for case, prompts in cases:
            load = os.getloadavg()[0]
            runs = {}
            for name, build in methods:
                try:
                    setup, runs[name] = seconds(lambda: build(prompts))
                    first, tokens = seconds(runs[name])
                    second, _ = seconds(runs[name])
                    results[(case, name)] = dict(setup=setup, first=first, second=second, tokens=tokens,
                                                 best=float("inf"), load=load)
                except Exception as e:  # the engine may not run here: say what, and go on
                    import traceback

                    where = traceback.extract_tb(e.__traceback__)[-1]
                    results[(case, name)] = dict(error=f"{type(e).__name__}: {e} ({where.filename}:{where.lineno})",
                                                 load=load)
                    runs.pop(name, None)
            for _ in range(args.rounds):
                for name, run in runs.items():
                    r = results[(case, name)]
                    r["best"] = min(r["best"], seconds(run)[0])
            print(f"  measured: {case}", file=sys.stderr)

    print()
    print("| case | method | setup s | first call s | second call s | best s | tokens/s | tokens per prompt | "
          "same tokens as core/decode.py | load |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |")
    for case, prompts in cases:
        ref = results[(case, methods[0][0])].get("tokens")
        for name, _ in methods:
            r = results[(case, name)]
            if "error" in r:
                print(f"| {case} | {name} | failed: {r['error']} | | | | | | | {r['load']:.1f} |")
                continue
            lens = sorted({len(t) for t in r["tokens"]})
            if ref is None or r["tokens"] is ref:
                same = "(reference)" if ref is not None else "-"
            else:
                equal = [a == b for a, b in zip(r["tokens"], ref)]
                diverge = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                           for a, b, e in zip(r["tokens"], ref, equal) if not e]
                same = f"{sum(equal)}/{len(ref)} prompts" + (f" (first difference at token {diverge})"
                                                              if diverge else "")
            rate = len(prompts) * n / r["best"]
            print(f"| {case} | {name} | {r['setup']:.2f} | {r['first']:.2f} | {r['second']:.2f} | {r['best']:.3f} | "
                  f"{rate:,.0f} | {'/'.join(map(str, lens))} | {same} | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
