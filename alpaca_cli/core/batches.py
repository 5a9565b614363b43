"""Rows for the trainer: packed examples with per-example attention and positions, and the loss over them.

A row holds whole examples back to back. Every token carries its example's segment id (attention never crosses
examples) and its position within the example (so absolute-position models such as GPT-2 see what they would see
alone). The loss weight of position i is that of predicting token i+1: the target flag of token i+1 when it belongs
to the same example, else 0. This is Stanford's `labels` shifted by one, done here rather than in Levanter's
SupervisedDataset, whose mask is off by one (it skips the first response token and trains on EOS -> next example).

Weights are divided by the number of trained tokens in the whole optimizer step, and the loss is their sum: the
step's loss is the mean over its trained tokens however the step is split over devices, hosts or microbatches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import equinox as eqx
import haliax as hax
import jax.numpy as jnp
import numpy as np
from levanter.data import AsyncDataset

from alpaca_cli.core.cache import PreparedCache


class PackedRow(eqx.Module):
    tokens: hax.NamedArray
    """[position] int32 token ids (pad id after the last example)."""
    weights: hax.NamedArray
    """[position] float32 loss weight of predicting token i+1 from position i."""
    segment_ids: hax.NamedArray
    """[position] int32 index of the example within the row, -1 for padding."""
    pos_ids: hax.NamedArray
    """[position] int32 position within the example."""


def build_row(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Numpy arrays (tokens, weights, segment_ids, pos_ids) for one row holding `examples` (ids, targets)."""
    tokens = np.full(seq_len, pad_id, dtype=np.int32)
    weights = np.zeros(seq_len, dtype=np.float32)
    segments = np.full(seq_len, -1, dtype=np.int32)
    positions = np.zeros(seq_len, dtype=np.int32)
    at = 0
    for seg, (ids, targets) in enumerate(examples):
        n = len(ids)
        if at + n > seq_len:
            raise ValueError(f"row overflow: {at + n} tokens > {seq_len}")
        tokens[at : at + n] = ids
        # position i predicts token i+1 of the same example; the example's last position predicts nothing
        weights[at : at + n - 1] = targets[1:n].astype(np.float32) * scale
        segments[at : at + n] = seg
        positions[at : at + n] = np.arange(n, dtype=np.int32)
        at += n
    return tokens, weights, segments, positions


_EMPTY = np.zeros(0, dtype=np.int64)


