"""Nothing is trained, exported or answered from a checkpoint or cache that is not whole or not the run's own.

TensorStore reads a missing array chunk as zeros without an error (alpaca_cli/seal.py says more), so each check here
damages a folder the way a partial copy or a disk error would, and checks that what reads it refuses, in one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from helpers import error_line, run_cli

from alpaca_cli import seal
from alpaca_cli.core import checkpoints
from alpaca_cli.errors import RunDirError, StageError
from alpaca_cli.rundir import open_run


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(out)


def _steps(run_dir: str) -> list[str]:
    """The run's checkpoint folders, oldest first."""
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")), key=lambda n: int(n.split("-")[1]))


def _chunk(folder: str, under: str = "") -> str:
    """The largest array file under folder/under: a chunk of weights, not metadata. (A checkpoint is one OCDBT
    database: manifest.ocdbt and data files under d/, each holding chunks of many arrays.)"""
    files = [f for f in _files(folder) if f.startswith(under) and not f.endswith((".json", ".zarray", ".zattrs"))]
    return max(files, key=lambda f: os.path.getsize(os.path.join(folder, f)))


# -- the seal itself -------------------------------------------------------------------------------------------------


def test_a_sealed_folder_is_whole_until_a_file_goes_missing_or_shrinks(tmp_path):
    folder = tmp_path / "f"
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "b" / "0.0").write_bytes(b"x" * 100)
    (folder / "metadata.json").write_text("{}")
    assert "has no alpaca-seal.json" in seal.problem(str(folder), {})
    seal.write(str(folder), {"run_id": "r1", "step": 3})
    assert seal.problem(str(folder), {"run_id": "r1", "step": 3}) is None
    assert "belongs to another run" in seal.problem(str(folder), {"run_id": "r2", "step": 3})
    assert "sealed with step 3, not 4" in seal.problem(str(folder), {"run_id": "r1", "step": 4})

    (folder / "a" / "b" / "0.0").write_bytes(b"x" * 60)
    assert seal.problem(str(folder), {}) == "is damaged: a/b/0.0 has 60 bytes, 100 when it was written"
    (folder / "a" / "b" / "0.0").unlink()
    assert seal.problem(str(folder), {}) == "is damaged: a/b/0.0 of its 2 files missing"


def test_a_seal_on_gcs_sees_a_missing_object(gcs):
    import fsspec

    url = f"{gcs.url}/integrity/folder"
    fs = fsspec.filesystem("gcs")
    fs.pipe_file(f"{gcs.bucket}/integrity/folder/x/0", b"abc")
    fs.pipe_file(f"{gcs.bucket}/integrity/folder/metadata.json", b"{}")
    seal.write(url, {"fingerprint": "f"})
    assert seal.problem(url, {"fingerprint": "f"}) is None
    fs.rm_file(f"{gcs.bucket}/integrity/folder/x/0")
    assert seal.problem(url, {"fingerprint": "f"}) == "is damaged: x/0 of its 2 files missing"


def test_a_deletion_cut_short_never_leaves_a_checkpoint_that_looks_whole(tmp_path, monkeypatch):
    run = open_run(str(tmp_path / "run"), create=True)
    run.save()
    for step in (39, 79):
        folder = os.path.join(run.checkpoints_dir, f"step-{step}")
        os.makedirs(os.path.join(folder, "model"))
        with open(os.path.join(folder, "model", "0"), "wb") as f:
            f.write(b"w" * 10)
        with open(os.path.join(folder, "metadata.json"), "w") as f:
            json.dump({"step": step}, f)
        seal.write(folder, checkpoints.identity(run, step))
    assert [c.step for c in checkpoints.sealed_checkpoints(run)] == [39, 79]

    def killed(url):  # the process dies after the first file of the deletion
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.io, "rm_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.delete_checkpoint(os.path.join(run.checkpoints_dir, "step-39"))
    monkeypatch.undo()
    assert [c.step for c in checkpoints.sealed_checkpoints(run)] == [79]  # retention and progress skip it
    assert not os.path.exists(os.path.join(run.checkpoints_dir, "step-39", "metadata.json"))


# -- checkpoints: every command that reads one --------------------------------------------------------------------


