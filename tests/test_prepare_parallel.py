"""alpaca prepare on several worker processes: the cache is byte-identical to one process's for any number of
workers, the input is read as a stream, errors are the ones one process finds, and a worker that dies is retried or
fails the prepare in one line without leaving a cache that looks complete."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random

import pytest
from helpers import prepared_examples, read_records, stanford_examples
from stanford_reference import stanford_tokenizer
from test_prepare_chat import CONVERSATIONS, as_messages, oracle

from alpaca_cli.config import PrepareConfig
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core import parallel
from alpaca_cli.core.data import load_records
from alpaca_cli.core.prepare import prepare
from alpaca_cli.errors import DataError, StageError
from alpaca_cli.rundir import open_run

CHUNKS = 6  # about this many chunks per file (the chunk size is shrunk to the file's size / CHUNKS)
WORDS = ["alpha", "beta", "gamma", "héllo", "東京", "😀", "{braces}", "\"quoted\"", "new\nline", "tab\there",
         "x" * 30, "</s>", "Response:", "a\u2028b"]  # U+2028 is written raw: lines end at \n only


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, k)))

    return [{"instruction": text(12) or "Say it.", "input": text(8) if rng.random() < 0.4 else "",
             "output": text(40)} for _ in range(n)]


def write_lines(path, records, blank_every: int = 9) -> str:
    """JSON Lines with a blank line now and then (skipped; the line numbers count them)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n\n" if i % blank_every == blank_every - 1 else "\n")
    return str(path)


