"""The training plan: which examples go into which row of which step, decided once, deterministically.

Each epoch shuffles the examples (seeded by the run's seed and the epoch, as Stanford's Trainer reshuffles every
epoch), and every optimizer step takes about `batch_size` examples (at most that many): packing changes how a
step's examples are laid out in rows, not the batch the optimizer sees, so Stanford's 128 examples per step do not
become 1,000 at the same learning rate. Empty rows (to give every step the same shape) weigh nothing.

The plan depends on the data, the seed, the batch size, the row length and the steps, never on the machine: a mesh
whose data-parallel slots do not divide the plan's rows per step gets empty rows added to each batch
(`rows_per_batch`), which carry no trained token and so change no loss. That is what lets a run resume on another
device count, host count or tensor-parallel size with the same examples in the same steps.

Everything here is numpy over example lengths, so a plan can be printed (`--dry-run`) before JAX starts, and every
host of a pod computes the same one.
"""

from __future__ import annotations

import functools
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
    source_examples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """With a mixture: examples the steps take from each source (repeats counted)."""
    source_trained: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """With a mixture: trained tokens the steps take from each source."""

    @property
    def examples_per_step(self) -> float:
        return sum(len(r) for r in self.rows) / max(1, self.steps)

    @property
    def padding_fraction(self) -> float:
        return self.padding_on(self.rows_per_step)

    def padding_on(self, rows_per_batch: int) -> float:
        """The fraction of row tokens that are padding when each step is a batch of rows_per_batch rows."""
        total = self.steps * rows_per_batch * self.seq_len
        return 1.0 - self.real_tokens / total if total else 0.0


