#!/usr/bin/env python
"""Benchmark the conversation labels (`core.chat.tokenize_conversations`) against one plain tokenizer pass of the
rendered text, on synthetic multi-turn conversations (3-8 user/assistant turns, half with a system message).

Run by hand, never by tests:

    python benchmarks/bench_chat_labels.py                          # 50,000 conversations, ChatML
    python benchmarks/bench_chat_labels.py --conversations 2000     # a quick run
    python benchmarks/bench_chat_labels.py --template FILE.jinja --train-on last

Columns: `render` is one rendering of each whole conversation (Renderer, the same Jinja as apply_chat_template);
`tokenize` one batched Rust tokenization of those texts without special tokens (ids only, as the cache needs);
`plain` their sum: what a tool that trained on every token would do. `labels` is tokenize_conversations: every
prefix P_i / R_i rendered once, the text tokenized once, each turn's tokens found by char_to_token at its two ends,
truncation and counts. Speed is printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOKENIZER = os.path.normpath(os.path.join(REPO, "..", "shared", "tokenizers", "llama-sp-32k"))
sys.path.insert(0, REPO)


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over a lazy dog while answers need several words of text naïve café "
             "東京 — “quoted” 42 3.14 {json: true} <tag> line\nbreak").split(" ")

    def say(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    out = []
    for _ in range(n):
        conv = [{"role": "system", "content": say(12)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(3, 8)):
            conv += [{"role": "user", "content": say(rng.randint(5, 60))},
                     {"role": "assistant", "content": say(rng.randint(5, 120))}]
        out.append(conv)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=50_000)
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    ap.add_argument("--template", default="chatml", help="chatml, alpaca, or a Jinja file")
    ap.add_argument("--train-on", default="all", choices=("all", "last"))
    ap.add_argument("--repeat", type=int, default=1, help="best of N for each column")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from alpaca_cli.core import chat

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(chat.CHATML_TOKENS)})
    template = chat.resolve_template(tok, args.template).text
    convs = conversations(args.conversations)
    render = chat.Renderer(tok, template)
    backend = tok.backend_tokenizer

    def plain():
        t0 = time.perf_counter()
        texts = [render(c) for c in convs]
        t1 = time.perf_counter()
        ids = [e.ids for i in range(0, len(texts), 512) for e in backend.encode_batch(texts[i : i + 512],
                                                                                    add_special_tokens=False)]
        return t1 - t0, time.perf_counter() - t1, sum(map(len, ids))

    def labels():
        t0 = time.perf_counter()
        stats = chat.ChatStats()
        chat.tokenize_conversations(tok, template, convs, max_length=1 << 30, train_on=args.train_on, stats=stats)
        return time.perf_counter() - t0, stats

    best_plain = min((plain() for _ in range(args.repeat)), key=lambda r: r[0] + r[1])
    best_labels = min((labels() for _ in range(args.repeat)), key=lambda r: r[0])
    r, t, tokens = best_plain
    seconds, stats = best_labels
    print(f"{len(convs):,} conversations, {stats.assistant_turns:,} assistant turns, {tokens:,} tokens "
          f"({stats.trained_tokens:,} trained); template {args.template}, train_on {args.train_on}, "
          f"split conversations {stats.split_conversations:,}")
    print(f"render {r:.2f}s  tokenize {t:.2f}s  plain {r + t:.2f}s  labels {seconds:.2f}s  "
          f"= {seconds / (r + t):.2f}x plain ({seconds / t:.2f}x tokenize alone)")


if __name__ == "__main__":
    main()
