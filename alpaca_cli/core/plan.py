"""The training plan: which examples go into which row of which step, decided once, deterministically.

Each epoch shuffles the examples (seeded by the run's seed and the epoch, as Stanford's Trainer reshuffles every
epoch); with packing, Levanter's `pack_documents` then fills rows greedily in that order. The number of rows per step
is chosen so that a step sees about `batch_size` examples: packing must not turn Stanford's 128 examples per step
into 1,000 at the same learning rate. The final step is filled up with empty rows, which weigh nothing.

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
    """Plan the whole run. row_multiple: rows per step must divide over the data-parallel devices (x microbatch)."""
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

    def epoch_order(epoch: int, count: int) -> np.ndarray:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        return ids_all[perm[:count]]

    def epoch_rows(epoch: int, count: int) -> list[np.ndarray]:
        order = epoch_order(epoch, count)
        if pack:
            return pack_rows(order, lengths, seq_len, max_segments)
        return [order[i : i + 1] for i in range(len(order))]

    # rows per step, from the first epoch's packing density
    first = epoch_rows(0, n)
    if pack:
        per_row = n / len(first)
        want = max(1, round(batch_size / per_row))
        rows_per_step = max(row_multiple, int(round(want / row_multiple)) * row_multiple)
    else:
        if batch_size % row_multiple:
            raise ConfigError(
                f"batch size {batch_size} does not divide over the {row_multiple} data-parallel slots "
                f"(devices / tensor parallel x per-device rows) with --no-pack",
                hint=f"use a multiple of {row_multiple}",
            )
        rows_per_step = batch_size

    rows: list[np.ndarray] = []
    if steps:
        needed = steps * rows_per_step
        epoch = 0
        rows.extend(first)
        while len(rows) < needed:
            epoch += 1
            rows.extend(epoch_rows(epoch, n))
        covered = _epochs_covered(rows[:needed], n)
        rows = rows[:needed]
    else:
        whole = int(math.floor(epochs))
        frac = epochs - whole
        for epoch in range(whole):
            rows.extend(first if epoch == 0 else epoch_rows(epoch, n))
        if frac > 0:
            count = max(1, int(round(frac * n)))
            rows.extend(epoch_rows(whole, count) if whole > 0 else _partial_first(first, count))
        steps = max(1, math.ceil(len(rows) / rows_per_step))
        covered = epochs
    empty = np.zeros(0, dtype=np.int64)
    rows.extend([empty] * (steps * rows_per_step - len(rows)))

    step_tokens = np.zeros(steps, dtype=np.int64)
    step_real = np.zeros(steps, dtype=np.int64)
    for i, r in enumerate(rows):
        if len(r):
            step_tokens[i // rows_per_step] += int(trained[r].sum())
            step_real[i // rows_per_step] += int(lengths[r].sum())
    real = int(step_real.sum())
    return Plan(
        seq_len=seq_len,
        pack=pack,
        batch_size=batch_size,
        rows_per_step=rows_per_step,
        steps=steps,
        rows=rows,
        step_tokens=step_tokens,
        step_real_tokens=step_real,
        epochs=round(float(covered), 4),
        train_examples=n,
        real_tokens=real,
        trained_tokens=int(step_tokens.sum()),
        val_examples=np.asarray(val_ids if val_ids is not None else np.zeros(0, np.int64), dtype=np.int64),
    )


def _partial_first(first: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The first `count` examples of epoch 0 (a run of less than one epoch), keeping epoch 0's packing."""
    out, seen = [], 0
    for r in first:
        if seen >= count:
            break
        take = r[: count - seen]
        out.append(take)
        seen += len(take)
    return out


def _epochs_covered(rows: list[np.ndarray], n: int) -> float:
    return sum(len(r) for r in rows) / n
