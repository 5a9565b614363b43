"""`alpaca prepare`: records -> Alpaca prompts -> Stanford labels -> a Levanter token cache in the run directory;
or conversations -> the chat template's rendering -> assistant-only labels (core.chat) -> the same cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Iterable, Iterator

import numpy as np

from alpaca_cli import config as cfgmod
from alpaca_cli import io
from alpaca_cli.config import PrepareConfig
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core import parallel
from alpaca_cli.core import prompts as promptsmod
from alpaca_cli.core.data import (HubTable, JsonlStream, Records, decode_block, detect, first_record, is_hub,
                                  load_records, not_json_lines, open_hub, streams)
from alpaca_cli.core.tokenize import load_tokenizer, prefix_stable
from alpaca_cli.errors import ConfigError, DataError, StageError
from alpaca_cli.records import DataSource, PrepareInputs, PrepareRecord, PrepareSummary
from alpaca_cli.rundir import RunDir

logger = logging.getLogger(__name__)

# Bump when the cache's content for the same inputs changes (it invalidates every fingerprint).
CACHE_FORMAT = 1
PACK_ROW = 2048  # the row length the statistics report packing for


@dataclass
class PrepareResult:
    """What `prepare` did beside its record: whether it reused the cache, and the statistics it prints (stats.json,
    of which the record's summary keeps the counts)."""

    reused: bool
    stats: dict[str, Any]
    fingerprint: str


class Progress:
    """What core code reports; the command turns it into a progress bar (or nothing)."""

    def start(self, description: str, total: int | None) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...


def fingerprint_inputs(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def prepare(
    cfg: PrepareConfig, run: RunDir, *, overwrite: bool = False, progress: Progress | None = None
) -> PrepareResult:
    """Prepare the run's token cache; reuse it when the fingerprint matches, refuse a stale one unless overwrite."""
    t0 = time.time()
    progress = progress or Progress()
    if cfg.sources:
        raise ConfigError("a config with several sources is prepared by core.prepare_sources.prepare_sources")

    # Everything that can be wrong with the inputs is found before anything is written.
    promptsmod.validate(cfg.prompts)
    cluster = ray_cluster(cfg)
    records = loaded = None
    try:
        records = read_input(cfg, cluster)
        loaded = load_tokenizer(cfg.tokenizer)
        template = chat_template(cfg, records, loaded.tokenizer)
        components = _components(cfg, records, loaded, template)
        fingerprint = fingerprint_inputs(components)
        reused = reuse_or_refuse(run, fingerprint, components, overwrite)
        if reused is not None:
            return reused

        record = PrepareRecord(
            config=cfg,
            inputs=PrepareInputs(data=records.source, tokenizer=cfg.tokenizer, components=components),
            fingerprint=fingerprint,
            format=records.format,
            chat_template=template.text if template is not None else None,
        )
        stats = prepare_stage(run, cfg, record, t0, lambda: _build(cfg, run, records, loaded, template, progress))
        return PrepareResult(False, stats, fingerprint)
    finally:
        if records is not None:
            records.engine.close()
        if cluster is not None:
            cluster.close()
        if loaded is not None:
            shutil.rmtree(loaded.local_dir, ignore_errors=True)


def prepare_stage(run: RunDir, cfg: PrepareConfig, record: PrepareRecord, t0: float, build) -> dict[str, Any]:
    """The prepare stage around build() (which writes the cache and returns its statistics): the config, then
    stats.json and the record's summary; the stage is complete only when all of it is written."""
    with run.stage("prepare", record):
        run.write_config("prepare", cfgmod.dump(cfg))
        stats = build()
        stats["seconds"] = round(time.time() - t0, 3)
        io.write_text_atomic(run.stats_path, json.dumps(stats, indent=2) + "\n")
        record.summary = PrepareSummary(
            **{k: stats[k] for k in ("records_read", "examples", "truncated", "dropped", "tokens",
                                    "trained_tokens", "vocab_size", "added_tokens")}
        )
    return stats


def ray_cluster(cfg: PrepareConfig):
    """The Ray cluster of --ray-address (core.ray_engine), connected; None without it (nothing imports Ray)."""
    if cfg.ray_address is None:
        return None
    from alpaca_cli.core.ray_engine import RayCluster

    return RayCluster(cfg.ray_address)


# -- the first pass: every record read and checked --------------------------------------------------------------


@dataclass
class Input:
    """The training data after the first pass (every record read and checked, nothing written yet), as chunks for
    the second: a JSON Lines file streamed (and read again), or records read whole (a .json file, the Hub)."""

    where: str
    format: str
    source: DataSource
    engine: Any
    """core.parallel's InProcess or ProcessPool, kept for the second pass."""
    count: int
    stream: JsonlStream | None = None
    counts: list[int] = field(default_factory=list)
    """Records per chunk of the stream."""
    records: Records | None = None
    table: HubTable | None = None
    first_where: str | None = None

    def __len__(self) -> int:
        return self.count

    def chunks(self) -> Iterator[parallel.Chunk]:
        if self.table is not None:
            yield from parallel.table_chunks(self.table)
            return
        if self.stream is None:
            yield from parallel.record_chunks(self.records)
            return
        yield from parallel.block_chunks(self.stream, self.counts)
        if self.stream.source != self.source:
            raise DataError(f"--data {self.where} changed while it was being prepared",
                            hint="prepare it again once nothing writes to it")


def read_input(cfg: PrepareConfig, pool: parallel.ProcessPool | None = None) -> Input:
    """The first pass: a JSON Lines file read as a stream in chunks on the engine's workers (its sha256, its
    records counted and checked), anything else read whole; DataError (one line, the error one process reading the
    whole file finds first) before anything is written. pool: the worker processes to use (a mixture's sources
    share one), else new ones."""
    if is_hub(cfg.data):
        return _read_hub(cfg, pool)
    if not streams(cfg.data):
        records = load_records(cfg)
        engine, _ = parallel.engine_for(cfg.workers, parallel.record_chunks(records), pool)
        return Input(cfg.data, records.format, records.source, engine, len(records), records=records)
    stream = JsonlStream(cfg.data)
    engine, chunks = parallel.engine_for(cfg.workers, parallel.block_chunks(stream), pool)
    try:
        head, fmt, first_where, errors = _first_record(cfg, chunks)
        job = parallel.Job(cfg, cfg.data, fmt, first_where)
        counts = []
        for i, checked in enumerate(engine.map_ordered(parallel.validate_chunk, job, chain(head, chunks), cfg.data)):
            counts.append(checked.records)
            if checked.error is not None:
                errors.append((checked.error[0], i, checked.error[1]))
                if checked.error[0] == parallel.UTF8:
                    break  # nothing comes before it
        if errors:
            raise min(errors, key=lambda e: e[:2])[2]
        if not sum(counts):
            raise DataError(f"--data {cfg.data}: the file is empty")
        return Input(cfg.data, fmt, stream.source, engine, sum(counts), stream=stream, counts=counts,
                     first_where=first_where)
    except BaseException:
        if engine is not pool:
            engine.close()
        raise


def _read_hub(cfg: PrepareConfig, pool) -> Input:
    """The first pass over a Hub dataset: opened (memory-mapped, not read), its rows checked in chunks on the
    engine's workers; the first bad record's error, as reading it whole finds it."""
    table = open_hub(cfg)
    engine, chunks = parallel.engine_for(cfg.workers, parallel.table_chunks(table), pool)
    try:
        first = table.rows(0, 1)[0]
        fmt = cfg.format if cfg.format != "auto" else detect(first[1], cfg, True, where=f"{cfg.data} {first[0]}")
        job = parallel.Job(cfg, cfg.data, fmt, first[0])
        for checked in engine.map_ordered(parallel.validate_chunk, job, chunks, cfg.data):
            if checked.error is not None:
                raise checked.error[1]
        return Input(cfg.data, fmt, table.source, engine, len(table), table=table, first_where=first[0])
    except BaseException:
        if engine is not pool:
            engine.close()
        raise


def _first_record(cfg: PrepareConfig, chunks: Iterator[parallel.Chunk]) -> tuple[list, str | None, str | None, list]:
    """The chunks read up to the first one that holds more than blank lines (kept for the first pass), and from it:
    the records' format (--format, or auto: the first record's; None when it cannot be known: the first pass finds
    an error), the first record's place, and the errors found here as (class, chunk, DataError)."""
    fmt = cfg.format if cfg.format != "auto" else None
    head, errors = [], []
    for chunk in chunks:
        head.append(chunk)
        try:
            text = decode_block(chunk.payload, chunk.first_line, cfg.data, first=chunk.index == 0)
        except DataError:
            return head, fmt, None, errors  # the first pass finds it
        if text.strip():
            break
    else:
        return head, fmt or "alpaca", None, errors  # no record: the file is empty
    if (list_error := not_json_lines(text, cfg.data)) is not None:
        errors.append((parallel.NOT_JSON_LINES, chunk.index, list_error))
    first = first_record(text, chunk.first_line)
    if first is None:
        return head, fmt, None, errors  # not JSON: the first pass finds it
    if fmt is None:
        try:
            fmt = detect(first[1], cfg, where=f"{cfg.data} {first[0]}")
        except DataError as e:
            errors.append((parallel.INVALID, chunk.index, e))
    return head, fmt, first[0], errors


def reuse_or_refuse(run: RunDir, fingerprint: str, components: dict, overwrite: bool) -> PrepareResult | None:
    """The run's complete cache when it was prepared from the same inputs (and is undamaged); None when it is to be
    (re)written; StageError for a cache prepared from other inputs (naming what differs) without --overwrite, or
    new data over training state."""
    previous = run.prepare
    damaged = None
    if previous is not None and previous.complete and previous.fingerprint == fingerprint and not overwrite:
        damaged = cachemod.problem(run.cache_dir, fingerprint)
        if damaged is not None:
            logger.warning("The run's cache at %s %s: preparing it again", run.cache_dir, damaged)
    if previous is not None and previous.complete and damaged is None:
        if previous.fingerprint == fingerprint and not overwrite:
            logger.info("The run's cache was prepared from the same inputs: reusing it")
            stats = json.loads(io.read_text(run.stats_path))
            return PrepareResult(True, stats, fingerprint)
        if not overwrite:
            differ = _differences(previous.inputs.components, components)
            raise StageError(
                f"run {run.url} was prepared from different inputs ({differ}); "
                f"pass --overwrite to replace its cache, or use another --run-dir"
            )
    if overwrite and run.train is not None and (previous.fingerprint if previous else None) != fingerprint:
        raise StageError(
            f"run {run.url} already has training state; preparing new data into it would orphan its "
            "checkpoints: use a new --run-dir"
        )
    return None


def chat_template(cfg: PrepareConfig, records, tok):
    """The chat template conversations are rendered with (core.chat.resolve_template: --chat-template, else the
    tokenizer's own, refused in one line when it has none); None for Alpaca records, which refuse the options that
    apply to conversations only. Asked before anything is written."""
    if records.format == "alpaca":
        if cfg.chat_template is not None or cfg.train_on != "all":
            raise ConfigError(f"--chat-template and --train-on apply to conversations; --data {records.where} holds "
                              "Alpaca records (rendered with --prompts)", hint="leave them out, or pass conversations")
        return None
    if not cfg.mask_inputs:
        raise ConfigError("--no-mask-inputs applies to Alpaca records; conversations train their assistant turns",
                          hint="leave it out; --train-on last|all chooses which assistant turns")
    from alpaca_cli.core import chat

    return chat.resolve_template(tok, cfg.chat_template, prompts=cfg.prompts)


def _components(cfg: PrepareConfig, records, loaded, template) -> dict[str, Any]:
    """Everything the fingerprint covers, by name. Alpaca records' are what they always were (their runs keep their
    fingerprints); conversations' add the format, the template's text (its sha256: the manifest keeps the text) and
    which turns are trained."""
    common = {
        "format": CACHE_FORMAT,
        "data": {k: v for k, v in dataclasses.asdict(records.source).items() if v is not None},
    }
    if template is None:
        return {
            **common,
            "fields": [cfg.instruction_field, cfg.input_field, cfg.output_field],
            "prompts": cfgmod.encode(cfg.prompts),
            "tokenizer": loaded.fingerprint,
            "max_length": cfg.max_length,
            "on_overflow": cfg.on_overflow,
            "mask_inputs": cfg.mask_inputs,
        }
    return {
        **common,
        "records": records.format,
        "fields": [cfg.messages_field if records.format == "messages" else cfg.conversations_field],
        "chat_template": hashlib.sha256(template.text.encode()).hexdigest(),
        "train_on": cfg.train_on,
        "tokenizer": loaded.fingerprint,
        "max_length": cfg.max_length,
        "on_overflow": cfg.on_overflow,
    }


def _differences(old: dict, new: dict) -> str:
    names = {
        "records": "--format",
        "chat_template": "--chat-template",
        "train_on": "--train-on",
        "data": "data",
        "fields": "field names",
        "prompts": "prompt templates",
        "tokenizer": "tokenizer",
        "max_length": "--max-length",
        "on_overflow": "--on-overflow",
        "mask_inputs": "--mask-inputs",
        "format": "cache format",
    }
    diff = []
    for k in {**new, **old}:
        if old.get(k) != new.get(k):
            if k == "sources" and old.get(k) and new.get(k):
                diff += _source_differences(old[k], new[k])
            else:
                diff.append(names.get(k, k))
    return "differs in " + ", ".join(diff) if diff else "different fingerprint"


def _source_differences(old: list[dict], new: list[dict]) -> list[str]:
    """What differs between two mixtures' sources, by name: `sources[chat].weight (1.0 -> 2.0)`, or the sources
    themselves (added, removed, reordered)."""
    old_names, new_names = [s.get("name") for s in old], [s.get("name") for s in new]
    if old_names != new_names:
        return [f"sources ({', '.join(map(str, old_names))} -> {', '.join(map(str, new_names))})"]
    out = []
    for a, b in zip(old, new):
        for key in {**a, **b}:
            if a.get(key) != b.get(key):
                shown = f" ({a.get(key)} -> {b.get(key)})" if key in ("weight", "epochs", "val_fraction",
                                                                      "records", "train_on") else ""
                out.append(f"sources[{b['name']}].{key}{shown}")
    return out


def fill_run_cache(run: RunDir, loaded, progress: Progress, n: int, write):
    """The run's cache written from scratch by write(cache_dir, advance, metadata) (a killed earlier attempt may have
    left a partial one, without its ledger), then sealed, and the tokenizer saved beside it; returns what write
    returns."""
    from levanter.store.cache import CacheMetadata

    if run.writer:
        io.rm_tree(run.cache_dir)
        io.rm_tree(run.tokenizer_dir)
    metadata = CacheMetadata(preprocessor_metadata={"alpaca_fingerprint": run.prepare.fingerprint})
    progress.start("Tokenizing", n)
    try:
        out = write(run.cache_dir, progress.advance, metadata)
    finally:
        progress.stop()
    if run.writer:
        cachemod.seal_cache(run.cache_dir, run.prepare.fingerprint)
    io.upload_dir(loaded.local_dir, run.tokenizer_dir)
    return out


def _build(cfg: PrepareConfig, run: RunDir, records: Input, loaded, template, progress: Progress) -> dict:
    """The second pass: every chunk tokenized (Stanford's labels for Alpaca records, core.chat's for
    conversations) on the engine, in order into the run's cache; returns the statistics."""
    if template is not None and template.missing_tokens:
        logger.warning("The tokenizer has no token %s: the %s template's markers are tokenized as plain text",
                       " or ".join(template.missing_tokens), template.name)
    what = "records" if template is None else "conversations"
    t_tok = time.time()
    totals = fill_run_cache(run, loaded, progress, len(records), lambda cache_dir, advance, metadata: write_cache(
        cache_dir, tokenized_chunks(cfg, records, loaded, template), advance, metadata, what))
    stats = compute_stats(totals, loaded.tokenizer, loaded.added)
    stats.update(source_stats(cfg, records, template, totals, loaded.tokenizer))
    stats["seconds_tokenize_and_write"] = round(time.time() - t_tok, 3)
    return stats


def tokenized_chunks(cfg: PrepareConfig, records: Input, loaded, template) -> Iterator[parallel.ChunkResult]:
    """The second pass over one source: its chunks tokenized on its engine, results in order."""
    tok = loaded.tokenizer
    fast = False
    if template is None:
        fast, why = prefix_stable(tok)
        logger.debug("Prompt lengths %s (%s)", "from offsets" if fast else "by tokenizing prompts", why)
    job = parallel.Job(cfg, cfg.data, records.format, records.first_where, template.text if template else None,
                       fast, loaded.local_dir, loaded.fingerprint)
    if isinstance(records.engine, parallel.InProcess):
        records.engine.tok = tok
    return records.engine.map_ordered(parallel.tokenize_chunk, job, records.chunks(), cfg.data)


def source_stats(cfg: PrepareConfig, records: Input, template, totals: Totals, tok) -> dict[str, Any]:
    """What the table says of one source beyond compute_stats: records read, and the conversations' counts (or
    whether Alpaca prompts' lengths came from offsets)."""
    out: dict[str, Any] = {"records_read": len(records)}
    if template is not None:
        out.update(conversation_stats(totals.chat, records.format, template, cfg.train_on))
    else:
        out["fast_prompt_lengths"] = prefix_stable(tok)[0]
    return out


class Totals:
    """What the statistics need of every chunk's result, added in order. Memory: each example's length (4 bytes),
    and at most 1000 dropped examples."""

    def __init__(self):
        self.lengths: list[np.ndarray] = []
        self.records = self.examples = self.trained = 0
        self.truncated = self.truncated_tokens = self.prompts_tokenized_alone = self.special_text = 0
        self.dropped = {"too_long": 0, "no_trained_tokens": 0}
        self.dropped_examples: list[tuple[int, str]] = []
        self.chat = None

    _SUMMED = ("records", "trained", "truncated", "truncated_tokens", "prompts_tokenized_alone", "special_text")

    def add(self, r: parallel.ChunkResult) -> None:
        self.lengths.append(r.lengths)
        self._sum(r, len(r.lengths), r.dropped_examples)
        if r.chat is not None:
            self.chat = r.chat if self.chat is None else self.chat.merge(r.chat)

    def merge(self, other: Totals, label: str) -> None:
        """A mixture's source's totals added to the whole's (its dropped examples named `label:index`)."""
        self.lengths += other.lengths
        self._sum(other, other.examples, [(f"{label}:{i}", why) for i, why in other.dropped_examples])

    def _sum(self, other, examples: int, dropped_examples: list) -> None:
        for name in self._SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples += examples
        for k, n in other.dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + n
        self.dropped_examples.extend(dropped_examples[: 1000 - len(self.dropped_examples)])


def write_cache(cache_dir, results: Iterable[parallel.ChunkResult], advance, metadata, what: str) -> Totals:
    """Chunks' examples, in order, into Levanter's cache (one SerialCacheWriter: its ledger, which marks the cache
    complete, is written only when every row is in and nothing failed); returns their totals."""
    from levanter.store.cache import SerialCacheWriter

    with SerialCacheWriter(cache_dir, cachemod.EXEMPLAR, metadata=metadata) as writer:
        return write_results_into(writer, results, advance, what)


def write_results_into(writer, results: Iterable[parallel.ChunkResult], advance, what: str) -> Totals:
    """write_cache into an open SerialCacheWriter (a mixture writes its sources one after the other); DataError
    when no example is left."""
    from levanter.store.jagged_array import PreparedBatch

    totals = Totals()
    for r in results:
        totals.add(r)
        if len(r.lengths):
            # The chunk's rows as Levanter's own batch form (flat data, each row's end offset), given straight to
            # the writer's store: write_batch would cut them into one array per example, turn the batch into one
            # dict per example (canonicalize_batch, then a tree_map over all of them) and join them again; the
            # same bytes, written without that (it was the writer's largest cost: it bounds every core's rate).
            ends = np.cumsum(r.lengths, dtype=np.int64)
            rows = np.arange(1, len(r.lengths) + 1, dtype=np.int64)
            writer._tree_store.extend_with_batch({"input_ids": PreparedBatch(r.ids, ends, None),
                                                  "targets": PreparedBatch(r.targets, ends, None),
                                                  "source_index": PreparedBatch(r.source_index, rows, None)})
        if advance is not None:
            advance(r.records)
    if not totals.examples:
        raise DataError(
            f"no example is left to train on: all {totals.records} {what} were dropped "
            f"({_reason_text(totals.dropped)})",
            hint="raise --max-length or use --on-overflow truncate",
        )
    return totals


def conversation_stats(chat_stats, fmt: str, template, train_on: str) -> dict[str, Any]:
    """What the prepare table reports of conversations beside the common statistics."""
    return {
        "format": fmt,
        "chat_template": template.name,
        "train_on": train_on,
        "conversations": chat_stats.conversations,
        "turns": chat_stats.messages,
        "roles": {r: chat_stats.roles.get(r, 0) for r in ("system", "user", "assistant", "tool")},
        "assistant_turns": chat_stats.assistant_turns,
        "trained_turns": chat_stats.trained_turns,
        "split_conversations": chat_stats.split_conversations,
        "cut_in_turn": chat_stats.cut_in_turn,
        "turns_beyond_limit": chat_stats.turns_beyond_limit,
    }


def prepare_validation(run: RunDir, data: str) -> str:
    """A held-out file prepared exactly like the run's training data (its tokenizer, templates, max length and
    mask; for conversations, the chat template's text the run recorded and --train-on), into
    RUN/data/val/<fingerprint>/. Reused when it is already there. Returns the cache directory. In a mixture,
    `FILE,source=NAME` prepares it like source NAME (default: _validation_config's choice)."""
    from levanter.store.cache import CacheMetadata

    prepared = run.require_prepare()
    data, _, source = data.partition(",source=")  # a mixture's held-out data: FILE,source=NAME
    pcfg, records, template_text, fmt, named = _validation_config(prepared, data, source or None)
    identity = {"val": dataclasses.asdict(records.source), "prepared": prepared.fingerprint}
    fingerprint = fingerprint_inputs({**identity, "source": named} if named else identity)
    cache_dir = run.val_cache_dir(fingerprint)
    if cachemod.problem(cache_dir, fingerprint) is None:
        return cache_dir
    if (records.format == "alpaca") != (fmt == "alpaca"):
        raise DataError(f"{data} holds {records.format} records, but the run was prepared from {fmt} "
                        "ones", hint="give held-out data in the training data's format")
    tok = run.load_tokenizer()
    io.rm_tree(cache_dir)
    metadata = CacheMetadata(preprocessor_metadata={"alpaca_fingerprint": fingerprint})
    alpaca = records.format == "alpaca"
    job = parallel.Job(pcfg, data, records.format, None, None if alpaca else template_text,
                       prefix_stable(tok)[0] if alpaca else False)  # the template exactly as the training data used
    results = parallel.InProcess(tok).map_ordered(parallel.tokenize_chunk, job, parallel.record_chunks(records), data)
    totals = write_cache(cache_dir, results, None, metadata, "records" if alpaca else "conversations")
    cachemod.seal_cache(cache_dir, fingerprint)
    logger.info("Prepared %d held-out examples from %s", totals.examples, data)
    return cache_dir


def _validation_config(prepared, data: str, source: str | None):
    """(config, records, chat template text, format, source name or None) for held-out data: the run's settings,
    or in a mixture the named source's (default: the first source whose records are of the held-out data's kind,
    Alpaca or conversations), with the prompts and template exactly as it was prepared with."""
    if not prepared.sources:
        if source is not None:
            raise ConfigError(f"--val-data {data},source={source}: the run was prepared from one source",
                              hint=f"give --val-data {data}")
        pcfg = dataclasses.replace(prepared.config, data=data)
        return pcfg, load_records(pcfg), prepared.chat_template, prepared.format, None
    import draccus

    from alpaca_cli.config import PromptTemplates

    resolved = {r.name: r for r in prepared.config.resolved_sources()}
    if source is not None and source not in resolved:
        raise ConfigError(f"--val-data {data},source={source}: the run has no source {source}",
                          hint="one of " + ", ".join(resolved))
    by_name = {s.name: (s, c) for s, c in zip(prepared.sources, prepared.inputs.components["sources"])}
    names = [source] if source is not None else list(by_name)
    first_error = None
    for name in names:
        record, components = by_name[name]
        pcfg = dataclasses.replace(resolved[name].cfg, data=data)
        if "prompts" in components:
            pcfg = dataclasses.replace(pcfg, prompts=draccus.decode(PromptTemplates, components["prompts"]))
        try:
            records = load_records(pcfg)
        except DataError as e:  # not this source's kind of records (its format named): try the next
            first_error = first_error or e
            continue
        if (records.format == "alpaca") == (record.format == "alpaca") or name == names[-1]:
            return pcfg, records, record.chat_template, record.format, name
    raise first_error


def _reason_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in dropped.items() if n) or "none"


def compute_stats(totals: Totals, tok, added: dict[str, str]) -> dict[str, Any]:
    """The statistics of a prepared cache, from its chunks' totals."""
    from levanter.data.packing import pack_documents

    lengths = np.concatenate(totals.lengths).astype(np.int64)
    total = int(lengths.sum())
    pct = np.percentile(lengths, [50, 90, 99]).tolist()
    packed_rows = len(pack_documents(lengths, PACK_ROW, slice_strategy="right"))
    padded_rows = int(np.sum(np.ceil(lengths / PACK_ROW)))
    trained = totals.trained

    return {
        "examples": int(len(lengths)),
        "truncated": totals.truncated,
        "truncated_tokens": totals.truncated_tokens,
        "dropped": dict(totals.dropped),
        "dropped_examples": [[i, r] for i, r in totals.dropped_examples[:1000]],
        "tokens": total,
        "trained_tokens": trained,
        "trained_fraction": round(trained / total, 6) if total else 0.0,
        "length": {
            "mean": round(float(lengths.mean()), 2),
            "p50": pct[0],
            "p90": pct[1],
            "p99": pct[2],
            "max": int(lengths.max()),
        },
        "rows_2048_packed": packed_rows,
        "rows_2048_padded": padded_rows,
        "records_with_special_token_text": totals.special_text,
        "prompts_tokenized_alone": totals.prompts_tokenized_alone,
        "vocab_size": len(tok),
        "added_tokens": added,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
