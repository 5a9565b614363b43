"""What a careless or unlucky user meets: one `Error:` line naming what is wrong and what to do, a non-zero exit,
and nothing complete-looking left behind. Through `main()`, the console script's error boundary, in-process (the
file-system failures are simulated there) or as a subprocess where signals or the environment are involved."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ALPACA, cli_env, error_line, prepared_examples, read_records, run_cli

from alpaca_cli import main as main_mod
from alpaca_cli.rundir import open_run


def alpaca(args, capsys, monkeypatch) -> tuple[int, str]:
    """Run `alpaca ARGS` through main() in this process: (exit code, the one error line)."""
    monkeypatch.setattr(sys, "argv", ["alpaca", *args])
    with pytest.raises(SystemExit) as exit_info:
        main_mod.main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return exit_info.value.code, errors[0] + "\n" + "\n".join(line for line in err.splitlines() if "hint:" in line)


@pytest.fixture(scope="module")
def prepared_template(tmp_path_factory, fixture_data, tokenizer_dir):
    path = str(tmp_path_factory.mktemp("bad-input") / "run")
    run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", path, "--max-length",
             "128", "-q"])
    return path


@pytest.fixture
def prepared(prepared_template, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(prepared_template, dst)
    return dst


def test_a_read_only_run_directory(tmp_path, fixture_data, tokenizer_dir, capsys, monkeypatch):
    from alpaca_cli import io

    real = io.write_bytes_atomic

    def read_only(url, data):
        raise OSError(errno.EROFS, "Read-only file system", url)

    monkeypatch.setattr(io, "write_bytes_atomic", read_only)
    code, line = alpaca(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir",
                         str(tmp_path / "ro")], capsys, monkeypatch)
    assert code == 1 and line.startswith(f"Error: cannot write {tmp_path / 'ro' / 'manifest.json'}: read-only file")
    assert "use a --run-dir (or --output) you can write to" in line
    monkeypatch.setattr(io, "write_bytes_atomic", real)
    assert not (tmp_path / "ro" / "manifest.json").exists()


def test_a_full_disk_while_writing_the_cache(tmp_path, fixture_data, tokenizer_dir, capsys, monkeypatch):
    import alpaca_cli.core.prepare as prepare_core

    def full(*a, **k):  # what tensorstore reports when the disk fills up under Levanter's cache writer
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/data/cache/input_ids/offsets\": "
                         "No space left on device [OS error: No space left on device]")

    monkeypatch.setattr(prepare_core, "write_cache", full)
    run = tmp_path / "full"
    code, line = alpaca(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", str(run)],
                        capsys, monkeypatch)
    assert code == 1 and line.startswith("Error: no space left on the device") and "free some space" in line
    assert open_run(str(run)).prepare.status == "failed"  # not complete, and says why


def test_out_of_accelerator_memory_and_unexpected_errors_are_one_line():
    from alpaca_cli.errors import explain

    oom = explain(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17.2GiB"))
    assert oom.message == "out of accelerator memory" and "--per-device-rows" in oom.hint
    bug = explain(KeyError("h.ln_1.weight"))
    assert bug.message == "internal error: KeyError: 'h.ln_1.weight'" and "ALPACA_DEBUG=1" in bug.hint


def test_weights_that_do_not_match_their_config(prepared, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A config.json whose model_type does not describe its weights (here: Llama weights, a GPT-2 config)."""
    bad = tmp_path / "mismatch"
    shutil.copytree(tiny_model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": config["hidden_size"],
        "n_layer": config["num_hidden_layers"], "n_head": config["num_attention_heads"], "n_positions": 256,
        "vocab_size": config["vocab_size"],
    }))
    code, line = alpaca(["train", "--run-dir", prepared, "--model", str(bad), "--seq-len", "256", "-q"],
                        capsys, monkeypatch)
    assert code == 1
    assert f"Error: --model {bad}: its weights do not match its config.json (model_type gpt2)" in line
    assert "check that config.json belongs to these weights" in line
    assert open_run(prepared).train.status == "failed"


def _no_weights(folder) -> str:
    os.remove(folder / "model.safetensors")
    return " has no weights (no model.safetensors, model.safetensors.index.json or pytorch_model.bin in it)"


