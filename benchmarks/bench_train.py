#!/usr/bin/env python
"""Benchmark `alpaca train` (packed, and --no-pack as in Levanter's tutorial) against Stanford Alpaca's recipe on
Hugging Face's Trainer (torch, CPU): the same tiny Llama-shaped base model, the same prepared examples, the same
examples in every optimizer step, one method after another in one invocation.

Run by hand, never by tests, in an environment with the benchmark extra (`pip install -e ".[bench]"`: torch and
accelerate, which transformers' Trainer needs).

    python benchmarks/bench_train.py                    # 512 examples, batch 32 (16 steps)
    python benchmarks/bench_train.py --examples 64      # a quick run (2 steps)
    python benchmarks/bench_train.py --packed-seq-lens 2048,1024 --methods packed,hf

The headline number is trained tokens per second: tokens whose label is not -100 (Stanford's labels, prompt
masked), counted the way every loss here counts them (position 0 of an example is never predicted). Steady-state
rates leave out the first optimizer step of every method (it includes JAX's JIT compilation, or torch's first-call
warm-up). Speed is measured and printed, never asserted. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the development data and tokenizer beside the repository (../shared); --data and --tokenizer name others
DEFAULT_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "alpaca_en_demo.json"))
DEFAULT_TOKENIZER = os.path.normpath(os.path.join(REPO, "..", "shared", "tokenizers", "llama-sp-32k"))
ALPACA = os.path.join(os.path.dirname(sys.executable), "alpaca")
IGNORE_INDEX = -100


# =====================================================================================================================
# Stanford Alpaca's recipe, copied from tatsu-lab/stanford_alpaca train.py (main branch, commit 761dc5b;
# https://github.com/tatsu-lab/stanford_alpaca/blob/main/train.py). Only `utils.jload` is inlined (`load_records`)
# and the data path is the --data file. Everything else is the original code, imported lazily (torch).
# =====================================================================================================================

DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"
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


def load_records(path: str) -> list[dict]:
    """Stanford's utils.jload (a JSON list), plus JSONL."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def stanford_definitions():
    """Stanford's smart_tokenizer_and_embedding_resize, _tokenize_fn, preprocess, SupervisedDataset and
    DataCollatorForSupervisedDataset (tatsu-lab/stanford_alpaca train.py), defined here because they need torch."""
    import copy
    import logging
    from dataclasses import dataclass as _dataclass
    from typing import Dict, Sequence

    import torch
    import transformers
    from torch.utils.data import Dataset

    def smart_tokenizer_and_embedding_resize(
        special_tokens_dict: Dict,
        tokenizer: transformers.PreTrainedTokenizer,
        model: transformers.PreTrainedModel,
    ):
        """Resize tokenizer and embedding.

        Note: This is the unoptimized version that may make your embedding size not be divisible by 64.
        """
        num_new_tokens = tokenizer.add_special_tokens(special_tokens_dict)
        model.resize_token_embeddings(len(tokenizer))

        if num_new_tokens > 0:
            input_embeddings = model.get_input_embeddings().weight.data
            output_embeddings = model.get_output_embeddings().weight.data

            input_embeddings_avg = input_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)
            output_embeddings_avg = output_embeddings[:-num_new_tokens].mean(dim=0, keepdim=True)

            input_embeddings[-num_new_tokens:] = input_embeddings_avg
            output_embeddings[-num_new_tokens:] = output_embeddings_avg

    def _tokenize_fn(strings: Sequence[str], tokenizer: transformers.PreTrainedTokenizer) -> Dict:
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

    def preprocess(
        sources: Sequence[str],
        targets: Sequence[str],
        tokenizer: transformers.PreTrainedTokenizer,
    ) -> Dict:
        """Preprocess the data by tokenizing."""
        examples = [s + t for s, t in zip(sources, targets)]
        examples_tokenized, sources_tokenized = [_tokenize_fn(strings, tokenizer) for strings in (examples, sources)]
        input_ids = examples_tokenized["input_ids"]
        labels = copy.deepcopy(input_ids)
        for label, source_len in zip(labels, sources_tokenized["input_ids_lens"]):
            label[:source_len] = IGNORE_INDEX
        return dict(input_ids=input_ids, labels=labels)

    class SupervisedDataset(Dataset):
        """Dataset for supervised fine-tuning."""

        def __init__(self, data_path: str, tokenizer: transformers.PreTrainedTokenizer):
            super(SupervisedDataset, self).__init__()
            logging.warning("Loading data...")
            list_data_dict = load_records(data_path)  # utils.jload(data_path)

            logging.warning("Formatting inputs...")
            prompt_input, prompt_no_input = PROMPT_DICT["prompt_input"], PROMPT_DICT["prompt_no_input"]
            sources = [
                prompt_input.format_map(example) if example.get("input", "") != "" else prompt_no_input.format_map(example)
                for example in list_data_dict
            ]
            targets = [f"{example['output']}{tokenizer.eos_token}" for example in list_data_dict]

            logging.warning("Tokenizing inputs... This may take some time...")
            data_dict = preprocess(sources, targets, tokenizer)

            self.input_ids = data_dict["input_ids"]
            self.labels = data_dict["labels"]

        def __len__(self):
            return len(self.input_ids)

        def __getitem__(self, i) -> Dict[str, torch.Tensor]:
            return dict(input_ids=self.input_ids[i], labels=self.labels[i])

    @_dataclass
    class DataCollatorForSupervisedDataset(object):
        """Collate examples for supervised fine-tuning."""

        tokenizer: transformers.PreTrainedTokenizer

        def __call__(self, instances: Sequence[Dict]) -> Dict[str, torch.Tensor]:
            input_ids, labels = tuple([instance[key] for instance in instances] for key in ("input_ids", "labels"))
            input_ids = torch.nn.utils.rnn.pad_sequence(
                input_ids, batch_first=True, padding_value=self.tokenizer.pad_token_id
            )
            labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)
            return dict(
                input_ids=input_ids,
                labels=labels,
                attention_mask=input_ids.ne(self.tokenizer.pad_token_id),
            )

    return smart_tokenizer_and_embedding_resize, SupervisedDataset, DataCollatorForSupervisedDataset


