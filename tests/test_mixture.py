"""Mixtures in the training plan (numpy only): the asked proportions per step and over the run, the same on every
device count, `epochs` per source, and one source exactly as before mixtures existed."""

import hashlib

import numpy as np
import pytest

from alpaca_cli.core.plan import (Mixture, make_plan, mixture_counts, mixture_stream, mixture_weights,
                                  rows_per_batch, split_validation, split_validation_by_source)
from alpaca_cli.core.train_setup import mixture_for
from alpaca_cli.errors import ConfigError
from alpaca_cli.records import SourceRecord

rng = np.random.default_rng(1)
# two sources back to back in the cache: A (rows 0-599, shorter) and B (rows 600-899, longer)
LENGTHS = np.concatenate([rng.integers(10, 120, 600), rng.integers(100, 400, 300)])
TRAINED = (LENGTHS * 0.5).astype(np.int64)
A, B = np.arange(0, 600), np.arange(600, 900)


def mixed(weights=(3, 1), **kw):
    w, size = mixture_weights([len(A), len(B)], list(weights), [None, None])
    args = dict(seq_len=1024, pack=False, batch_size=128, epochs=2.0, steps=None, seed=5,
                mixture=Mixture([A, B], w, size, ["a", "b"]))
    args.update(kw)
    return make_plan(LENGTHS, TRAINED, **args)


def steps_of(p):
    return [np.concatenate(p.rows[s * p.rows_per_step:(s + 1) * p.rows_per_step]) for s in range(p.steps)]


def from_b(ids):
    return int((np.asarray(ids) >= 600).sum())


def test_3_to_1_unpacked_every_step_is_exactly_96_and_32():
    p = mixed()
    steps = steps_of(p)
    full = [s for s in steps if len(s) == 128]
    assert len(full) == p.steps - 1 or len(full) == p.steps
    assert all(from_b(s) == 32 for s in full)  # every full step: 96 from A, 32 from B
    taken = np.concatenate(steps)
    assert abs(from_b(taken) - 0.25 * len(taken)) < 1  # and over the whole run
    assert list(p.source_examples) == [len(taken) - from_b(taken), from_b(taken)]
    assert p.source_trained.sum() == p.trained_tokens


def test_3_to_1_packed_is_close_per_step_and_exact_over_the_run():
    p = mixed(pack=True)
    steps = steps_of(p)
    for s in steps[:-1]:
        n = len(s)
        # a packed step takes a prefix of the stream (whole blocks of 128 hold exactly 32 of B): binomial-sized slack
        assert abs(from_b(s) - 0.25 * n) <= 4 * np.sqrt(n * 0.25 * 0.75) + 1
    taken = np.concatenate(steps)
    assert abs(from_b(taken) - 0.25 * len(taken)) <= 32  # the stream is exact per block of 128: off by < one block


def test_the_stream_is_exact_at_every_block_and_never_negative():
    for trial in range(300):
        r = np.random.default_rng(trial)
        S = int(r.integers(2, 7))
        w = r.random(S) ** 3 + 1e-4
        w /= w.sum()
        block, total = int(r.integers(1, 200)), int(r.integers(1, 3000))
        counts = mixture_counts(w, total, block)
        assert (counts >= 0).all()
        assert list(counts.sum(1)) == [min(block, total - s) for s in range(0, total, block)]
        error = np.cumsum(counts, 0) - w[None] * np.cumsum(counts.sum(1))[:, None]
        assert np.abs(error).max() < (1 if S == 2 else 2)  # an independent check of the claimed bound


def test_the_stream_draws_each_source_from_its_own_shuffled_epochs():
    s = mixture_stream([A, B], np.array([0.5, 0.5]), 1200, seed=0, block=100)
    b = s[s >= 600]
    assert len(b) == 600
    assert sorted(b[:300]) == list(B) and sorted(b[300:]) == list(B)  # two epochs of B, each once
    assert list(b[:300]) != list(b[300:])  # in a new order