def shrink_chunks(monkeypatch, path) -> None:
    monkeypatch.setattr(parallel, "CHUNK_BYTES", max(1, os.path.getsize(path) // CHUNKS))
    monkeypatch.setattr(parallel, "CHUNK_RECORDS", 7)


def engines_used(monkeypatch) -> list:
    """The engines prepare picks, as (class name, workers)."""
    used, real = [], parallel.engine_for

    def spy(workers, chunks, pool=None):
        engine, chunks = real(workers, chunks, pool)
        used.append((type(engine).__name__, engine.workers))
        return engine, chunks

    monkeypatch.setattr(parallel, "engine_for", spy)
    return used


def run_prepare(tmp_path, name, data, tokenizer, **kw):
    run = open_run(str(tmp_path / name), create=True)
    return prepare(PrepareConfig(data=data, tokenizer=tokenizer, **kw), run), run


def cache_digest(run, arrays_only: bool = False) -> dict[str, str]:
    """sha256 of every file of the run's cache (arrays_only: not the ledger and seal, which name the inputs'
    fingerprint)."""
    root = os.path.join(run.url, "data", "cache")
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if arrays_only and os.sep not in rel:
                continue
            out[rel] = hashlib.sha256(open(os.path.join(root, rel), "rb").read()).hexdigest()
    assert len(out) >= 6
    return out


def comparable(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith("seconds")}


@pytest.fixture
def alpaca_file(tmp_path, fixture_data):
    records = read_records(fixture_data) + synthetic_records(50)
    return write_lines(tmp_path / "alpaca.jsonl", records), records


def test_alpaca_records_on_1_2_4_workers_give_one_process_cache(tmp_path, alpaca_file, tokenizer_dir, monkeypatch):
    path, records = alpaca_file
    one, run = run_prepare(tmp_path, "one", path, tokenizer_dir, workers=0, max_length=96)  # one chunk
    reference = cache_digest(run)
    tok = stanford_tokenizer(tokenizer_dir)
    assert prepared_examples(run.url) == stanford_examples(records, tok, max_length=96)  # the independent check
    assert one.stats["truncated"] > 0 and one.stats["records_read"] == len(records)

    shrink_chunks(monkeypatch, path)
    used = engines_used(monkeypatch)
    for workers in (0, 1, 2, 4):
        result, run = run_prepare(tmp_path, f"w{workers}", path, tokenizer_dir, workers=workers, max_length=96)
        assert cache_digest(run) == reference, f"{workers} workers"
        assert comparable(result.stats) == comparable(one.stats)
    assert used == [("InProcess", 0), ("ProcessPool", 1), ("ProcessPool", 2), ("ProcessPool", 4)]


def test_conversations_on_1_2_4_workers_give_one_process_cache(tmp_path, chatml_tokenizer_dir, monkeypatch):
    conversations = [c for _ in range(6) for c in CONVERSATIONS]
    path = write_lines(tmp_path / "chat.jsonl", as_messages(conversations))
    kw = dict(chat_template="chatml", max_length=64)
    one, run = run_prepare(tmp_path, "one", path, chatml_tokenizer_dir, workers=0, **kw)
    reference = cache_digest(run)
    assert prepared_examples(run.url) == oracle(chatml_tokenizer_dir, conversations, max_length=64)
    assert one.stats["conversations"] == len(conversations) and one.stats["truncated"] > 0

    shrink_chunks(monkeypatch, path)
    used = engines_used(monkeypatch)
    for workers in (0, 1, 2, 4):
        result, run = run_prepare(tmp_path, f"w{workers}", path, chatml_tokenizer_dir, workers=workers, **kw)
        assert cache_digest(run) == reference, f"{workers} workers"
        assert comparable(result.stats) == comparable(one.stats)
    assert [u[0] for u in used] == ["InProcess", "ProcessPool", "ProcessPool", "ProcessPool"]


def test_records_read_whole_are_chunked_too(tmp_path, alpaca_file, tokenizer_dir, monkeypatch):
    """A .json list is read whole, then tokenized in chunks on the workers: the same arrays as the .jsonl."""
    path, records = alpaca_file
    js = tmp_path / "alpaca.json"
    js.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    _, a = run_prepare(tmp_path, "jsonl", path, tokenizer_dir, workers=0)
    shrink_chunks(monkeypatch, path)
    used = engines_used(monkeypatch)
    _, b = run_prepare(tmp_path, "json", str(js), tokenizer_dir, workers=2)
    assert used == [("ProcessPool", 2)]
    assert cache_digest(b, arrays_only=True) == cache_digest(a, arrays_only=True)


def test_jsonl_gz_streams_to_the_same_cache(tmp_path, alpaca_file, tokenizer_dir, monkeypatch):
    path, _ = alpaca_file
    gz = tmp_path / "alpaca.jsonl.gz"
    gz.write_bytes(gzip.compress(open(path, "rb").read()))
    _, plain = run_prepare(tmp_path, "plain", path, tokenizer_dir, workers=0)
    shrink_chunks(monkeypatch, path)
    result, run = run_prepare(tmp_path, "gz", str(gz), tokenizer_dir, workers=2)
    assert cache_digest(run, arrays_only=True) == cache_digest(plain, arrays_only=True)
    # what identifies the data is what reading it whole gives: the file's sha256 and its decompressed size
    whole = load_records(PrepareConfig(data=str(gz), tokenizer=tokenizer_dir))
    assert run.prepare.inputs.data == whole.source
    assert whole.source.sha256 == hashlib.sha256(gz.read_bytes()).hexdigest()


def _bad_file(tmp_path, name, lines: dict[int, str]):
    """60 good records with some lines replaced (by 0-based record index)."""
    records = [json.dumps(r, ensure_ascii=False) for r in synthetic_records(60, seed=1)]
    for i, text in lines.items():
        records[i] = text
    return write_lines(tmp_path / name, records, blank_every=1000)


BAD = {
    "missing": ({45: '{"instruction": "a"}'}, r"line 46: field `output` is missing"),
    # one process parses every line before it checks any record: a malformed line later wins
    "malformed-later": ({10: '{"instruction": "a"}', 50: '{"instruction": '}, r"line 51: malformed JSON"),
    "duplicate": ({40: '{"instruction": "a", "output": "b", "output": "c"}'}, r"line 41: the key `output` appears"),
    "not-a-string": ({33: '{"instruction": "a", "output": 3}'}, r"line 34: field `output` must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_record_in_a_later_chunk_is_one_process_error(tmp_path, tokenizer_dir, monkeypatch, case):
    lines, message = BAD[case]
    path = _bad_file(tmp_path, f"{case}.jsonl", lines)
    with pytest.raises(DataError) as whole:  # the reader of the whole file, as prepare read it before
        load_records(PrepareConfig(data=path, tokenizer=tokenizer_dir))
    assert whole.match(message)
    shrink_chunks(monkeypatch, path)
    for workers in (0, 2):
        with pytest.raises(DataError) as got:
            run_prepare(tmp_path, f"w{workers}", path, tokenizer_dir, workers=workers)
        assert str(got.value) == str(whole.value) and "\n" not in str(got.value)
        assert not (tmp_path / f"w{workers}" / "manifest.json").exists()
        assert not (tmp_path / f"w{workers}" / "data").exists()


def test_bytes_that_are_not_utf8_come_first_and_name_their_line(tmp_path, tokenizer_dir, monkeypatch):
    path = _bad_file(tmp_path, "bytes.jsonl", {5: '{"instruction": "a"}', 20: '{"instruction": '})
    with open(path, "ab") as f:
        f.write(b'{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match="line 61: not valid UTF-8") as whole:
        load_records(PrepareConfig(data=path, tokenizer=tokenizer_dir))
    shrink_chunks(monkeypatch, path)
    with pytest.raises(DataError) as got:
        run_prepare(tmp_path, "run", path, tokenizer_dir, workers=2)
    assert str(got.value) == str(whole.value)


def test_a_killed_worker_is_retried_and_the_cache_is_identical(tmp_path, alpaca_file, tokenizer_dir, monkeypatch):
    path, _ = alpaca_file
    _, one = run_prepare(tmp_path, "one", path, tokenizer_dir, workers=0)
    shrink_chunks(monkeypatch, path)
    monkeypatch.setenv(parallel.FAULT_ENV, "kill:2:once")
    monkeypatch.setenv(parallel.FAULT_DIR_ENV, str(tmp_path))
    _, run = run_prepare(tmp_path, "killed", path, tokenizer_dir, workers=2)
    assert [f for f in os.listdir(tmp_path) if f.startswith("alpaca-fault-")]  # the worker did die once
    assert cache_digest(run) == cache_digest(one)


def test_a_worker_that_always_dies_fails_in_one_line_and_the_rerun_restarts(tmp_path, alpaca_file, tokenizer_dir,
                                                                             monkeypatch):
    path, _ = alpaca_file
    _, one = run_prepare(tmp_path, "one", path, tokenizer_dir, workers=0)
    shrink_chunks(monkeypatch, path)
    monkeypatch.setenv(parallel.FAULT_ENV, "kill:2:always")
    with pytest.raises(StageError, match=r"a prepare worker died 3 times on records \d+-\d+ of .*alpaca.jsonl "
                                         r"\(killed or out of memory\).*rerun restarts") as e:
        run_prepare(tmp_path, "run", path, tokenizer_dir, workers=2)
    assert "\n" not in str(e.value)
    run = open_run(str(tmp_path / "run"))
    assert run.prepare.status == "failed" and not run.is_complete("prepare")
    assert cachemod.problem(run.cache_dir, run.prepare.fingerprint) is not None  # not a complete-looking cache
    assert not os.path.exists(os.path.join(run.cache_dir, "shard_ledger.json"))

    monkeypatch.delenv(parallel.FAULT_ENV)
    result, run = run_prepare(tmp_path, "run", path, tokenizer_dir, workers=2)
    assert not result.reused and run.is_complete("prepare")
    assert cache_digest(run) == cache_digest(one)


def test_a_file_that_changes_between_the_passes_is_refused(tmp_path, alpaca_file, tokenizer_dir, monkeypatch):
    path, _ = alpaca_file
    real, calls = parallel.block_chunks, []

    def append_before_the_second_pass(stream, counts=None):
        calls.append(counts)
        if counts is not None:
            with open(path, "a") as f:
                f.write(json.dumps({"instruction": "late", "output": "x"}) + "\n")
        return real(stream, counts)

    monkeypatch.setattr(parallel, "block_chunks", append_before_the_second_pass)
    with pytest.raises(DataError, match="alpaca.jsonl changed while it was being prepared"):
        run_prepare(tmp_path, "run", path, tokenizer_dir, workers=0)
    assert len(calls) == 2
    run = open_run(str(tmp_path / "run"))
    assert run.prepare.status == "failed"
    assert not os.path.exists(os.path.join(run.cache_dir, "shard_ledger.json"))


def _plain_lines(n: int = 30) -> list[str]:
    return [json.dumps(r, ensure_ascii=False) for r in synthetic_records(n, seed=2)]


ODD_FILES = {  # a stream's own cases: the same records as the plain file, written differently
    "bom-then-blank-lines": lambda lines: "\ufeff\n \n\u3000\n" + "\n".join(lines) + "\n",
    "crlf": lambda lines: "\r\n".join(lines) + "\r\n",
    "no-final-newline": lambda lines: "\n".join(lines),
    "a-first-chunk-of-blank-lines": lambda lines: "\n" * 2000 + "\n".join(lines) + "\n",
}


@pytest.mark.parametrize("case", sorted(ODD_FILES))
def test_odd_but_valid_files_stream_to_the_plain_files_cache(tmp_path, tokenizer_dir, monkeypatch, case):
    lines = _plain_lines()
    plain = write_lines(tmp_path / "plain.jsonl", lines, blank_every=1000)
    _, a = run_prepare(tmp_path, "plain", plain, tokenizer_dir, workers=0)
    odd = tmp_path / "odd.jsonl"
    odd.write_bytes(ODD_FILES[case](lines).encode())
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 500)  # blocks in which a BOM, \r or a blank line may end
    result, b = run_prepare(tmp_path, "odd", str(odd), tokenizer_dir, workers=0)
    assert cache_digest(b, arrays_only=True) == cache_digest(a, arrays_only=True)
    assert result.stats["records_read"] == len(lines)
    assert b.prepare.inputs.data == load_records(PrepareConfig(data=str(odd), tokenizer=tokenizer_dir)).source


def test_conversations_after_a_chunk_of_blank_lines_are_detected(tmp_path, chatml_tokenizer_dir, monkeypatch):
    lines = [json.dumps(r, ensure_ascii=False) for r in as_messages(CONVERSATIONS)]
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n" * 300 + "\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 100)
    result, _ = run_prepare(tmp_path, "odd", str(odd), chatml_tokenizer_dir, workers=0, chat_template="chatml")
    assert result.stats["format"] == "messages" and result.stats["conversations"] == len(CONVERSATIONS)


BAD_FILES = {
    "json-list": (lambda lines: "[\n" + ",\n".join(lines) + "\n]\n", r"line 1: malformed JSON Lines"),
    "blank-only": (lambda lines: "\n \n\u3000\n" * 50, r"the file is empty"),
    "bom-only": (lambda lines: "\ufeff", r"the file is empty"),
    "formats-mixed": (lambda lines: '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
                      '"content": "b"}]}\n' + "\n".join(lines) + "\n", r"line 2: a alpaca record, but line 1 is"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_odd_bad_files_give_the_whole_file_readers_error(tmp_path, tokenizer_dir, monkeypatch, case):
    make, message = BAD_FILES[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(make(_plain_lines()).encode())
    with pytest.raises(DataError, match=message) as whole:
        load_records(PrepareConfig(data=str(bad), tokenizer=tokenizer_dir))
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 300)
    with pytest.raises(DataError) as got:
        run_prepare(tmp_path, "run", str(bad), tokenizer_dir, workers=0)
    assert str(got.value) == str(whole.value)
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.parametrize("case", ["not-gzip", "truncated"])
def test_a_bad_gzip_stream_is_the_whole_file_readers_error(tmp_path, tokenizer_dir, monkeypatch, case):
    text = ("\n".join(_plain_lines(200)) + "\n").encode()
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(text if case == "not-gzip" else gzip.compress(text)[:-200])
    with pytest.raises(DataError, match="not a valid gzip file") as whole:
        load_records(PrepareConfig(data=str(bad), tokenizer=tokenizer_dir))
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 1000)
    with pytest.raises(DataError) as got:
        run_prepare(tmp_path, "run", str(bad), tokenizer_dir, workers=0)
    assert str(got.value) == str(whole.value)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_workers_is_not_part_of_the_fingerprint_and_is_checked(tmp_path, alpaca_file, tokenizer_dir):
    from alpaca_cli.errors import ConfigError

    path, _ = alpaca_file
    first, run = run_prepare(tmp_path, "run", path, tokenizer_dir, workers=0)
    again, _ = run_prepare(tmp_path, "run", path, tokenizer_dir, workers=3)  # two chunks at most: in this process
    assert again.reused and again.fingerprint == first.fingerprint
    with pytest.raises(ConfigError, match=r"workers \(--workers\) must be 0 \(this process only\) or more, got -1"):
        PrepareConfig(data=path, tokenizer=tokenizer_dir, workers=-1)


def test_a_workers_error_reaches_the_command_whole(tmp_path, alpaca_file, tokenizer_dir, monkeypatch):
    """--on-overflow error raised in a worker process: the same line and hint as in one process."""
    path, _ = alpaca_file
    with pytest.raises(DataError) as one:
        run_prepare(tmp_path, "one", path, tokenizer_dir, workers=0, max_length=40, on_overflow="error")
    assert one.value.hint and "record" in str(one.value)
    shrink_chunks(monkeypatch, path)
    with pytest.raises(DataError) as got:
        run_prepare(tmp_path, "two", path, tokenizer_dir, workers=2, max_length=40, on_overflow="error")
    assert (str(got.value), got.value.hint) == (str(one.value), one.value.hint)
    assert open_run(str(tmp_path / "two")).prepare.status == "failed"


def test_a_mixture_on_2_workers_gives_the_one_process_cache(tmp_path, alpaca_file, tokenizer_dir, monkeypatch):
    from alpaca_cli.config import SourceConfig
    from alpaca_cli.core.prepare_sources import prepare_sources

    path, _ = alpaca_file
    other = write_lines(tmp_path / "other.jsonl", synthetic_records(80, seed=5))

    def mix(name, workers):
        run = open_run(str(tmp_path / name), create=True)
        cfg = PrepareConfig(data=path, tokenizer=tokenizer_dir, workers=workers, sources=[
            SourceConfig(data=path, name="a", weight=3.0), SourceConfig(data=other, name="b", weight=1.0)])
        return prepare_sources(cfg, run), run

    one_result, one = mix("one", 0)
    shrink_chunks(monkeypatch, path)
    used = engines_used(monkeypatch)
    result, run = mix("two", 2)
    assert used == [("ProcessPool", 2), ("ProcessPool", 2)]  # both sources on worker processes
    assert cache_digest(run) == cache_digest(one)
    assert [s.rows for s in run.prepare.sources] == [s.rows for s in one.prepare.sources]
    assert comparable(result.stats) == comparable(one_result.stats)


def heavy_modules_after_a_chunk(job, chunk):
    """In a worker: a chunk tokenized, then which of the heavy libraries the process holds."""
    import sys

    parallel.tokenize_chunk(job, chunk)
    return sorted({"jax", "torch", "levanter", "haliax"} & set(sys.modules))


def test_a_worker_tokenizes_without_loading_jax_or_torch(tokenizer_dir):
    """A spawned worker imports what tokenizing needs, not JAX (the compat patch waits for it) nor torch (which
    transformers would import when installed, as it is here): seconds and hundreds of MB per worker, on every core."""
    from alpaca_cli.core.tokenize import hash_folder

    block = b'{"instruction": "Say hi", "input": "", "output": "hi"}\n'
    job = parallel.Job(PrepareConfig(data="x.jsonl", tokenizer=tokenizer_dir), "x.jsonl", "alpaca", "line 1",
                       tokenizer_dir=tokenizer_dir, tokenizer_fingerprint=hash_folder(tokenizer_dir))
    pool = parallel.ProcessPool(1)
    try:
        chunks = [parallel.Chunk(0, block, first_line=1, records=1)]
        assert list(pool.map_ordered(heavy_modules_after_a_chunk, job, chunks, "x.jsonl")) == [[]]
    finally:
        pool.close()
    import torch  # noqa: F401 - installed here, so the worker had it to import
