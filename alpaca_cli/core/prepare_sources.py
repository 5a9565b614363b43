"""`alpaca prepare` of a mixture: several sources, each with its own format, fields, template and weight (or
epochs, or held-out fraction), tokenized into ONE cache, the sources back to back in config order and each in its
record order. The record keeps each source's rows [start, stop), so every example's source is known without a new
cache field; train samples the mixture (core/plan.py, mixture_stream).

The weights are in the fingerprint: a changed weight is a different preparation, and the stale-cache refusal names
it (`sources[chat].weight (1.0 -> 2.0)`). A plain --data (no `SPEC,key=value`, no `data:` list) never comes here:
it is the single-source prepare (core/prepare.py), fingerprint and cache unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from alpaca_cli import config as cfgmod
from alpaca_cli.config import PrepareConfig, ResolvedSource
from alpaca_cli.core import cache as cachemod
from alpaca_cli.core import prompts as promptsmod
from alpaca_cli.core import parallel
from alpaca_cli.core.plan import mixture_weights
from alpaca_cli.core.prepare import (CACHE_FORMAT, Input, PrepareResult, Progress, Totals, chat_template,
                                     compute_stats, fill_run_cache, fingerprint_inputs, prepare_stage, ray_cluster,
                                     read_input, reuse_or_refuse, source_stats, tokenized_chunks, write_results_into)
from alpaca_cli.core.tokenize import load_tokenizer
from alpaca_cli.records import PrepareInputs, PrepareRecord, SourceRecord
from alpaca_cli.rundir import RunDir

logger = logging.getLogger(__name__)


@dataclass
class SourceInput:
    """One source after the first pass (read and checked, nothing written yet)."""

    source: ResolvedSource
    cfg: PrepareConfig
    """The source's full config (its prompts read)."""
    records: Input
    template: Any  # core.chat template, or None for Alpaca records


def prepare_sources(cfg: PrepareConfig, run: RunDir, *, overwrite: bool = False,
                    progress: Progress | None = None) -> PrepareResult:
    """core.prepare.prepare for a config with sources: read every source (every problem found before anything is
    written; the sources share one pool of worker processes), fingerprint the mixture, reuse or refuse as prepare
    does, then write one cache."""
    t0 = time.time()
    progress = progress or Progress()
    pool = ray_cluster(cfg) or parallel.ProcessPool(
        parallel.available_cores() if cfg.workers is None else max(1, cfg.workers))
    loaded = None
    try:
        loaded = load_tokenizer(cfg.tokenizer)
        inputs = []
        for s in cfg.resolved_sources():
            inputs.append(read_source(s, loaded.tokenizer, pool))
        components = mixture_components(cfg, inputs, loaded)
        fingerprint = fingerprint_inputs(components)
        reused = reuse_or_refuse(run, fingerprint, components, overwrite)
        if reused is not None:
            return reused
        chats = [i for i in inputs if i.template is not None]
        if len({i.template.text for i in chats}) > 1:
            logger.warning("The conversation sources use different chat templates; export and generate use the "
                           "first one's (%s)", chats[0].source.name)
        record = PrepareRecord(
            config=cfg,
            inputs=PrepareInputs(data=inputs[0].records.source, tokenizer=cfg.tokenizer, components=components),
            fingerprint=fingerprint,
            format=chats[0].records.format if chats else "alpaca",
            chat_template=chats[0].template.text if chats else None,
        )

        def build() -> dict[str, Any]:
            stats, record.sources = _build_sources(run, inputs, loaded, progress)
            return stats

        return PrepareResult(False, prepare_stage(run, cfg, record, t0, build), fingerprint)
    finally:
        pool.close()
        if loaded is not None:
            shutil.rmtree(loaded.local_dir, ignore_errors=True)


def read_source(source: ResolvedSource, tok, pool: parallel.ProcessPool) -> SourceInput:
    """A source's first pass and chat template, checked as a single-source prepare checks its --data."""
    cfg = source.cfg
    if source.prompts_file:
        cfg = dataclasses.replace(cfg, prompts=promptsmod.load_prompts_file(source.prompts_file))
    promptsmod.validate(cfg.prompts)
    records = read_input(cfg, pool)
    template = chat_template(cfg, records, tok)
    if template is not None and template.missing_tokens:
        logger.warning("Source %s: the tokenizer has no token %s: the %s template's markers are tokenized as plain "
                       "text", source.name, " or ".join(template.missing_tokens), template.name)
    return SourceInput(source, cfg, records, template)


