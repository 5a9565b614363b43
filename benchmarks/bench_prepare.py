#!/usr/bin/env python
"""Benchmark `alpaca prepare` against a plain tokenizer pass, Stanford Alpaca's preprocessing and Levanter's
tutorial (examples/alpaca/alpaca.py) on the same ~52k Alpaca records and the same tokenizer.

Run by hand, never by tests:

    python benchmarks/bench_prepare.py                      # 52,000 records, all four methods
    python benchmarks/bench_prepare.py --records 2000       # a quick run
    python benchmarks/bench_prepare.py --skip-levanter      # no Ray

See benchmarks/README.md for what each column means. Speed is measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Sequence

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "alpaca_en_demo.json"))
DEFAULT_TOKENIZER = os.path.normpath(os.path.join(REPO, "..", "shared", "tokenizers", "llama-sp-32k"))


# -- inputs -----------------------------------------------------------------------------------------------------------


def load_source(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def write_repeated_jsonl(records: list[dict], n: int, path: str) -> None:
    """records repeated (in order, cycling) until there are n, one JSON object a line."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(records[i % len(records)], ensure_ascii=False))
            f.write("\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- method 2: the floor ----------------------------------------------------------------------------------------------


def render_prompts(records: list[dict]) -> list[str]:
    """The Stanford templates from alpaca_cli.config, input template when input != "" (as Stanford)."""
    from alpaca_cli.config import STANFORD_PROMPT_INPUT, STANFORD_PROMPT_NO_INPUT

    return [
        STANFORD_PROMPT_INPUT.format_map(ex) if ex.get("input", "") != "" else STANFORD_PROMPT_NO_INPUT.format_map(ex)
        for ex in records
    ]


def floor_pass(tok, records: list[dict], offsets: bool = False) -> int:
    """One batched fast-tokenizer pass over prompt + output + eos: the least any preparation can do.

    offsets=True asks for the offsets too (what alpaca prepare's one pass asks for): a diagnostic row, not the floor.
    """
    prompts = render_prompts(records)
    texts = [p + ex["output"] + tok.eos_token for p, ex in zip(prompts, records)]
    if offsets:
        enc = tok(texts, return_attention_mask=False, return_offsets_mapping=True)
    else:
        enc = tok(texts, return_attention_mask=False)
    return sum(len(ids) for ids in enc["input_ids"])


# -- method 3: Stanford Alpaca ----------------------------------------------------------------------------------------
# Copied from tatsu-lab/stanford_alpaca, train.py (commit c8ea92b1c360269f787036fb3746b9e2dea120e5): IGNORE_INDEX,
# PROMPT_DICT, _tokenize_fn, preprocess and the formatting done in SupervisedDataset.__init__. Only the data loading
# (utils.jload of a JSON file) is replaced by the records already read, and the tokenizer is passed in.
# Copyright 2023 Rohan Taori, Ishaan Gulrajani, Tianyi Zhang, Yann Dubois, Xuechen Li; Apache License 2.0.

IGNORE_INDEX = -100
DEFAULT_PAD_TOKEN = "[PAD]"
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def _tokenize_fn(strings: Sequence[str], tokenizer) -> Dict:
    """Tokenize a list of strings."""
    tokenized_list = [
        tokenizer(
            text,
            return_tensors="pt",
            padding="longest",
            max_length=tokenizer.model_max_length,
            truncation=True,
        )
        for text in strings
    ]
    input_ids = labels = [tokenized.input_ids[0] for tokenized in tokenized_list]
    input_ids_lens = labels_lens = [
        tokenized.input_ids.ne(tokenizer.pad_token_id).sum().item() for tokenized in tokenized_list
    ]
    return dict(
        input_ids=input_ids,
        labels=labels,
        input_ids_lens=input_ids_lens,
        labels_lens=labels_lens,
    )


def preprocess(sources: Sequence[str], targets: Sequence[str], tokenizer) -> Dict:
    """Preprocess the data by tokenizing."""
    examples = [s + t for s, t in zip(sources, targets)]
    examples_tokenized, sources_tokenized = [_tokenize_fn(strings, tokenizer) for strings in (examples, sources)]
    input_ids = examples_tokenized["input_ids"]
    labels = copy.deepcopy(input_ids)
    for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
        label[:source_len] = IGNORE_INDEX
    return dict(input_ids=input_ids, labels=labels)


def stanford_dataset(list_data_dict: list[dict], tokenizer) -> Dict:
    """SupervisedDataset.__init__ minus the file read."""
    prompt_input, prompt_no_input = PROMPT_DICT["prompt_input"], PROMPT_DICT["prompt_no_input"]
    sources = [
        prompt_input.format_map(example) if example.get("input", "") != "" else prompt_no_input.format_map(example)
        for example in list_data_dict
    ]
    targets = [f"{example['output']}{tokenizer.eos_token}" for example in list_data_dict]
    return preprocess(sources, targets, tokenizer)


def stanford_tokenizer(path: str, *, use_fast: bool = True, model_max_length: int = 512):
    """train.py's tokenizer set-up (Stanford passes use_fast=False; the benchmark's default compares the same fast
    tokenizer everywhere) plus the [PAD] token it adds when the tokenizer has none."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, model_max_length=model_max_length, padding_side="right", use_fast=use_fast
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens(dict(pad_token=DEFAULT_PAD_TOKEN))  # smart_tokenizer_and_embedding_resize
    return tokenizer


# -- method 4: Levanter's tutorial ------------------------------------------------------------------------------------
# The preprocessing of stanford-crfm/levanter examples/alpaca/alpaca.py (mk_dataset, up to build_or_load_cache), with
# its DEFAULT_PROMPT_DICT (byte-identical to Stanford's) and its tokenizer set-up (model_max_length=max_tune_length,
# 2048 by default; padding_side="right"; add_special_tokens adds [PAD]). Copyright 2025 The Levanter Authors,
# Apache-2.0.


def tutorial_tokenizer(path: str, max_tune_length: int = 2048):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, model_max_length=max_tune_length, padding_side="right"
    )
    special_tokens_dict = {}
    if tokenizer.pad_token is None:
        special_tokens_dict["pad_token"] = "[PAD]"
    if tokenizer.eos_token is None:
        special_tokens_dict["eos_token"] = "</s>"
    if tokenizer.bos_token is None:
        special_tokens_dict["bos_token"] = "<s>"
    if tokenizer.unk_token is None:
        special_tokens_dict["unk_token"] = "<unk>"
    tokenizer.add_special_tokens(special_tokens_dict)
    return tokenizer


def tutorial_mk_dataset(data_path: str, cache_dir: str, tokenizer):
    import levanter
    from levanter.utils.hf_utils import num_cpus_used_by_tokenizer

    dataset = levanter.data.datasource_from_jsonl([data_path])
    prompts = PROMPT_DICT

    def preprocess(batch):
        def format_example(ex):
            if ex.get("input", "") == "":
                return prompts["prompt_no_input"].format_map(ex)
            else:
                return prompts["prompt_input"].format_map(ex)

        sources = [format_example(example) for example in batch]
        targets = [f"{example['output']}{tokenizer.eos_token}" for example in batch]
        examples = [s + t for s, t in zip(sources, targets)]
        sources_tokenized = tokenizer(sources, return_tensors="np", padding=False, truncation=True)
        examples_tokenized = tokenizer(examples, return_tensors="np", padding=False, truncation=True)

        source_lens = [len(s) for s in sources_tokenized["input_ids"]]

        return {
            "input_ids": examples_tokenized["input_ids"],
            "source_lens": source_lens,
        }

    # The one change to the tutorial: the installed Levanter's map_batches needs an output_exemplar (without one every
    # batch fails in TreeBatchPreparer with "ValueError: Expected None, got {'input_ids': ...}" and Ray retries the
    # task until it gives up). The exemplar keeps the dtype the tutorial's return_tensors="np" produces (int64).
    output_exemplar = {"input_ids": np.zeros((0,), dtype=np.int64), "source_lens": np.zeros((0,), dtype=np.int64)}
    dataset = dataset.map_batches(
        preprocess,
        batch_size=128,
        num_cpus=num_cpus_used_by_tokenizer(tokenizer),
        output_exemplar=output_exemplar,
    )
    return dataset.build_or_load_cache(cache_dir, await_finished=True)


# -- timing -----------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    records: int
    seconds: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    load: float | None = None
    """1-minute load average when the row started (the machine may be shared)."""
    part: bool = False
    """A part of the row above (seconds only: a rate or ratio of a part is meaningless)."""

    @property
    def rate(self) -> float | None:
        return self.records / self.seconds if self.seconds else None


def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[float, Any]:
    """Best (least) wall time of `repeat` calls, and the last call's value."""
    best = float("inf")
    value = None
    for _ in range(max(1, repeat)):
        gc.collect()
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def say(msg: str) -> None:
    print(msg, flush=True)


# -- the side check ---------------------------------------------------------------------------------------------------


def compare_with_stanford(cache_dir: str, stanford: Dict, n_records: int) -> dict[str, Any]:
    """Every record's input_ids and labels from the prepared cache against Stanford's."""
    from alpaca_cli.core.cache import labels, open_cache

    cache = open_cache(cache_dir)
    rows = cache.rows(range(len(cache)))
    by_source: dict[int, dict] = {}
    for row in rows:
        by_source[int(np.asarray(row["source_index"]).reshape(-1)[0])] = row
    mismatched_ids = mismatched_labels = missing = 0
    missing_all_masked = 0  # records prepare dropped that Stanford keeps with every label -100 (nothing to train)
    first_bad: list[int] = []
    for i in range(n_records):
        s_ids = stanford["input_ids"][i].numpy()
        s_lab = stanford["labels"][i].numpy()
        row = by_source.get(i)
        if row is None:
            missing += 1
            if (s_lab[1:] == IGNORE_INDEX).all():
                missing_all_masked += 1
            elif len(first_bad) < 5:
                first_bad.append(i)
            continue
        ids = np.asarray(row["input_ids"])
        ok_ids = np.array_equal(ids.astype(np.int64), s_ids.astype(np.int64))
        ok_lab = ok_ids and np.array_equal(labels(ids, np.asarray(row["targets"])), s_lab.astype(np.int64))
        mismatched_ids += not ok_ids
        mismatched_labels += not ok_lab
        if (not ok_ids or not ok_lab) and len(first_bad) < 5:
            first_bad.append(i)
    return {
        "cache_rows": len(cache),
        "input_ids_mismatches": mismatched_ids,
        "labels_mismatches": mismatched_labels,
        "records_missing_from_cache": missing,
        "of_which_stanford_trains_nothing": missing_all_masked,
        "first_mismatches": first_bad,
    }


def compare_tutorial_with_stanford(cache, stanford: Dict, max_len: int) -> dict[str, Any]:
    """The tutorial caches untruncated (2048) ids and source_lens: compare them with Stanford's where Stanford did not
    truncate (example of at most model_max_length tokens)."""
    n = len(cache)
    rows = cache.get_batch_sync(list(range(n)))
    compared = ids_bad = src_bad = 0
    for i, row in enumerate(rows):
        s_ids = stanford["input_ids"][i].numpy()
        if len(s_ids) >= max_len:
            continue
        compared += 1
        ids = np.asarray(row["input_ids"]).astype(np.int64)
        if not np.array_equal(ids, s_ids):
            ids_bad += 1
        n_masked = int((stanford["labels"][i].numpy() == IGNORE_INDEX).sum())
        if int(np.asarray(row["source_lens"]).reshape(-1)[0]) != n_masked:
            src_bad += 1
    return {"rows": n, "compared": compared, "input_ids_mismatches": ids_bad, "source_len_mismatches": src_bad}


# -- environment ------------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": tuple(round(x, 2) for x in os.getloadavg()),
        "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "(unset)"),
        "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS", "(unset)"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    for name in ("alpaca-cli", "transformers", "tokenizers", "torch", "levanter", "marin-levanter", "ray", "jax", "numpy", "sentencepiece"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    return env


# -- output -----------------------------------------------------------------------------------------------------------


def print_table(results: list[Result], floor_seconds: float | None, title: str) -> None:
    rows = []
    for r in results:
        if r.error or r.seconds is None:
            rows.append((r.name, f"{r.records:,}", "-", "-", "-", "-", r.error or r.note or "skipped"))
            continue
        load = f"{r.load:.1f}" if r.load is not None else ""
        if r.part:
            rows.append((r.name, "", f"{r.seconds:.2f}", "", "", load, r.note))
            continue
        ratio = f"{r.seconds / floor_seconds:.2f}x" if floor_seconds else "-"
        rows.append((r.name, f"{r.records:,}", f"{r.seconds:.2f}", f"{r.rate:,.0f}", ratio, load, r.note))
    headers = ("method", "records", "seconds", "records/s", "x floor", "load", "notes")
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="right" if h in ("records", "seconds", "records/s", "x floor", "load") else "left")
        for row in rows:
            table.add_row(*row)
        Console(width=max(160, shutil.get_terminal_size().columns)).print(table)
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


# -- main -------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"a JSON list or JSONL of Alpaca records (default {DEFAULT_DATA})")
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help=f"a tokenizer folder (default {DEFAULT_TOKENIZER})")
    ap.add_argument("--records", type=int, default=52_000, help="records to prepare: --data repeated (default 52000)")
    ap.add_argument("--skip-levanter", action="store_true", help="skip Levanter's tutorial path (Ray)")
    ap.add_argument("--skip-stanford", action="store_true", help="skip Stanford's preprocessing (and the side check)")
    ap.add_argument(
        "--stanford-slow",
        action="store_true",
        help="also time Stanford's preprocessing with the slow (sentencepiece) tokenizer, as train.py loads it "
        "(use_fast=False)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="time the floor and alpaca prepare N times, keep the best")
    ap.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs given to ray.init (default 8)")
    ap.add_argument("--profile", metavar="FILE", help="after the timed runs, cProfile one more alpaca prepare into FILE")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--workdir", help="where to write the data copy, run dirs and caches (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    env = environment()
    say("Environment")
    for k, v in env.items():
        say(f"  {k:24s} {v}")

    work = args.workdir or tempfile.mkdtemp(prefix="bench-prepare-")
    os.makedirs(work, exist_ok=True)
    say(f"  {'work dir':24s} {work}")

    results: list[Result] = []
    summary: dict[str, Any] = {"environment": env, "args": vars(args)}
    try:
        source = load_source(args.data)
        data_path = os.path.join(work, f"alpaca_{args.records}.jsonl")
        write_repeated_jsonl(source, args.records, data_path)
        records = read_jsonl(data_path)
        n = len(records)
        say(f"\nData: {args.data} ({len(source)} records) repeated to {n:,} -> {data_path}")
        say(f"Tokenizer: {args.tokenizer}\n")

        # -- 2. the floor ------------------------------------------------------------------------------------------
        from transformers import AutoTokenizer

        floor_tok = AutoTokenizer.from_pretrained(args.tokenizer)
        if floor_tok.pad_token is None:  # the same tokenizer as every other method uses
            floor_tok.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
        floor_tok(["warm up"] * 8, return_attention_mask=False)
        say("[floor] one batched fast-tokenizer pass over prompt + output + eos ...")
        load_floor = os.getloadavg()[0]
        floor_s, floor_tokens = timed(lambda: floor_pass(floor_tok, records), args.repeat)
        floor = Result(
            "floor: tok(texts), one batched pass", n, floor_s, load=load_floor,
            note=f"{floor_tokens:,} tokens (render + tokenize)",
        )
        say(f"    {floor_s:.2f} s")
        say("[floor + offsets] the same pass with return_offsets_mapping=True (diagnostic) ...")
        load_off = os.getloadavg()[0]
        off_s, _ = timed(lambda: floor_pass(floor_tok, records, offsets=True), args.repeat)
        floor_offsets = Result(
            "  floor + return_offsets_mapping", n, off_s, load=load_off,
            note="diagnostic: offsets as Python lists (prepare asks the Rust encodings instead)",
        )
        say(f"    {off_s:.2f} s")

        # -- 1. alpaca prepare -------------------------------------------------------------------------------------
        from alpaca_cli.config import PrepareConfig
        from alpaca_cli.core import prepare as prepmod
        from alpaca_cli.rundir import open_run

        cfg = PrepareConfig(data=data_path, tokenizer=args.tokenizer)
        # Modules prepare imports lazily are imported up front, so that import time (start-up) is not in its timing.
        t_imp = time.perf_counter()
        import draccus  # noqa: F401
        import levanter.data.packing  # noqa: F401
        import levanter.store.cache  # noqa: F401
        import levanter.store.tree_store  # noqa: F401

        say(f"[alpaca prepare] lazy imports (draccus, levanter.store, JAX): {time.perf_counter() - t_imp:.2f} s, untimed")

        run_path = None
        prep_result = None

        def do_prepare(tag: str):
            nonlocal run_path, prep_result
            run_path = os.path.join(work, f"run-{tag}-{time.time_ns()}")
            run = open_run(run_path, create=True)
            prep_result = prepmod.prepare(cfg, run)
            return prep_result

        say("[alpaca prepare] prepare(cfg, run) on a fresh run directory ...")
        load_prep = os.getloadavg()[0]
        best = None  # (seconds, result, run dir) of the fastest call: its stats are reported, its cache checked
        for k in range(max(1, args.repeat)):
            gc.collect()
            t0 = time.perf_counter()
            do_prepare(str(k))
            took = time.perf_counter() - t0
            if best is None or took < best[0]:
                if best is not None:
                    shutil.rmtree(best[2], ignore_errors=True)
                best = (took, prep_result, run_path)
            else:
                shutil.rmtree(run_path, ignore_errors=True)
        prep_s, prep_result, prep_run = best
        st = prep_result.stats
        prep = Result(
            "alpaca prepare: prepare(cfg, run)",
            n,
            prep_s,
            load=load_prep,
            note=(
                f"tokenize+write {st.get('seconds_tokenize_and_write')} s; "
                f"{st.get('prompts_tokenized_alone')} prompts tokenized alone; "
                f"{st.get('examples'):,} examples, {st.get('truncated')} truncated"
            ),
            extra={"stats": {k: st.get(k) for k in ("examples", "truncated", "dropped", "tokens", "trained_tokens",
                                                     "prompts_tokenized_alone", "fast_prompt_lengths",
                                                     "seconds_tokenize_and_write", "seconds")}},
        )
        say(f"    {prep_s:.2f} s (stats: {json.dumps(prep.extra['stats'])})")
        results += [
            prep,
            Result("  of which tokenize + write cache", n, st.get("seconds_tokenize_and_write"), part=True,
                   note="prepare's own stats: render, tokenize, labels, SerialCacheWriter"),
            floor,
            floor_offsets,
        ]

        # -- 3. Stanford -------------------------------------------------------------------------------------------
        stanford_out = None
        if args.skip_stanford:
            results.append(Result("Stanford train.py preprocess (fast tok)", n, note="skipped (--skip-stanford)"))
        else:
            import torch  # noqa: F401  (imported before timing)

            s_tok = stanford_tokenizer(args.tokenizer, use_fast=True)
            s_tok("warm up", return_tensors="pt")
            say("[Stanford] train.py preprocess: two per-string tokenizer calls per record (fast tokenizer) ...")
            load_s = os.getloadavg()[0]
            s_s, stanford_out = timed(lambda: stanford_dataset(records, s_tok))
            results.append(
                Result("Stanford train.py preprocess (fast tok)", n, s_s, load=load_s,
                       note="2 unbatched calls/record, model_max_length 512")
            )
            say(f"    {s_s:.2f} s")

            say("[check] alpaca prepare's input_ids and labels vs Stanford's, every record ...")
            check = compare_with_stanford(open_run(prep_run).cache_dir, stanford_out, n)
            summary["check_prepare_vs_stanford"] = check
            say(f"    {json.dumps(check)}")

        if args.stanford_slow:
            s_tok_slow = stanford_tokenizer(args.tokenizer, use_fast=False)
            s_tok_slow("warm up", return_tensors="pt")
            say("[Stanford] train.py preprocess with the slow tokenizer (use_fast=False, as train.py) ...")
            load_ss = os.getloadavg()[0]
            ss_s, slow_out = timed(lambda: stanford_dataset(records, s_tok_slow))
            note = "use_fast=False as in train.py"
            if stanford_out is not None:
                same = sum(
                    np.array_equal(a.numpy(), b.numpy()) for a, b in zip(slow_out["input_ids"], stanford_out["input_ids"])
                )
                note += f"; ids equal fast's for {same:,}/{n:,}"
            results.append(Result("Stanford train.py preprocess (slow tok)", n, ss_s, load=load_ss, note=note))
            say(f"    {ss_s:.2f} s ({note})")
            del slow_out

        # -- 4. Levanter tutorial ----------------------------------------------------------------------------------
        if args.skip_levanter:
            results.append(Result("Levanter tutorial (Ray), total", n, note="skipped (--skip-levanter)"))
        else:
            results += run_tutorial(args, data_path, work, n, stanford_out, summary)

        # -- output -------------------------------------------------------------------------------------------------
        env_after = tuple(round(x, 2) for x in os.getloadavg())
        say("")
        print_table(
            results,
            floor.seconds,
            title=f"Preparing {n:,} Alpaca records ({env['cpus_usable']} CPUs, load {env['loadavg']} -> {env_after})",
        )
        if "check_prepare_vs_stanford" in summary:
            c = summary["check_prepare_vs_stanford"]
            say(
                f"Side check, alpaca prepare vs Stanford over {n:,} records: {c['input_ids_mismatches']} input_ids "
                f"mismatches, {c['labels_mismatches']} labels mismatches, {c['records_missing_from_cache']} records "
                f"not in the cache ({c['of_which_stanford_trains_nothing']} of them all -100 in Stanford)."
            )
        if "check_tutorial_vs_stanford" in summary:
            c = summary["check_tutorial_vs_stanford"]
            if "error" in c:
                say(f"Side check, tutorial vs Stanford: could not read the tutorial cache ({c['error']})")
            else:
                say(
                    f"Side check, tutorial vs Stanford over the {c['compared']:,} examples Stanford does not truncate: "
                    f"{c['input_ids_mismatches']} input_ids mismatches, {c['source_len_mismatches']} source length "
                    "mismatches."
                )

        if args.profile:
            profile_prepare(do_prepare, args.profile)

        summary["results"] = [
            {"name": r.name, "records": r.records, "seconds": r.seconds, "records_per_s": r.rate,
             "ratio_to_floor": (r.seconds / floor.seconds) if r.seconds and floor.seconds else None,
             "load": r.load, "note": r.note, "error": r.error, **r.extra}
            for r in results
        ]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2, default=str)
            say(f"Results written to {args.json}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def run_tutorial(args, data_path: str, work: str, n: int, stanford_out, summary: dict) -> list[Result]:
    """Levanter's tutorial path, Ray start-up and cache build timed apart."""
    out: list[Result] = []
    try:
        import ray

        import levanter.data  # noqa: F401
        from levanter.utils.hf_utils import num_cpus_used_by_tokenizer

        t_tok = tutorial_tokenizer(args.tokenizer)
        cache_dir = os.path.join(work, "tutorial-cache")
        say(
            f"[Levanter tutorial] ray.init(num_cpus={args.ray_cpus}), then datasource_from_jsonl -> "
            f"map_batches(batch_size=128, num_cpus={num_cpus_used_by_tokenizer(t_tok)}) -> build_or_load_cache ..."
        )
        load_t = os.getloadavg()[0]
        t0 = time.perf_counter()
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        ray_s = time.perf_counter() - t0
        say(f"    ray.init {ray_s:.2f} s")
        t1 = time.perf_counter()
        cache = tutorial_mk_dataset(data_path, cache_dir, t_tok)
        build_s = time.perf_counter() - t1
        say(f"    build_or_load_cache {build_s:.2f} s")
        rows = len(cache)
        out.append(
            Result("Levanter tutorial (Ray), total", n, ray_s + build_s, load=load_t, note=f"{rows:,} rows cached")
        )
        out.append(Result("  of which ray.init", n, ray_s, part=True, note="Ray start-up"))
        out.append(
            Result("  of which build_or_load_cache", n, build_s, part=True,
                   note=f"build alone: {n / build_s:,.0f} records/s; 2 batched calls per 128 records")
        )
        if stanford_out is not None:
            try:
                summary["check_tutorial_vs_stanford"] = compare_tutorial_with_stanford(cache, stanford_out, 512)
            except Exception as e:  # noqa: BLE001 - a side check must not lose the timings
                summary["check_tutorial_vs_stanford"] = {"error": f"{type(e).__name__}: {e}"}
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
    except Exception as e:  # noqa: BLE001 - report it in the table, keep the other methods' results
        logging.exception("the Levanter tutorial path failed")
        out.append(Result("Levanter tutorial (Ray), total", n, error=f"{type(e).__name__}: {e}"[:120]))
    return out


def profile_prepare(do_prepare: Callable[[str], Any], path: str) -> None:
    import cProfile
    import pstats

    say(f"\n[profile] one more alpaca prepare under cProfile -> {path}")
    prof = cProfile.Profile()
    prof.enable()
    do_prepare("profile")
    prof.disable()
    prof.dump_stats(path)
    stats = pstats.Stats(prof, stream=sys.stdout).strip_dirs()
    say("Top 25 by cumulative time:")
    stats.sort_stats("cumulative").print_stats(25)
    say("Top 15 by own (tottime) time:")
    stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    sys.exit(main())
