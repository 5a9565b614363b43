"""A model's logits: one place that asks the model for them, so family specifics (Gemma-2's final soft-capping, say)
are never skipped by a hand-written `activations @ lm_head`."""

from __future__ import annotations


def model_logits(model, tokens, attn_mask, *, pos_ids=None):
    """[..., position, vocab] logits from the model's own call (Levanter's LmHeadModel.__call__).

    Inside defer_tracker_for_jit: Mixtral's forward logs router statistics through Levanter's tracker, which warns
    "No global tracker set" outside training and cannot run under differentiation (see batches.row_activations)."""
    import levanter.tracker

    with levanter.tracker.defer_tracker_for_jit():
        return model(tokens, attn_mask, key=None, pos_ids=pos_ids)
