"""The attention kernel: chosen per platform, checked against the row length before anything is loaded, and exact
with packed rows (an example's logits packed equal its logits alone) on every kernel that runs on CPU."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from helpers import make_tiny_llama, run_cli

from alpaca_cli.core.attention import AttentionChoice, Platform, choose
from alpaca_cli.errors import ConfigError

CPU, GPU, V3, V4, V5 = Platform("cpu"), Platform("gpu"), Platform("tpu", 3), Platform("tpu", 4), Platform("tpu", 5)


@pytest.mark.parametrize(
    "platform,seq_len,expected",
    [
        (V4, 768, AttentionChoice("splash", 256)),  # the README's v3-32 length, on a v4
        (V4, 2048, AttentionChoice("splash", 512)),
        (V5, 1536, AttentionChoice("splash", 512)),
        (V3, 768, AttentionChoice("flash", 256)),  # never splash on v3
        (V3, 2048, AttentionChoice("flash", 1024)),
        (GPU, 1536, AttentionChoice("flash", 512)),  # Levanter's default (1024) would fail here
        (GPU, 1024, AttentionChoice("flash", 1024)),
        (CPU, 1536, AttentionChoice("flash", 512)),
        (CPU, 1000, AttentionChoice("vanilla", None)),  # any length on CPU
        (CPU, 256, AttentionChoice("flash", 256)),
    ],
)
def test_auto_picks_a_kernel_and_block_that_compile(platform, seq_len, expected):
    choice = choose("auto", None, seq_len, platform)
    assert choice == expected
    assert choice.block is None or seq_len % choice.block == 0


@pytest.mark.parametrize(
    "requested,block,seq_len,platform,message",
    [
        ("auto", None, 1000, GPU, r"--seq-len 1000 does not compile with flash attention on GPU .* 896 or 1024"),
        ("auto", None, 1000, V4, r"--seq-len 1000 does not compile with splash attention on TPU v4 .* 896 or 1024"),
        ("flash", 1024, 1536, GPU, r"1024-token blocks .* nearest lengths that work: 1024 or 2048"),
        ("splash", None, 2048, V3, r"not known to compile on TPU v3"),
        ("splash", None, 2048, GPU, r"runs on TPU only"),
        ("flash", 384, 768, CPU, r"must be a power of two"),
        ("vanilla", 512, 768, CPU, r"applies to flash and splash"),
    ],
)
def test_lengths_that_would_not_compile_are_refused_with_the_nearest_that_would(
    requested, block, seq_len, platform, message
):
    with pytest.raises(ConfigError, match=message):
        choose(requested, block, seq_len, platform)


def _splash_in_pallas_interpreter(monkeypatch):
    """Splash is a TPU (Mosaic) kernel; on CPU it runs through Pallas' interpreter. A test-only switch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sak

    monkeypatch.setattr(sak, "make_splash_mha", functools.partial(sak.make_splash_mha, interpret=True))


@pytest.mark.parametrize("seq_len", [768, 1536])
@pytest.mark.parametrize("backend", ["flash", "vanilla", "splash"])
def test_packed_logits_equal_unpacked_with_every_kernel(backend, seq_len, monkeypatch):
    import dataclasses

    import haliax as hax
    import jax
    from levanter.layers.attention import AttentionMask
    from levanter.models.llama import LlamaConfig

    from alpaca_cli.core.attention import levanter_fields
    from alpaca_cli.core.batches import build_row
    from alpaca_cli.core.mesh import local_mesh

    if backend == "splash":
        _splash_in_pallas_interpreter(monkeypatch)
    platform = V4 if backend == "splash" else CPU
    choice = choose(backend, None, seq_len, platform)
    assert choice.backend == backend
    cfg = LlamaConfig(max_seq_len=seq_len, hidden_dim=32, intermediate_dim=64, num_layers=1, num_heads=4, num_kv_heads=2)
    cfg = dataclasses.replace(cfg, **levanter_fields(choice, remat=True, config=cfg))
    rng = np.random.default_rng(0)
    # examples that cross block boundaries (blocks of 256/512)
    examples = [(rng.integers(3, 50, size=n), np.ones(n, dtype=np.uint8)) for n in (300, 211, 190)]

    with hax.partitioning.set_mesh(local_mesh()):
        model = cfg.build(hax.Axis("vocab", 50), key=jax.random.PRNGKey(1))

        def logits(tokens, segments, positions):
            row = [hax.named(np.asarray(a, dtype=np.int32), model.Pos) for a in (tokens, segments, positions)]
            mask = AttentionMask.causal().with_segment_ids(row[1])
            return np.asarray(model(row[0], mask, pos_ids=row[2]).array)

        tokens, _, segments, positions = build_row(examples, seq_len, pad_id=0, scale=1.0)
        packed = logits(tokens, segments, positions)
        at = 0
        for ids, targets in examples:
            t, _, s, p = build_row([(ids, targets)], seq_len, pad_id=0, scale=1.0)
            alone = logits(t, s, p)
            np.testing.assert_allclose(packed[at:at + len(ids)], alone[:len(ids)], atol=1e-4)
            at += len(ids)


@pytest.fixture(scope="module")
def long_context_run(tmp_path_factory, fixture_data, tokenizer_dir):
    root = tmp_path_factory.mktemp("attention-plan")
    model = make_tiny_llama(str(root / "model"), tokenizer_dir, max_seq_len=2048)
    run = str(root / "run")
    run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", run, "-q"])
    return run, model


def test_the_plan_reports_and_checks_the_kernel(long_context_run):
    """`--dry-run --json` names the kernel, block and remat; a length that would not compile is refused there."""
    from typer.testing import CliRunner

    from alpaca_cli.main import app

    run, model = long_context_run
    runner = CliRunner()

    def plan(*args):
        result = runner.invoke(app, ["train", "--run-dir", run, "--model", model, "--dry-run", "--json", *args])
        return result

    p = json.loads(plan("--seq-len", "1536").stdout)
    assert (p["attention"], p["attention_block"], p["remat"]) == ("flash", 512, True)
    p = json.loads(plan("--seq-len", "1000").stdout)
    assert (p["attention"], p["attention_block"]) == ("vanilla", None)
    refused = plan("--seq-len", "1000", "--attention", "flash")
    assert refused.exit_code == 1 and "nearest lengths that work: 896 or 1024" in refused.exception.message
    # the memory estimate follows the choices: no gradient checkpointing keeps every layer's activations
    on = json.loads(plan("--seq-len", "1024").stdout)["memory_per_device_gib"]["activations_estimate"]
    off_result = plan("--seq-len", "1024", "--no-remat")
    off = json.loads(off_result.stdout)
    assert off["remat"] is False and off["memory_per_device_gib"]["activations_estimate"] > on
