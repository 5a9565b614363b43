"""A model's logits: one place that asks the model for them, so family specifics (Gemma-2's final soft-capping, say)
are never skipped by a hand-written `activations @ lm_head`; and the one way a model is put in evaluation mode."""

from __future__ import annotations


def for_inference(model):
    """The model with dropout off: what every forward that is not a training step runs (generate, eval,
    export --verify, the held-out loss during training). A model built from a config with dropout (every published
    GPT-2: 0.1; LoRA's adapters) is in training mode, where a forward without a PRNG key fails ("Dropout requires a
    key") and one with a key is random.

    Levanter's own call (what its evaluators and TrainerState.eval_model use): it sets `inference` on every module
    that has one (haliax's Dropout, GPT-2's attention). Training is untouched: Levanter's train step sets training
    mode itself (`inference_mode(state.model, False)`)."""
    from levanter.utils.tree_utils import inference_mode

    return inference_mode(model, True)


def model_logits(model, tokens, attn_mask, *, pos_ids=None):
    """[..., position, vocab] logits from the model's own call (Levanter's LmHeadModel.__call__).

    Inside defer_tracker_for_jit: Mixtral's forward logs router statistics through Levanter's tracker, which warns
    "No global tracker set" outside training and cannot run under differentiation (see batches.row_activations)."""
    import levanter.tracker

    with levanter.tracker.defer_tracker_for_jit():
        return model(tokens, attn_mask, key=None, pos_ids=pos_ids)
