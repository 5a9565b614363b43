"""Real size without the hardware: `alpaca train --dry-run --target` compiles Llama-2-7B's training step for the
target's devices (simulated on CPU, from its config.json alone) and says whether it fits."""

from __future__ import annotations

import json
import os

import pytest
from helpers import ASSETS, REPO, cli_env, run_cli

pytestmark = pytest.mark.entry

LLAMA_2_7B = os.path.join(ASSETS, "configs", "Llama-2-7b-hf")  # config.json only: no weights, no tokenizer
PARAMS_7B = 6_738_415_616 + 2 * 4096  # the published count, plus the [PAD] row in the embedding and the head


@pytest.fixture(scope="module")
def llama_vocab_run(tmp_path_factory, tokenizer_dir):
    """A run prepared with a 32,000-token tokenizer (the demo one, padded with unused tokens to Llama-2's size)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("plan")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens([f"<unused_{i}>" for i in range(32000 - len(tok))])
    tok.save_pretrained(str(root / "tok32k"))
    run = str(root / "run")
    run_cli(["prepare", "--data", os.path.join(REPO, "alpaca_cli", "assets", "demo_data.jsonl"),
             "--tokenizer", str(root / "tok32k"), "--run-dir", run, "-q"])
    return run


def plan(run, *args):
    """The XLA:CPU estimate (also where libtpu is installed: tests/test_tpu_compile.py plans with XLA:TPU)."""
    out = run_cli(["train", "--run-dir", run, "--model", LLAMA_2_7B, "--dry-run", "--json", *args], timeout=900,
                  env=cli_env(ALPACA_PLAN_COMPILER="cpu"))
    return json.loads(out.stdout)


def test_llama_2_7b_fits_eight_a100s(llama_vocab_run):
    p = plan(llama_vocab_run, "--target", "8xa100-80g", "--seq-len", "2048")
    c = p["compiled"]
    mem = c["memory_per_device_gib"]
    assert (p["devices"], p["platform"], p["parameters"]) == (8, "8xa100-80g", PARAMS_7B)
    assert mem["verdict"] == "fits" and mem["verdict_text"].startswith("fits 8xa100-80g")
    # independent check of XLA's arguments: float32 weights + Adam's two float32 moments, sharded over 8 devices
    assert mem["arguments"] == pytest.approx(12 * PARAMS_7B / 8 / 2**30, rel=0.01)
    assert mem["aliased"] == pytest.approx(mem["arguments"], rel=0.01)  # the new state reuses the old one's memory
    assert mem["arguments"] < mem["total"] < 0.9 * mem["target_usable"]
    # the compiled step's matrix FLOPs: 6 x params x tokens, plus the forward recomputed by remat (8 x in all)
    tokens = p["rows_per_batch"] * p["seq_len"]  # the rows the step computes: the plan's and the mesh's empty ones
    assert 6 * PARAMS_7B * tokens < c["compiled_flops_per_step"] < 9.5 * PARAMS_7B * tokens
    assert c["step_seconds_at_40_mfu"] == pytest.approx(c["model_flops_per_step"] / (0.4 * 8 * 312e12), rel=1e-3)


def test_long_rows_on_a_v3_8_do_not_fit_and_it_says_so(llama_vocab_run):
    p = plan(llama_vocab_run, "--target", "v3-8", "--seq-len", "4096", "--per-device-rows", "16")
    mem = p["compiled"]["memory_per_device_gib"]
    assert (p["attention"], p["attention_block"]) == ("flash", 1024)  # TPU v3: never splash
    from alpaca_cli.core.target_compile import tpu_compiler_available

    by = p["compiled"]["compiled_by"]
    assert p["compiled"]["compiler"] == "XLA:CPU" and by.startswith("estimated with XLA:CPU on 8 simulated devices")
    assert ("pip install 'alpaca[plan]'" in by) == (not tpu_compiler_available())  # the way to XLA:TPU's figures
    assert mem["verdict"] == "does not fit"
    assert mem["verdict_text"].startswith("does not fit v3-8 (16 GiB per device, 15.5 usable)")
    assert "--per-device-rows" in mem["verdict_text"]


def test_a_length_the_target_cannot_compile_is_refused_before_compiling(llama_vocab_run):
    from helpers import error_line

    proc = run_cli(["train", "--run-dir", llama_vocab_run, "--model", LLAMA_2_7B, "--dry-run", "--target", "v4-8",
                    "--seq-len", "1000"], check=False)
    assert proc.returncode == 1
    assert error_line(proc) == ("Error: --seq-len 1000 does not compile with splash attention on TPU v4 (rows must "
                                "be a multiple of 128); nearest lengths that work: 896 or 1024")
    unknown = run_cli(["train", "--run-dir", llama_vocab_run, "--dry-run", "--target", "tpu-v9"], check=False)
    assert unknown.returncode == 1 and "--target 'tpu-v9' is not a known machine; known: cpu, v3-8" in unknown.stderr


def test_compiled_flops_count_every_iteration_of_a_loop():
    """XLA's cost_analysis counts a loop body once; the planner's count multiplies by the trip count."""
    import jax
    import jax.numpy as jnp

    from alpaca_cli.core.target_compile import hlo_matmul_flops

    def f(x, ws):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    x, ws = jnp.ones((8, 16)), jnp.ones((5, 16, 16))
    lowered = jax.jit(f).lower(x, ws)
    assert hlo_matmul_flops(lowered.compile().as_text()) == 5 * 2 * 8 * 16 * 16
    # the program as lowered (what an XLA:TPU plan counts): no known_trip_count, the bound in the loop's condition
    assert hlo_matmul_flops(lowered.as_text(dialect="hlo")) == 5 * 2 * 8 * 16 * 16