def hf_worker(spec_path: str) -> None:
    """Stanford's train() on the benchmark's base model and examples; run in a subprocess of this script, so its
    wall time is a whole command's, like `alpaca train`'s. Writes per-step timings and token counts as JSON."""
    t_process = float(os.environ.get("BENCH_T0", time.time()))
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    from torch.utils.data import SequentialSampler, Subset
    from transformers import Trainer, TrainerCallback

    smart_tokenizer_and_embedding_resize, SupervisedDataset, DataCollatorForSupervisedDataset = stanford_definitions()
    t_setup = time.time()

    # -- Stanford's train(), with the benchmark's arguments (Stanford's README: lr 2e-5, weight decay 0,
    #    warmup_ratio 0.03, cosine; here float32 on CPU, no FSDP, no saving) ------------------------------------------
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32)
    # Stanford loads use_fast=False (sentencepiece); the fast tokenizer gives the same ids here, and tokenization is
    # not timed. The labels are checked below against `alpaca prepare`'s, example by example.
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        spec["model"], model_max_length=spec["model_max_length"], padding_side="right", use_fast=True
    )
    special_tokens_dict = dict()
    if tokenizer.pad_token is None:
        special_tokens_dict["pad_token"] = DEFAULT_PAD_TOKEN
    if tokenizer.eos_token is None:
        special_tokens_dict["eos_token"] = DEFAULT_EOS_TOKEN
    if tokenizer.bos_token is None:
        special_tokens_dict["bos_token"] = DEFAULT_BOS_TOKEN
    if tokenizer.unk_token is None:
        special_tokens_dict["unk_token"] = DEFAULT_UNK_TOKEN
    smart_tokenizer_and_embedding_resize(special_tokens_dict=special_tokens_dict, tokenizer=tokenizer, model=model)
    full = SupervisedDataset(tokenizer=tokenizer, data_path=spec["data"])

    # The same examples as `alpaca train`, in the plan's order, so every step holds the same examples in all three
    # methods. Stanford's Trainer samples at random (RandomSampler); the plan's order is itself a seeded random
    # permutation, so the batches are as random, just the same ones. (Subset + SequentialSampler is the only change.)
    train_dataset = Subset(full, spec["source_indices"])
    check = np.load(spec["expected"], allow_pickle=False)
    mismatched = 0
    offsets = check["offsets"]
    for k, src in enumerate(spec["source_indices"]):
        a, b = offsets[k], offsets[k + 1]
        if not (
            np.array_equal(full.input_ids[src].numpy(), check["input_ids"][a:b])
            and np.array_equal(full.labels[src].numpy(), check["labels"][a:b])
        ):
            mismatched += 1

    collator = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    batches: list[dict] = []

    def counting_collator(instances):
        out = collator(instances)
        batches.append(
            {
                "examples": len(instances),
                # what the model's shifted loss counts: labels[:, 1:] != -100
                "trained": int((out["labels"][:, 1:] != IGNORE_INDEX).sum()),
                "real": int(out["attention_mask"].sum()),
                "slots": int(out["input_ids"].numel()),
            }
        )
        return out

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())

    class PlanOrderTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    times = StepTimes()
    args = transformers.TrainingArguments(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=2e-5,
        weight_decay=0.0,
        warmup_ratio=0.03,
        lr_scheduler_type="cosine",
        optim="adamw_torch",  # Stanford's TrainingArguments default
        logging_steps=1,  # Stanford's README
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = PlanOrderTrainer(
        model=model,
        processing_class=tokenizer,  # Stanford passes tokenizer=, the name transformers 4.57 deprecates
        args=args,
        train_dataset=train_dataset,
        eval_dataset=None,
        data_collator=counting_collator,
        callbacks=[times],
    )
    t_train = time.time()
    out = trainer.train()
    t_done = time.time()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "step_seconds": [e - b for b, e in zip(times.begin, times.end)],
        "step_end": times.end,
        "batches": batches,
        "losses": losses,
        "train_loss": out.training_loss,
        "label_mismatches": mismatched,
        "vocab": len(tokenizer),
        "pad_id": tokenizer.pad_token_id,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        "seconds_imports": t_setup - t_process,
        "seconds_setup": t_train - t_setup,
        "seconds_train": t_done - t_train,
    }
    with open(spec["result"], "w") as f:
        json.dump(result, f)


