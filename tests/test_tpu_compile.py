"""The TPU plan from the TPU compiler: with libtpu installed (`pip install 'alpaca[plan]'`), `alpaca train --dry-run
--target` compiles a TPU target's real training step with XLA:TPU, deviceless (no TPU here), and reports the chip's
own memory figures; splash attention is lowered for real.

Marked tpu_compiler: CI's step 2 (no libtpu) skips them, CI's step 3 installs libtpu and runs only these, with
ALPACA_REQUIRE_TPU_COMPILER=1 so that a missing libtpu fails instead of skipping. Each 7B compile takes 1-2 minutes
on 2 cores."""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import REPO, cli_env, error_line, run_cli

pytestmark = [pytest.mark.entry, pytest.mark.tpu_compiler]

# Llama-2-7B's config.json (meta-llama/Llama-2-7b-hf), as published
LLAMA_2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000,
}
PARAMS_7B = 6_738_415_616 + 2 * 4096  # the published count, plus the [PAD] row in the embedding and the head
# a small Llama with 128-wide heads (splash's lanes): the splash tests compile in seconds
SMALL_CONFIG = {**LLAMA_2_7B_CONFIG, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2,
                "num_key_value_heads": 2, "num_hidden_layers": 2}


@pytest.fixture(scope="module", autouse=True)
def libtpu():
    from alpaca_cli.core.target_compile import tpu_compiler_available

    if not tpu_compiler_available():
        if os.environ.get("ALPACA_REQUIRE_TPU_COMPILER"):
            pytest.fail("ALPACA_REQUIRE_TPU_COMPILER is set and libtpu is not installed: pip install -e '.[plan]'")
        pytest.skip("libtpu is not installed (pip install -e '.[plan]'); CI's step 3 runs these")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, config in (("llama-2-7b", LLAMA_2_7B_CONFIG), ("small", SMALL_CONFIG)):
        os.makedirs(root / name)
        (root / name / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
    """A run prepared with a 32,000-token tokenizer (the demo one, padded with unused tokens to Llama-2's size)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tpu-plan")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_tokens([f"<unused_{i}>" for i in range(32000 - len(tok))])
    tok.save_pretrained(str(root / "tok32k"))
    run_cli(["prepare", "--data", os.path.join(REPO, "alpaca_cli", "assets", "demo_data.jsonl"),
             "--tokenizer", str(root / "tok32k"), "--run-dir", str(root / "run"), "-q"])
    return str(root / "run")


def plan(run, model, *args, **env):
    out = run_cli(["train", "--run-dir", run, "--model", str(model), "--dry-run", "--json", *args], timeout=900,
                  env=cli_env(**env))
    return json.loads(out.stdout)


def table_row(plan_json: dict, name: str) -> str:
    """A row of the plan table `alpaca train --dry-run` prints for this plan."""
    import draccus

    from alpaca_cli.commands.train import plan_table
    from alpaca_cli.records import PlanRecord

    table = plan_table(draccus.decode(PlanRecord, plan_json))
    rows = dict(zip(table.columns[0]._cells, table.columns[1]._cells))
    return rows[name]


def test_llama_2_7b_fits_a_v4_8_by_xla_tpu_figures(run, models):
    p = plan(run, models / "llama-2-7b", "--target", "v4-8", "--seq-len", "2048")
    c, mem = p["compiled"], p["compiled"]["memory_per_device_gib"]
    assert (p["devices"], p["parameters"], p["attention"]) == (4, PARAMS_7B, "splash")
    assert c["compiler"] == "XLA:TPU" and c["compiled_by"] == "compiled by XLA:TPU for v4-8 (2x2x1), deviceless"
    # float32 weights + Adam's two float32 moments over 4 chips, reused in place by the new state
    assert mem["arguments"] == pytest.approx(12 * PARAMS_7B / 4 / 2**30, rel=0.01)
    assert mem["aliased"] == pytest.approx(mem["arguments"], rel=0.01)
    assert mem["cpu_upcast"] == 0 and mem["accelerator_total"] == mem["total"]
    assert mem["arguments"] < mem["total"] <= mem["target_usable"] == 31.5
    assert mem["verdict"] == "fits" and mem["verdict_text"] == (
        f"fits v4-8 (32 GiB per device, 31.5 usable): {mem['total']:.1f} GiB per device (XLA:TPU)")
    assert not mem["refused"] and table_row(p, "compiled step").startswith(
        f"{mem['total']:.2f} GiB per device on XLA:TPU: arguments {mem['arguments']:.2f}, outputs")
    tokens = p["rows_per_batch"] * p["seq_len"]  # the TPU program's loops counted by their bounds
    assert 6 * PARAMS_7B * tokens < c["compiled_flops_per_step"] < 9.5 * PARAMS_7B * tokens
    # the same plan estimated with XLA:CPU: other figures (float32 activations, CPU fusion), a margin in the verdict
    cpu = plan(run, models / "llama-2-7b", "--target", "v4-8", "--seq-len", "2048", ALPACA_PLAN_COMPILER="cpu")
    cmem = cpu["compiled"]["memory_per_device_gib"]
    assert cpu["compiled"]["compiler"] == "XLA:CPU"
    assert cmem["arguments"] == pytest.approx(mem["arguments"], rel=0.01)
    assert abs(cmem["temporaries"] - mem["temporaries"]) > 0.5 and cmem["total"] > mem["total"]


def test_long_rows_on_a_v3_8_do_not_fit_by_xla_tpu(run, models):
    p = plan(run, models / "llama-2-7b", "--target", "v3-8", "--seq-len", "4096", "--per-device-rows", "16")
    c, mem = p["compiled"], p["compiled"]["memory_per_device_gib"]
    assert c["compiler"] == "XLA:TPU" and (p["attention"], p["attention_block"]) == ("flash", 1024)
    assert mem["verdict"] == "does not fit" and mem["total"] > mem["target_usable"] == 15.5
    assert mem["refused"] and mem["arguments"] == mem["temporaries"] == 0  # the least it needs, no breakdown
    assert table_row(p, "compiled step").startswith(  # the table says so, not "arguments 0.00"
        f"at least {mem['total']:.2f} GiB per device on XLA:TPU, which refused to place it (no breakdown)")
    assert mem["verdict_text"].startswith(
        f"does not fit v3-8 (16 GiB per device, 15.5 usable): at least {mem['total']:.1f} GiB per device (XLA:TPU "
        "refused to compile it for the chip's HBM); use fewer rows per device (--per-device-rows)")


def test_lora_on_a_v5e_8_compiles(run, models):
    p = plan(run, models / "llama-2-7b", "--target", "v5e-8", "--seq-len", "2048", "--lora-r", "16",
             "--per-device-rows", "1")
    c, mem = p["compiled"], p["compiled"]["memory_per_device_gib"]
    assert c["compiler"] == "XLA:TPU" and p["attention"] == "splash" and p["lora_r"] == 16
    assert p["trainable_parameters"] < 0.01 * p["parameters"]
    # the frozen base in bfloat16 over 8 chips (plus the adapters and their Adam state); no float32 copies of the
    # base in the temporaries (those are XLA:CPU's)
    assert 1.0 < mem["arguments"] / (2 * PARAMS_7B / 8 / 2**30) < 1.25
    assert mem["cpu_upcast"] == 0 and mem["verdict"] == "fits" and mem["total"] <= 15.5


SPLASH_ACCEPTED_BY_THE_PLANNER = """
import sys
from alpaca_cli.core import attention
# the planner's own check would refuse the row before compiling: let it through, so that XLA:TPU's lowering of
# the splash kernel is what refuses it
attention.choose = lambda requested, block, seq_len, platform: attention.AttentionChoice("splash", 512)
from alpaca_cli.main import main
sys.argv = ["alpaca", *sys.argv[1:]]
main()
"""


def test_a_splash_block_that_does_not_divide_the_row_fails_compiling(run, models):
    args = ["train", "--run-dir", run, "--model", str(models / "small"), "--dry-run", "--target", "v5e-8", "--json"]
    cmd = [sys.executable, "-c", SPLASH_ACCEPTED_BY_THE_PLANNER, *args]
    import subprocess

    bad = subprocess.run([*cmd, "--seq-len", "1000"], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1
    line = error_line(bad)
    assert line.startswith("Error: --seq-len 1000 does not compile with splash attention and 512-token blocks on "
                           "XLA:TPU (")
    assert line.endswith("); nearest lengths that work: 896 or 1024")
    good = subprocess.run([*cmd, "--seq-len", "1024"], env=cli_env(), capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stderr
    p = json.loads(good.stdout)
    assert p["compiled"]["compiler"] == "XLA:TPU" and (p["attention"], p["attention_block"]) == ("splash", 512)


# hosts (TPU VMs) of each slice, from Cloud TPU's documentation of the accelerator types
PUBLISHED_HOSTS = {"v3-8": 1, "v3-32": 4, "v4-8": 1, "v4-32": 4, "v5e-8": 1, "v5e-16": 4, "v5p-8": 1,
                   "tpu:v3:2x2": 1, "tpu:v4:2x2x4": 4, "tpu:v5p:2x2x2": 2, "tpu:v5e:2x4": 1, "tpu:v5e:4x4": 4,
                   "tpu:v6e:2x4": 1, "tpu:v6e:4x4": 4}


def test_every_tpu_target_has_the_devices_libtpu_describes_and_the_published_hosts():
    """The catalogue and `tpu:GEN:CHIPS` slices: the devices libtpu describes for the topology (cores or megacore
    chips), and the hosts Cloud TPU publishes for the slice, which is also how many processes libtpu lays it over."""
    import subprocess

    code = f"""
import json
from alpaca_cli.core import machines
from alpaca_cli.core.target_compile import tpu_devices
out = {{}}
for n in {sorted(PUBLISHED_HOSTS)!r}:
    t = machines.get(n)
    d = tpu_devices(t)
    out[n] = [t.devices, t.hosts, len(d), len({{x.process_index for x in d}})]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    described = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(described) == sorted(PUBLISHED_HOSTS)
    assert {t for t in machines_with_topology()} <= set(PUBLISHED_HOSTS)  # every catalogue TPU is checked
    for name, (devices, hosts, libtpu_devices, libtpu_processes) in described.items():
        assert (devices, hosts, libtpu_processes) == (libtpu_devices, PUBLISHED_HOSTS[name], hosts), name


def machines_with_topology():
    from alpaca_cli.core import machines

    return [n for n, t in machines.TARGETS.items() if t.topology]
