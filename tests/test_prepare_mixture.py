"""alpaca prepare of a mixture (Alpaca records with Stanford's prompts + messages with ChatML): one cache whose
source ranges hold exactly what a single-source prepare of each source gives (its own template), per-source
statistics and shares, the weights in the fingerprint, and the CLI (--data SPEC,key=value, status, inspect)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from helpers import read_records, run_cli, write_jsonl

from alpaca_cli import config as cfgmod
from alpaca_cli.config import PrepareConfig, SourceConfig
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core.prepare import prepare
from alpaca_cli.core.prepare_sources import prepare_sources
from alpaca_cli.errors import ConfigError, StageError
from alpaca_cli.rundir import open_run

IM = ("<|im_start|>", "<|im_end|>")
CHATS = [
    [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer number {i}."}]
    for i in range(7)
] + [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
      {"role": "assistant", "content": "Bye."}]]


@pytest.fixture
def files(tmp_path, fixture_data):
    chat = write_jsonl(str(tmp_path / "chat.jsonl"), [{"messages": c} for c in CHATS])
    return fixture_data, chat


def mixture_cfg(files, tok, **weights):
    alpaca, chat = files
    wa, wc = weights.get("alpaca", 3.0), weights.get("chat", 1.0)
    return PrepareConfig(data=alpaca, tokenizer=tok, sources=[
        SourceConfig(data=alpaca, name="alpaca", weight=wa),
        SourceConfig(data=chat, name="chat", format="messages", chat_template="chatml", weight=wc)])


def rows(run_url):
    c = cachemod.open_cache(run_url.rstrip("/") + "/data/cache")
    return [(r["input_ids"].tolist(), r["targets"].tolist(), int(r["source_index"][0])) for r in c.rows(range(len(c)))]


def test_each_source_range_is_that_sources_own_prepare(tmp_path, files, chatml_tokenizer_dir):
    alpaca, chat = files
    run = open_run(str(tmp_path / "mix"), create=True)
    result = prepare_sources(mixture_cfg(files, chatml_tokenizer_dir), run)
    one_a = open_run(str(tmp_path / "a"), create=True)
    prepare(PrepareConfig(data=alpaca, tokenizer=chatml_tokenizer_dir), one_a)
    one_c = open_run(str(tmp_path / "c"), create=True)
    prepare(PrepareConfig(data=chat, tokenizer=chatml_tokenizer_dir, format="messages", chat_template="chatml"),
            one_c)
    mixed, ra, rc = rows(run.url), rows(one_a.url), rows(one_c.url)
    assert mixed == ra + rc  # the sources back to back, each exactly as its own prepare writes it

    record = open_run(run.url).prepare
    assert [(s.name, s.rows, s.weight, s.format) for s in record.sources] == [
        ("alpaca", [0, len(ra)], 3.0, "alpaca"), ("chat", [len(ra), len(ra) + len(rc)], 1.0, "messages")]
    assert record.format == "messages" and "<|im_start|>" in record.chat_template
    # a source's own template is used for its records: decode the rows
    tok = open_run(run.url).load_tokenizer()
    for ids, _, _ in mixed[: len(ra)]:
        text = tok.decode(ids)
        assert "### Instruction:" in text and IM[0] not in text
    for ids, _, _ in mixed[len(ra):]:
        text = tok.decode(ids)
        assert text.count(IM[0]) >= 2 and "### Instruction:" not in text

    stats = result.stats
    by_name = {s["name"]: s for s in stats["sources"]}
    assert by_name["alpaca"]["examples"] == len(ra) and by_name["chat"]["examples"] == len(rc)
    assert by_name["chat"]["records_read"] == len(CHATS) and by_name["alpaca"]["records_read"] == len(
        read_records(alpaca))
    assert stats["examples"] == len(mixed) and stats["records_read"] == len(CHATS) + len(read_records(alpaca))
    # independent: the shares from the rows themselves
    trained = {n: np.mean([sum(t[1:]) for _, t, _ in part]) for n, part in (("alpaca", ra), ("chat", rc))}
    assert by_name["alpaca"]["trained_tokens"] == sum(sum(t[1:]) for _, t, _ in ra)
    assert by_name["alpaca"]["share_examples"] == pytest.approx(0.75)
    want = 0.75 * trained["alpaca"] / (0.75 * trained["alpaca"] + 0.25 * trained["chat"])
    assert by_name["alpaca"]["share_trained"] == pytest.approx(want, abs=1e-5)
    assert stats["trained_tokens"] == sum(s["trained_tokens"] for s in stats["sources"])


def test_a_changed_weight_is_a_different_preparation(tmp_path, files, chatml_tokenizer_dir):
    run = open_run(str(tmp_path / "mix"), create=True)
    first = prepare_sources(mixture_cfg(files, chatml_tokenizer_dir), run)
    assert prepare_sources(mixture_cfg(files, chatml_tokenizer_dir), open_run(run.url)).reused
    with pytest.raises(StageError, match=r"sources\[chat\]\.weight \(1\.0 -> 2\.0\)"):
        prepare_sources(mixture_cfg(files, chatml_tokenizer_dir, chat=2.0), open_run(run.url))
    again = prepare_sources(mixture_cfg(files, chatml_tokenizer_dir, chat=2.0), open_run(run.url), overwrite=True)
    assert not again.reused and again.fingerprint != first.fingerprint
    assert open_run(run.url).prepare.sources[1].weight == 2.0


def test_one_source_keeps_todays_fingerprint_and_cache(tmp_path, fixture_data, tokenizer_dir):
    """One --data through the (now repeatable) flag is today's single source: no sources, the same fingerprint as
    main 4218c6a computed for these inputs."""
    cfg = cfgmod.load_config(PrepareConfig, None, [], {"data": [fixture_data], "tokenizer": tokenizer_dir},
                             adapt=cfgmod.data_list_to_sources)
    assert cfg.sources == [] and cfg.data == fixture_data
    run = open_run(str(tmp_path / "one"), create=True)
    result = prepare(cfg, run)
    assert result.fingerprint == ONE_SOURCE_FINGERPRINT
    assert open_run(run.url).prepare.sources == []


ONE_SOURCE_FINGERPRINT = "04650827b7401e8cf9b5f749ee5d8c673cd45832214412c5b04c2264b5b346bb"


def test_the_cli_mixture_table_status_inspect_and_train_plan(tmp_path, files, chatml_tokenizer_dir):
    from helpers import make_tiny_llama

    alpaca, chat = files
    run = str(tmp_path / "mix")
    out = run_cli(["prepare", "--data", f"{alpaca},name=alpaca,weight=3",
                   "--data", f"{chat},format=messages,chat_template=chatml,weight=1",
                   "--tokenizer", chatml_tokenizer_dir, "--run-dir", run, "-q"]).stdout
    lines = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in out.splitlines() if line.count("│") == 9}
    kept = open_run(run).prepare.sources
    stats = {x["name"]: x for x in json.loads(open(open_run(run).stats_path).read())["sources"]}
    for k in kept:
        assert lines[k.name] == [k.format, f"{k.records_read:,}", f"{k.examples:,}", f"{k.trained_tokens:,}",
                                 f"{k.weight:g}", f"{100 * stats[k.name]['share_examples']:.1f}%",
                                 f"{100 * stats[k.name]['share_trained']:.1f}%"]
    assert [lines["alpaca"][5], lines["chat"][5]] == ["75.0%", "25.0%"]

    from alpaca_cli.commands.status import key_figures

    assert key_figures(open_run(run), "prepare").endswith(
        f" from 2 sources (alpaca {kept[0].examples:,} · chat {kept[1].examples:,})")
    assert "from 2" in run_cli(["status", "--run-dir", run]).stdout  # (the table wraps the rest)

    shown = run_cli(["inspect", "--run-dir", run, "--source", "chat", "--index", "7", "-n", "1"]).stdout
    assert "conversation 7 of chat (source 2/2)" in shown and "Bye." in shown
    as_json = [json.loads(x) for x in run_cli(["inspect", "--run-dir", run, "--json"]).stdout.splitlines()]
    assert [x["source"] for x in as_json] == ["alpaca"] * kept[0].examples + ["chat"] * kept[1].examples
    assert [x["index"] for x in as_json if x["source"] == "chat"] == list(range(len(CHATS)))
    refused = run_cli(["inspect", "--run-dir", run, "--source", "nope"], check=False)
    assert refused.returncode != 0 and "one of alpaca, chat" in refused.stderr

    model = make_tiny_llama(str(tmp_path / "model"), chatml_tokenizer_dir, max_seq_len=512)
    plan = json.loads(run_cli(["train", "--run-dir", run, "--model", model, "--no-pack", "--batch-size",
                               "8", "--steps", "5", "--seq-len", "512", "--dry-run", "--json"]).stdout)
    assert [(s["name"], s["examples"]) for s in plan["sources"]] == [("alpaca", 30), ("chat", 10)]


def test_the_cli_refuses_an_unknown_source_key_with_the_allowed_list(tmp_path, files, chatml_tokenizer_dir):
    alpaca, chat = files
    proc = run_cli(["prepare", "--data", f"{alpaca},weight=3", "--data", f"{chat},wieght=1", "--tokenizer",
                    chatml_tokenizer_dir, "--run-dir", str(tmp_path / "r")], check=False)
    assert proc.returncode != 0
    line = [x for x in proc.stderr.splitlines() if x.startswith("Error: ")]
    assert len(line) == 1 and "unknown source key 'wieght'" in line[0] and "weight, epochs" in proc.stderr


def test_sources_from_a_config_file_list_and_their_checks(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("tokenizer: demo\ndata:\n  - {data: tatsu-lab/alpaca, weight: 3}\n"
                    "  - {data: chat.jsonl, format: messages, chat_template: chatml, weight: 1, val_fraction: 0.1}\n"
                    "  - gs://bucket/mine.jsonl,name=mine,weight=0.5\n")
    cfg = cfgmod.load_config(PrepareConfig, str(path), adapt=cfgmod.data_list_to_sources)
    resolved = cfg.resolved_sources()
    assert [(r.name, r.weight, r.val_fraction, r.cfg.data, r.cfg.format, r.cfg.chat_template) for r in resolved] == [
        ("tatsu-lab/alpaca", 3.0, None, "tatsu-lab/alpaca", "auto", None),
        ("chat", 1.0, 0.1, "chat.jsonl", "messages", "chatml"),
        ("mine", 0.5, None, "gs://bucket/mine.jsonl", "auto", None)]
    assert all(r.cfg.sources == [] and r.cfg.tokenizer == "demo" for r in resolved)

    def refused(*specs):
        with pytest.raises(ConfigError) as e:
            cfgmod.load_config(PrepareConfig, None, [], {"data": list(specs)}, adapt=cfgmod.data_list_to_sources)
        return str(e.value)

    assert "b have no weight while a do" in refused("a.jsonl,weight=1", "b.jsonl")
    assert "give a weight or epochs, not both" in refused("a.jsonl,weight=1,epochs=2", "b.jsonl,weight=1")
    assert "must be a positive number" in refused("a.jsonl,weight=0", "b.jsonl,weight=1")
    assert "used twice" in refused("x/a.jsonl", "y/a.jsonl")
    assert "val_fraction must be in [0, 1)" in refused("a.jsonl,val_fraction=1", "b.jsonl")
    # a comma not followed by a known key stays in the file name
    assert cfgmod.parse_source_spec("odd,name.jsonl,weight=2") == {"data": "odd,name.jsonl", "weight": 2}


def test_held_out_data_is_prepared_like_its_source(tmp_path, files, chatml_tokenizer_dir):
    from alpaca_cli.core.prepare import prepare_validation
    from alpaca_cli.errors import DataError

    alpaca, chat = files
    run = open_run(str(tmp_path / "mix"), create=True)
    prepare_sources(mixture_cfg(files, chatml_tokenizer_dir), run)
    sources = open_run(run.url).prepare.sources
    mixed = rows(run.url)
    for data, source in ((chat, sources[1]), (f"{chat},source=chat", sources[1]), (alpaca, sources[0])):
        cache = cachemod.open_cache(prepare_validation(open_run(run.url), data))
        got = [(r["input_ids"].tolist(), r["targets"].tolist(), int(r["source_index"][0]))
               for r in cache.rows(range(len(cache)))]
        assert got == mixed[source.rows[0]:source.rows[1]]  # the same file as its source: the same rows
    with pytest.raises(DataError, match="field `messages` is missing"):  # the chat source reads messages
        prepare_validation(open_run(run.url), f"{alpaca},source=chat")
    with pytest.raises(ConfigError, match="no source nope"):
        prepare_validation(open_run(run.url), f"{alpaca},source=nope")


def test_held_out_data_goes_to_the_first_source_that_reads_it(tmp_path, files, chatml_tokenizer_dir):
    """With the chat source (format=messages) first, Alpaca records held out go to the Alpaca source: the chat
    source's format cannot read them, so the next source is tried."""
    from alpaca_cli.core.prepare import prepare_validation

    alpaca, chat = files
    cfg = mixture_cfg(files, chatml_tokenizer_dir)
    cfg = dataclasses.replace(cfg, sources=cfg.sources[::-1])  # chat first
    run = open_run(str(tmp_path / "mix"), create=True)
    prepare_sources(cfg, run)
    chat_source, alpaca_source = open_run(run.url).prepare.sources
    assert (chat_source.name, alpaca_source.name) == ("chat", "alpaca")
    cache = cachemod.open_cache(prepare_validation(open_run(run.url), alpaca))
    got = [(r["input_ids"].tolist(), r["targets"].tolist(), int(r["source_index"][0]))
           for r in cache.rows(range(len(cache)))]
    assert got == rows(run.url)[alpaca_source.rows[0]:alpaca_source.rows[1]]