class PackedRows(AsyncDataset[PackedRow]):
    """The plan's rows as a Levanter AsyncDataset (read from the token cache on demand).

    With steps (step_tokens): batch b holds step b's rows_per_step rows, then rows_per_batch - rows_per_step empty
    rows, so a batch divides over the mesh's row slots while the plan stays the one of every machine."""

    def __init__(
        self,
        cache: PreparedCache,
        rows: Sequence[np.ndarray],
        Pos: hax.Axis,
        pad_id: int,
        step_tokens: Optional[np.ndarray] = None,
        rows_per_step: int = 1,
        rows_per_batch: Optional[int] = None,
    ):
        super().__init__()
        self.cache = cache
        self.Pos = Pos
        self.pad_id = int(pad_id)
        self.step_tokens = step_tokens
        self.rows_per_step = rows_per_step
        self.rows_per_batch = rows_per_batch or rows_per_step
        rows = list(rows)
        if self.rows_per_batch == rows_per_step:
            self.rows = rows
        else:
            blank = [_EMPTY] * (self.rows_per_batch - rows_per_step)
            self.rows = [r for s in range(0, len(rows), rows_per_step) for r in rows[s : s + rows_per_step] + blank]

    async def async_len(self) -> int:
        return len(self.rows)

    async def final_length_is_known(self) -> bool:
        return True

    def is_finite(self) -> bool:
        return True

    async def current_len(self) -> Optional[int]:
        return len(self.rows)

    def scale_for_row(self, index: int) -> float:
        if self.step_tokens is None:
            return 1.0
        n = int(self.step_tokens[index // self.rows_per_batch])
        return 1.0 / n if n else 0.0

    async def get_batch(self, indices: Sequence[int]) -> Sequence[PackedRow]:
        wanted = sorted({int(e) for i in indices for e in self.rows[i]})
        store = self.cache.store
        fetched = await store.get_batch(wanted) if wanted else []
        by_id = {e: (f["input_ids"], f["targets"]) for e, f in zip(wanted, fetched)}
        out = []
        for i in indices:
            arrays = build_row([by_id[int(e)] for e in self.rows[i]], self.Pos.size, self.pad_id, self.scale_for_row(i))
            out.append(
                PackedRow(*(hax.named(a, self.Pos) for a in arrays))  # numpy-backed; the loader stacks on CPU
            )
        return out


def make_loss_fn(real_vocab: int, accum_steps: int = 1):
    """Levanter-style loss: sum of weighted next-token cross-entropy (the weights already hold 1/step tokens).

    accum_steps: Levanter's microbatching averages the microbatches' losses and gradients; multiplying by their
    number here turns that average back into the step's sum.
    """
    def loss_fn(model, row: PackedRow, *, key=None):
        activations, aux = row_activations(model, row, key=key)
        per_token = token_losses(model, activations, row.tokens, row.weights > 0, real_vocab)
        loss = hax.sum(per_token * row.weights).scalar() * accum_steps
        return loss + aux, {}

    return loss_fn


def row_activations(model, row: PackedRow, *, key=None):
    """(activations, auxiliary loss) of a packed row: attention kept within each example, positions per example.

    Mixtral's forward logs router statistics with levanter.tracker.jit_log, an io_callback under which JAX cannot
    differentiate ("IO callbacks do not support JVP", levanter/models/mixtral.py:580); inside
    defer_tracker_for_jit the statistics go to a dict instead. Its auxiliary loss comes back as a 0-d NamedArray.
    """
    import levanter.tracker
    from levanter.layers.attention import AttentionMask

    attn_mask = AttentionMask.causal().with_segment_ids(row.segment_ids)
    with levanter.tracker.defer_tracker_for_jit():
        activations = model.activations(row.tokens, attn_mask, key=key, pos_ids=row.pos_ids)
    aux = 0.0
    if isinstance(activations, tuple):
        activations, aux = activations
        if isinstance(aux, hax.NamedArray):
            aux = aux.scalar()
    return activations, aux


def token_losses(model, activations, tokens, mask, real_vocab: int):
    """Per-position cross-entropy of predicting the next token (0 where mask is False): logsumexp minus the
    target's logit, picked with a gather.

    Levanter's next_token_loss picks the target through a float one-hot of [positions, vocab] (1.3 GB per 10k
    positions of a 32k vocabulary), which made the whole step 2.5x slower on CPU; its blockwise variant gave a wrong
    loss with a block of 16384 over a 32001-token vocabulary (benchmarks/README.md).
    """
    import jax

    from alpaca_cli.core.families import final_logit_softcap

    # Flattened to [positions, embed] @ [embed, vocab]: XLA's CPU backend ran the gather and the logsumexp of the
    # 2-D form 1.6x faster than of [batch, position, vocab].
    Vocab, Embed = model.Vocab, model.Embed
    x = activations.rearrange((*tokens.axes, Embed)).array.reshape(-1, Embed.size)
    logits = (x @ model.get_lm_head().rearrange((Embed, Vocab)).array).astype(jnp.float32)
    logits = final_logit_softcap(model, logits)  # Gemma-2/3: what the model's own call applies
    if Vocab.size != real_vocab:  # the vocabulary was padded for sharding: padded ids take no probability mass
        logits = jnp.where(jnp.arange(Vocab.size) < real_vocab, logits, -1e30)
    target = hax.roll(tokens, -1, tokens.resolve_axis(model.Pos.name)).array.reshape(-1, 1).astype(jnp.int32)
    per_token = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, target, axis=-1)[:, 0]
    per_token = hax.named(per_token.reshape(tokens.array.shape), tokens.axes)
    return hax.where(mask, per_token, 0.0)
