"""LoRA (`alpaca train --lora-r`): the same pipeline with adapters: it learns, it resumes exactly, its checkpoints hold
the adapters only, sharding changes nothing, and both exports (merged, PEFT adapter) compute what Levanter computed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import ALPACA, REPO, checkpoint_saved, cli_env, read_records, run_cli, write_jsonl

from alpaca_cli.rundir import open_run

pytestmark = pytest.mark.entry

LORA = ["--model", "demo", "--seq-len", "256", "--batch-size", "8", "--lora-r", "64", "--lora-dropout", "0",
        "--learning-rate", "3e-3", "--precision", "p=f32,c=f32", "-q"]


def metrics(run):
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def checkpoint_arrays(checkpoint: str, under: str) -> dict[str, list[int]]:
    """{array path: shape} of the arrays a checkpoint (one OCDBT database, read with TensorStore) holds under a prefix."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{os.path.abspath(checkpoint)}/"}).result()
    arrays = [k.decode()[: -len("/zarr.json")] for k in kv.list().result() if k.decode().endswith("/zarr.json")]
    return {a: json.loads(kv.read(f"{a}/zarr.json").result().value)["shape"] for a in arrays if a.startswith(under)}


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """Eight of the demo records, prepared."""
    root = tmp_path_factory.mktemp("lora")
    records = read_records(os.path.join(REPO, "alpaca_cli", "assets", "demo_data.jsonl"))[:8]
    data = write_jsonl(str(root / "eight.jsonl"), records)
    run = str(root / "prepared")
    run_cli(["prepare", "--data", data, "--tokenizer", "demo", "--run-dir", run, "-q"])
    return run, records, data


def test_lora_learns_resumes_exactly_and_exports_both_ways(eight, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prepared, records, data = eight
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    shutil.copytree(prepared, straight)
    shutil.copytree(prepared, killed)
    args = [*LORA, "--epochs", "100", "--checkpoint-every", "40"]
    run_cli(["train", "--run-dir", straight, *args])

    # a kill -9 after the checkpoint of step 40, then the same command: the same losses, step for step
    proc = subprocess.Popen([ALPACA, "train", "--run-dir", killed, *args], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not checkpoint_saved(os.path.join(killed, "checkpoints", "step-40")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run_cli(["train", "--run-dir", killed, *args])
    assert "Resuming from the checkpoint after step 41 of 100" in resumed.stderr
    assert [m["loss"] for m in metrics(straight)] == [m["loss"] for m in metrics(killed)]

    train = open_run(straight).train
    assert train.lora.r == 64 and train.plan.lora_r == 64
    # r x (in + out) for every adapted projection of the demo model (hidden 64, MLP 192, 2 kv heads of 16, 2 layers)
    per_layer = sum(i + o for i, o in ((64, 64), (64, 32), (64, 32), (64, 64), (64, 192), (64, 192), (192, 64)))
    assert train.plan.trainable_parameters == 2 * 64 * per_layer
    # the checkpoint holds the adapters (and their optimizer state), not the model
    final = os.path.join(straight, train.final_checkpoint)
    saved = checkpoint_arrays(final, "model/")
    assert saved and all("/lora/" in name for name in saved), sorted(saved)
    assert sum(int(np.prod(shape)) for shape in saved.values()) == train.plan.trainable_parameters

    # it learned: greedy answers reproduce the responses
    out = run_cli(["generate", "--file", data, "--run-dir", straight]).stdout
    assert [json.loads(line)["output"] for line in out.splitlines()] == [r["output"] for r in records]

    # merged export (verified against transformers inside), and the PEFT adapter on the resized base model
    run_cli(["export", "--run-dir", straight, "--verify"])
    run_cli(["export", "--run-dir", straight, "--adapter", "--output", str(tmp_path / "adapter"), "--verify"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= set(
        os.listdir(tmp_path / "adapter"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "adapter"))
    from alpaca_cli.core.demo_model import demo_model_dir

    base = AutoModelForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32)
    old = base.get_input_embeddings().weight.shape[0]
    base.resize_token_embeddings(len(tok))
    with torch.no_grad():  # what the adapter's model card says to do
        for w in (base.get_input_embeddings().weight, base.get_output_embeddings().weight):
            w[old:] = w[:old].mean(0)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(straight, "hf"), dtype=torch.float32).eval()
    ids = torch.tensor([tok(records[0]["instruction"])["input_ids"]])
    with torch.no_grad():
        diff = np.abs(peft_model(input_ids=ids).logits.numpy() - merged(ids).logits.numpy()).max()
    assert diff < 1e-4, diff


def test_lora_on_four_devices_with_tensor_parallelism_equals_one_device(eight, tmp_path):
    prepared, _, _ = eight
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    shutil.copytree(prepared, one)
    shutil.copytree(prepared, four)
    args = ["train", *LORA, "--steps", "3"]
    run_cli([*args, "--run-dir", one], env=cli_env(devices=1))
    run_cli([*args, "--run-dir", four, "--tensor-parallel", "2"], env=cli_env(devices=4))
    np.testing.assert_allclose([m["loss"] for m in metrics(one)], [m["loss"] for m in metrics(four)], rtol=1e-4)


def test_lora_is_refused_where_it_cannot_work(eight, tmp_path, tokenizer_dir):
    from typer.testing import CliRunner

    from alpaca_cli.main import app

    prepared, _, _ = eight
    runner = CliRunner()
    bad = runner.invoke(app, ["train", "--run-dir", prepared, "--model", "demo", "--lora-r", "8", "--lora-targets",
                              "c_attn", "--seq-len", "256", "--dry-run"])
    assert bad.exit_code == 1 and "no module of the model has these names" in bad.exception.message
    full = runner.invoke(app, ["export", "--run-dir", prepared, "--adapter"])
    assert full.exit_code == 1  # nothing trained yet: no adapter (and the message names the train command)