# =====================================================================================================================
# The benchmark
# =====================================================================================================================


@dataclass
class Method:
    key: str
    label: str
    kind: str  # "levanter" or "hf"
    seq_len: int = 0
    pack: bool = True
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Result:
    method: Method
    ok: bool = False
    error: str = ""
    wall: float = 0.0
    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)
    step_end: list[float] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)
    real: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    # steady state: every step but the first
    def timed(self, xs):
        return xs[1:] if len(xs) > 1 else xs

    @property
    def timed_seconds(self) -> float:
        return float(sum(self.timed(self.step_seconds)))

    def rate(self, xs) -> float:
        s = self.timed_seconds
        return float(sum(self.timed(xs))) / s if s > 0 else float("nan")

    @property
    def interval_seconds(self) -> float:
        """First step's end to last step's end: steps + data loading + hooks/callbacks."""
        return self.step_end[-1] - self.step_end[0] if len(self.step_end) > 1 else float("nan")

    def interval_rate(self, xs) -> float:
        s = self.interval_seconds
        return float(sum(self.timed(xs))) / s if s and s > 0 else float("nan")

    @property
    def median_step_rate(self) -> float:
        """Trained tokens per second of the median timed step (robust to a few steps slowed by other work)."""
        per = [t / s for t, s in zip(self.timed(self.trained), self.timed(self.step_seconds)) if s > 0]
        return float(np.median(per)) if per else float("nan")

    @property
    def padding(self) -> float:
        return 1.0 - sum(self.real) / sum(self.slots) if sum(self.slots) else float("nan")