def _truncated(folder) -> str:  # an interrupted copy: the first half of the file
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)
    return (": model.safetensors is truncated or damaged (safetensors: Error while deserializing header: incomplete "
            "metadata, file not fully covered)")


def _shard_missing(folder) -> str:  # a sharded export copied without one of its shards
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return ": model-00002-of-00002.safetensors (named in model.safetensors.index.json) is missing"


@pytest.mark.parametrize("damage", [_no_weights, _truncated, _shard_missing])
@pytest.mark.parametrize("command", [["generate", "Name a color."], ["eval", "--data", "demo"]])
def test_from_export_of_a_folder_without_whole_weights(command, damage, tmp_path, tiny_model_dir, capsys,
                                                       monkeypatch):
    """An export folder whose weights are missing or cut short: one line naming the folder or the file, and the
    fix (before: an internal error, a Hub repo-id error for a local path or 'buffer is smaller than requested
    size')."""
    export = tmp_path / "export"
    shutil.copytree(tiny_model_dir, export)
    what = damage(export)
    code, line = alpaca([*command, "--from-export", str(export)], capsys, monkeypatch)
    assert code == 1
    assert line == (f"Error: --from-export {export}{what}\n"
                    "  hint: export it again (`alpaca export --run-dir RUN --output DIR`), or copy the whole export "
                    "again")


@pytest.mark.parametrize("repo_id,reason", [
    ("not a valid id!!", ("Repo id must use alphanumeric chars, '-', '_' or '.'. The name cannot start or end with "
                          "'-' or '.' and the maximum length is 96")),
    ("a/b/c", "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"),
])
def test_push_to_hub_with_an_invalid_repo_id_is_refused_before_any_work(repo_id, reason, prepared, capsys,
                                                                        monkeypatch):
    """huggingface_hub's own validator, before anything is read or written (before: an internal HFValidationError
    once the export was written). Refused even before the missing train stage is noticed."""
    monkeypatch.setenv("HF_TOKEN", "hf_fake_SECRET_token_0123456789")
    code, line = alpaca(["export", "--run-dir", prepared, "--push-to-hub", "--repo-id", repo_id], capsys, monkeypatch)
    assert code == 1
    assert line == (f"Error: --repo-id {repo_id!r} is not a Hub repo id: {reason}\n"
                    "  hint: give NAMESPACE/NAME (e.g. YOU/llama2-alpaca), or NAME for your own namespace")
    assert open_run(prepared).export is None and not os.path.exists(os.path.join(prepared, "hf"))


def test_push_to_hub_in_offline_mode_is_refused_before_any_work(prepared, capsys, monkeypatch):
    """HF_HUB_OFFLINE=1 (this test session's, read by huggingface_hub when imported): nothing could be pushed, so
    nothing is exported (before: an internal OfflineModeIsEnabled once the export was written)."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_TOKEN", "hf_fake_SECRET_token_0123456789")
    code, line = alpaca(["export", "--run-dir", prepared, "--push-to-hub", "--repo-id", "tester/alpaca-tiny"], capsys,
                        monkeypatch)
    assert code == 1
    assert line == ("Error: --push-to-hub: the Hub cannot be reached, offline mode is on (HF_HUB_OFFLINE=1)\n"
                    "  hint: unset HF_HUB_OFFLINE to push, or export without --push-to-hub")
    assert open_run(prepared).export is None and not os.path.exists(os.path.join(prepared, "hf"))


def test_a_model_folder_without_weights(prepared, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Only the config and tokenizer copied (the weights forgotten, or still downloading)."""
    bare = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    code, line = alpaca(["train", "--run-dir", prepared, "--model", str(bare), "--seq-len", "256", "-q"],
                        capsys, monkeypatch)
    assert code == 1 and line == (f"Error: --model {bare} has no weights (no model.safetensors, "
                                  "model.safetensors.index.json or pytorch_model.bin in it)\n  hint: copy the model's "
                                  "weight files into it, or give the folder that has them")
    assert open_run(prepared).train is None  # refused before anything started


