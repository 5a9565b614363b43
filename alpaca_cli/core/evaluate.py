"""`alpaca eval`: how a model does on held-out records: the loss per trained token and its perplexity (on Stanford's
labels, prepared exactly as training prepared its data), and the EOS-stop rate: the share of prompts whose greedy
answer ends with the end-of-sequence token within max_new_tokens. A model that never learned to stop (EOS not
trained, or not exported) scores 0 there, however good its loss.

A run prepared from conversations is scored on conversations: the loss over the tokens training trains (its
assistant turns, core.chat.tokenize_conversations with the run's template), and the stop rate of the answers to
each conversation's last assistant turn, stopped at EOS or the template's end-of-turn token."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from alpaca_cli.config import PrepareConfig
from alpaca_cli.core import decode
from alpaca_cli.core import prompts as promptsmod
from alpaca_cli.core import served_template as served
from alpaca_cli.core.generate import Decoding, Generator, Request
from alpaca_cli.core.mesh import COMPUTE
from alpaca_cli.core.tokenize import prefix_stable, tokenize_examples
from alpaca_cli.errors import DataError
from alpaca_cli.records import DataSource, EvalRecord, EvalScore
from alpaca_cli.rundir import RunDir


@dataclass
class HeldOut:
    requests: list[Request]
    outputs: list[str]
    source: Optional[DataSource] = None
    """What identifies the records: known to the process that read them (the writer)."""
    conversations: Optional[list[list[dict]]] = None
    """The held-out conversations, when the model is scored on conversations (requests: each up to its last
    assistant turn, outputs: that turn)."""


def held_out(pcfg: PrepareConfig, data: str, *, conversations: bool = False) -> HeldOut:
    """Records of `data`, read with the run's field names; or (conversations) its conversations."""
    from alpaca_cli.core.data import load_records

    if conversations:
        return held_out_conversations(data)
    records = load_records(dataclasses.replace(pcfg, data=data))
    requests = [Request(i, x) for i, x in zip(records.instructions, records.inputs)]
    return HeldOut(requests, list(records.outputs), records.source)


def held_out_conversations(data: str) -> HeldOut:
    """The conversations of a .json/.jsonl file (messages or ShareGPT, as prepare reads them; an Alpaca record is
    the conversation of its instruction and output), each with at least one assistant turn."""
    from alpaca_cli.core import chat
    from alpaca_cli.core.data import read_rows

    conversations = []
    for where, row in read_rows(data, "--data"):
        row = {"messages": row} if isinstance(row, list) else row  # a bare list of messages
        fmt = chat.detect_format(row) if isinstance(row, dict) else "alpaca"
        if fmt == "alpaca":
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) \
                    or not isinstance(row.get("output"), str):
                raise DataError(f"--data {data} {where}: not a conversation (messages or ShareGPT) nor an Alpaca "
                                "record with a string instruction and output")
            conversations.append([served.instruction_message(row["instruction"], row.get("input") or ""),
                                  {"role": "assistant", "content": row["output"]}])
        else:
            conversations.append(chat.to_messages(row, fmt, where=f"--data {data} {where}"))
    if not conversations:
        raise DataError(f"--data {data}: holds no conversation")
    last = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in conversations]
    requests = [Request("", messages=c[:i]) for c, i in zip(conversations, last)]
    return HeldOut(requests, [c[i]["content"] for c, i in zip(conversations, last)], _file_source(data),
                   conversations=conversations)


def _file_source(data: str) -> DataSource:
    import hashlib

    from alpaca_cli import io

    raw = io.read_bytes(data)
    return DataSource(kind="file", sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))


def scores_conversations(run: Optional[RunDir], from_export: Optional[str]) -> bool:
    """Whether --data is read as conversations: the run was prepared from them (its record holds the chat template),
    or, scoring an export without its run, the export folder carries no Alpaca prompts (an export of a conversation
    run carries its chat template only)."""
    from alpaca_cli import io
    from alpaca_cli.core.prompts import PROMPTS_FILE

    if run is not None and run.is_complete("prepare"):
        return run.require_prepare().chat_template is not None
    return (from_export is not None and io.exists(from_export)
            and not io.exists(io.join(from_export, PROMPTS_FILE)))


