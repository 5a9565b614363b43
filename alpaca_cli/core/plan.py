"""The training plan: which examples go into which row of which step, decided once, deterministically.

Each epoch shuffles the examples (seeded by the run's seed and the epoch, as Stanford's Trainer reshuffles every
epoch), and every optimizer step takes the next `batch_size` examples: packing changes how a step's examples are laid
out in rows, never how many there are, so Stanford's 128 examples per step stay 128 at the same learning rate.
Empty rows (to give every step the same shape) weigh nothing.

Everything here is numpy over example lengths, so a plan can be printed (`--dry-run`) before JAX starts, and every
host of a pod computes the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from alpaca_cli.errors import ConfigError


@dataclass
class Plan:
    seq_len: int
    pack: bool
    batch_size: int
    """Examples per step asked for."""
    rows_per_step: int
    steps: int
    rows: list[np.ndarray]
    """Example ids of each row, steps * rows_per_step of them (trailing rows may be empty)."""
    step_tokens: np.ndarray
    """Trained tokens in each step (the loss is their mean)."""
    step_real_tokens: np.ndarray
    """Non-padding tokens in each step."""
    epochs: float
    """Passes over the training examples that the steps cover."""
    train_examples: int
    real_tokens: int
    trained_tokens: int
    val_examples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def examples_per_step(self) -> float:
        return sum(len(r) for r in self.rows) / max(1, self.steps)

    @property
    def padding_fraction(self) -> float:
        total = self.steps * self.rows_per_step * self.seq_len
        return 1.0 - self.real_tokens / total if total else 0.0

    def step_of_row(self, row: int) -> int:
        return row // self.rows_per_step


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids): a seeded random `fraction` of the examples is held out."""
    ids = np.arange(n, dtype=np.int64)
    if fraction <= 0:
        return ids, np.zeros(0, np.int64)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise ConfigError(f"val_fraction {fraction} leaves no training example out of {n}")
    perm = np.random.default_rng([seed, 1_000_003]).permutation(n)
    val = np.sort(perm[:k])
    train = np.sort(perm[k:])
    return train, val


def pack_rows(ids: np.ndarray, lengths: np.ndarray, seq_len: int, max_segments: int) -> list[np.ndarray]:
    """Greedy in-order packing (Levanter's pack_documents) of the given examples into rows of seq_len."""
    from levanter.data.packing import pack_documents

    if len(ids) == 0:
        return []
    ranges = pack_documents(lengths[ids], seq_len, max_segments_per_example=max_segments)
    return [ids[r.start : r.stop] for r in ranges]


def pack_step(ids: np.ndarray, lengths: np.ndarray, seq_len: int, max_segments: int) -> list[np.ndarray]:
    """One step's examples into as few rows as first-fit-decreasing finds (order within a row: by length)."""
    order = sorted(ids.tolist(), key=lambda e: -int(lengths[e]))
    rows: list[list[int]] = []
    room: list[int] = []
    for e in order:
        n = int(lengths[e])
        for i in range(len(rows)):
            if room[i] >= n and len(rows[i]) < max_segments:
                rows[i].append(e)
                room[i] -= n
                break
        else:
            rows.append([e])
            room.append(seq_len - n)
    return [np.asarray(r, dtype=np.int64) for r in rows]


def make_plan(
    lengths: np.ndarray,
    trained: np.ndarray,
    *,
    seq_len: int,
    pack: bool,
    batch_size: int,
    epochs: float,
    steps: int | None,
    row_multiple: int,
    seed: int,
    max_segments: int = 64,
    train_ids: np.ndarray | None = None,
    val_ids: np.ndarray | None = None,
) -> Plan:
    """Plan the whole run. row_multiple: rows per step must divide over the data-parallel devices (x microbatch).

    The examples of all epochs form one stream (each epoch a fresh permutation); every step takes the next
    batch_size of them, as an unpacked run would. With packing, each step's examples are packed into rows, and
    every step gets the same number of rows: the most any step needs, rounded up to row_multiple (empty rows weigh
    nothing). The plan's padding fraction shows what that costs; a shorter --seq-len lowers it.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    trained = np.asarray(trained, dtype=np.int64)
    ids_all = np.arange(len(lengths), dtype=np.int64) if train_ids is None else np.asarray(train_ids, np.int64)
    n = len(ids_all)
    if n == 0:
        raise ConfigError("there is no training example (the prepared data is empty or all held out)")
    too_long = int((lengths[ids_all] > seq_len).sum())
    if too_long:
        raise ConfigError(
            f"{too_long} prepared example(s) are longer than --seq-len {seq_len} (longest {int(lengths[ids_all].max())})",
            hint="raise --seq-len, or prepare with a --max-length no larger than it",
        )
    if not pack and batch_size % row_multiple:
        raise ConfigError(
            f"batch size {batch_size} does not divide over the {row_multiple} data-parallel slots "
            f"(devices / tensor parallel x per-device rows) with --no-pack",
            hint=f"use a multiple of {row_multiple}",
        )

    # the example stream
    if steps:
        total = steps * batch_size
    else:
        total = max(1, int(round(epochs * n)))
    stream_parts = []
    epoch = 0
    while sum(len(x) for x in stream_parts) < total:
        stream_parts.append(ids_all[np.random.default_rng([seed, epoch]).permutation(n)])
        epoch += 1
    stream = np.concatenate(stream_parts)[:total]
    if steps is None:
        steps = math.ceil(total / batch_size)
    step_examples = [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]

    if pack:
        packed = [pack_step(ex, lengths, seq_len, max_segments) for ex in step_examples]
        need = max(len(p) for p in packed)
        rows_per_step = max(row_multiple, math.ceil(need / row_multiple) * row_multiple)
    else:
        packed = [[ex[i : i + 1] for i in range(len(ex))] for ex in step_examples]
        rows_per_step = batch_size

    empty = np.zeros(0, dtype=np.int64)
    rows: list[np.ndarray] = []
    step_tokens = np.zeros(steps, dtype=np.int64)
    step_real = np.zeros(steps, dtype=np.int64)
    for s, step_rows in enumerate(packed):
        rows.extend(step_rows)
        rows.extend([empty] * (rows_per_step - len(step_rows)))
        step_tokens[s] = int(trained[step_examples[s]].sum())
        step_real[s] = int(lengths[step_examples[s]].sum())
    return Plan(
        seq_len=seq_len,
        pack=pack,
        batch_size=batch_size,
        rows_per_step=rows_per_step,
        steps=steps,
        rows=rows,
        step_tokens=step_tokens,
        step_real_tokens=step_real,
        epochs=round(total / n, 4),
        train_examples=n,
        real_tokens=int(step_real.sum()),
        trained_tokens=int(step_tokens.sum()),
        val_examples=np.asarray(val_ids if val_ids is not None else np.zeros(0, np.int64), dtype=np.int64),
    )