def test_a_source_with_its_own_prompts_file(tmp_path, fixture_data, tokenizer_dir):
    prompts = tmp_path / "p.yaml"
    prompts.write_text('prompt_input: "Q: {instruction} / {input}\\nA:"\nprompt_no_input: "Q: {instruction}\\nA:"\n')
    cfg = cfgmod.load_config(PrepareConfig, None, [], {"tokenizer": tokenizer_dir, "data": [
        f"{fixture_data},name=stanford", f"{fixture_data},name=short,prompts={prompts}"]},
        adapt=cfgmod.data_list_to_sources)
    run = open_run(str(tmp_path / "r"), create=True)
    prepare_sources(cfg, run)
    record = open_run(run.url).prepare
    tok = open_run(run.url).load_tokenizer()
    mixed = rows(run.url)
    a, b = record.sources
    assert a.examples == b.examples and a.rows[1] == b.rows[0]
    for ids, _, _ in mixed[a.rows[0]:a.rows[1]]:
        assert tok.decode(ids, skip_special_tokens=True).lstrip().startswith("Below is an instruction")
    for ids, _, _ in mixed[b.rows[0]:b.rows[1]]:
        assert tok.decode(ids, skip_special_tokens=True).lstrip().startswith("Q:")
    components = record.inputs.components["sources"]
    assert components[1]["prompts"]["prompt_no_input"] == "Q: {instruction}\nA:"