@pytest.mark.parametrize(
    "args,message",
    [
        (["--learning-rate", "nan"], "optimizer.learning_rate (--learning-rate) must be a finite number >= 0.0"),
        (["--learning-rate", "-1"], "must be a finite number >= 0.0, got -1.0"),
        (["--tensor-parallel", "3"], "--tensor-parallel 3 does not divide the 4 devices; use one of 1, 2, 4"),
        (["--warmup", "1.5"], "optimizer.warmup (--warmup) as a fraction must be in [0, 1), got 1.5"),
    ],
)
def test_invalid_numbers_are_refused_before_anything_is_loaded(prepared, tiny_model_dir, args, message, capsys,
                                                               monkeypatch):
    code, line = alpaca(["train", "--run-dir", prepared, "--model", tiny_model_dir, "--seq-len", "256", *args],
                        capsys, monkeypatch)
    assert code == 1 and message in line
    assert open_run(prepared).train is None  # nothing started


def test_flag_values_a_command_cannot_mean(prepared, tiny_model_dir, tmp_path, fixture_data, tokenizer_dir):
    steps = run_cli(["train", "--run-dir", prepared, "--model", tiny_model_dir, "--steps", "0"], check=False)
    assert steps.returncode == 2 and "greater than or equal to 1" in " ".join(steps.stderr.split())
    empty = run_cli(["generate", "", "--run-dir", prepared], check=False)
    assert empty.returncode == 1 and error_line(empty) == "Error: the instruction is empty"
    huge = run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir",
                    str(tmp_path / "huge"), "--max-length", "99999999999"], check=False)
    assert huge.returncode == 1
    assert error_line(huge) == ("Error: max_length (--max-length) must be between 2 and 1,048,576 tokens, "
                                "got 99,999,999,999")
    assert not (tmp_path / "huge").exists()


