"""alpaca prepare: the cache holds exactly Stanford's examples, and everything else it promises."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
from helpers import prepared_examples, read_records, stanford_examples, write_jsonl
from stanford_reference import preprocess, stanford_tokenizer

from alpaca_cli import io
from alpaca_cli.config import PrepareConfig, PromptTemplates
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core.prepare import prepare
from alpaca_cli.core.tokenize import prefix_stable, tokenize_examples
from alpaca_cli.errors import ConfigError, DataError, StageError
from alpaca_cli.rundir import open_run


def run_prepare(tmp_path, data, tokenizer_dir, name="run", **kw):
    cfg = PrepareConfig(data=data, tokenizer=tokenizer_dir, **kw)
    run = open_run(str(tmp_path / name), create=True)
    return prepare(cfg, run), run


@pytest.mark.parametrize("max_length,use_fast", [(512, False), (64, False), (512, True)])
def test_labels_equal_stanford_on_awkward_records(tmp_path, fixture_data, tokenizer_dir, max_length, use_fast):
    """Against Stanford's preprocessing with its own tokenizer setup (transformers directly, the slow sentencepiece
    tokenizer as train.py loads it, and the fast one)."""
    result, run = run_prepare(tmp_path, fixture_data, tokenizer_dir, max_length=max_length)
    records = read_records(fixture_data)
    tok = stanford_tokenizer(tokenizer_dir, use_fast=use_fast)
    ids, labels = preprocess(records, tok, model_max_length=max_length)
    got = prepared_examples(run.url)
    for i in range(len(records)):
        trainable = any(x != -100 for x in labels[i][1:])
        if not trainable:  # Stanford keeps examples with nothing to train on; we drop and count them
            assert i not in got
            continue
        assert got[i] == (ids[i], labels[i]), f"record {i} differs from Stanford's preprocessing"
    dropped = result.stats["dropped"]["no_trained_tokens"]
    assert dropped == sum(1 for lab in labels if not any(x != -100 for x in lab[1:]))
    if max_length == 64:
        assert dropped >= 1  # the record with a 400-word instruction has only prompt left
        assert result.stats["truncated"] == sum(1 for r in records if len(tok(_full(r, tok))["input_ids"]) > 64)


def _full(record, tok):
    from stanford_reference import PROMPT_DICT

    template = PROMPT_DICT["prompt_input"] if record.get("input", "") != "" else PROMPT_DICT["prompt_no_input"]
    return template.format_map(record) + record["output"] + tok.eos_token


# The prefix-stable SentencePiece-BPE layouts in use: the demo's (Metaspace, no '▁' put in front, as Mistral's and the
# shared Llama-2-style tokenizers), Llama-2's Hugging Face conversion (Prepend('▁') and Replace(' ', '▁') normalizers)
# and Metaspace putting '▁' in front of the first word.
SPM_LAYOUTS = {
    "metaspace-never": {},
    "llama2-normalizers": {
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
    },
    "metaspace-first": {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}},
}


@pytest.mark.parametrize("layout", sorted(SPM_LAYOUTS))
def test_fast_prompt_lengths_equal_tokenizing_prompts_on_random_boundaries(tokenizer_dir, tmp_path, layout):
    """Fuzz the prompt/response boundary: reading prompt lengths off the full text's tokens (the characters each
    covers, or the offsets) equals tokenizing each prompt."""
    import shutil

    from alpaca_cli.core.tokenize import char_table

    folder = str(tmp_path / layout)
    shutil.copytree(tokenizer_dir, folder)
    with open(f"{folder}/tokenizer.json", encoding="utf-8") as f:
        spec = json.load(f)
    spec.update(SPM_LAYOUTS[layout])
    with open(f"{folder}/tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(spec, f)
    tok = stanford_tokenizer(folder, use_fast=True)
    assert prefix_stable(tok)[0] and char_table(tok) is not None
    assert char_table(tok).prepended == (0 if layout == "metaspace-never" else 1)
    rng = random.Random(0)
    pool = list("ab :\"'{}\n\t.,;!?-_()[]") + ["é", "東", "😀", "  ", "\r\n", "</s>", "Response", ":\"", "▁", "ा", "👍🏽"]
    prompts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(400)]  # some empty
    outputs = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(400)]
    fast = tokenize_examples(tok, prompts, outputs, max_length=10_000, fast_path=True, batch_size=64)
    slow = tokenize_examples(tok, prompts, outputs, max_length=10_000, fast_path=False)
    assert fast.prompt_lengths == slow.prompt_lengths
    assert fast.source_index == slow.source_index
    for a, b in zip(fast.targets, slow.targets):
        assert np.array_equal(a, b)
    # and the independent computation: len(tokenize(prompt)) for every prompt
    expected = [len(tok(p)["input_ids"]) for p in prompts]
    assert [fast.prompt_lengths[fast.source_index.index(i)] for i in fast.source_index] == [
        expected[i] for i in fast.source_index
    ]
    # texts without a special token's string: all but the few straddling prompts are read off the full text
    ordinary = [i for i in range(len(prompts)) if prompts[i] and "</s>" not in prompts[i] + outputs[i]]
    again = tokenize_examples(tok, [prompts[i] for i in ordinary], [outputs[i] for i in ordinary], max_length=10_000,
                              fast_path=True)
    assert len(ordinary) > 100 and again.prompts_tokenized_alone <= len(ordinary) // 20


def test_byte_level_tokenizer_takes_the_two_tokenization_path(tmp_path, fixture_data):
    """A GPT-2-style tokenizer (regex pre-tokenizer with look-ahead) is not prefix-stable: prompts are tokenized
    alone, and the labels still equal Stanford's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.dumps(r, ensure_ascii=False) for r in read_records(fixture_data)] * 5
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok_dir = str(tmp_path / "bytelevel")
    tok.save_pretrained(tok_dir)
    assert not prefix_stable(tok)[0]

    result, run = run_prepare(tmp_path, fixture_data, tok_dir)
    assert result.stats["fast_prompt_lengths"] is False
    records = read_records(fixture_data)
    ref_tok = stanford_tokenizer(tok_dir, use_fast=True)
    ids, labels = preprocess(records, ref_tok, model_max_length=512)
    got = prepared_examples(run.url)
    trainable = {i for i in range(len(records)) if any(x != -100 for x in labels[i][1:])}
    assert got == {i: (ids[i], labels[i]) for i in trainable}
    assert result.stats["prompts_tokenized_alone"] == len(records)


