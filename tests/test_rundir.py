"""The run directory and its manifest."""

import json
import os

import pytest

from alpaca_cli.errors import RunDirError
from alpaca_cli.rundir import SCHEMA_VERSION, open_run, read_manifest


def test_manifest_round_trip_with_relative_outputs(tmp_path):
    run = open_run(str(tmp_path / "r"), create=True)
    run.start_stage("prepare", config={"max_length": 512}, inputs={"data": {"sha256": "x"}})
    run.complete_stage("prepare", outputs={"cache": run.relative(run.cache_dir)}, summary={"examples": 3})
    m = read_manifest(run.url)
    assert m["schema_version"] == SCHEMA_VERSION
    st = m["stages"]["prepare"]
    assert st["status"] == "complete" and st["outputs"]["cache"] == "data/cache"
    assert st["config"] == {"max_length": 512} and st["summary"] == {"examples": 3}
    assert st["versions"]["levanter"] and st["versions"]["jax"]
    assert open_run(run.url).resolve("data/cache") == run.cache_dir


def test_missing_run_and_missing_stage_name_the_command(tmp_path):
    with pytest.raises(RunDirError, match="run `alpaca prepare --run-dir .*` first"):
        open_run(str(tmp_path / "none"))
    run = open_run(str(tmp_path / "r"), create=True)
    run.start_stage("prepare", config={})
    with pytest.raises(RunDirError, match=r"incomplete \(running\) `prepare` stage; run `alpaca prepare"):
        run.require("prepare")
    with pytest.raises(RunDirError, match="no `train` stage; run `alpaca train"):
        run.require("train")


def test_unknown_schema_version_is_refused(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"schema_version": 99, "stages": {}}))
    with pytest.raises(RunDirError, match="schema_version 99"):
        open_run(str(d))
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="not valid JSON"):
        open_run(str(d))


def test_manifest_writes_are_atomic(tmp_path, monkeypatch):
    run = open_run(str(tmp_path / "r"), create=True)
    run.start_stage("prepare", config={})
    before = (tmp_path / "r" / "manifest.json").read_text()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        run.complete_stage("prepare")
    assert (tmp_path / "r" / "manifest.json").read_text() == before  # the old manifest, whole
    assert [p for p in os.listdir(tmp_path / "r") if p.startswith(".tmp")] == []


def test_non_writer_processes_do_not_write(tmp_path):
    run = open_run(str(tmp_path / "r"), create=True, writer=False)
    run.start_stage("prepare", config={})
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_default_run_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPACA_RUN_DIR", str(tmp_path / "env-run"))
    run = open_run(None, create=True)
    assert run.url == str(tmp_path / "env-run")
    monkeypatch.delenv("ALPACA_RUN_DIR")
    monkeypatch.chdir(tmp_path)
    assert open_run(None, create=True).url == str(tmp_path / "alpaca-run")