def evaluate(run: Optional[RunDir], held: HeldOut, pcfg: PrepareConfig,
             models: list[tuple[str, Callable[[], Generator]]], *, data: str, max_new_tokens: int,
             batch_size: int) -> list[EvalScore]:
    """Score each (label, load) model in turn, one in memory at a time, every process together; the writer records
    the scores as the run's eval stage (data: the records as --data named them) and in its export's model card."""
    scores = []
    for label, load in models:
        gen = load()
        scores.append(score(gen, held, pcfg, label=label, max_new_tokens=max_new_tokens, batch_size=batch_size))
        del gen
    if run is None or not run.writer:
        return scores
    # the stage records finished scores: a scoring that fails leaves the run's previous eval record as it was
    with run.stage("eval", EvalRecord(data=data, source=held.source, scores=scores)):
        pass
    if run.export is not None and run.export.complete:
        from alpaca_cli.core.export import refresh_model_card

        refresh_model_card(run)
    return scores


def score(gen: Generator, data: HeldOut, pcfg: PrepareConfig, *, label: str, max_new_tokens: int,
          batch_size: int) -> EvalScore:
    """Loss, perplexity and EOS-stop rate of the generator's model on the held-out records (or conversations)."""
    tokenized = trained_tokens(gen, data, pcfg)
    if not tokenized.input_ids:
        raise DataError("no held-out example has a token to score (every prompt fills --max-length)")
    total, count = _loss_sums(gen, tokenized.input_ids, tokenized.targets, batch_size)
    answers = gen.generate(data.requests, Decoding(max_new_tokens=max_new_tokens, batch_size=batch_size))
    stopped = sum(a.finish == decode.EOS for a in answers)
    loss = total / count
    return EvalScore(model=label, examples=len(tokenized.input_ids), trained_tokens=int(count), loss=round(loss, 6),
                     perplexity=round(math.exp(min(loss, 700.0)), 4),
                     eos_stop_rate=round(stopped / len(answers), 4), eos_stopped=stopped, prompts=len(answers),
                     max_new_tokens=max_new_tokens)


def trained_tokens(gen: Generator, data: HeldOut, pcfg: PrepareConfig):
    """The held-out examples as training tokenizes them (core.tokenize.Tokenized): Alpaca records with the run's
    prompts, or conversations with the template the model is served with (the run's), assistant turns trained."""
    tok = gen.tokenizer
    max_length = min(pcfg.max_length, gen.max_len)
    if data.conversations is not None:
        from alpaca_cli.core import chat

        return chat.tokenize_conversations(tok, gen.served_template, data.conversations, max_length=max_length,
                                           on_overflow="truncate", train_on=getattr(pcfg, "train_on", "all"))
    prompts = [promptsmod.render(gen.templates, r.instruction, r.input) for r in data.requests]
    return tokenize_examples(tok, prompts, data.outputs, max_length=max_length, on_overflow="truncate",
                             mask_inputs=pcfg.mask_inputs, fast_path=prefix_stable(tok)[0])


def _loss_sums(gen: Generator, input_ids, targets, batch_size: int) -> tuple[float, float]:
    """Summed next-token loss over the trained tokens, and their count: one example per row, rows of a bucketed
    length, the training loss's own functions."""
    import haliax as hax
    import jax.numpy as jnp

    from alpaca_cli.core.batches import PackedRow, build_row, row_activations, token_losses

    real_vocab = len(gen.tokenizer)
    pad = gen.tokenizer.pad_token_id if gen.tokenizer.pad_token_id is not None else 0

    @hax.named_jit
    def sums(model, row):
        act, _ = row_activations(model, row)
        per_token = token_losses(model, act, row.tokens, row.weights > 0, real_vocab)
        return hax.sum(per_token * row.weights).scalar(), hax.sum(row.weights).scalar()

    order = sorted(range(len(input_ids)), key=lambda i: len(input_ids[i]))
    total = count = 0.0
    with hax.partitioning.set_mesh(gen.mesh), hax.axis_mapping(COMPUTE):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = 16
            while width < max(len(input_ids[i]) for i in chunk):
                width *= 2
            width = min(width, gen.max_len)
            built = [build_row([(input_ids[i], targets[i])], width, pad, 1.0) for i in chunk]
            built += [build_row([], width, pad, 1.0)] * (batch_size - len(chunk))  # one shape per width
            Batch, Pos = hax.Axis("batch", len(built)), hax.Axis("position", width)
            arrays = [np.stack([b[k] for b in built]) for k in range(4)]
            row = PackedRow(*(hax.named(jnp.asarray(a), (Batch, Pos)) for a in arrays))
            s, c = sums(gen.model, row)
            total += float(s)
            count += float(c)
    return total, count
