"""Generation and evaluation: KV-cached decoding equals recomputing everything, and transformers' generate on the
export; a file of requests survives a kill; AlpacaEval's format; the exported chat template prompts as training
did; `alpaca eval` tells a fine-tuned model from its base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import ALPACA, all_succeeded, cli_env, run_cli, write_jsonl

from alpaca_cli.rundir import open_run

pytestmark = pytest.mark.entry


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_decoding_equals_recomputing_the_whole_sequence(kind, tmp_path):
    """Prompts of different lengths in one batch, greedy and sampled: the cache changes nothing, and neither does the
    batch a request shares (each request's sampling depends on its own key only). The lengths make three prefill
    groups (three prompts of the 16-token bucket, one of them a padding row; one of 32; one of 64), and the answers
    run past cache slot 64, where the decoding loop grows the cache from 64 to 96 slots (40 + 56 new tokens)."""
    import haliax as hax
    import jax

    from alpaca_cli.core import decode
    from alpaca_cli.core.mesh import local_mesh

    if kind == "llama":
        from levanter.models.llama import LlamaConfig

        cfg = LlamaConfig(max_seq_len=256, hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=2)
    else:
        from levanter.models.gpt2 import Gpt2Config

        cfg = Gpt2Config(max_seq_len=256, hidden_dim=32, num_layers=2, num_heads=4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 60, size=n).tolist() for n in (5, 17, 40, 9, 12)]
    with hax.partitioning.set_mesh(local_mesh()):
        model = cfg.build(hax.Axis("vocab", 64), key=jax.random.PRNGKey(3))
        batched = decode.layout_for(model, 6)  # on CPU, every projection's weight input-first: same values

        def input_first(m) -> set[bool]:  # per projection: is the weight's last axis one of its outputs?
            import haliax.nn as hnn

            linears = jax.tree_util.tree_leaves(m, is_leaf=lambda x: isinstance(x, hnn.Linear))
            return {lin.weight.axes[-1].name in {a.name for a in hax.axis_spec_to_tuple(lin.Out)}
                    for lin in linears if isinstance(lin, hnn.Linear)}

        assert input_first(batched) == {True} and input_first(decode.layout_for(batched, 1)) == {False}
        for temperature, top_p in ((0.0, 1.0), (1.0, 0.9)):
            args = dict(max_new_tokens=56, max_len=256, eos_ids=[2], temperature=temperature, top_p=top_p, seed=7,
                        real_vocab=60)
            cached = decode.generate(batched, prompts, batch_size=6, **args)
            uncached = decode.generate_uncached(model, prompts, **args)
            assert [g.tokens for g in cached] == [g.tokens for g in uncached], temperature
            assert [g.finish for g in cached] == [g.finish for g in uncached]
            alone = decode.generate(model, prompts[1:2], request_ids=[1], **args)
            assert alone[0].tokens == cached[1].tokens  # not the batch's doing
            assert all(t < 60 for g in cached for t in g.tokens)  # never a padded vocabulary id
            assert max(len(p) + len(g.tokens) for p, g in zip(prompts, cached)) > 64  # the second loop phase ran


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_a_long_prompt_prefilled_in_causal_chunks_equals_the_models_own_call(kind):
    """A prompt of 600 tokens (its 1,024-row bucket) is prefilled in four chunks of queries, each reading only the
    keys up to its end: the logits after it equal the model's own call over the whole row, and greedy answers equal
    recomputing the whole sequence per token. Gemma-2: a 100-token sliding window on its first layer (the window cuts
    across chunks) and soft-capped attention and final logits."""
    import haliax as hax
    import jax
    import jax.numpy as jnp
    from levanter.layers.attention import AttentionMask

    from alpaca_cli.core import decode
    from alpaca_cli.core.logits import model_logits
    from alpaca_cli.core.mesh import local_mesh

    small = dict(max_seq_len=1024, hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=2)
    if kind == "llama":
        from levanter.models.llama import LlamaConfig

        cfg = LlamaConfig(**small)
    else:
        from alpaca_cli.core.families import AlpacaGemma2Config

        cfg = AlpacaGemma2Config(**small, head_dim=8, sliding_window=100,
                                 layer_types=("sliding_attention", "full_attention"))
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, 60, size=600).tolist()
    with hax.partitioning.set_mesh(local_mesh()):
        model = cfg.build(hax.Axis("vocab", 64), key=jax.random.PRNGKey(5))
        row = np.zeros(1024, np.int32)
        row[:600] = prompt
        expected = model_logits(model, hax.named(jnp.asarray(row), model.Pos), AttentionMask.causal()).array[599]
        cache, first = decode._prefill(model, decode._empty_cache(model, 1, 1024, jnp.float32),
                                       jnp.zeros((1, 64), jnp.float32), jnp.asarray([0]),
                                       hax.named(jnp.asarray(row[None]), ("batch", "position")), jnp.asarray([600]))
        np.testing.assert_allclose(np.asarray(first[0]), np.asarray(expected, np.float32), rtol=1e-4, atol=1e-5)

        prompts = [prompt, prompt[:7]]
        args = dict(max_new_tokens=6, max_len=1024, real_vocab=60)
        reference = [g.tokens for g in decode.generate_uncached(model, prompts, **args)]
        for rows in (2, 1):
            cached = decode.generate(decode.layout_for(model, rows), prompts, batch_size=2, **args)
            assert [g.tokens for g in cached] == reference


def test_generation_reproduces_memorised_responses(trained, tmp_path):
    run, _, records = trained
    records = [records[i] for i in (0, 1, 3, 5)]  # braces, quotes, an input; not the one prepare truncated
    r = records[1]
    one = run_cli(["generate", r["instruction"], "--input", r.get("input", ""), "--run-dir", run])
    assert one.stdout.rstrip("\n") == r["output"]
    requests = write_jsonl(str(tmp_path / "requests.jsonl"),
                           [{"instruction": r["instruction"], "input": r.get("input", "")} for r in records])
    many = run_cli(["generate", "--file", requests, "--run-dir", run, "--batch-size", "3"])
    assert [json.loads(line)["output"] for line in many.stdout.splitlines()] == [r["output"] for r in records]


@pytest.mark.exclusive  # two processes that must join (jax.distributed), alone on the machine
def test_generate_and_eval_on_every_host_of_a_pod_decode_together(trained, tmp_path):
    """The same command on both hosts of a (simulated) pod, two processes of two devices: they load the model sharded
    over all four devices and decode in step; process 0 alone prints and writes. The answers and scores equal one
    process's. An error reading the input on process 0 stops both with its message."""
    from helpers import free_port, launch, wait_all

    run, _, records = trained
    records = [records[i] for i in (0, 1, 3)]
    requests = write_jsonl(str(tmp_path / "requests.jsonl"),
                           [{"instruction": r["instruction"], "input": r.get("input", "")} for r in records])
    two, one = str(tmp_path / "two.json"), str(tmp_path / "one.json")
    outs = wait_all(launch(["generate", "--file", requests, "--output", two, "--run-dir", run, "-q"], free_port()))
    all_succeeded(outs)
    assert all("sharded over 4 devices of 2 processes" in err for _, _, err in outs), outs
    assert "3 answers in" in outs[0][2] and "answers in" not in outs[1][2] and outs[1][1] == ""
    run_cli(["generate", "--file", requests, "--output", one, "--run-dir", run, "-q"])
    with open(two) as f, open(one) as g:
        answers = json.load(f)
        assert answers == json.load(g)
    assert [a["output"] for a in answers] == [r["output"] for r in records]
    # a file cut short by a kill after its first answer: process 0 finds that answer, both decode the other two
    resumed = str(tmp_path / "resumed.json")
    key = {"decoding": {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": 0},
           "generator": answers[0]["generator"]}
    with open(resumed + ".partial.jsonl", "w") as f:
        f.write(json.dumps({"index": 0, "key": key, **answers[0], "output": "(from the partial file)"}) + "\n")
    outs = wait_all(launch(["generate", "--file", requests, "--output", resumed, "--run-dir", run, "-q"], free_port()))
    all_succeeded(outs)
    said = " ".join(outs[0][2].split())  # the console wraps long lines
    assert "3 answers in" in said and "(1 from an earlier, interrupted run)" in said
    with open(resumed) as f:
        assert json.load(f) == [{**answers[0], "output": "(from the partial file)"}, *answers[1:]]

    held_out = str(tmp_path / "held_out.jsonl")
    args = ["eval", "--data", held_out, "--run-dir", run, "--json", "--max-new-tokens", "64"]
    outs = wait_all(launch(args, free_port()))  # no held_out.jsonl yet: both stop, with process 0's error
    assert all(rc != 0 and "held_out.jsonl" in err for rc, _, err in outs), outs
    write_jsonl(held_out, records)
    outs = wait_all(launch(args, free_port()))
    all_succeeded(outs)
    assert outs[1][1] == ""
    st = open_run(run).eval
    assert st.complete and (st.writer.process_index, st.writer.process_count) == (0, 2)
    alone = json.loads(run_cli(args).stdout)
    for x, y in zip(json.loads(outs[0][1]), alone):
        assert x["eos_stop_rate"] == y["eos_stop_rate"] == 1.0 and x["trained_tokens"] == y["trained_tokens"]
        assert abs(x["loss"] - y["loss"]) < 1e-5


def test_a_file_of_requests_survives_a_kill_and_writes_alpaca_evals_format(trained, tmp_path):
    """The base model never stops on its own, so every answer takes the full budget: slow enough to be killed half
    way. The rerun answers only what is missing, and the result equals an uninterrupted run's."""
    run, _, _ = trained
    requests = [{"instruction": f"Request number {i}: say something.", "dataset": "helpful_base",
                 "output": "a reference answer", "generator": "text_davinci_003"} for i in range(24)]
    requests[3]["input"] = "with an input"
    file = write_jsonl(str(tmp_path / "eval.jsonl"), requests)
    args = ["generate", "--file", file, "--run-dir", run, "--base", "--batch-size", "2", "--max-new-tokens", "40",
            "--temperature", "0.7", "--seed", "3", "--generator", "tiny", "-q"]
    out, straight = str(tmp_path / "out.json"), str(tmp_path / "straight.json")

    proc = subprocess.Popen([ALPACA, *args, "--output", out], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    partial = out + ".partial.jsonl"
    deadline = time.time() + 300
    while not (os.path.exists(partial) and len(open(partial).read().splitlines()) >= 4):
        assert proc.poll() is None and time.time() < deadline, "finished before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out)  # nothing complete-looking
    answered_before = len(open(partial).read().splitlines())

    resumed = run_cli([*args, "--output", out])
    assert f"24 answers in {out} ({answered_before} from an earlier, interrupted run)" in " ".join(resumed.stderr.split())
    assert not os.path.exists(partial)
    run_cli([*args, "--output", straight])
    got, expected = json.load(open(out)), json.load(open(straight))
    assert got == expected  # nothing lost, nothing generated twice, nothing changed by the interruption
    assert [g["instruction"] for g in got] == [r["instruction"] for r in requests]  # verbatim, in order
    assert all(g["generator"] == "tiny" and g["dataset"] == "helpful_base" and g["output"] != "a reference answer"
               for g in got)
    assert set(got[0]) == {"instruction", "output", "generator", "dataset"} and got[3]["input"] == "with an input"


def test_the_exported_chat_template_prompts_exactly_as_training_did(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from alpaca_cli.config import PromptTemplates
    from alpaca_cli.core.prompts import adds_bos, chat_template, render

    run, _, records = trained
    run_cli(["export", "--run-dir", run])
    folder = os.path.join(run, "hf")
    tok = AutoTokenizer.from_pretrained(folder)
    templates = open_run(run).prepare.config.prompts
    bos = tok.bos_token if adds_bos(tok) else ""
    for r in records:
        message = {"role": "user", "content": r["instruction"]}
        if r.get("input"):
            message["input"] = r["input"]
        rendered = tok.apply_chat_template([message], add_generation_prompt=True, tokenize=False)
        prompt = render(templates, r["instruction"], r.get("input", ""))
        assert rendered == bos + prompt  # byte for byte, the BOS the tokenizer adds in front
        assert tok(rendered, add_special_tokens=False)["input_ids"] == tok(prompt)["input_ids"]
    # any template a run can use, braces, quotes and backslashes included
    custom = PromptTemplates(prompt_input="Q: {instruction} {{x}}\n  '{input}' \\ end\n", prompt_no_input="{instruction}\n### R:")
    tok.chat_template = chat_template(custom, bos=True)
    for message in ({"role": "user", "content": "Hi 'x' {y}"}, {"role": "user", "content": "Hi", "input": "IN"}):
        assert tok.apply_chat_template([message], add_generation_prompt=True, tokenize=False) == tok.bos_token + render(
            custom, message["content"], message.get("input", ""))

    # transformers' chat pipeline on the export answers what alpaca generate answers
    r = records[0]
    chat = pipeline("text-generation", model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                    tokenizer=AutoTokenizer.from_pretrained(folder))
    answer = chat([{"role": "user", "content": r["instruction"]}], max_new_tokens=100, do_sample=False)
    ours = run_cli(["generate", r["instruction"], "--run-dir", run, "--max-new-tokens", "100"]).stdout.rstrip("\n")
    assert answer[0]["generated_text"][-1]["content"] == ours == r["output"]


def test_eval_tells_the_fine_tuned_model_from_its_base(trained):
    run, _, records = trained
    held_out = os.path.join(os.path.dirname(run), "held_out.jsonl")
    write_jsonl(held_out, [records[i] for i in (0, 1, 3, 5)])
    scores = json.loads(run_cli(["eval", "--data", held_out, "--run-dir", run, "--base", "--json",
                                 "--max-new-tokens", "64"]).stdout)
    tuned, base = scores
    assert tuned["model"] == "step-79" and base["model"] == "base"
    assert tuned["loss"] < 0.1 < 3 < base["loss"]
    assert tuned["eos_stop_rate"] == 1.0 and tuned["eos_stopped"] == tuned["prompts"] == 4
    assert abs(tuned["perplexity"] - np.exp(tuned["loss"])) < 1e-3
    assert tuned["trained_tokens"] == base["trained_tokens"] > 0
    record = open_run(run).eval
    assert record.complete and [s.model for s in record.scores] == ["step-79", "base"]