def rows_per_batch(rows_per_step: int, slots: int) -> int:
    """The rows of a batch on a mesh with `slots` data-parallel row slots (devices / tensor parallel, times the rows
    per device of a microbatch): the plan's rows per step, then empty rows up to a multiple of the slots."""
    return -(-rows_per_step // slots) * slots


def split_validation(n: int, fraction: float, seed: int, tag: tuple[int, ...] = (),
                     what: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids): a seeded random `fraction` of the examples is held out (`tag` seeds a
    mixture's sources apart; `what` names the source in the error)."""
    ids = np.arange(n, dtype=np.int64)
    if fraction <= 0:
        return ids, np.zeros(0, np.int64)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        raise ConfigError(f"val_fraction {fraction} leaves no training example out of {n}{what}")
    perm = np.random.default_rng([seed, 1_000_003, *tag]).permutation(n)
    val = np.sort(perm[:k])
    train = np.sort(perm[k:])
    return train, val


@dataclass
class Mixture:
    """Several sources sampled at given proportions: each source's training example ids (global cache rows), the
    normalised weights (the expected share of examples from each), and the examples in one pass over the mixture
    (what --epochs counts)."""

    groups: list[np.ndarray]
    weights: np.ndarray
    epoch_size: int
    names: list[str] = field(default_factory=list)


def split_validation_by_source(ranges: list[tuple[int, int]], fractions: list[float], seed: int,
                               names: list[str] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """(each source's train ids, all validation ids, sorted): source s (cache rows [start, stop)) holds out its
    own fraction, seeded apart from the others."""
    groups, vals = [], []
    for s, ((start, stop), fraction) in enumerate(zip(ranges, fractions)):
        what = f" in source {names[s]}" if names else ""
        train, val = split_validation(stop - start, fraction, seed, tag=(s,), what=what)
        groups.append(train + start)
        vals.append(val + start)
    return groups, np.sort(np.concatenate(vals)) if vals else np.zeros(0, np.int64)


def mixture_weights(examples: list[int], weights: list[float | None], epochs: list[float | None]) -> tuple[np.ndarray, int]:
    """(normalised weights, examples per mixture epoch). Weights: as given, an epoch being every example once.
    Epochs e_s: weights e_s * n_s, an epoch being sum e_s * n_s. Neither: weights n_s (a plain concatenation)."""
    n = np.asarray(examples, dtype=np.float64)
    if all(w is not None for w in weights):
        raw, size = np.asarray(weights, dtype=np.float64), n.sum()
    elif all(e is not None for e in epochs):
        raw = np.asarray(epochs, dtype=np.float64) * n
        size = raw.sum()
    else:
        raw, size = n, n.sum()
    return raw / raw.sum(), max(1, int(round(size)))


def mixture_counts(weights: np.ndarray, total: int, block: int) -> np.ndarray:
    """[blocks, sources] examples of each source in each block of `block` consecutive stream positions (the last
    block may be shorter): every block's counts sum to its size, and each source's cumulative count stays within
    1 of weight x position at every block's end (the error carried from block to block is paid back)."""
    w = np.asarray(weights, dtype=np.float64)
    sizes = [min(block, total - start) for start in range(0, total, block)]
    out = np.zeros((len(sizes), len(w)), dtype=np.int64)
    error = np.zeros(len(w))  # count so far - weight x position so far
    for b, size in enumerate(sizes):
        want = np.maximum(w * size - error, 0.0)  # a source ahead by more than its share takes nothing
        counts = np.floor(want).astype(np.int64)
        rest = size - int(counts.sum())
        if rest >= 0:  # the largest remainders get one more, ties to the lower source
            counts[np.argsort(-(want - counts), kind="stable")[:rest]] += 1
        else:  # (rare: sources behind by up to 1 each) the smallest remainders give one back
            order = [i for i in np.argsort(want - counts, kind="stable") if counts[i] > 0]
            counts[order[:-rest]] -= 1
        out[b] = counts
        error += counts - w * size
    return out


def mixture_stream(groups: list[np.ndarray], weights: np.ndarray, total: int, seed: int, block: int) -> np.ndarray:
    """The first `total` examples of a mixture's stream. Block b (of `block` positions: a step's batch when
    unpacked) holds mixture_counts' examples of each source at seeded positions; each source's examples come from
    its own stream (every epoch a fresh permutation of its training ids, as _stream)."""
    counts = mixture_counts(weights, total, block)
    streams = [_stream(np.asarray(g, np.int64), int(counts[:, s].sum()), seed, tag=(2, s)) if counts[:, s].sum()
               else np.zeros(0, np.int64) for s, g in enumerate(groups)]
    slots = np.concatenate([np.random.default_rng([seed, 3, b]).permutation(np.repeat(np.arange(len(groups)), c))
                            for b, c in enumerate(counts)])
    out = np.empty(total, dtype=np.int64)
    for s, stream in enumerate(streams):
        out[slots == s] = stream
    return out


def pack_rows(ids: np.ndarray, lengths: np.ndarray, seq_len: int, max_segments: int) -> list[np.ndarray]:
    """Greedy in-order packing (Levanter's pack_documents) of the given examples into rows of seq_len."""
    from levanter.data.packing import pack_documents

    if len(ids) == 0:
        return []
    ranges = pack_documents(lengths[ids], seq_len, max_segments_per_example=max_segments)
    return [ids[r.start : r.stop] for r in ranges]


class _StepPacker:
    """First-fit placement of examples into a step's fixed number of rows."""

    def __init__(self, rows: int, seq_len: int, max_segments: int):
        self.rows: list[list[int]] = [[] for _ in range(rows)]
        self.room = [seq_len] * rows
        self.max_segments = max_segments
        self.count = 0

    def add(self, example: int, length: int) -> bool:
        for i, r in enumerate(self.rows):
            if self.room[i] >= length and len(r) < self.max_segments:
                r.append(example)
                self.room[i] -= length
                self.count += 1
                return True
        return False

    def result(self) -> list[np.ndarray]:
        return [np.asarray(r, dtype=np.int64) for r in self.rows]


def make_plan(
    lengths: np.ndarray,
    trained: np.ndarray,
    *,
    seq_len: int,
    pack: bool,
    batch_size: int,
    epochs: float,
    steps: int | None,
    seed: int,
    max_segments: int = 64,
    train_ids: np.ndarray | None = None,
    val_ids: np.ndarray | None = None,
    mixture: Mixture | None = None,
) -> Plan:
    """Plan the whole run, for any machine (rows_per_batch fits it to a mesh).

    The examples of all epochs form one stream (each epoch a fresh permutation), consumed in order. Without packing
    every step takes the next batch_size examples. With packing, every step has the same number of rows (enough for
    batch_size examples of average length) and takes the next examples, first-fit into its rows, until it holds
    batch_size of them or the next one does not fit: about batch_size examples per step, in rows with little
    padding. The plan's padding fraction shows what remains; a shorter --seq-len lowers it on many devices. With a
    `mixture`, the stream is mixture_stream's (its groups are the training ids) and epochs count its epoch_size.
    """
    lengths, trained = np.asarray(lengths, dtype=np.int64), np.asarray(trained, dtype=np.int64)
    ids_all = _training_ids(len(lengths), train_ids, mixture)
    n = len(ids_all)
    _check(lengths[ids_all], seq_len)

    # A step never takes more than batch_size examples, so steps * batch_size examples are enough for --steps;
    # packed steps may take fewer and leave the tail unused.
    epoch_size = n if mixture is None else mixture.epoch_size
    total = steps * batch_size if steps else max(1, int(round(epochs * epoch_size)))
    stream, mean_length = _plan_stream(ids_all, lengths, total, seed, batch_size, mixture)
    if pack:
        # enough rows for a batch of average examples with 5% to spare
        rows_per_step = max(1, math.ceil(batch_size * mean_length / (0.95 * seq_len)))
        take = functools.partial(_packed_step, lengths=lengths, rows=rows_per_step, seq_len=seq_len,
                                 batch_size=batch_size, max_segments=max_segments)
    else:
        rows_per_step = batch_size
        take = functools.partial(_padded_step, rows=rows_per_step)

    rows: list[np.ndarray] = []
    step_tokens, step_real = [], []  # trained tokens, and non-padding ones, of each step
    consumed = 0
    while (len(step_tokens) < steps) if steps else (consumed < total):
        step_rows, taken = take(stream[consumed:])
        consumed += len(taken)
        rows.extend(step_rows)
        step_tokens.append(int(trained[taken].sum()))
        step_real.append(int(lengths[taken].sum()))
    step_tokens_a = np.asarray(step_tokens, dtype=np.int64)
    step_real_a = np.asarray(step_real, dtype=np.int64)
    return Plan(
        seq_len=seq_len,
        pack=pack,
        batch_size=batch_size,
        rows_per_step=rows_per_step,
        steps=len(step_tokens),
        rows=rows,
        step_tokens=step_tokens_a,
        step_real_tokens=step_real_a,
        epochs=round(consumed / epoch_size, 4),
        train_examples=n,
        real_tokens=int(step_real_a.sum()),
        trained_tokens=int(step_tokens_a.sum()),
        val_examples=np.asarray(val_ids if val_ids is not None else np.zeros(0, np.int64), dtype=np.int64),
        **_source_totals(mixture, stream[:consumed], trained),
    )


def _training_ids(n: int, train_ids: np.ndarray | None, mixture: Mixture | None) -> np.ndarray:
    """The examples the plan trains on, sorted: a mixture's groups, the given ids, or all n."""
    if mixture is not None:
        return np.sort(np.concatenate(mixture.groups))
    return np.arange(n, dtype=np.int64) if train_ids is None else np.asarray(train_ids, np.int64)


def _plan_stream(ids: np.ndarray, lengths: np.ndarray, total: int, seed: int, batch_size: int,
                 mixture: Mixture | None) -> tuple[np.ndarray, float]:
    """(the plan's stream of examples, their expected mean length): _stream over the training ids, or a mixture's
    stream (blocks of batch_size)."""
    if mixture is None:
        return _stream(ids, total, seed), float(lengths[ids].mean())
    stream = mixture_stream(mixture.groups, mixture.weights, total, seed, batch_size)
    return stream, float(sum(w * lengths[g].mean() for w, g in zip(mixture.weights, mixture.groups) if len(g)))


def _source_totals(mixture: Mixture | None, taken: np.ndarray, trained: np.ndarray) -> dict[str, np.ndarray]:
    """A mixture plan's source_examples and source_trained: what its steps take from each source."""
    if mixture is None:
        return {}
    member = [np.isin(taken, g) for g in mixture.groups]
    return {"source_examples": np.asarray([int(m.sum()) for m in member], dtype=np.int64),
            "source_trained": np.asarray([int(trained[taken[m]].sum()) for m in member], dtype=np.int64)}


def _stream(ids: np.ndarray, total: int, seed: int, tag: tuple[int, ...] = ()) -> np.ndarray:
    """The first `total` examples of the stream: every epoch a fresh permutation, seeded by the run's seed (and
    `tag`: a mixture's source)."""
    n = len(ids)
    if n == 0:
        raise ConfigError("a source of the mixture has no training example (all held out, or none prepared)")
    epochs = [ids[np.random.default_rng([seed, *tag, epoch]).permutation(n)] for epoch in range(math.ceil(total / n))]
    return np.concatenate(epochs)[:total]


def _check(lengths: np.ndarray, seq_len: int) -> None:
    """Refuse a plan that cannot be made: no example, or one longer than a row."""
    if len(lengths) == 0:
        raise ConfigError("there is no training example (the prepared data is empty or all held out)")
    too_long = int((lengths > seq_len).sum())
    if too_long:
        raise ConfigError(
            f"{too_long} prepared example(s) are longer than --seq-len {seq_len} (longest {int(lengths.max())})",
            hint="raise --seq-len, or prepare with a --max-length no larger than it",
        )


def _packed_step(stream: np.ndarray, *, lengths: np.ndarray, rows: int, seq_len: int, batch_size: int,
                 max_segments: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(the step's rows, the examples it takes from the front of the stream): first-fit until it holds batch_size
    examples or the next one does not fit."""
    packer = _StepPacker(rows, seq_len, max_segments)
    for e in stream:  # lazily: a step takes a few examples off a long stream
        if packer.count >= batch_size or not packer.add(int(e), int(lengths[e])):
            break  # the step is full: this example opens the next one
    return packer.result(), stream[: packer.count]


def _padded_step(stream: np.ndarray, *, rows: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One example per row, the step's trailing rows empty when the stream ends."""
    chunk = stream[:rows]
    step_rows = [chunk[i : i + 1] for i in range(len(chunk))]
    return step_rows + [np.zeros(0, dtype=np.int64)] * (rows - len(chunk)), chunk
