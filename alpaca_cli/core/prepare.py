"""`alpaca prepare`: records -> Alpaca prompts -> Stanford labels -> a Levanter token cache in the run directory;
or conversations -> the chat template's rendering -> assistant-only labels (core.chat) -> the same cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from alpaca_cli import config as cfgmod
from alpaca_cli import io
from alpaca_cli.config import PrepareConfig
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core import prompts as promptsmod
from alpaca_cli.core.data import load_records
from alpaca_cli.core.tokenize import Tokenized, load_tokenizer, prefix_stable, tokenize_examples
from alpaca_cli.errors import ConfigError, DataError, StageError
from alpaca_cli.records import PrepareInputs, PrepareRecord, PrepareSummary
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
    records = load_records(cfg)
    loaded = load_tokenizer(cfg.tokenizer)
    try:
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
        with run.stage("prepare", record):
            run.write_config("prepare", cfgmod.dump(cfg))
            if template is None:
                stats = _build(cfg, run, records, loaded, progress)
            else:
                stats = _build_conversations(cfg, run, records, loaded, template, progress)
            stats["seconds"] = round(time.time() - t0, 3)
            io.write_text_atomic(run.stats_path, json.dumps(stats, indent=2) + "\n")
            record.summary = PrepareSummary(
                **{k: stats[k] for k in ("records_read", "examples", "truncated", "dropped", "tokens",
                                        "trained_tokens", "vocab_size", "added_tokens")}
            )
        return PrepareResult(False, stats, fingerprint)
    finally:
        shutil.rmtree(loaded.local_dir, ignore_errors=True)


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


def _build(cfg: PrepareConfig, run: RunDir, records, loaded, progress: Progress) -> dict[str, Any]:
    tok = loaded.tokenizer
    t_tok = time.time()
    prompts = [
        promptsmod.render(cfg.prompts, ins, inp) for ins, inp in zip(records.instructions, records.inputs)
    ]
    fast, why = prefix_stable(tok)
    logger.debug("Prompt lengths %s (%s)", "from offsets" if fast else "by tokenizing prompts", why)

    tokenized = fill_run_cache(run, loaded, progress, len(prompts), lambda cache_dir, advance, metadata: write_cache(
        cache_dir, prompts, records.outputs, tok, cfg, fast, advance, metadata))
    seconds_tokenize = time.time() - t_tok
    stats = compute_stats(tokenized, zip(prompts, records.outputs), tok, loaded.added)
    stats["records_read"] = len(records)
    stats["fast_prompt_lengths"] = fast
    stats["seconds_tokenize_and_write"] = round(seconds_tokenize, 3)
    return stats


def write_cache(cache_dir, prompts, outputs, tok, cfg: PrepareConfig, fast: bool, advance, metadata) -> Tokenized:
    """Alpaca records (prompts and outputs) tokenized with Stanford's labels into Levanter's cache (_write_rows)."""

    def chunk(start: int, stop: int, into: Tokenized) -> None:
        tokenize_examples(tok, prompts[start:stop], outputs[start:stop], max_length=cfg.max_length,
                          on_overflow=cfg.on_overflow, mask_inputs=cfg.mask_inputs, fast_path=fast, progress=advance,
                          source_offset=start, into=into)

    return _write_rows(cache_dir, len(prompts), "records", chunk, metadata)


def _write_rows(cache_dir, n: int, what: str, tokenize_chunk, metadata) -> Tokenized:
    """Tokenize n records in chunks (tokenize_chunk(start, stop, into) appends their examples) and write Levanter's
    cache (SerialCacheWriter: in-process, no Ray). The ledger that marks the cache complete is written only when
    every row is in."""
    from levanter.store.cache import SerialCacheWriter

    with SerialCacheWriter(cache_dir, cachemod.EXEMPLAR, metadata=metadata) as writer:
        return write_rows_into(writer, n, what, tokenize_chunk)


def write_rows_into(writer, n: int, what: str, tokenize_chunk, tokenized: Tokenized | None = None) -> Tokenized:
    """_write_rows into an open SerialCacheWriter (a mixture writes its sources one after the other). DataError
    when no example is left."""
    chunk = 8192
    tokenized = tokenized if tokenized is not None else Tokenized()
    for start in range(0, n, chunk):
        before = len(tokenized.input_ids)
        tokenize_chunk(start, min(start + chunk, n), tokenized)
        new = slice(before, len(tokenized.input_ids))
        if new.stop > new.start:
            writer.write_batch(
                {
                    "input_ids": tokenized.input_ids[new],
                    "targets": tokenized.targets[new],
                    "source_index": [np.atleast_1d(np.int64(i)) for i in tokenized.source_index[new]],
                }
            )
    if not tokenized.input_ids:
        raise DataError(
            f"no example is left to train on: all {n} {what} were dropped ({_reason_text(tokenized.dropped)})",
            hint="raise --max-length or use --on-overflow truncate",
        )
    return tokenized


def _build_conversations(cfg: PrepareConfig, run: RunDir, records, loaded, template, progress: Progress) -> dict:
    """The conversation path of _build: the same cache (input_ids, targets, source_index), labels by core.chat."""
    tok = loaded.tokenizer
    if template.missing_tokens:
        logger.warning("The tokenizer has no token %s: the %s template's markers are tokenized as plain text",
                       " or ".join(template.missing_tokens), template.name)
    t_tok = time.time()
    tokenized, chat_stats = fill_run_cache(
        run, loaded, progress, len(records), lambda cache_dir, advance, metadata: write_conversation_cache(
            cache_dir, records.conversations, tok, template.text, cfg, advance, metadata))
    seconds_tokenize = time.time() - t_tok
    texts = ([m["content"] for m in conversation] for conversation in records.conversations)
    stats = compute_stats(tokenized, texts, tok, loaded.added)
    stats.update(conversation_stats(chat_stats, records.format, template, cfg.train_on))
    stats["records_read"] = len(records)
    stats["seconds_tokenize_and_write"] = round(seconds_tokenize, 3)
    return stats


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


def write_conversation_cache(cache_dir, conversations, tok, template_text: str, cfg: PrepareConfig, advance,
                             metadata):
    """Conversations tokenized with assistant-only labels (core.chat.tokenize_conversations) into Levanter's cache
    (_write_rows); returns (Tokenized, core.chat.ChatStats)."""
    from alpaca_cli.core import chat

    totals = chat.ChatStats()

    def chunk(start: int, stop: int, into: Tokenized) -> None:
        chat.tokenize_conversations(tok, template_text, conversations[start:stop], max_length=cfg.max_length,
                                    on_overflow=cfg.on_overflow, train_on=cfg.train_on, source_offset=start,
                                    into=into, progress=advance, stats=totals)

    return _write_rows(cache_dir, len(conversations), "conversations", chunk, metadata), totals


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
    if records.format != "alpaca":  # the template exactly as the training data used it
        tokenized, _ = write_conversation_cache(cache_dir, records.conversations, tok, template_text, pcfg,
                                                None, metadata)
    else:
        prompts = [promptsmod.render(pcfg.prompts, a, b) for a, b in zip(records.instructions, records.inputs)]
        tokenized = write_cache(cache_dir, prompts, records.outputs, tok, pcfg, prefix_stable(tok)[0], None, metadata)
    cachemod.seal_cache(cache_dir, fingerprint)
    logger.info("Prepared %d held-out examples from %s", len(tokenized.input_ids), data)
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
    for name in names:
        record, components = by_name[name]
        pcfg = dataclasses.replace(resolved[name].cfg, data=data)
        if "prompts" in components:
            pcfg = dataclasses.replace(pcfg, prompts=draccus.decode(PromptTemplates, components["prompts"]))
        records = load_records(pcfg)
        if (records.format == "alpaca") == (record.format == "alpaca") or name == names[-1]:
            return pcfg, records, record.chat_template, record.format, name
    raise AssertionError("unreachable")


def _reason_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in dropped.items() if n) or "none"


def compute_stats(tokenized, texts, tok, added: dict[str, str]) -> dict[str, Any]:
    """The statistics of a prepared cache. texts: each record's strings (prompt and output, or the messages'
    contents), to count records whose text holds a special token's string."""
    from levanter.data.packing import pack_documents

    lengths = np.array([len(x) for x in tokenized.input_ids], dtype=np.int64)
    # every target but position 0's (never predicted)
    trained = int(np.concatenate(tokenized.targets).sum(dtype=np.int64)) - sum(int(t[0]) for t in tokenized.targets)
    total = int(lengths.sum())
    pct = np.percentile(lengths, [50, 90, 99]).tolist()
    packed_rows = len(pack_documents(lengths, PACK_ROW, slice_strategy="right"))
    padded_rows = int(np.sum(np.ceil(lengths / PACK_ROW)))

    specials = [s for s in tok.all_special_tokens if s]
    special_text = sum(1 for parts in texts if any(s in part for s in specials for part in parts))

    return {
        "examples": int(len(lengths)),
        "truncated": tokenized.truncated,
        "truncated_tokens": tokenized.truncated_tokens,
        "dropped": dict(tokenized.dropped),
        "dropped_examples": [[i, r] for i, r in tokenized.dropped_examples[:1000]],
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
        "records_with_special_token_text": special_text,
        "prompts_tokenized_alone": tokenized.prompts_tokenized_alone,
        "vocab_size": len(tok),
        "added_tokens": added,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