def test_epochs_per_source_weigh_by_training_examples():
    from alpaca_cli.core.train_setup import mixture_for
    from alpaca_cli.records import SourceRecord

    sources = [SourceRecord(name="a", rows=[0, 100], epochs=1), SourceRecord(name="b", rows=[100, 120], epochs=3)]
    mixture, val = mixture_for(sources, 0.0, seed=0)
    assert mixture.epoch_size == 100 + 60 and np.allclose(mixture.weights, [100 / 160, 60 / 160])
    assert len(val) == 0 and [len(g) for g in mixture.groups] == [100, 20]


def test_a_mixture_trains_and_scores_each_sources_held_out_rows(tmp_path, fixture_data, tokenizer_dir):
    """End to end: the plan's examples come from the sources' training rows only, and the held-out rows (source b's
    val_fraction) are scored (the eval hook: core/hooks.py's batch axis name, fixed with this test)."""
    from helpers import make_tiny_llama

    from alpaca_cli.core.train_setup import mixture_for

    run = str(tmp_path / "run")
    run_cli(["prepare", "--data", f"{fixture_data},name=a,weight=3", "--data",
             f"{fixture_data},name=b,weight=1,val_fraction=0.2", "--tokenizer", tokenizer_dir, "--run-dir", run, "-q"])
    model = make_tiny_llama(str(tmp_path / "model"), tokenizer_dir, max_seq_len=512)
    run_cli(["train", "--run-dir", run, "--model", model, "--steps", "2", "--batch-size", "4", "--seq-len", "512",
             "--no-pack", "--eval-every", "2", "-q"])
    record = open_run(run)
    assert record.train.complete
    metrics = [json.loads(x) for x in open(f"{run}/metrics.jsonl") if x.strip()]
    assert any("val_loss" in m and np.isfinite(m["val_loss"]) for m in metrics)
    mixture, val = mixture_for(record.prepare.sources, 0.0, seed=0)
    b = record.prepare.sources[1]
    assert len(val) == 3 and (val >= b.rows[0]).all() and len(mixture.groups[1]) == b.examples - 3
