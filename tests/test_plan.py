"""The training plan (pure numpy): batches of about batch_size examples, every example once per epoch."""

import numpy as np
import pytest

from alpaca_cli.core.batches import build_row
from alpaca_cli.core.plan import make_plan, rows_per_batch, split_validation
from alpaca_cli.errors import ConfigError

rng = np.random.default_rng(0)
LENGTHS = rng.integers(20, 300, size=500)
TRAINED = (LENGTHS * 0.6).astype(int)


def plan(**kw):
    args = dict(seq_len=2048, pack=True, batch_size=64, epochs=3, steps=None, seed=0)
    args.update(kw)
    return make_plan(LENGTHS, TRAINED, **args)


def step_examples(p, s):
    return np.concatenate(p.rows[s * p.rows_per_step:(s + 1) * p.rows_per_step])


def test_packed_steps_see_about_batch_size_examples_in_dense_rows():
    p = plan()
    per_step = [len(step_examples(p, s)) for s in range(p.steps)]
    assert max(per_step) <= 64  # never more than asked: packing does not grow the batch
    assert np.mean(per_step[:-1]) >= 0.9 * 64  # about batch_size, not 10x fewer either
    for r in p.rows:
        assert LENGTHS[r].sum() <= 2048 and len(r) <= 64
    assert p.padding_fraction < 0.2  # rows sized for the batch: little padding
    # the stream is consumed in order, each example of each epoch exactly once
    flat = np.concatenate([np.sort(step_examples(p, s)) for s in range(p.steps)])
    assert len(flat) == 3 * len(LENGTHS)


def test_every_example_once_per_epoch_in_a_new_order():
    p = plan(epochs=3, batch_size=50, pack=False)  # unpacked: exactly 50 per step, 10 per epoch
    steps_per_epoch = 10
    assert p.steps == 30 and p.epochs == 3
    epochs = [np.concatenate([step_examples(p, s) for s in range(e * steps_per_epoch, (e + 1) * steps_per_epoch)])
              for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(len(LENGTHS)))
    assert set(step_examples(p, 0).tolist()) != set(step_examples(p, steps_per_epoch).tolist())  # reshuffled
    packed = plan(epochs=3, batch_size=50)
    counts = np.bincount(np.concatenate([r for r in packed.rows if len(r)]), minlength=len(LENGTHS))
    assert (counts == 3).all()


def test_plan_is_deterministic_and_seeded():
    a, b, c = plan(), plan(), plan(seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.rows, b.rows))
    assert not all(np.array_equal(x, y) for x, y in zip(a.rows, c.rows))


def test_step_tokens_and_padding_rows():
    p = plan(epochs=1)
    assert len(p.rows) == p.steps * p.rows_per_step
    for s in range(p.steps):
        rows = p.rows[s * p.rows_per_step:(s + 1) * p.rows_per_step]
        assert p.step_tokens[s] == sum(int(TRAINED[r].sum()) for r in rows)
    assert p.trained_tokens == TRAINED.sum()
    assert p.real_tokens == LENGTHS.sum()


def test_steps_override_epochs_and_fractional_epochs():
    p = plan(steps=7)
    assert p.steps == 7 and len(p.rows) == 7 * p.rows_per_step
    half = plan(epochs=0.5)
    flat = np.concatenate([r for r in half.rows if len(r)])
    assert len(flat) == 250 and len(set(flat.tolist())) == 250 and half.epochs == 0.5


def test_no_pack_is_one_example_per_row_on_any_mesh():
    p = plan(pack=False, batch_size=6)
    assert p.rows_per_step == 6 and all(len(r) <= 1 for r in p.rows)
    # on 4 data-parallel devices each batch gets two empty rows; on 3 or 6, none
    assert [rows_per_batch(6, slots) for slots in (1, 3, 4, 6, 8)] == [6, 6, 8, 6, 8]
    assert p.padding_on(8) > p.padding_on(6) == p.padding_fraction


def test_examples_longer_than_rows_are_refused():
    with pytest.raises(ConfigError, match="longer than --seq-len 128"):
        plan(seq_len=128)


def test_validation_split_is_disjoint_and_seeded():
    train, val = split_validation(100, 0.1, seed=0)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100
    assert np.array_equal(val, split_validation(100, 0.1, seed=0)[1])


def test_build_row_shifts_targets_within_each_example():
    a = (np.array([1, 10, 11, 12, 2]), np.array([0, 0, 0, 1, 1], dtype=np.uint8))
    b = (np.array([1, 20, 2]), np.array([0, 1, 1], dtype=np.uint8))
    tokens, weights, segments, positions = build_row([a, b], 10, pad_id=0, scale=0.5)
    assert tokens.tolist() == [1, 10, 11, 12, 2, 1, 20, 2, 0, 0]
    # position i carries the weight of predicting token i+1 of the same example; the last of each predicts nothing
    assert weights.tolist() == [0, 0, 0.5, 0.5, 0, 0.5, 0.5, 0, 0, 0]
    assert segments.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, -1, -1]
    assert positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