def test_data_mistakes_get_a_message_that_says_what_to_do(tmp_path, fixture_data, tokenizer_dir, capsys,
                                                          monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(fixture_data, folder / "train.jsonl")
    code, line = alpaca(["prepare", "--data", str(folder), "--tokenizer", tokenizer_dir, "--run-dir",
                         str(tmp_path / "a")], capsys, monkeypatch)
    assert code == 1 and line.startswith(f"Error: --data {folder} is a directory; give one .json/.jsonl/.jsonl.gz "
                                         "file (in it: train.jsonl)")

    pretty = tmp_path / "pretty.jsonl"  # a pretty-printed JSON list saved as .jsonl
    pretty.write_text(json.dumps(read_records(fixture_data), indent=2, ensure_ascii=False))
    code, line = alpaca(["prepare", "--data", str(pretty), "--tokenizer", tokenizer_dir, "--run-dir",
                         str(tmp_path / "b")], capsys, monkeypatch)
    assert code == 1 and "looks like one JSON list" in line and "name it .json" in line

    run_file = tmp_path / "not-a-dir"
    run_file.write_text("x")
    code, line = alpaca(["status", "--run-dir", str(run_file)], capsys, monkeypatch)
    assert code == 1 and line.startswith(f"Error: --run-dir {run_file} is a file, not a directory")


def test_a_record_with_a_key_given_twice_is_refused_with_its_place(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """JSON readers keep the last of two equal keys silently; one of the two answers would be lost unseen."""
    lines = tmp_path / "twice.jsonl"
    lines.write_text('{"instruction": "a", "output": "b"}\n'
                     '{"instruction": "Name a color.", "output": "Red.", "output": "Blue."}\n')
    listed = tmp_path / "twice.json"
    listed.write_text('[{"instruction": "a", "output": "b"},\n'
                      ' {"instruction": "x", "instruction": "y", "output": "z"}]')
    hint = "  hint: keep one of them: JSON readers silently take the last"
    for path, where, key in ((lines, "line 2", "output"), (listed, "record 1", "instruction")):
        code, line = alpaca(["prepare", "--data", str(path), "--tokenizer", tokenizer_dir, "--run-dir",
                             str(tmp_path / "run")], capsys, monkeypatch)
        assert code == 1 and line == f"Error: {path} {where}: the key `{key}` appears twice in one record\n{hint}"
    assert not (tmp_path / "run" / "data").exists()


def test_inspect_past_the_last_record_says_the_range(prepared, capsys, monkeypatch):
    indices = sorted(prepared_examples(prepared))
    code, line = alpaca(["inspect", "--run-dir", prepared, "--index", "500"], capsys, monkeypatch)
    assert code == 1 and line == (f"Error: --index 500 is past the end: the prepared examples are source records "
                                  f"{indices[0]} to {indices[-1]} ({len(indices)} examples)\n"
                                  "  hint: give an --index in that range")


def test_a_byte_order_mark_is_accepted(tmp_path, fixture_data, tokenizer_dir):
    """Files saved by spreadsheet tools start with a UTF-8 BOM: the records are the same as without it."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + open(fixture_data, "rb").read())
    run_cli(["prepare", "--data", str(bom), "--tokenizer", tokenizer_dir, "--run-dir", str(tmp_path / "bom"), "-q"])
    run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", str(tmp_path / "plain"),
             "-q"])
    assert prepared_examples(str(tmp_path / "bom")) == prepared_examples(str(tmp_path / "plain"))


@pytest.mark.exclusive  # a time bound
def test_gcs_without_network_or_credentials_fails_at_once_in_one_line(tmp_path):
    t0 = time.time()
    unreachable = run_cli(["status", "--run-dir", "gs://bucket/run"], check=False,
                          env=cli_env(STORAGE_EMULATOR_HOST="http://127.0.0.1:9"))  # nothing listens on port 9
    assert unreachable.returncode == 1 and time.time() - t0 < 30
    line = error_line(unreachable)
    assert "cannot reach Google Cloud Storage at http://127.0.0.1:9" in line
    assert "gcloud auth application-default login" in unreachable.stderr
    assert "STORAGE_EMULATOR_HOST" in unreachable.stderr

    env = cli_env()
    for var in ("STORAGE_EMULATOR_HOST", "FSSPEC_GCS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS"):
        env.pop(var, None)
    env["HOME"] = str(tmp_path)  # no gcloud application-default credentials either
    env["CLOUDSDK_CONFIG"] = str(tmp_path / "gcloud")
    no_credentials = run_cli(["status", "--run-dir", "gs://bucket/run"], check=False, env=env)
    assert no_credentials.returncode == 1
    assert error_line(no_credentials).startswith("Error: gs://bucket/run/manifest.json: no Google Cloud credentials")


SWALLOWED = r"""
import gc, os, signal
from alpaca_cli import interrupts
interrupts.install()

def collecting(phase, info):  # a garbage-collection callback, as JAX registers one
    if phase == "start":
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # the handler runs here; Python drops its KeyboardInterrupt ("Exception ignored in")

gc.callbacks.append(collecting)
gc.collect()
gc.callbacks.remove(collecting)
print("ran on")
try:
    interrupts.check()
except KeyboardInterrupt:
    print("stopped at the check")
"""


def test_a_ctrl_c_swallowed_by_a_gc_callback_still_stops_at_the_next_check():
    out = subprocess.run([sys.executable, "-c", SWALLOWED], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in out.stderr and "KeyboardInterrupt" in out.stderr  # what Python does with it
    assert out.stdout.split("\n")[:2] == ["ran on", "stopped at the check"], (out.stdout, out.stderr)


@pytest.mark.exclusive  # a signal at a chosen moment
def test_ctrl_c_says_how_to_continue_and_status_tells_what_happened(prepared, tiny_model_dir):
    proc = subprocess.Popen([ALPACA, "train", "--run-dir", prepared, "--model", tiny_model_dir, "--seq-len", "256",
                             "--batch-size", "4", "--epochs", "100", "-q"], env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(prepared, "metrics.jsonl")
    deadline = time.time() + 300
    while not os.path.exists(metrics):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.startswith("Error: ")] == ["Error: interrupted"]
    assert "hint: run the same command again to continue" in err
    assert open_run(prepared).train.status == "interrupted"
    status = run_cli(["status", "--run-dir", prepared])
    assert "interrupted" in status.stdout


def test_from_export_of_a_folder_without_a_config_names_that_flag(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "not-an-export"
    empty.mkdir()
    code, line = alpaca(["generate", "--from-export", str(empty), "Name a color."], capsys, monkeypatch)
    assert code == 1
    assert line.splitlines()[0] == f"Error: --from-export {empty}: expected a Hugging Face checkpoint folder with a config.json"