def env_for_subprocess(threads: int) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # one CPU device, all cores for XLA's thread pool
    env["PYTHONUNBUFFERED"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["OMP_NUM_THREADS"] = str(threads)
    env["WANDB_MODE"] = "disabled"
    return env


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


LAST_RUN: dict = {}


def run_logged(cmd: list[str], log_path: str, env: dict, timeout: float) -> tuple[int, float]:
    """Run cmd (output to log_path); returns (exit code, wall seconds). Also records in LAST_RUN how much CPU the
    rest of the machine used meanwhile (busy CPU seconds minus the command's own), since this machine is shared."""
    t0 = time.perf_counter()
    busy0, own0 = busy_cpu_seconds(), children_cpu_seconds()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = -999
        finally:  # timeout, Ctrl-C or SIGTERM: never leave the command running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - t0
    own = children_cpu_seconds() - own0
    others = max(0.0, busy_cpu_seconds() - busy0 - own)
    LAST_RUN.update(own_cpu=own, others_cpu=others, others_share=others / (wall * (os.cpu_count() or 1)))
    return rc, wall


def tail(path: str, n: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def build_base_model(out_dir: str, tokenizer_dir: str, a) -> str:
    from levanter.models.llama import LlamaConfig

    from alpaca_cli.core.demo_model import write_random_hf_model

    cfg = LlamaConfig(
        hidden_dim=a.hidden,
        intermediate_dim=a.intermediate,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        max_seq_len=a.max_positions,
    )
    return write_random_hf_model(out_dir, tokenizer_dir, cfg, seed=0)


def stream_order(prepared_dir: str, examples: int, batch_size: int, seed: int = 0):
    """The plan's example stream (cache row ids, step by step) that `alpaca train --steps S --batch-size B` uses.

    Recomputed with alpaca_cli.core.plan.make_plan and TrainConfig's defaults (seed 0, no held-out set); the
    Levanter runs' metrics.jsonl (`loss_tokens` per step) is compared with it afterwards, so a drift shows."""
    from alpaca_cli.train_config import TrainConfig
    from alpaca_cli.core.cache import open_cache
    from alpaca_cli.core.plan import make_plan, split_validation

    defaults = TrainConfig()
    cache = open_cache(os.path.join(prepared_dir, "data", "cache"))
    lengths = cache.lengths()
    trained = cache.trained_tokens()
    train_ids, val_ids = split_validation(len(lengths), defaults.val_fraction, seed)
    plan = make_plan(
        lengths, trained, seq_len=int(lengths.max()), pack=False, batch_size=batch_size, epochs=1.0,
        steps=examples // batch_size, seed=seed, max_segments=defaults.max_segments_per_row,
        train_ids=train_ids, val_ids=val_ids,
    )
    stream = np.concatenate(plan.rows)
    return cache, stream, plan


def write_hf_expected(cache, stream: np.ndarray, path: str) -> list[int]:
    """Input ids and labels (alpaca_cli.core.cache.labels) of the stream's examples, for the HF worker to compare
    with Stanford's preprocessing; returns their source record indices."""
    from alpaca_cli.core.cache import labels

    uniq = sorted(set(int(e) for e in stream))
    rows = dict(zip(uniq, cache.rows(uniq)))
    ids, labs, offsets, sources = [], [], [0], []
    for e in stream:
        r = rows[int(e)]
        ids.append(r["input_ids"].astype(np.int64))
        labs.append(labels(r["input_ids"], r["targets"]))
        offsets.append(offsets[-1] + len(r["input_ids"]))
        sources.append(int(r["source_index"][0]))
    np.savez(path, input_ids=np.concatenate(ids), labels=np.concatenate(labs), offsets=np.asarray(offsets))
    return sources


def run_levanter(m: Method, prepared: str, workdir: str, model_dir: str, a, env: dict) -> Result:
    res = Result(m)
    run_dir = os.path.join(workdir, f"run-{m.key}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept --workdir: train afresh, never resume
    shutil.copytree(prepared, run_dir)
    cmd = [ALPACA]
    if a.verbose_levanter:
        cmd.append("--verbose")
    cmd += [
        "train", "--run-dir", run_dir, "--model", model_dir,
        # packed steps take about --batch-size examples each (never more), so a fixed step count would train
        # fewer examples than the others: packed runs train the same examples as one fraction of an epoch
        *(["--epochs", repr(a.examples / a.train_examples)] if m.pack else ["--steps", str(a.examples // a.batch_size)]),
        "--batch-size", str(a.batch_size),
        "--seq-len", str(m.seq_len), "--pack" if m.pack else "--no-pack",
        "--precision", "p=f32,c=f32", "--learning-rate", "2e-5", "-q", *m.extra_args,
    ]
    res.notes["command"] = " ".join(cmd)
    log = os.path.join(workdir, f"{m.key}.log")
    rc, res.wall = run_logged(cmd, log, env, a.timeout)
    res.notes["log"] = log
    res.notes.update(LAST_RUN)
    if rc != 0:
        res.error = f"exit {rc} (timeout)" if rc == -999 else f"exit {rc}"
        res.notes["tail"] = tail(log)
        return res
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(run_dir, "manifest.json")) as f:
        plan = json.load(f)["stages"]["train"]["plan"]
    slots_per_step = plan["rows_per_step"] * plan["seq_len"]
    res.steps = len(recs)
    res.step_seconds = [r["step_seconds"] for r in recs]
    res.step_end = [r["time"] for r in recs]
    res.trained = [r["loss_tokens"] for r in recs]
    res.real = [r["tokens"] for r in recs]
    res.slots = [slots_per_step] * len(recs)
    res.losses = [r["loss"] for r in recs]
    res.notes["rows_per_step"] = plan["rows_per_step"]
    res.notes["plan_padding"] = plan["padding_fraction"]
    res.ok = True
    return res


def run_hf(m: Method, workdir: str, model_dir: str, source_indices: list[int], expected: str, a, env: dict) -> Result:
    res = Result(m)
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:  # the subprocess gets this process's PYTHONPATH
        res.error = ("transformers' Trainer needs accelerate>=0.26, which this environment lacks: "
                     "pip install -e '.[bench]'")
        return res
    spec = {
        "model": model_dir,
        "data": a.data,
        "model_max_length": a.max_length,
        "source_indices": source_indices,
        "expected": expected,
        "batch_size": a.batch_size,
        "steps": a.examples // a.batch_size,
        "threads": a.threads,
        "output_dir": os.path.join(workdir, "hf-out"),
        "result": os.path.join(workdir, "hf-result.json"),
    }
    spec_path = os.path.join(workdir, "hf-spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, os.path.abspath(__file__), "--hf-worker", spec_path]
    res.notes["command"] = " ".join(cmd)
    log = os.path.join(workdir, "hf.log")
    env = dict(env, BENCH_T0=str(time.time()))
    rc, res.wall = run_logged(cmd, log, env, a.timeout)
    res.notes["log"] = log
    res.notes.update(LAST_RUN)
    if rc != 0:
        res.error = f"exit {rc} (timeout)" if rc == -999 else f"exit {rc}"
        res.notes["tail"] = tail(log)
        return res
    with open(spec["result"]) as f:
        out = json.load(f)
    res.steps = len(out["step_seconds"])
    res.step_seconds = out["step_seconds"]
    res.step_end = out["step_end"]
    res.trained = [b["trained"] for b in out["batches"]]
    res.real = [b["real"] for b in out["batches"]]
    res.slots = [b["slots"] for b in out["batches"]]
    res.losses = out["losses"]
    res.notes.update({k: out[k] for k in ("label_mismatches", "vocab", "attn_implementation", "torch_threads",
                                          "seconds_imports", "seconds_setup", "seconds_train")})
    res.ok = True
    return res


def environment(a) -> list[str]:
    lines = []
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except Exception:  # noqa: BLE001
        cpu = platform.processor()
    lines.append(f"CPU: {os.cpu_count()} x {cpu}; load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    vers = []
    for mod in ("jax", "jaxlib", "levanter", "marin-levanter", "haliax", "marin-haliax", "equinox", "torch", "transformers", "numpy"):
        try:
            from importlib.metadata import version

            vers.append(f"{mod} {version(mod)}")
        except Exception:  # noqa: BLE001
            pass
    lines.append(f"Python {platform.python_version()}; " + ", ".join(vers))
    return lines


def fmt_rate(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{x:,.0f}"


def print_table(results: list[Result], baseline_key: str, hf_key: str) -> None:
    by_key = {r.method.key: r for r in results if r.ok}
    base = by_key.get(baseline_key)
    hf = by_key.get(hf_key)
    headers = ["method", "rows x len", "trained tok", "trained tok/s", "x tutorial", "x HF", "real tok/s",
               "row tok/s", "padding", "s/step", "median-step tok/s", "incl. load tok/s", "wall s", "wall tok/s",
               "others' CPU"]
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.method.label, "FAILED: " + r.error] + [""] * (len(headers) - 2))
            continue
        tr = r.rate(r.trained)
        shape = (f"{r.notes['rows_per_step']} x {r.method.seq_len}" if r.method.kind == "levanter"
                 else f"{a_batch(r)} x ~{int(np.mean(r.slots) / a_batch(r))}")
        rows.append([
            r.method.label,
            shape,
            f"{sum(r.trained):,}",
            fmt_rate(tr),
            f"{tr / base.rate(base.trained):.2f}x" if base else "-",
            f"{tr / hf.rate(hf.trained):.2f}x" if hf else "-",
            fmt_rate(r.rate(r.real)),
            fmt_rate(r.rate(r.slots)),
            f"{100 * r.padding:.1f}%",
            f"{r.timed_seconds / max(1, len(r.timed(r.step_seconds))):.2f}",
            fmt_rate(r.median_step_rate),
            fmt_rate(r.interval_rate(r.trained)),
            f"{r.wall:.1f}",
            fmt_rate(sum(r.trained) / r.wall),
            f"{100 * r.notes.get('others_share', float('nan')):.0f}%",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    print(line)
    print("-" * len(line))
    for row in rows:
        if row[1].startswith("FAILED"):
            print(f"{row[0].ljust(widths[0])}  {row[1]}")
            continue
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(row, widths))))


def a_batch(r: Result) -> int:
    return int(r.notes.get("batch_size", 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="records (JSON list or JSONL); default %(default)s")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer folder; default %(default)s")
    p.add_argument("--examples", type=int, default=512, help="examples trained by every method (default 512)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step (default 32)")
    p.add_argument("--seq-len", type=int, default=2048, help="row length of the packed and --no-pack runs (2048)")
    p.add_argument("--packed-seq-lens", default="",
                   help="more packed runs at these row lengths, comma-separated (e.g. 1024,4096)")
    p.add_argument("--methods", default="packed,nopack,hf",
                   help="which of packed,nopack,hf to run, in this order (default all three)")
    p.add_argument("--max-length", type=int, default=512,
                   help="prepare's --max-length = Stanford's model_max_length (default 512)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=2048, help="the base model's context (default 2048)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the HF Trainer (default 2)")
    p.add_argument("--nopack-rows-per-pass", type=int, default=8,
                   help="--per-device-rows for the --no-pack run (gradient accumulation; default 8: 32 rows of "
                        "2048 in one pass need ~42 GB, more than this 24 GB machine has); 0: all rows in one pass")
    p.add_argument("--levanter-args", default="", help="extra arguments for every `alpaca train` (space-separated)")
    p.add_argument("--verbose-levanter", action="store_true", help="run `alpaca --verbose train` (logs in the workdir)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the methods this many rounds (round-robin) and tabulate each method's best round")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per method before it is killed")
    p.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind (and kill the running command) on `kill`
    if a.hf_worker:
        hf_worker(a.hf_worker)
        return 0
    if a.examples % a.batch_size:
        p.error("--examples must be a multiple of --batch-size")
    steps = a.examples // a.batch_size
    wanted = [x.strip() for x in a.methods.split(",") if x.strip()]
    extra = a.levanter_args.split()

    methods: list[Method] = []
    for key in wanted:
        if key == "packed":
            methods.append(Method("packed", f"alpaca train (packed, {a.seq_len})", "levanter", a.seq_len, True, extra))
            for s in [int(x) for x in a.packed_seq_lens.split(",") if x.strip()]:
                methods.append(Method(f"packed{s}", f"alpaca train (packed, {s})", "levanter", s, True, extra))
        elif key == "nopack":
            rows = ["--per-device-rows", str(a.nopack_rows_per_pass)] if a.nopack_rows_per_pass else []
            methods.append(Method("nopack", f"alpaca train --no-pack ({a.seq_len}, tutorial)", "levanter",
                                  a.seq_len, False, extra + rows))
        elif key == "hf":
            methods.append(Method("hf", "HF Trainer, Stanford train.py (torch)", "hf"))
        else:
            p.error(f"unknown method {key!r}")

    own_workdir = a.workdir is None
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench-train-")
    os.makedirs(workdir, exist_ok=True)
    env = env_for_subprocess(a.threads)
    print("\n".join(environment(a)))
    print(f"workdir: {workdir}")
    print(f"model: Llama hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads, "
          f"{a.kv_heads} kv heads, context {a.max_positions}; float32 params and compute in every method")
    print(f"data: {a.data}; tokenizer: {a.tokenizer}; {a.examples} examples = {steps} steps x {a.batch_size}; "
          f"lr 2e-5, weight decay 0, warmup 3%, cosine, grad clip 1.0")
    try:
        prepared = os.path.join(workdir, "prepared")
        if not os.path.exists(os.path.join(prepared, "manifest.json")):
            cmd = [ALPACA, "prepare", "--data", a.data, "--tokenizer", a.tokenizer, "--run-dir", prepared,
                   "--max-length", str(a.max_length), "-q"]
            rc, secs = run_logged(cmd, os.path.join(workdir, "prepare.log"), env, a.timeout)
            if rc != 0:
                print(f"alpaca prepare failed (exit {rc}):\n{tail(os.path.join(workdir, 'prepare.log'))}")
                return 1
            print(f"setup: {' '.join(cmd)}  ({secs:.1f} s)")
        model_dir = os.path.join(workdir, "base-model")
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            t0 = time.perf_counter()
            build_base_model(model_dir, a.tokenizer, a)
            print(f"setup: write_random_hf_model -> {model_dir}  ({time.perf_counter() - t0:.1f} s)")
        cache, stream, plan = stream_order(prepared, a.examples, a.batch_size)
        a.train_examples = plan.train_examples
        assert round(float(repr(a.examples / a.train_examples)) * a.train_examples) == a.examples
        if len(stream) != a.examples:
            print(f"the plan has {len(stream)} examples, not {a.examples}")
            return 1
        expected = os.path.join(workdir, "hf-expected.npz")
        source_indices = write_hf_expected(cache, stream, expected)
        print(f"plan: {len(stream)} examples ({len(set(stream.tolist()))} distinct), trained tokens "
              f"{plan.trained_tokens:,}, real tokens {plan.real_tokens:,}")
        print()

        rounds: list[list[Result]] = []
        for rnd in range(a.repeat):
            results: list[Result] = []
            for m in methods:
                tag = f" (round {rnd + 1} of {a.repeat})" if a.repeat > 1 else ""
                print(f"running {m.label}{tag} ...", flush=True)
                if m.kind == "levanter":
                    r = run_levanter(m, prepared, workdir, model_dir, a, env)
                else:
                    r = run_hf(m, workdir, model_dir, source_indices, expected, a, env)
                    r.notes["batch_size"] = a.batch_size
                results.append(r)
                if r.ok:
                    print(f"  done in {r.wall:.1f} s (others used {100 * r.notes['others_share']:.0f}% of the "
                          f"machine's CPU meanwhile); step seconds: " + " ".join(f"{x:.2f}" for x in r.step_seconds))
                else:
                    print(f"  FAILED ({r.error}); log {r.notes.get('log')}:\n{r.notes.get('tail', '')}")
            rounds.append(results)
        all_results = [r for rr in rounds for r in rr]
        # per method, the round with the best steady-state trained tokens/s (the least disturbed by other work)
        results = []
        for i in range(len(methods)):
            ok = [rr[i] for rr in rounds if rr[i].ok]
            results.append(max(ok, key=lambda r: r.rate(r.trained)) if ok else rounds[-1][i])

        # -- checks: the same trained tokens, step by step, in every method -----------------------------------------
        print()
        print("checks (trained tokens = labels != -100 after the shift; per method, all steps):")
        want = plan.step_tokens.tolist()
        for r in all_results:
            if not r.ok:
                continue
            if r.method.kind == "levanter" and r.method.pack:
                # the same examples in fewer, denser steps: the totals must match the plan's
                same = sum(r.trained) == plan.trained_tokens and sum(r.real) == plan.real_tokens
                verdict = (f"the plan's {a.examples} examples in {r.steps} packed steps" if same
                           else "DIFFERS from the plan's totals")
            else:
                same = r.trained == want
                verdict = "identical to the plan, step by step" if same else "DIFFERS from the plan: " + str(r.trained)
            extra_note = ""
            if r.method.kind == "hf":
                extra_note = (f"; Stanford labels vs alpaca prepare's: {r.notes['label_mismatches']} of "
                              f"{len(stream)} examples differ; attention {r.notes['attn_implementation']}, "
                              f"torch threads {r.notes['torch_threads']}")
            print(f"  {r.method.label}: {sum(r.trained):,} trained tokens, {sum(r.real):,} real tokens "
                  f"({verdict})"
                  f"; first/last loss {r.losses[0]:.4f}/{r.losses[-1]:.4f}{extra_note}")

        print()
        print("trained tokens/s, real tokens/s, row tok/s and s/step: steps 2..S (step 1 left out: it includes "
              "JAX's JIT compilation / torch's warm-up), from step_seconds in metrics.jsonl (Levanter: the jitted "
              "step, data loading excluded) and on_step_begin..on_step_end (HF: forward, backward, optimizer; "
              "collation excluded).")
        print("incl. load tok/s: the same tokens over end of step 1 -> end of the last step (data loading, hooks, "
              "callbacks included). wall s: the whole command (start-up, imports, model load, compile, final "
              "checkpoint for alpaca); wall tok/s: all trained tokens / wall s. row tok/s: positions computed "
              "(padding included).")
        print("others' CPU: the share of the machine's CPU time that other processes used during the command "
              "(this machine is shared; rates measured while it is high are low).")
        if a.repeat > 1:
            for k, rr in enumerate(rounds):
                print(f"\nround {k + 1}:\n")
                print_table(rr, "nopack", "hf")
            print(f"\nbest of {a.repeat} rounds per method (by trained tokens/s):")
        print()
        print_table(results, "nopack", "hf")
        for r in results:
            if r.ok and r.method.kind == "hf":
                n = r.notes
                print(f"\nHF worker: imports {n['seconds_imports']:.1f} s, model/tokenizer/data setup "
                      f"{n['seconds_setup']:.1f} s, trainer.train() {n['seconds_train']:.1f} s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump([{"method": r.method.__dict__, "ok": r.ok, "error": r.error, "wall": r.wall,
                            "step_seconds": r.step_seconds, "trained": r.trained, "real": r.real, "slots": r.slots,
                            "losses": r.losses, "notes": {k: v for k, v in r.notes.items() if k != "tail"}}
                           for r in all_results], f, indent=1)
        return 0 if all(r.ok for r in results) else 1
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
