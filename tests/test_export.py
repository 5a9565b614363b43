"""alpaca export and alpaca generate: a checkpoint transformers loads and that computes what Levanter computed."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from fake_hub import FakeHub
from helpers import cli_env, error_line, run_cli

from alpaca_cli.rundir import open_run

pytestmark = pytest.mark.entry


def levanter_logits(run_url, ids):
    import haliax as hax
    import jax.numpy as jnp
    from levanter.layers.attention import AttentionMask

    from alpaca_cli.core.checkpoints import find_checkpoint, load_model
    from alpaca_cli.core.mesh import local_mesh

    run = open_run(run_url)
    tok = run.load_tokenizer()
    with hax.partitioning.set_mesh(local_mesh()):
        model, _, _ = load_model(run, find_checkpoint(run), tokenizer=tok)
        x = hax.named(jnp.asarray(ids, dtype=jnp.int32), model.Pos.resize(len(ids)))
        act = model.activations(x, AttentionMask.causal(), key=None)
        return np.asarray(hax.dot(act, model.get_lm_head(), axis=model.Embed).array)


def test_export_loads_in_transformers_and_computes_what_levanter_computed(trained, tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, base_dir, records = trained
    out = run_cli(["export", "--run-dir", run, "--verify"])
    assert out.stdout.strip().splitlines()[0] == os.path.join(run, "hf")
    m = re.search(r"largest \|logit difference\| ([0-9.e+-]+)", out.stderr)
    assert m and float(m.group(1)) < 1e-4
    folder = os.path.join(run, "hf")

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok(records[0]["instruction"])["input_ids"]
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(hf_logits, levanter_logits(run, ids), atol=1e-4)

    config = json.load(open(os.path.join(folder, "config.json")))
    base = json.load(open(os.path.join(base_dir, "config.json")))
    assert config["vocab_size"] == len(tok) == 641 == model.get_input_embeddings().weight.shape[0]
    assert tok.pad_token == "[PAD]" and config["pad_token_id"] == tok.pad_token_id == 640
    assert config["eos_token_id"] == tok.eos_token_id == 2 and config["bos_token_id"] == 1
    assert config["max_position_embeddings"] == base["max_position_embeddings"] == 256  # not the training seq_len (128)
    assert "begin_suppress_tokens" not in config
    gen = json.load(open(os.path.join(folder, "generation_config.json")))
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 640)
    card = open(os.path.join(folder, "README.md")).read()
    assert "### Instruction:\n{instruction}\n\n### Response:" in card and "Final training loss" in card
    record = open_run(run).export
    assert record.complete and record.outputs.export_dir == "hf"


def test_bfloat16_export(trained):
    from safetensors import safe_open

    run, _, _ = trained
    out = str(os.path.join(run, "bf16"))
    run_cli(["export", "--run-dir", run, "--dtype", "bfloat16", "--output", out, "--verify"])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


def test_push_to_hub_round_trip_and_no_token_anywhere(trained, tmp_path):
    run, _, _ = trained
    hub = FakeHub.start()
    try:
        env = cli_env(**hub.env())
        out = run_cli(["export", "--run-dir", run, "--push-to-hub", "--repo-id", "tester/alpaca-tiny", "--private"], env=env)
        assert out.stdout.strip().splitlines()[-1].endswith("tester/alpaca-tiny")
        assert hub.repos()["tester/alpaca-tiny"]["private"] is True
        code = (
            "from huggingface_hub import snapshot_download\n"
            f"print(snapshot_download('tester/alpaca-tiny', local_dir={str(tmp_path / 'dl')!r}))\n"
        )
        import subprocess
        import sys

        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        local = os.path.join(run, "hf")
        from alpaca_cli.core.export_folder import EXPORT_MARKER

        assert EXPORT_MARKER not in hub.files("tester/alpaca-tiny")  # our bookkeeping (the run's identity) stays here
        for name in set(os.listdir(local)) - {EXPORT_MARKER}:
            with open(os.path.join(local, name), "rb") as a, open(tmp_path / "dl" / name, "rb") as b:
                assert a.read() == b.read(), name
        token = hub.env()["HF_TOKEN"]
        assert token not in out.stdout + out.stderr
        for root, _, files in os.walk(run):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    assert token.encode() not in f.read(), os.path.join(root, name)
        outputs = open_run(run).export.outputs
        assert outputs.repo_id == "tester/alpaca-tiny" and outputs.commit
    finally:
        hub.stop()


def test_push_to_hub_without_network_says_where_the_export_is_and_the_hint_pushes_it(trained, tmp_path):
    """The Hub's endpoint refuses connections (a closed local port): one line that says so and where the complete
    export is, the token nowhere; the `hf upload` of the hint, run once the Hub is back, publishes that export."""
    import subprocess
    import sys

    from helpers import free_port

    run, _, _ = trained
    token = "hf_fake_SECRET_token_0123456789"
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = cli_env(HF_TOKEN=token, HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1")
    out = run_cli(["export", "--run-dir", run, "--push-to-hub", "--repo-id", "tester/alpaca-tiny"], env=env,
                  check=False)
    export = os.path.join(run, "hf")
    assert out.returncode == 1
    assert error_line(out) == (f"Error: cannot reach the Hugging Face Hub at {endpoint} (Connection refused); the "
                               f"export itself is complete at {export}")
    command = f"hf upload tester/alpaca-tiny {export} . --exclude .alpaca-export.json"
    assert (f"hint: once the Hub can be reached, push it with `{command}`, or run this export again with --overwrite"
            in out.stderr)
    assert token not in out.stdout + out.stderr

    hub = FakeHub.start(token=token)
    try:
        hf = [sys.executable, "-c", "import sys; from huggingface_hub.cli.hf import main; sys.exit(main())"]
        subprocess.run(hf + command.split()[1:], env={**env, **hub.env()}, check=True, capture_output=True)
        pushed = hub.files("tester/alpaca-tiny")
        assert ".alpaca-export.json" not in pushed  # the run's marker stays on this machine
        for name in set(os.listdir(export)) - {".alpaca-export.json"}:
            with open(os.path.join(export, name), "rb") as f:
                assert pushed[name] == f.read(), name
    finally:
        hub.stop()


def test_export_to_gcs(trained, gcs):
    import gcsfs

    run, _, _ = trained
    url = f"{gcs.url}/exports/tiny"
    env = cli_env(**gcs.env())
    run_cli(["export", "--run-dir", run, "--output", url], env=env)
    fs = gcsfs.GCSFileSystem(token="anon")
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{gcs.bucket}/exports/tiny")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names


def test_export_bad_input(trained, tmp_path):
    run, _, _ = trained
    missing = run_cli(["export", "--run-dir", run, "--step", "7"], check=False)
    assert missing.returncode == 1 and re.search(r"no checkpoint step-7 .*whole: step-40, step-79", error_line(missing))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    unwritable = run_cli(["export", "--run-dir", run, "--output", str(blocker / "hf")], check=False)
    assert unwritable.returncode == 1 and "cannot create a folder there" in error_line(unwritable)
    env = cli_env(HF_TOKEN="", HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0")
    env.pop("HF_TOKEN")
    no_token = run_cli(["export", "--run-dir", run, "--push-to-hub"], env=env, check=False)
    assert no_token.returncode == 1 and "--push-to-hub needs a Hugging Face token" in error_line(no_token)
    assert not os.path.exists(os.path.join(run, "hf"))  # nothing was exported before the token check

    prepared_only = str(tmp_path / "prepared-only")
    os.makedirs(prepared_only)
    shutil.copy(os.path.join(run, "manifest.json"), prepared_only)
    manifest = json.load(open(os.path.join(prepared_only, "manifest.json")))
    manifest["stages"].pop("train")
    json.dump(manifest, open(os.path.join(prepared_only, "manifest.json"), "w"))
    untrained = run_cli(["export", "--run-dir", prepared_only], check=False)
    assert untrained.returncode == 1 and "no `train` stage; run `alpaca train" in error_line(untrained)


def test_large_models_are_written_in_shards_that_transformers_loads(trained):
    import torch
    from transformers import AutoModelForCausalLM

    run, _, _ = trained
    out = os.path.join(run, "sharded")
    run_cli(["export", "--run-dir", run, "--output", out, "--max-shard-size", "200KB"])
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    run_cli(["export", "--run-dir", run])  # the same weights in one file, to compare with
    whole = AutoModelForCausalLM.from_pretrained(os.path.join(run, "hf"), dtype=torch.float32)
    split = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for (name, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_defaults_to_the_base_models_dtype(trained):
    """A float16 base (Llama-2-7b-hf's config.json says torch_dtype float16) exports as float16, half the bytes of
    float32, and --verify's tolerance follows the dtype."""
    from safetensors import safe_open

    run, _, _ = trained
    base_config = os.path.join(run, "base", "config.json")
    config = json.load(open(base_config))
    config["torch_dtype"] = "float16"
    json.dump(config, open(base_config, "w"))
    out = run_cli(["export", "--run-dir", run, "--verify"])
    assert re.search(r"exported step-\d+ as float16", out.stderr)
    assert re.search(r"\(tolerance 0.05\)", out.stderr)
    exported = json.load(open(os.path.join(run, "hf", "config.json")))
    assert exported["torch_dtype"] == "float16"
    with safe_open(os.path.join(run, "hf", "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    assert open_run(run).export.outputs.dtype == "float16"


def test_the_haliax_patch_fails_loudly_if_haliax_changes(monkeypatch):
    """export silences haliax's barrier on non-writer hosts (a pod hang otherwise); if haliax renames it, patching
    would silently do nothing, so the check refuses instead."""
    from haliax._src import state_dict as hax_state_dict

    from alpaca_cli.core import export

    assert export._haliax_state_dict_module() is hax_state_dict  # the pinned haliax: what the patch expects
    monkeypatch.delattr(hax_state_dict, "sync_global_devices")
    with pytest.raises(RuntimeError, match="haliax changed"):
        export._haliax_state_dict_module()
