"""The run directory: typed stage records in an atomic manifest, liveness of running stages, one layout."""

import json
import os

import pytest

from alpaca_cli.config import PrepareConfig
from alpaca_cli.errors import RunDirError
from alpaca_cli.records import PrepareInputs, PrepareRecord, PrepareSummary
from alpaca_cli.rundir import SCHEMA_VERSION, liveness, open_run, read_manifest


def test_a_stage_record_round_trips_typed(tmp_path):
    run = open_run(str(tmp_path / "r"), create=True)
    with run.stage("prepare", PrepareRecord(config=PrepareConfig(max_length=64), fingerprint="abc",
                                            inputs=PrepareInputs(tokenizer="tok"))) as record:
        assert open_run(run.url).prepare.status == "running"  # on disk as soon as the stage starts
        record.summary = PrepareSummary(examples=3, added_tokens={"pad_token": "[PAD]"})

    on_disk = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION
    assert on_disk["stages"]["prepare"]["config"]["max_length"] == 64  # plain JSON for people and other tools

    again = open_run(run.url).prepare
    assert isinstance(again, PrepareRecord) and isinstance(again.config, PrepareConfig)
    assert again.complete and again.fingerprint == "abc" and again.config.max_length == 64
    assert again.summary.added_tokens == {"pad_token": "[PAD]"}
    assert again.writer.pid == os.getpid() and again.versions["marin-levanter"]
    assert read_manifest(run.url).stages["prepare"] == again


def test_missing_run_and_missing_stage_name_the_command(tmp_path):
    with pytest.raises(RunDirError, match="run `alpaca prepare --run-dir .*` first"):
        open_run(str(tmp_path / "none"))
    run = open_run(str(tmp_path / "r"), create=True)
    with run.stage("prepare", PrepareRecord()):
        with pytest.raises(RunDirError, match=r"incomplete \(running\) `prepare` stage; run `alpaca prepare"):
            run.require("prepare")
    with pytest.raises(RunDirError, match="no `train` stage; run `alpaca train"):
        run.require("train")


def test_unknown_schema_version_and_malformed_records_are_refused(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"schema_version": 99, "stages": {}}))
    with pytest.raises(RunDirError, match="schema_version 99"):
        open_run(str(d))
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="not valid JSON"):
        open_run(str(d))
    (d / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION,
                                                 "stages": {"prepare": {"status": "complete", "bogus": 1}}}))
    with pytest.raises(RunDirError, match="`prepare` record is malformed.*bogus"):
        open_run(str(d))


def test_a_file_as_run_dir_is_one_clear_error(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        open_run(str(f), create=True)


def test_manifest_writes_are_atomic(tmp_path, monkeypatch):
    run = open_run(str(tmp_path / "r"), create=True)

    def fail(*a, **k):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with run.stage("prepare", PrepareRecord()):
            before = (tmp_path / "r" / "manifest.json").read_text()
            monkeypatch.setattr(os, "replace", fail)
    assert (tmp_path / "r" / "manifest.json").read_text() == before  # the old manifest, whole
    assert [p for p in os.listdir(tmp_path / "r") if p.startswith(".tmp")] == []


def test_non_writer_processes_do_not_write(tmp_path):
    run = open_run(str(tmp_path / "r"), create=True, writer=False)
    with run.stage("prepare", PrepareRecord()):
        pass
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_status_tells_a_dead_or_silent_stage_from_a_running_one(tmp_path):
    import subprocess
    import sys

    run = open_run(str(tmp_path / "r"), create=True)
    with pytest.raises(KeyboardInterrupt):
        with run.stage("prepare", PrepareRecord()) as st:
            assert liveness(st) == "running"  # this process, heartbeat just now
            gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True)
            st.writer.pid = int(gone.stdout)  # a process that has exited
            assert liveness(st).startswith("dead (process")
            st.writer.pid = os.getpid()
            st.heartbeat = "2000-01-01T00:00:00+00:00"
            assert liveness(st).startswith("stale (no sign of life")
            raise KeyboardInterrupt
    assert liveness(open_run(run.url).prepare) == "interrupted"


def test_a_stage_that_raises_is_failed_with_the_error_and_a_complete_one_stays_complete(tmp_path):
    run = open_run(str(tmp_path / "r"), create=True)
    with pytest.raises(ValueError):
        with run.stage("prepare", PrepareRecord()):
            raise ValueError("bad row 7")
    failed = open_run(run.url).prepare
    assert (failed.status, failed.error) == ("failed", "ValueError: bad row 7") and failed.finished
    with run.stage("prepare", PrepareRecord()):
        pass
    assert open_run(run.url).prepare.complete


def test_default_run_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ALPACA_RUN_DIR", str(tmp_path / "env-run"))
    run = open_run(None, create=True)
    assert run.url == str(tmp_path / "env-run")
    monkeypatch.delenv("ALPACA_RUN_DIR")
    monkeypatch.chdir(tmp_path)
    assert open_run(None, create=True).url == str(tmp_path / "alpaca-run")


def test_each_run_has_its_own_identity_which_survives_reopening(tmp_path):
    a = open_run(str(tmp_path / "a"), create=True)
    a.save()
    b = open_run(str(tmp_path / "b"), create=True)
    b.save()
    assert a.run_id and b.run_id and a.run_id != b.run_id
    assert open_run(str(tmp_path / "a")).run_id == a.run_id
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["run_id"] == a.run_id


def test_a_torn_last_metrics_line_is_skipped_and_a_malformed_one_before_it_refused(tmp_path, caplog):
    """A kill or a full disk during an append cuts the last line short; the resume rewrites the file without it.
    A damaged line in the middle is no interrupted write: it is refused, with its place."""
    run = open_run(str(tmp_path / "r"), create=True)
    run.save()
    steps = "".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in (1, 2, 3))
    (tmp_path / "r" / "metrics.jsonl").write_text(steps + '{"step": 4, "lo')
    with caplog.at_level("WARNING"):
        assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    assert "metrics.jsonl line 4 was cut short (an interrupted write); skipping it" in caplog.text
    (tmp_path / "r" / "metrics.jsonl").write_text(steps.replace('{"step": 2', '{"step": 2,,') + steps)
    with pytest.raises(RunDirError) as e:
        run.read_metrics()
    assert str(e.value) == (f"{run.metrics_path} line 2 is not valid JSON (Expecting property name enclosed in "
                            "double quotes) (repair or delete that line, then run again)")
    (tmp_path / "r" / "metrics.jsonl").unlink()
    assert run.read_metrics() == []


def test_a_manifest_from_before_mixtures_still_reads(tmp_path):
    """Issue 25 added PrepareConfig.sources, PrepareRecord.sources and PlanRecord.sources (defaults, schema 2): a
    manifest written without them reads, as one source over every row."""
    run = open_run(str(tmp_path / "r"), create=True)
    with run.stage("prepare", PrepareRecord(config=PrepareConfig(data="a.jsonl"), fingerprint="abc")) as record:
        record.summary = PrepareSummary(examples=5, records_read=6)
    path = tmp_path / "r" / "manifest.json"
    on_disk = json.loads(path.read_text())
    del on_disk["stages"]["prepare"]["sources"], on_disk["stages"]["prepare"]["config"]["sources"]
    path.write_text(json.dumps(on_disk))
    again = open_run(run.url).prepare
    assert again.sources == [] and again.config.sources == []
    (only,) = again.source_list()
    assert (only.name, only.rows, only.records_read) == ("a", [0, 5], 6)