def test_deleting_any_file_of_a_checkpoint_makes_every_reader_refuse_it(trained):
    """The fault-injection test: each file of the final checkpoint deleted in turn. find_checkpoint is what export,
    generate and eval load through; scan_checkpoints is what train's resume_point chooses from."""
    run_dir, _, _ = trained
    run = open_run(run_dir)
    final = checkpoints.find_checkpoint(run)
    assert final.step == 79
    files = [f for f in _files(final.path) if f != seal.SEAL]
    assert {"metadata.json", "manifest.ocdbt"} < set(files) and any(f.startswith("d/") for f in files)
    for name in files:
        path = os.path.join(final.path, name)
        saved = path + ".saved"
        os.rename(path, saved)
        try:
            if name == "metadata.json":  # without it the folder is no checkpoint at all: nothing reads it
                with pytest.raises(StageError, match="final checkpoint .* is missing"):
                    checkpoints.find_checkpoint(run)
            else:
                with pytest.raises(StageError, match=f"step-79 is damaged: {re.escape(name)} of its .* files missing"):
                    checkpoints.find_checkpoint(run)
                with pytest.raises(StageError, match=f"step-79 is damaged: {re.escape(name)}"):
                    checkpoints.find_checkpoint(run, 79)
            assert not checkpoints.is_whole(run, final.path)
            # what a resume chooses from: step-79 is not whole (or, without metadata.json, no checkpoint at all)
            assert all(c.problem for c in checkpoints.scan_checkpoints(run) if c.step == 79)
        finally:
            os.rename(saved, path)
    assert checkpoints.find_checkpoint(run).step == 79


def test_export_and_generate_refuse_a_checkpoint_with_a_missing_chunk(trained):
    run_dir, _, _ = trained
    step79 = os.path.join(run_dir, "checkpoints", "step-79")
    chunk = _chunk(step79, "d/")
    os.remove(os.path.join(step79, chunk))

    out = run_cli(["export", "--run-dir", run_dir], check=False)
    assert out.returncode == 1
    assert error_line(out) == f"Error: checkpoint {step79} is damaged: {chunk} of its {len(_files(step79))} files missing"
    older = _steps(run_dir)[0]
    assert f"hint: restore it from a copy or pick a whole one with --step (whole: {older})" in out.stderr
    assert not os.path.exists(os.path.join(run_dir, "hf"))

    out = run_cli(["generate", "--run-dir", run_dir, "Say hi."], check=False)
    assert out.returncode == 1 and f"step-79 is damaged: {chunk}" in error_line(out)
    assert run_cli(["export", "--run-dir", run_dir, "--step", older[5:]]).returncode == 0  # the way out works


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_keeps_it_aside(trained):
    run_dir, model_dir, _ = trained
    run = open_run(run_dir)
    step79 = os.path.join(run_dir, "checkpoints", "step-79")
    chunk = _chunk(step79, "d/")
    with open(os.path.join(step79, chunk), "r+b") as f:
        f.truncate(10)  # a partial copy
    older = _steps(run_dir)[0]
    out = run_cli(["train", "--run-dir", run_dir, "--model", model_dir, "--seq-len", "128", "--batch-size", "6",
                   "--steps", "80", "--learning-rate", "1e-2", "--warmup", "0.05", "--precision", "p=f32,c=f32",
                   "--checkpoint-every", "40", "--keep-checkpoints", "2"])
    assert f"Checkpoint {step79} is damaged: {chunk} has 10 bytes" in out.stderr
    assert f"resuming from {os.path.join(run_dir, 'checkpoints', older)}" in out.stderr
    aside = os.listdir(run.unusable_checkpoints_dir)
    assert len(aside) == 1 and aside[0].startswith("step-79-")  # moved, not deleted
    assert os.path.getsize(os.path.join(run.unusable_checkpoints_dir, aside[0], chunk)) == 10
    # trained again from the whole one: a new, whole final checkpoint, and every step's metrics once
    assert checkpoints.find_checkpoint(open_run(run_dir)).step == 79
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f if line.strip()] == list(range(1, 81))


