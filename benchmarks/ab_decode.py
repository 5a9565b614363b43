#!/usr/bin/env python
"""A/B of decoder variants: several copies of core/decode.py (e.g. `git show HEAD:alpaca_cli/core/decode.py >
/tmp/old.py` beside an edited one) on the same model and prompts, interleaved in one process, best of --rounds.
On a shared, noisy machine, a change to the decoder is only believed when it wins here, side by side.

    python benchmarks/ab_decode.py --hidden 512 --layers 4 old=/tmp/old.py new=alpaca_cli/core/decode.py

Per case (one prompt of 10 or 1,000 tokens; 8 of 100; 8 of 20-120): the prefill (time to the first token) and the
time per decoding step ((time for N + 1 tokens - time for 1) / N), each variant's model laid out by its own
`layout_for`. The last column says whether every variant produced the same tokens (greedy). Asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def load_variant(name: str, path: str):
    spec = importlib.util.spec_from_file_location(f"decode_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="NAME=PATH to a copy of core/decode.py")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import haliax as hax
    from levanter.models.llama import LlamaConfig
    from transformers import AutoTokenizer

    from alpaca_cli.core.demo_assets import asset
    from alpaca_cli.core.demo_model import write_random_hf_model
    from alpaca_cli.core.mesh import COMPUTE, local_mesh
    from alpaca_cli.core.models import open_base_model

    variants = {}
    for spec in args.variants:
        name, _, path = spec.partition("=")
        variants[name] = load_variant(name, path)
    folder = write_random_hf_model(
        os.path.join(tempfile.mkdtemp(prefix="ab-decode-"), "model"), asset("demo_tokenizer"),
        LlamaConfig(max_seq_len=2048, hidden_dim=args.hidden, intermediate_dim=3 * args.hidden, num_layers=args.layers,
                    num_heads=4, num_kv_heads=2), seed=0)
    tok = AutoTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)

    def prompt(n):
        return [1] + rng.integers(3, len(tok), size=n - 1).tolist()

    cases = [("1 x 10", [prompt(10)]), ("1 x 1,000", [prompt(1000)]), ("8 x 100", [prompt(100)] * 8),
             ("8 x 20-120", [prompt(int(n)) for n in np.linspace(20, 120, 8)])]
    n = args.new_tokens
    best: dict = {}
    tokens: dict = {}
    with hax.partitioning.set_mesh(local_mesh(all_devices=True)), hax.axis_mapping(COMPUTE), \
            open_base_model(folder) as base:
        cfg = base.lev_config(2048)
        model = base.converter(tok).load_pretrained(cfg.model_type, ref=base.ref, config=cfg, axis_mapping=None,
                                                    resize_vocab_to_match_tokenizer=False)
        laid = {(v, rows): m.layout_for(model, rows) for v, m in variants.items() for rows in (1, 8)}

        def seconds(f) -> float:
            start = time.perf_counter()
            f()
            return time.perf_counter() - start

        for r in range(args.rounds):
            for case, prompts in cases:
                for v, m in variants.items():
                    def run(k, m=m, v=v, prompts=prompts):
                        return m.generate(laid[(v, len(prompts))], prompts, max_new_tokens=k, max_len=2048,
                                          batch_size=len(prompts))
                    if r == 0:  # compile both lengths' programs outside the timings
                        tokens[(case, v)] = [g.tokens for g in run(n + 1)]
                        run(1)
                    first = seconds(lambda: run(1))
                    step = (seconds(lambda: run(n + 1)) - first) / n
                    b = best.setdefault((case, v), [float("inf"), float("inf")])
                    b[0], b[1] = min(b[0], first), min(b[1], step)

    print(f"# Llama hidden {args.hidden}, {args.layers} layers; {n} decoding steps; best of {args.rounds}")
    print("| case | " + " | ".join(f"{v}: prefill ms | {v}: ms/step" for v in variants) + " | same tokens |")
    print("| --- |" + " ---: | ---: |" * len(variants) + " --- |")
    for case, _ in cases:
        cells = " | ".join(f"{best[(case, v)][0] * 1e3:.0f} | {best[(case, v)][1] * 1e3:.2f}" for v in variants)
        same = len({str(tokens[(case, v)]) for v in variants}) == 1
        print(f"| {case} | {cells} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
