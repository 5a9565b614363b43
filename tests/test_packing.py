"""Packed rows: an example's logits packed with others equal its logits alone (float32)."""

import numpy as np
import pytest


def _model(kind):
    import haliax as hax
    import jax

    if kind == "llama":
        from levanter.models.llama import LlamaConfig

        cfg = LlamaConfig(max_seq_len=64, hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=2)
    else:  # absolute learned positions: only right if every example restarts at position 0
        from levanter.models.gpt2 import Gpt2Config

        cfg = Gpt2Config(max_seq_len=64, hidden_dim=32, num_layers=2, num_heads=4)
    return cfg, cfg.build(hax.Axis("vocab", 50), key=jax.random.PRNGKey(1))


def _logits(model, tokens, segments, positions):
    import haliax as hax
    from levanter.layers.attention import AttentionMask

    Pos = model.Pos
    row = [hax.named(np.asarray(a, dtype=np.int32), Pos) for a in (tokens, segments, positions)]
    mask = AttentionMask.causal().with_segment_ids(row[1])
    act = model.activations(row[0], mask, key=None, pos_ids=row[2])
    return np.asarray(hax.dot(act, model.get_lm_head(), axis=model.Embed).array)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_logits_equal_alone(kind):
    import haliax as hax

    from alpaca_cli.core.batches import build_row
    from alpaca_cli.core.mesh import local_mesh

    rng = np.random.default_rng(0)
    examples = [(rng.integers(3, 50, size=n), np.ones(n, dtype=np.uint8)) for n in (17, 9, 30)]
    with hax.partitioning.set_mesh(local_mesh()):
        cfg, model = _model(kind)
        tokens, _, segments, positions = build_row(examples, 64, pad_id=0, scale=1.0)
        packed = _logits(model, tokens, segments, positions)
        at = 0
        for ids, targets in examples:
            t, _, s, p = build_row([(ids, targets)], 64, pad_id=0, scale=1.0)
            alone = _logits(model, t, s, p)
            n = len(ids)
            np.testing.assert_allclose(packed[at:at + n], alone[:n], atol=2e-5, rtol=1e-5)
            at += n
        # and without segment ids the packed logits really would differ (the test can fail)
        leaky = _logits(model, tokens, np.zeros_like(segments), np.arange(64))
        assert np.abs(leaky[17:26] - packed[17:26]).max() > 1e-3
