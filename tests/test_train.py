"""alpaca train, through the installed CLI: the loss is the right one, sharding and resume change nothing, it learns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import (ALPACA, checkpoint_saved, cli_env, error_line, make_tiny_llama, read_records, run_cli, write_jsonl,
                     torch_loss_stanford)
from stanford_reference import stanford_tokenizer

from alpaca_cli.rundir import open_run

F32 = ["--precision", "p=f32,c=f32"]

pytestmark = pytest.mark.entry


@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory, fixture_data, tokenizer_dir):
    """A run prepared once from the awkward fixture (max length 128); tests copy it."""
    path = str(tmp_path_factory.mktemp("prepared") / "run")
    run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", path, "--max-length", "128", "-q"])
    return path


@pytest.fixture
def prepared(prepared_template, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(prepared_template, dst)
    return dst


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_first_step_loss_equals_transformers_on_stanford_labels(prepared, tiny_model_dir, fixture_data, tokenizer_dir):
    """All examples in one packed step, float32: the loss Levanter computes on our rows equals the token-mean
    cross-entropy of transformers on Stanford's labels, one example at a time. This pins the loss mask (no
    off-by-one), the EOS target, the isolation of packed examples and the mean-initialised [PAD] rows."""
    run_cli(["train", "--run-dir", prepared, "--model", tiny_model_dir, "--seq-len", "256", "--batch-size", "64",
             "--epochs", "1", *F32, "-q"])
    m = metrics(prepared)
    assert len(m) == 1
    tok = stanford_tokenizer(tokenizer_dir)
    expected, count = torch_loss_stanford(tiny_model_dir, tok, read_records(fixture_data), 128)
    assert m[0]["loss_tokens"] == count
    assert m[0]["examples"] == 15 and m[0]["step"] == 1
    assert abs(m[0]["loss"] - expected) < 1e-4, (m[0]["loss"], expected)
    record = open_run(prepared).train
    assert record.complete and record.final_checkpoint == "checkpoints/step-0"
    for key in ("step_seconds", "loss_tokens", "loss", "step"):
        assert key in m[0]


def test_tensor_parallel_on_four_devices_matches_one_device(prepared_template, tmp_path, tiny_model_dir):
    args = ["--model", tiny_model_dir, "--seq-len", "256", "--batch-size", "8", "--steps", "4",
            "--learning-rate", "1e-3", *F32, "-q"]
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    shutil.copytree(prepared_template, one)
    shutil.copytree(prepared_template, four)
    run_cli(["train", "--run-dir", one, *args], env=cli_env(devices=1))
    plan = json.loads(run_cli(["train", "--run-dir", four, *args, "--tensor-parallel", "2", "--dry-run", "--json"],
                              env=cli_env(devices=4)).stdout)
    assert plan["devices"] == 4 and plan["mesh"] == {"data_parallel_fsdp": 2, "tensor_parallel": 2}
    run_cli(["train", "--run-dir", four, *args, "--tensor-parallel", "2"], env=cli_env(devices=4))
    a, b = metrics(one), metrics(four)
    assert [r["loss_tokens"] for r in a] == [r["loss_tokens"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-4)

    # gradient accumulation (one row per forward pass) gives the same steps too: the loss is the step's token mean
    accum = str(tmp_path / "accum")
    shutil.copytree(prepared_template, accum)
    run_cli(["train", "--run-dir", accum, *args, "--per-device-rows", "1"], env=cli_env(devices=1))
    c = metrics(accum)
    assert open_run(accum).train.plan.rows_per_step > 1
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in c], rtol=1e-4)


def test_weights_are_sharded_over_the_tensor_parallel_axis(tiny_model_dir, tokenizer):
    """In-process, 4 CPU devices: with --tensor-parallel 2, attention and MLP weights are split over 'model'."""
    import dataclasses

    import haliax as hax
    import jax
    from levanter.trainer import TrainerConfig

    from alpaca_cli.core.models import open_base_model
    from alpaca_cli.core.models import load_base_weights
    from alpaca_cli.core.trainer_config import TP_AXES

    assert jax.device_count() == 4
    from levanter.utils.mesh import MeshConfig

    tc = dataclasses.replace(TrainerConfig(), mesh=MeshConfig(axes={"model": 2}, shared_mapping={a: "model" for a in TP_AXES}))
    with hax.partitioning.set_mesh(tc.device_mesh), open_base_model(tiny_model_dir) as base:
        lev = base.lev_config(256)
        tok = tokenizer
        Vocab = hax.Axis("vocab", len(tok))
        model = load_base_weights(base, lev, tok, Vocab, tc.parameter_axis_mapping, tc.mp)
        attn = model.transformer.layers.stacked.self_attn
        for w in (attn.q_proj.weight, attn.k_proj.weight, model.transformer.layers.stacked.mlp.gate_proj.weight):
            spec = w.array.sharding.spec
            assert "model" in jax.tree_util.tree_leaves(tuple(spec)), (w.axes, spec)


def test_resume_after_sigkill_gives_the_same_losses(prepared_template, tmp_path, tiny_model_dir):
    args = ["--model", tiny_model_dir, "--seq-len", "256", "--batch-size", "4", "--epochs", "6",
            "--learning-rate", "3e-3", "--checkpoint-every", "5", "-q"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    shutil.copytree(prepared_template, straight)
    shutil.copytree(prepared_template, killed)
    run_cli(["train", "--run-dir", straight, *args])

    proc = subprocess.Popen([ALPACA, "train", "--run-dir", killed, *args], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not checkpoint_saved(os.path.join(killed, "checkpoints", "step-10")):
        assert proc.poll() is None and time.time() < deadline, "training ended before its checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert open_run(killed).train.status == "running"  # nothing claims the run is complete
    # and a later save that the kill interrupted: Levanter had created its metadata.json but not yet written it
    interrupted = os.path.join(killed, "checkpoints", "step-14")
    shutil.copytree(os.path.join(killed, "checkpoints", "step-10"), interrupted, dirs_exist_ok=True)
    os.remove(os.path.join(interrupted, "alpaca-seal.json"))  # never sealed: the seal comes after metadata.json
    open(os.path.join(interrupted, "metadata.json"), "w").close()
    out = run_cli(["train", "--run-dir", killed, *args[:-1]])
    assert "Resuming from the checkpoint after step" in out.stderr
    assert not os.path.exists(interrupted)  # deleted before training: it was never complete
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # identical batches, identical losses

    again = run_cli(["train", "--run-dir", killed, *args])
    assert again.returncode == 0 and "already trained" in again.stdout
    # --keep-checkpoints' default (1): of the checkpoints saved every 5 steps only the final one is left
    final = open_run(killed).train.final_checkpoint
    assert os.listdir(os.path.join(killed, "checkpoints")) == [os.path.basename(final)]


def test_a_torn_last_metrics_line_from_a_kill_does_not_stop_the_resume(trained):
    """A kill -9 (or a full disk) in the middle of appending a step's line leaves it cut short: the resume skips it
    with a warning and rewrites the file, every step once."""
    run, model_dir, _ = trained
    shutil.rmtree(os.path.join(run, "checkpoints", "step-79"))  # killed after step 61, its checkpoint at step 41
    state = open_run(run)
    state.train.status = "running"
    state.save()
    path = os.path.join(run, "metrics.jsonl")
    lines = open(path).read().splitlines()[:60]
    with open(path, "w") as f:
        f.write("\n".join(lines) + '\n{"step": 61, "loss": 0.01')
    out = run_cli(["train", "--run-dir", run, "--model", model_dir, "--seq-len", "128", "--batch-size", "6",
                   "--steps", "80", "--learning-rate", "1e-2", "--warmup", "0.05", "--precision", "p=f32,c=f32",
                   "--checkpoint-every", "40", "--keep-checkpoints", "2", "-q"])  # the `trained` fixture's command
    assert "Resuming from the checkpoint after step 41 of 80" in out.stderr
    assert f"{path} line 61 was cut short (an interrupted write); skipping it" in out.stderr
    assert [r["step"] for r in metrics(run)] == list(range(1, 81)) and open_run(run).train.complete


def test_it_learns_the_responses(tmp_path, tokenizer_dir):
    """A few examples, many steps: the loss on the responses falls and teacher-forced argmax reproduces them."""
    import haliax as hax
    import jax.numpy as jnp

    from alpaca_cli.core import cache as cachemod
    from alpaca_cli.core.checkpoints import find_checkpoint, load_model
    from alpaca_cli.core.mesh import local_mesh

    records = read_records(os.path.join(os.path.dirname(__file__), "assets", "alpaca_awkward.jsonl"))[:6]
    data = str(tmp_path / "few.jsonl")
    with open(data, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    model_dir = make_tiny_llama(str(tmp_path / "m"), tokenizer_dir, hidden_dim=64, intermediate_dim=128)
    run = str(tmp_path / "run")
    run_cli(["prepare", "--data", data, "--tokenizer", tokenizer_dir, "--run-dir", run, "-q"])
    run_cli(["train", "--run-dir", run, "--model", model_dir, "--seq-len", "256", "--batch-size", "6", "--steps", "80",
             "--learning-rate", "1e-2", "--warmup", "0.05", *F32, "-q"])
    m = metrics(run)
    assert m[-1]["loss"] < 0.05 < m[0]["loss"] / 20

    r = open_run(run)
    tok = r.load_tokenizer()
    with hax.partitioning.set_mesh(local_mesh()):
        model, lev, _ = load_model(r, find_checkpoint(r), tokenizer=tok)
        prepared_cache = cachemod.open_cache(r.cache_dir)
        for row in prepared_cache.rows(range(len(prepared_cache))):
            ids, targets = row["input_ids"], row["targets"].astype(bool)
            x = hax.named(jnp.asarray(ids), "position")
            logits = _logits(model, x)
            predicted = np.asarray(logits).argmax(-1)[:-1]
            trained = targets[1:]
            assert (predicted[trained] == ids[1:][trained]).all()


def _logits(model, x):
    import haliax as hax
    from levanter.layers.attention import AttentionMask

    act = model.activations(x, AttentionMask.causal(), key=None)
    return hax.dot(act, model.get_lm_head(), axis=model.Embed).array


BAD = [
    (lambda r, m: ["train", "--run-dir", r + "-none", "--model", m], "no run at .*; run `alpaca prepare --run-dir"),
    (lambda r, m: ["train", "--run-dir", r, "--model", r + "/no-such-model"], "--model .*no-such-model: no such folder"),
    (lambda r, m: ["train", "--run-dir", r, "--model", m, "--set", "trainer.nope=1"], "unknown config key: .*nope"),
    (lambda r, m: ["train", "--run-dir", r, "--model", m, "--seq-len", "1024"], "longer than the model's context"),
    (lambda r, m: ["train", "--run-dir", r, "--model", m, "--seq-len", "64"], "longer than --seq-len 64"),
    (lambda r, m: ["train", "--run-dir", r, "--model", m, "--seq-len", "256", "--tensor-parallel", "3"],
     "--tensor-parallel 3 does not divide the 4 devices"),
    (lambda r, m: ["train", "--run-dir", r, "--model", m, "--seq-len", "256", "--tensorboard-dir", r + "/tb"],
     "--tensorboard-dir needs tensorboardX"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_refused_before_anything_starts(prepared, tiny_model_dir, args, message):
    """In-process (this test process has 4 CPU devices): each mistake is an AlpacaError with one clear message."""
    import re

    from typer.testing import CliRunner

    from alpaca_cli.errors import AlpacaError
    from alpaca_cli.main import app

    result = CliRunner().invoke(app, args(prepared, tiny_model_dir))
    assert result.exit_code == 1 and isinstance(result.exception, AlpacaError), result.output
    assert re.search(message, result.exception.message), result.exception.message
    assert open_run(prepared).train is None  # nothing was started


def test_a_train_mistake_through_the_console_script_is_one_line(prepared, tiny_model_dir):
    proc = run_cli(["train", "--run-dir", prepared, "--model", tiny_model_dir, "--seq-len", "64"], check=False)
    assert proc.returncode == 1
    assert error_line(proc) == "Error: 7 prepared example(s) are longer than --seq-len 64 (longest 128)"


def test_vocabulary_mismatch_is_refused(prepared, tmp_path):
    from typer.testing import CliRunner

    from alpaca_cli.errors import ConfigError
    from alpaca_cli.main import app

    other = make_tiny_llama(str(tmp_path / "other"), os.path.join(os.path.dirname(__file__), "assets", "tok400"))
    result = CliRunner().invoke(app, ["train", "--run-dir", prepared, "--model", other, "--seq-len", "256"])
    assert result.exit_code == 1 and isinstance(result.exception, ConfigError)
    assert "does not fit the prepared tokenizer" in result.exception.message


def test_sigterm_saves_a_checkpoint_and_stops_then_resume_continues(prepared_template, tmp_path, tiny_model_dir):
    run = str(tmp_path / "run")
    shutil.copytree(prepared_template, run)
    args = ["train", "--run-dir", run, "--model", tiny_model_dir, "--seq-len", "256", "--batch-size", "4",
            "--epochs", "6", "--checkpoint-every", "1000", "-q"]
    proc = subprocess.Popen([ALPACA, *args], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(run, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(path) and len(open(path).read().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    line = [x for x in err.splitlines() if x.startswith("Error: ")][0]
    import re

    stopped = int(re.search(r"stopped by SIGTERM after step (\d+); its checkpoint \(step-(\d+)\) is saved", line).group(1))
    assert os.path.exists(os.path.join(run, "checkpoints", f"step-{stopped - 1}", "metadata.json"))
    resumed = run_cli(args)
    assert f"Resuming from the checkpoint after step {stopped} of" in resumed.stderr


def test_wandb_offline_and_nothing_in_the_working_directory(prepared, tiny_model_dir, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_cli(["train", "--run-dir", prepared, "--model", tiny_model_dir, "--seq-len", "256", "--batch-size", "16",
             "--steps", "2", "--wandb-project", "alpaca-test", "-q"], env=cli_env(WANDB_MODE="offline"), cwd=str(cwd))
    assert list(cwd.iterdir()) == []  # no ./wandb, ./logs, ./checkpoints
    offline = [d for d in os.listdir(os.path.join(prepared, "logs", "wandb")) if d.startswith("offline-run")]
    assert offline, os.listdir(os.path.join(prepared, "logs"))


def test_held_out_loss_during_training_equals_alpaca_eval_of_the_final_checkpoint(prepared, tiny_model_dir,
                                                                                   fixture_data, tmp_path):
    """--val-data is scored every --eval-every steps and at the end (val_loss in metrics.jsonl); the last score is
    the one `alpaca eval` gives the final checkpoint on the same records (computed apart: its own rows and loss)."""
    held = write_jsonl(str(tmp_path / "held.jsonl"), read_records(fixture_data)[:5])
    run_cli(["train", "--run-dir", prepared, "--model", tiny_model_dir, "--seq-len", "256", "--batch-size", "4",
             "--steps", "4", "--learning-rate", "3e-3", "--eval-every", "2", "--val-data", held, *F32, "-q"],
            env=cli_env(devices=2))
    val = {r["step"]: r["val_loss"] for r in metrics(prepared) if "val_loss" in r}
    assert sorted(val) == [1, 3, 4] and val[4] != val[1]  # after the first update, every 2, and at the end
    run_cli(["eval", "--data", held, "--run-dir", prepared, "--set", "max_new_tokens=2"])
    score = open_run(prepared).eval.scores[0]
    assert score.model == "step-3" and score.examples == 5
    assert abs(score.loss - val[4]) < 1e-5 * score.loss, (score.loss, val[4])
