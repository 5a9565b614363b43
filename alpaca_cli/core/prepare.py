"""`alpaca prepare`: records -> Alpaca prompts -> Stanford labels -> a Levanter token cache in the run directory."""

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
from alpaca_cli.errors import DataError, StageError
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

    # Everything that can be wrong with the inputs is found before anything is written.
    promptsmod.validate(cfg.prompts)
    records = load_records(cfg)
    loaded = load_tokenizer(cfg.tokenizer)
    try:
        components = {
            "format": CACHE_FORMAT,
            "data": {k: v for k, v in dataclasses.asdict(records.source).items() if v is not None},
            "fields": [cfg.instruction_field, cfg.input_field, cfg.output_field],
            "prompts": cfgmod.encode(cfg.prompts),
            "tokenizer": loaded.fingerprint,
            "max_length": cfg.max_length,
            "on_overflow": cfg.on_overflow,
            "mask_inputs": cfg.mask_inputs,
        }
        fingerprint = fingerprint_inputs(components)

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

        record = PrepareRecord(
            config=cfg,
            inputs=PrepareInputs(data=records.source, tokenizer=cfg.tokenizer, components=components),
            fingerprint=fingerprint,
        )
        with run.stage("prepare", record):
            run.write_config("prepare", cfgmod.dump(cfg))
            stats = _build(cfg, run, records, loaded, progress)
            stats["seconds"] = round(time.time() - t0, 3)
            io.write_text_atomic(run.stats_path, json.dumps(stats, indent=2) + "\n")
            record.summary = PrepareSummary(
                **{k: stats[k] for k in ("records_read", "examples", "truncated", "dropped", "tokens",
                                        "trained_tokens", "vocab_size", "added_tokens")}
            )
        return PrepareResult(False, stats, fingerprint)
    finally:
        shutil.rmtree(loaded.local_dir, ignore_errors=True)


def _differences(old: dict, new: dict) -> str:
    names = {
        "data": "data",
        "fields": "field names",
        "prompts": "prompt templates",
        "tokenizer": "tokenizer",
        "max_length": "--max-length",
        "on_overflow": "--on-overflow",
        "mask_inputs": "--mask-inputs",
        "format": "cache format",
    }
    diff = [names.get(k, k) for k in new if old.get(k) != new.get(k)]
    return "differs in " + ", ".join(diff) if diff else "different fingerprint"


def _build(cfg: PrepareConfig, run: RunDir, records, loaded, progress: Progress) -> dict[str, Any]:
    from levanter.store.cache import CacheMetadata

    tok = loaded.tokenizer
    t_tok = time.time()
    prompts = [
        promptsmod.render(cfg.prompts, ins, inp) for ins, inp in zip(records.instructions, records.inputs)
    ]
    fast, why = prefix_stable(tok)
    logger.debug("Prompt lengths %s (%s)", "from offsets" if fast else "by tokenizing prompts", why)

    # The cache is rewritten from scratch: a killed earlier attempt may have left a partial one (no ledger).
    if run.writer:
        io.rm_tree(run.cache_dir)
        io.rm_tree(run.tokenizer_dir)
    metadata = CacheMetadata(preprocessor_metadata={"alpaca_fingerprint": run.prepare.fingerprint})
    progress.start("Tokenizing", len(prompts))
    try:
        tokenized = write_cache(run.cache_dir, prompts, records.outputs, tok, cfg, fast, progress.advance, metadata)
    finally:
        progress.stop()
    if run.writer:
        cachemod.seal_cache(run.cache_dir, run.prepare.fingerprint)
    seconds_tokenize = time.time() - t_tok

    io.upload_dir(loaded.local_dir, run.tokenizer_dir)
    stats = compute_stats(tokenized, prompts, records.outputs, tok, loaded.added)
    stats["records_read"] = len(records)
    stats["fast_prompt_lengths"] = fast
    stats["seconds_tokenize_and_write"] = round(seconds_tokenize, 3)
    return stats


def write_cache(cache_dir, prompts, outputs, tok, cfg: PrepareConfig, fast: bool, advance, metadata) -> Tokenized:
    """Tokenize in chunks and write Levanter's cache (SerialCacheWriter: in-process, no Ray). The ledger that
    marks the cache complete is written only when every row is in."""
    from levanter.store.cache import SerialCacheWriter

    chunk = 8192
    tokenized = Tokenized()
    with SerialCacheWriter(cache_dir, cachemod.EXEMPLAR, metadata=metadata) as writer:
        for start in range(0, len(prompts), chunk):
            before = len(tokenized.input_ids)
            tokenize_examples(
                tok,
                prompts[start : start + chunk],
                outputs[start : start + chunk],
                max_length=cfg.max_length,
                on_overflow=cfg.on_overflow,
                mask_inputs=cfg.mask_inputs,
                fast_path=fast,
                progress=advance,
                source_offset=start,
                into=tokenized,
            )
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
                f"no example is left to train on: all {len(prompts)} records were dropped "
                f"({_reason_text(tokenized.dropped)})",
                hint="raise --max-length or use --on-overflow truncate",
            )
    return tokenized


def prepare_validation(run: RunDir, data: str) -> str:
    """A held-out file prepared exactly like the run's training data (its tokenizer, templates, max length and
    mask), into RUN/data/val/<fingerprint>/. Reused when it is already there. Returns the cache directory."""
    from levanter.store.cache import CacheMetadata

    prepared = run.require_prepare()
    pcfg = dataclasses.replace(prepared.config, data=data)
    records = load_records(pcfg)
    fingerprint = fingerprint_inputs({"val": dataclasses.asdict(records.source), "prepared": prepared.fingerprint})
    cache_dir = run.val_cache_dir(fingerprint)
    if cachemod.problem(cache_dir, fingerprint) is None:
        return cache_dir
    tok = run.load_tokenizer()
    prompts = [promptsmod.render(pcfg.prompts, a, b) for a, b in zip(records.instructions, records.inputs)]
    io.rm_tree(cache_dir)
    metadata = CacheMetadata(preprocessor_metadata={"alpaca_fingerprint": fingerprint})
    tokenized = write_cache(cache_dir, prompts, records.outputs, tok, pcfg, prefix_stable(tok)[0], None, metadata)
    cachemod.seal_cache(cache_dir, fingerprint)
    logger.info("Prepared %d held-out examples from %s", len(tokenized.input_ids), data)
    return cache_dir


def _reason_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in dropped.items() if n) or "none"


def compute_stats(tokenized, prompts, outputs, tok, added: dict[str, str]) -> dict[str, Any]:
    from levanter.data.packing import pack_documents

    lengths = np.array([len(x) for x in tokenized.input_ids], dtype=np.int64)
    # every target but position 0's (never predicted)
    trained = int(np.concatenate(tokenized.targets).sum(dtype=np.int64)) - sum(int(t[0]) for t in tokenized.targets)
    total = int(lengths.sum())
    pct = np.percentile(lengths, [50, 90, 99]).tolist()
    packed_rows = len(pack_documents(lengths, PACK_ROW, slice_strategy="right"))
    padded_rows = int(np.sum(np.ceil(lengths / PACK_ROW)))

    specials = [s for s in tok.all_special_tokens if s]
    special_text = sum(1 for p, o in zip(prompts, outputs) if any(s in p or s in o for s in specials))

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