def test_no_mask_inputs_trains_on_every_token(tmp_path, fixture_data, tokenizer_dir):
    result, run = run_prepare(tmp_path, fixture_data, tokenizer_dir, mask_inputs=False)
    tok = stanford_tokenizer(tokenizer_dir)
    records = read_records(fixture_data)
    ids, _ = preprocess(records, tok, model_max_length=512)
    got = prepared_examples(run.url)
    assert len(got) == len(records)
    for i, (input_ids, labels) in got.items():
        assert input_ids == ids[i] and labels == ids[i]
    assert result.stats["trained_tokens"] == sum(len(x) - 1 for x in ids)


def test_eos_is_a_target_and_empty_output_trains_only_eos(tmp_path, fixture_data, tokenizer_dir):
    _, run = run_prepare(tmp_path, fixture_data, tokenizer_dir)
    tok = stanford_tokenizer(tokenizer_dir)
    got = prepared_examples(run.url)
    for i, (input_ids, labels) in got.items():
        if len(input_ids) < 512:
            assert input_ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    empty = [i for i, r in enumerate(read_records(fixture_data)) if r["output"] == ""][0]
    assert [x for x in got[empty][1] if x != -100] == [tok.eos_token_id]


def test_overflow_policies(tmp_path, fixture_data, tokenizer_dir):
    tok = stanford_tokenizer(tokenizer_dir)
    records = read_records(fixture_data)
    lengths = [len(tok(_full(r, tok))["input_ids"]) for r in records]
    too_long = {i for i, n in enumerate(lengths) if n > 100}
    assert too_long
    result, run = run_prepare(tmp_path, fixture_data, tokenizer_dir, name="drop", max_length=100, on_overflow="drop")
    assert set(prepared_examples(run.url)) == set(range(len(records))) - too_long
    assert result.stats["dropped"]["too_long"] == len(too_long)
    assert result.stats["truncated"] == 0

    with pytest.raises(DataError, match=r"record \d+ is \d+ tokens long, over --max-length 100"):
        run_prepare(tmp_path, fixture_data, tokenizer_dir, name="err", max_length=100, on_overflow="error")
    assert "has no alpaca-seal.json" in cachemod.problem(str(tmp_path / "err" / "data" / "cache"), "any")
    assert open_run(str(tmp_path / "err")).prepare.status == "failed"


def test_statistics_match_an_independent_count(tmp_path, fixture_data, tokenizer_dir):
    result, run = run_prepare(tmp_path, fixture_data, tokenizer_dir, max_length=64)
    records = read_records(fixture_data)
    tok = stanford_tokenizer(tokenizer_dir)
    ids, labels = preprocess(records, tok, model_max_length=64)
    kept = [i for i in range(len(records)) if any(x != -100 for x in labels[i][1:])]
    s = result.stats
    assert s["records_read"] == len(records)
    assert s["examples"] == len(kept)
    assert s["tokens"] == sum(len(ids[i]) for i in kept)
    assert s["trained_tokens"] == sum(sum(1 for x in labels[i][1:] if x != -100) for i in kept)
    lengths = np.array([len(ids[i]) for i in kept])
    assert s["length"]["max"] == lengths.max()
    assert s["length"]["p50"] == pytest.approx(np.percentile(lengths, 50))
    # greedy packing in data order into 2048-token rows: everything here fits in one row
    assert s["rows_2048_packed"] == int(np.ceil(lengths.sum() / 2048)) == 1
    assert s["rows_2048_padded"] == len(kept)
    assert s["vocab_size"] == len(tok) and s["added_tokens"] == {"pad_token": "[PAD]"}
    assert s["records_with_special_token_text"] == 1
    on_disk = json.loads(io.read_text(run.stats_path))
    assert on_disk["examples"] == s["examples"]
    record = open_run(run.url).prepare
    assert record.complete and record.summary.examples == s["examples"]