def mixture_components(cfg: PrepareConfig, inputs: list[SourceInput], loaded) -> dict[str, Any]:
    """Everything a mixture's fingerprint covers: the shared settings, and per source (by name) its data, format,
    fields, prompts or chat template (sha256), trained turns, weight, epochs and held-out fraction."""
    sources = []
    for i in inputs:
        c, fmt = i.cfg, i.records.format
        entry: dict[str, Any] = {
            "name": i.source.name,
            "data": {k: v for k, v in dataclasses.asdict(i.records.source).items() if v is not None},
            "records": fmt,
            "weight": i.source.weight,
            "epochs": i.source.epochs,
            "val_fraction": i.source.val_fraction,
        }
        if i.template is None:
            entry["fields"] = [c.instruction_field, c.input_field, c.output_field]
            entry["prompts"] = cfgmod.encode(c.prompts)
        else:
            entry["fields"] = [c.messages_field if fmt == "messages" else c.conversations_field]
            entry["chat_template"] = hashlib.sha256(i.template.text.encode()).hexdigest()
            entry["train_on"] = c.train_on
        sources.append(entry)
    return {
        "format": CACHE_FORMAT,
        "tokenizer": loaded.fingerprint,
        "max_length": cfg.max_length,
        "on_overflow": cfg.on_overflow,
        "mask_inputs": cfg.mask_inputs,
        "sources": sources,
    }


def _build_sources(run: RunDir, inputs: list[SourceInput], loaded, progress: Progress):
    """Every source tokenized, in order, into the run's one cache; (stats, the sources' records)."""
    from levanter.store.cache import SerialCacheWriter

    t_tok = time.time()
    total = sum(len(i.records) for i in inputs)

    def write(cache_dir, advance, metadata) -> list[Totals]:
        with SerialCacheWriter(cache_dir, cachemod.EXEMPLAR, metadata=metadata) as writer:
            return [write_results_into(writer, tokenized_chunks(i.cfg, i.records, loaded, i.template), advance,
                                       f"{'records' if i.template is None else 'conversations'} of source "
                                       f"{i.source.name}") for i in inputs]

    results = fill_run_cache(run, loaded, progress, total, write)
    stats = _mixture_stats(inputs, results, loaded)
    stats["seconds_tokenize_and_write"] = round(time.time() - t_tok, 3)
    start, records = 0, []
    for i, totals, s in zip(inputs, results, stats["sources"]):
        stop = start + totals.examples
        records.append(SourceRecord(
            name=i.source.name, data=i.records.source, where=i.cfg.data, format=i.records.format,
            chat_template=i.template.text if i.template is not None else None, weight=i.source.weight,
            epochs=i.source.epochs, val_fraction=i.source.val_fraction, rows=[start, stop],
            records_read=len(i.records), examples=s["examples"], tokens=s["tokens"],
            trained_tokens=s["trained_tokens"]))
        start = stop
    return stats, records


def _mixture_stats(inputs: list[SourceInput], results: list[Totals], loaded) -> dict[str, Any]:
    """compute_stats over the whole cache (dropped_examples named `source:index`), plus `sources`: each source's
    own statistics and its share of the examples and trained tokens the weights ask for (before held-out data)."""
    tok, merged, per_source = loaded.tokenizer, Totals(), []
    for i, totals in zip(inputs, results):
        s = compute_stats(totals, tok, loaded.added)
        s.update(source_stats(i.cfg, i.records, i.template, totals, tok))
        s.update(name=i.source.name, format=i.records.format, weight=i.source.weight, epochs=i.source.epochs,
                 val_fraction=i.source.val_fraction)
        per_source.append(s)
        merged.merge(totals, i.source.name)
    stats = compute_stats(merged, tok, loaded.added)
    shares(per_source)
    stats.update(format="mixture", records_read=merged.records, sources=per_source)
    return stats


def shares(per_source: list[dict]) -> None:
    """Each source's share_examples (its normalised weight) and share_trained (weight x mean trained tokens per
    example, normalised): what the mixture asks for, before held-out data."""
    w, _ = mixture_weights([s["examples"] for s in per_source], [s["weight"] for s in per_source],
                           [s["epochs"] for s in per_source])
    mean_trained = np.asarray([s["trained_tokens"] / max(1, s["examples"]) for s in per_source])
    trained = w * mean_trained
    for s, share, t in zip(per_source, w, trained / trained.sum()):
        s["share_examples"] = round(float(share), 6)
        s["share_trained"] = round(float(t), 6)
