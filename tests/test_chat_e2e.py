"""The conversation path end to end, through the console script, on a tiny model: prepare -> train -> export ->
generate, with conversations in `messages` form and the built-in ChatML template."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import make_tiny_llama, run_cli, write_jsonl

from alpaca_cli.rundir import open_run

F32 = ["--precision", "p=f32,c=f32"]

pytestmark = pytest.mark.entry


def _turn(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, *_turn("Capital of France?", "Paris."),
     *_turn("And of Italy?", "Rome, of course."), *_turn("Spain?", "Madrid it is.")],
    [*_turn("Say a colour.", "Blue."), *_turn("Another one.", "Green, like grass.")],
    [*_turn("Count to three.", "1, 2, 3"), *_turn("Backwards?", "3, 2, 1"), *_turn("Now letters.", "a b c {x}")],
    [*_turn("Hello!", "Hi there."), *_turn("How are you?", "Fine, thanks — you?")],
]


def _chatml_tokenizer(folder: str, base: str) -> str:
    """The test tokenizer with ChatML's markers as tokens of their own (as a model trained on ChatML has them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(folder)
    return folder


def _trained_runs(targets: np.ndarray) -> list[int]:
    """The first index of each run of trained tokens (targets 1) in a cache row: one per assistant turn."""
    t = targets.astype(bool)
    return [j for j in range(len(t)) if t[j] and (j == 0 or not t[j - 1])]


def test_a_conversation_run_serves_the_conversations_it_learned(tmp_path, tokenizer_dir):
    """Four multi-turn conversations (one with a system message), prepared with `--format messages --chat-template
    chatml`, trained until memorised, exported, then asked again:

    - the export's tokenizer, through transformers' `apply_chat_template(messages[:i], add_generation_prompt=True)`,
      gives exactly the tokens training put before assistant turn i (the cache row's ids up to that turn's first
      trained token), for every assistant turn of every conversation: a model served from the export is prompted as
      it was trained;
    - `alpaca generate --messages` with a conversation cut before an assistant turn answers with that turn's
      memorised content, whole, and stops at ChatML's end of turn: no `<|im_end|>` and nothing after it.
    """
    from transformers import AutoTokenizer

    from alpaca_cli.core import cache as cachemod

    data = write_jsonl(str(tmp_path / "chat.jsonl"), [{"messages": c} for c in CONVERSATIONS])
    tok_dir = _chatml_tokenizer(str(tmp_path / "tok"), tokenizer_dir)
    model_dir = make_tiny_llama(str(tmp_path / "m"), tok_dir, hidden_dim=64, intermediate_dim=128)
    run = str(tmp_path / "run")
    run_cli(["prepare", "--data", data, "--tokenizer", tok_dir, "--format", "messages", "--chat-template", "chatml",
             "--run-dir", run, "-q"])
    run_cli(["train", "--run-dir", run, "--model", model_dir, "--seq-len", "256", "--batch-size", "4", "--steps", "80",
             "--learning-rate", "1e-2", "--warmup", "0.05", *F32, "-q"])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    assert losses[-1] < 0.05 < losses[0] / 20

    export = str(tmp_path / "export")
    run_cli(["export", "--run-dir", run, "--output", export, "--verify"])
    served = AutoTokenizer.from_pretrained(export)
    prepared = cachemod.open_cache(open_run(run).cache_dir)
    rows = {int(row["source_index"][0]): row for row in prepared.rows(range(len(prepared)))}
    assert sorted(rows) == list(range(len(CONVERSATIONS)))  # one example per conversation, none dropped
    for n, messages in enumerate(CONVERSATIONS):
        ids, starts = rows[n]["input_ids"].tolist(), _trained_runs(rows[n]["targets"])
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        assert len(starts) == len(turns), (n, starts)
        for i, start in zip(turns, starts):
            prompt = served.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            assert served(prompt, add_special_tokens=False)["input_ids"] == ids[:start], (n, i)
            assert prompt.endswith("<|im_start|>assistant\n") and served.decode(ids[:start]) == prompt, (n, i)

    one = str(tmp_path / "conv.json")
    with open(one, "w") as f:
        json.dump(CONVERSATIONS[0][:-1], f)
    out = run_cli(["generate", "--run-dir", run, "--messages", one, "--max-new-tokens", "40"])
    assert out.stdout.rstrip("\n") == CONVERSATIONS[0][-1]["content"]

    asks = [c[:i] for c in CONVERSATIONS for i, m in enumerate(c) if m["role"] == "assistant"]
    expected = [c[i]["content"] for c in CONVERSATIONS for i, m in enumerate(c) if m["role"] == "assistant"]
    answers = str(tmp_path / "answers.jsonl")
    run_cli(["generate", "--run-dir", run, "--messages", write_jsonl(str(tmp_path / "asks.jsonl"), asks),
             "--output", answers, "--max-new-tokens", "40"])
    with open(answers) as f:
        got = [json.loads(line)["output"] for line in f if line.strip()]
    assert got == expected