def test_same_inputs_reuse_the_cache_and_changed_inputs_are_refused(tmp_path, fixture_data, tokenizer_dir):
    first, run = run_prepare(tmp_path, fixture_data, tokenizer_dir)
    assert not first.reused
    again, _ = run_prepare(tmp_path, fixture_data, tokenizer_dir)
    assert again.reused and again.fingerprint == first.fingerprint
    with pytest.raises(StageError, match="differs in --max-length.*--overwrite"):
        run_prepare(tmp_path, fixture_data, tokenizer_dir, max_length=256)
    custom = PromptTemplates(prompt_input="I: {instruction} {input}\nR:", prompt_no_input="I: {instruction}\nR:")
    with pytest.raises(StageError, match="prompt templates"):
        run_prepare(tmp_path, fixture_data, tokenizer_dir, prompts=custom)
    changed = tmp_path / "changed.jsonl"
    write_jsonl(str(changed), read_records(fixture_data)[:5])
    with pytest.raises(StageError, match="differs in data"):
        run_prepare(tmp_path, str(changed), tokenizer_dir)
    cfg = PrepareConfig(data=str(changed), tokenizer=tokenizer_dir)
    result = prepare(cfg, open_run(run.url), overwrite=True)
    assert not result.reused and result.stats["records_read"] == 5
    assert len(prepared_examples(run.url)) == 5


def test_killed_prepare_leaves_nothing_complete_and_rerun_finishes(tmp_path, fixture_data, tokenizer_dir, monkeypatch):
    import alpaca_cli.core.prepare as core

    def boom(*a, **k):
        raise KeyboardInterrupt  # what a kill looks like from inside: the stage never completes

    monkeypatch.setattr(core, "compute_stats", boom)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tmp_path, fixture_data, tokenizer_dir)
    run = open_run(str(tmp_path / "run"))
    assert run.prepare.status == "interrupted"
    assert not io.exists(run.stats_path)
    from alpaca_cli.errors import RunDirError

    with pytest.raises(RunDirError, match="incomplete"):
        run.require("prepare")
    monkeypatch.undo()
    result, run = run_prepare(tmp_path, fixture_data, tokenizer_dir)
    assert not result.reused and run.is_complete("prepare")
    assert len(prepared_examples(run.url)) == result.stats["examples"] == 15  # record 12: prompt > 512 tokens


def test_jsonl_gz_and_json_read_the_same(tmp_path, fixture_data, tokenizer_dir):
    records = read_records(fixture_data)
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(gzip.compress(open(fixture_data, "rb").read()))
    js = tmp_path / "data.json"
    js.write_text(json.dumps(records, ensure_ascii=False))
    a, ra = run_prepare(tmp_path, str(gz), tokenizer_dir, name="gz")
    b, rb = run_prepare(tmp_path, str(js), tokenizer_dir, name="js")
    assert prepared_examples(ra.url) == prepared_examples(rb.url)
    assert a.stats["records_read"] == b.stats["records_read"] == len(records)


def test_custom_field_names_and_prompts(tmp_path, tokenizer_dir):
    records = [{"q": "Say hi.", "ctx": "", "a": "hi"}, {"q": "Echo.", "ctx": "x", "a": "x"}]
    data = write_jsonl(str(tmp_path / "d.jsonl"), records)
    prompts = PromptTemplates(prompt_input="Q: {instruction}\nC: {input}\nA:", prompt_no_input="Q: {instruction}\nA:")
    _, run = run_prepare(tmp_path, data, tokenizer_dir, instruction_field="q", input_field="ctx", output_field="a",
                         prompts=prompts)
    tok = stanford_tokenizer(tokenizer_dir)
    canonical = [{"instruction": r["q"], "input": r["ctx"], "output": r["a"]} for r in records]
    ids, labels = preprocess(canonical, tok, prompt_dict={"prompt_input": prompts.prompt_input,
                                                           "prompt_no_input": prompts.prompt_no_input})
    assert prepared_examples(run.url) == {0: (ids[0], labels[0]), 1: (ids[1], labels[1])}