def test_a_checkpoint_of_another_run_is_never_resumed_or_exported(trained, tmp_path):
    run_dir, model_dir, _ = trained
    # the run's manifest is deleted and the data prepared again: a new run, with the old run's checkpoints in place
    other = str(tmp_path / "other")
    shutil.copytree(run_dir, other)
    prepared = open_run(other).prepare
    os.remove(os.path.join(other, "manifest.json"))
    run_cli(["prepare", "--run-dir", other, "--data", prepared.config.data, "--tokenizer", prepared.config.tokenizer,
             "--max-length", "128", "-q"])
    out = run_cli(["train", "--run-dir", other, "--model", model_dir, "--seq-len", "128", "--batch-size", "6",
                   "--steps", "80", "--learning-rate", "1e-2", "--warmup", "0.05", "--precision", "p=f32,c=f32",
                   "--checkpoint-every", "40", "--keep-checkpoints", "2", "-q"], check=False)
    assert out.returncode == 1
    line = error_line(out)
    assert line.startswith(f"Error: no whole checkpoint of run {other} to resume from: {other}/checkpoints/step-79 "
                           "belongs to another run (run id ")
    assert _steps(other) == _steps(run_dir)  # nothing moved or lost

    older = _steps(other)[0]
    out = run_cli(["export", "--run-dir", other, "--step", older[5:]], check=False)
    assert out.returncode == 1 and f"{older} belongs to another run" in error_line(out)


# -- the token cache -------------------------------------------------------------------------------------------------


def test_a_cache_missing_a_chunk_is_refused_and_prepare_rebuilds_it(trained):
    run_dir, model_dir, _ = trained
    cache = os.path.join(run_dir, "data", "cache")
    chunk = _chunk(cache, "targets")
    os.remove(os.path.join(cache, chunk))

    out = run_cli(["inspect", "--run-dir", run_dir], check=False)
    assert out.returncode == 1
    assert error_line(out) == f"Error: the token cache at {cache} is damaged: {chunk} of its {len(_files(cache))} files missing"
    assert f"hint: run `alpaca prepare --run-dir {run_dir}` again with the same inputs: it rebuilds the cache" in out.stderr
    with pytest.raises(RunDirError, match="is damaged"):
        from alpaca_cli.core.cache import open_run_cache

        open_run_cache(open_run(run_dir))

    prepared = open_run(run_dir).prepare
    out = run_cli(["prepare", "--run-dir", run_dir, "--data", prepared.config.data, "--tokenizer",
                   prepared.config.tokenizer, "--max-length", "128"])
    assert "is damaged" in out.stderr and "preparing it again" in out.stderr
    assert "reused" not in out.stdout + out.stderr
    assert os.path.exists(os.path.join(cache, chunk))
    assert run_cli(["inspect", "--run-dir", run_dir]).returncode == 0


# -- the training plan -----------------------------------------------------------------------------------------------


def test_a_train_that_failed_before_its_first_checkpoint_can_be_run_again_with_another_model(
        tmp_path, fixture_data, tokenizer_dir, tiny_model_dir):
    run_dir = str(tmp_path / "run")
    run_cli(["prepare", "--data", fixture_data, "--tokenizer", tokenizer_dir, "--run-dir", run_dir, "--max-length",
             "128", "-q"])
    # a wrong --model: another model's config.json beside these weights (found when the weights are loaded)
    broken = str(tmp_path / "broken-model")
    shutil.copytree(tiny_model_dir, broken)
    with open(os.path.join(broken, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] *= 2
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(config, f)
    args = ["--seq-len", "128", "--batch-size", "4", "--steps", "2", "-q"]
    out = run_cli(["train", "--run-dir", run_dir, "--model", broken, *args], check=False)
    assert out.returncode == 1 and "its weights do not match its config.json" in error_line(out)
    assert open_run(run_dir).train.plan_fingerprint  # the plan was recorded before the weights failed to load

    run_cli(["train", "--run-dir", run_dir, "--model", tiny_model_dir, *args])  # the corrected model trains
    assert open_run(run_dir).train.complete
    out = run_cli(["train", "--run-dir", run_dir, "--model", broken, *args], check=False)
    # now a checkpoint follows it: the one line names the setting and both values
    assert out.returncode == 1
    assert error_line(out) == (f"Error: run {run_dir} was trained with model_name_or_path (--model) {tiny_model_dir}, "
                               f"now {broken}")