def test_deterministic_and_seeded():
    assert all((x == y).all() for x, y in zip(mixed().rows, mixed().rows))
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(mixed().rows, mixed(seed=6).rows))


@pytest.mark.parametrize("pack", [False, True])
def test_the_same_batches_on_1_2_4_8_devices(pack):
    from alpaca_cli.core.batches import PackedRows

    p = mixed(pack=pack)
    seen = []
    for devices in (1, 2, 4, 8):
        batch = rows_per_batch(p.rows_per_step, devices)
        data = PackedRows(None, p.rows, None, 0, step_tokens=p.step_tokens, rows_per_step=p.rows_per_step,
                          rows_per_batch=batch)
        steps = [np.concatenate(data.rows[i * batch:(i + 1) * batch]) for i in range(p.steps)]
        seen.append([s.tolist() for s in steps])
    assert seen[0] == seen[1] == seen[2] == seen[3]


def test_epochs_per_source_draw_each_record_exactly_that_often():
    w, size = mixture_weights([600, 300], [None, None], [1, 3])
    assert size == 600 + 900 and np.allclose(w, [600 / 1500, 900 / 1500])
    p = make_plan(LENGTHS, TRAINED, seq_len=1024, pack=False, batch_size=64, epochs=2.0, steps=None, seed=1,
                  mixture=Mixture([A, B], w, size))
    taken = np.concatenate(steps_of(p))
    counts = np.bincount(taken, minlength=900)
    assert (counts[:600] == 2).all() and (counts[600:] == 6).all()  # --epochs 2 passes over the mixture
    assert p.epochs == 2.0


def test_weights_default_to_sizes_and_are_normalised():
    assert np.allclose(mixture_weights([600, 300], [None, None], [None, None])[0], [2 / 3, 1 / 3])
    w, size = mixture_weights([600, 300], [3.0, 1.0], [None, None])
    assert np.allclose(w, [0.75, 0.25]) and size == 900


def test_held_out_per_source():
    groups, val = split_validation_by_source([(0, 600), (600, 900)], [0.0, 0.1], seed=2)
    assert list(groups[0]) == list(A) and len(val) == 30 and (val >= 600).all()
    assert sorted(np.concatenate([groups[1], val]).tolist()) == list(B)
    records = [SourceRecord(name="a", rows=[0, 600], weight=3), SourceRecord(name="b", rows=[600, 900], weight=1,
                                                                              val_fraction=0.5)]
    mixture, val = mixture_for(records, 0.1, seed=2)
    assert len(val) == 60 + 150 and [len(g) for g in mixture.groups] == [540, 150]
    with pytest.raises(ConfigError, match="in source b"):
        split_validation_by_source([(0, 600), (600, 601)], [0.0, 0.5], seed=2, names=["a", "b"])


def _digest(p):
    h = hashlib.sha256()
    for r in p.rows:
        h.update(np.asarray(r, np.int64).tobytes())
        h.update(b"|")
    h.update(p.step_tokens.tobytes())
    h.update(str((p.rows_per_step, p.steps, p.epochs)).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("pack,steps,golden", [(True, None, "389f2c92abd0d310"), (True, 7, "6a84067b30f7d373"),
                                               (False, None, "fe2de9a0dd750549"), (False, 7, "d82f8762474bade1")])
def test_one_source_plans_exactly_as_before_mixtures(pack, steps, golden):
    """Goldens computed with main 4218c6a's core/plan.py (before mixtures) on the same inputs."""
    r = np.random.default_rng(7)
    lengths = r.integers(5, 300, size=500)
    trained = (lengths * 0.6).astype(np.int64)
    train, val = split_validation(500, 0.1, 3)
    assert hashlib.sha256(val.tobytes()).hexdigest()[:16] == "717e4be99b2febe5"
    p = make_plan(lengths, trained, seq_len=512, pack=pack, batch_size=16, epochs=2.0, steps=steps, seed=3,
                  train_ids=train, val_ids=val)
    assert _digest(p) == golden