BAD_INPUTS = [
    ("empty.jsonl", "", r"the file is empty"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"line 2: malformed JSON"),
    ("missing.jsonl", '{"instruction": "a"}\n', r"line 1: field `output` is missing"),
    ("nonstr.jsonl", '{"instruction": "a", "input": null, "output": "b"}\n', r"line 1: field `input` must be a string, found null"),
    ("notlist.json", '{"instruction": "a", "output": "b"}', r"must hold a list of records"),
    ("nums.json", '[{"instruction": 3, "output": "b"}]', r"record 0: field `instruction` must be a string, found a number"),
    ("data.csv", "a,b\n", r"unsupported file type"),
]


@pytest.mark.parametrize("name,content,message", BAD_INPUTS)
def test_bad_data_is_one_clear_error_and_writes_nothing(tmp_path, tokenizer_dir, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        run_prepare(tmp_path, str(path), tokenizer_dir)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert not (tmp_path / "run" / "data").exists()


def test_unreadable_inputs(tmp_path, fixture_data, tokenizer_dir):
    with pytest.raises(DataError, match="no such file"):
        run_prepare(tmp_path, str(tmp_path / "nope.jsonl"), tokenizer_dir)
    with pytest.raises(ConfigError, match="--tokenizer .*no such folder"):
        run_prepare(tmp_path, fixture_data, str(tmp_path / "no-tokenizer"))
    with pytest.raises(DataError, match="cannot resolve this Hub dataset"):
        run_prepare(tmp_path, "tatsu-lab/alpaca", tokenizer_dir)  # offline in tests
    bad = PromptTemplates(prompt_input="{instruction} {inputs}", prompt_no_input="{instruction}")
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{inputs\}"):
        run_prepare(tmp_path, fixture_data, tokenizer_dir, prompts=bad)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_prepare_on_gcs(gcs, fixture_data, tokenizer_dir, tmp_path):
    """The whole prepare on a gs:// run directory (real emulator): data read from GCS, cache written there,
    reused, a stale one refused."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.put_file(fixture_data, f"{gcs.bucket}/inputs/data.jsonl")
    data = f"{gcs.url}/inputs/data.jsonl"
    url = f"{gcs.url}/runs/prepare-test"
    cfg = PrepareConfig(data=data, tokenizer=tokenizer_dir)
    first = prepare(cfg, open_run(url, create=True))
    assert not first.reused
    assert fs.exists(f"{gcs.bucket}/runs/prepare-test/data/cache/shard_ledger.json")
    assert fs.exists(f"{gcs.bucket}/runs/prepare-test/tokenizer/tokenizer.json")
    assert prepared_examples(url) == stanford_examples(read_records(fixture_data), stanford_tokenizer(tokenizer_dir))
    again = prepare(cfg, open_run(url))
    assert again.reused
    with pytest.raises(StageError, match="--overwrite"):
        prepare(PrepareConfig(data=data, tokenizer=tokenizer_dir, max_length=128), open_run(url))
    assert open_run(url).prepare.fingerprint == first.fingerprint


def test_tokenizer_that_appends_eos_truncates_and_masks_like_stanford(tmp_path, fixture_data, tokenizer_dir):
    """add_eos_token=True: special tokens after the text. Prompts are tokenized alone (their length includes the
    appended EOS, as in Stanford's code) and truncation is Hugging Face's, not a slice."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, add_eos_token=True)
    tok_dir = str(tmp_path / "eos-tokenizer")
    tok.save_pretrained(tok_dir)
    assert not prefix_stable(tok)[0]
    result, run = run_prepare(tmp_path, fixture_data, tok_dir, max_length=64)
    assert result.stats["truncated"] > 0
    expected = stanford_examples(read_records(fixture_data), stanford_tokenizer(tok_dir), max_length=64)
    assert prepared_examples(run.url) == expected


def test_offset_prompt_lengths_where_no_character_table_is_built(tokenizer_dir, monkeypatch):
    """A prefix-stable tokenizer the character table refuses still reads prompt lengths off the offsets, exactly."""
    from alpaca_cli.core import tokenize as tokmod

    tok = stanford_tokenizer(tokenizer_dir, use_fast=True)
    monkeypatch.setattr(tokmod, "char_table", lambda tok: None)
    rng = random.Random(1)
    pool = list("ab :\"'{}\n.,") + ["é", "😀", "</s>", "▁", "  "]
    prompts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 20))) for _ in range(200)]
    outputs = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 20))) for _ in range(200)]
    fast = tokenize_examples(tok, prompts, outputs, max_length=10_000, fast_path=True)
    assert fast.prompt_lengths == [len(tok(prompts[i])["input_ids"]) for i in fast.source_index]
    assert fast.prompts_tokenized_alone < len(prompts) // 10  # read off the offsets, not tokenized alone
