"""Nothing we did not write is deleted or overwritten: `export --output` replaces only an earlier export of the same
run (and only with --overwrite), never the run itself; a failed export leaves nothing beside its output; `generate
--output` replaces only its own earlier answers. Through `main()` in this process: the refusals come before any
model is loaded."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys

import pytest

from alpaca_cli import main as main_mod
from alpaca_cli.core.export_folder import EXPORT_MARKER
from alpaca_cli.rundir import open_run

pytestmark = pytest.mark.entry


def alpaca(args, capsys, monkeypatch) -> tuple[int, str]:
    """Run `alpaca ARGS` through main() in this process: (exit code, the Error line and its hint, or stdout)."""
    monkeypatch.setattr(sys, "argv", ["alpaca", *args])
    with pytest.raises(SystemExit) as exit_info:
        main_mod.main()
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    if exit_info.value.code == 0:
        return 0, out
    assert len(errors) == 1, err
    return exit_info.value.code, errors[0] + "\n" + "\n".join(line for line in err.splitlines() if "hint:" in line)


def tree(folder) -> dict:
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_export_into_a_folder_of_other_files_is_refused_and_leaves_them(trained, tmp_path, capsys, monkeypatch):
    run, _, _ = trained
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of work")
    code, line = alpaca(["export", "--run-dir", run, "--output", str(mine)], capsys, monkeypatch)
    assert code == 1
    assert line == (f"Error: --output {mine} is not empty; an export replaces only an earlier export of this run\n"
                    "  hint: give another --output, or empty that folder yourself")
    code, line = alpaca(["export", "--run-dir", run, "--output", str(mine), "--overwrite"], capsys, monkeypatch)
    assert code == 1 and "is not empty; an export replaces only an earlier export of this run" in line
    assert tree(mine) == {"notes.txt": b"a week of work"}
    assert open_run(run).export is None  # nothing started


def test_export_over_the_run_directory_its_parent_or_its_state_is_refused_even_with_overwrite(
        trained, tmp_path, capsys, monkeypatch):
    run, _, _ = trained
    before = tree(run)
    hint = f"  hint: export to a folder of its own, e.g. --output {run}/hf (the default)"
    code, line = alpaca(["export", "--run-dir", run, "--output", run, "--overwrite"], capsys, monkeypatch)
    assert code == 1
    assert line == f"Error: --output {run} is the run directory: an export there would replace the run\n{hint}"
    monkeypatch.chdir(tmp_path)  # `--output .` from the folder that holds the run
    code, line = alpaca(["export", "--run-dir", "run", "--output", ".", "--overwrite"], capsys, monkeypatch)
    assert code == 1 and line.startswith(f"Error: --output {tmp_path} holds the run directory {run}: an export there")
    for inside, what in (("checkpoints", "is the run's own checkpoints"),
                         ("checkpoints/step-79", "is inside the run's own checkpoints"),
                         ("data/cache", "is inside the run's own data"), ("tokenizer", "is the run's own tokenizer")):
        code, line = alpaca(["export", "--run-dir", run, "--output", os.path.join(run, inside), "--overwrite"],
                            capsys, monkeypatch)
        assert code == 1 and line.startswith(f"Error: --output {os.path.join(run, inside)} {what}"), line
    assert tree(run) == before


def test_exporting_again_needs_overwrite_and_a_failed_export_leaves_nothing_behind(
        trained, tmp_path, capsys, monkeypatch):
    """The default output (RUN/hf) too: a second export asks for --overwrite. A failure while the new folder is put
    in place (here a full disk) leaves no hidden folder beside the output, and the earlier export as it was."""
    from alpaca_cli.core import export_folder as export_mod

    run, _, _ = trained
    hf = os.path.join(run, "hf")
    code, out = alpaca(["export", "--run-dir", run], capsys, monkeypatch)
    assert code == 0 and out.strip() == hf
    marker = json.load(open(os.path.join(hf, EXPORT_MARKER)))
    assert marker["run_id"] == open_run(run).run_id
    first = tree(hf)
    code, line = alpaca(["export", "--run-dir", run], capsys, monkeypatch)
    assert code == 1 and line == (f"Error: --output {hf} holds an earlier export of this run\n"
                                  "  hint: add --overwrite to replace it, or give another --output")
    assert open_run(run).export.complete  # a refusal does not touch the record of the earlier export

    real_copytree = shutil.copytree

    def full_disk(src, dst, **kwargs):  # the disk fills up while the new folder is copied beside the output
        if os.path.basename(dst).startswith(".export-"):
            real_copytree(src, dst, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copytree(src, dst, **kwargs)

    listing = sorted(os.listdir(run))
    monkeypatch.setattr(export_mod.shutil, "copytree", full_disk)
    code, line = alpaca(["export", "--run-dir", run, "--step", "40", "--overwrite"], capsys, monkeypatch)
    assert code == 1 and line.startswith("Error: no space left on the device")
    code, line = alpaca(["export", "--run-dir", run, "--output", os.path.join(run, "new")], capsys, monkeypatch)
    assert code == 1 and line.startswith("Error: no space left on the device")
    monkeypatch.undo()
    real_replace = os.replace

    def fail_into_place(src, dst):  # the swap itself fails after the earlier export was moved aside
        if os.path.basename(src).startswith(".export-") and dst == hf:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(export_mod.os, "replace", fail_into_place)
    code, line = alpaca(["export", "--run-dir", run, "--step", "40", "--overwrite"], capsys, monkeypatch)
    assert code == 1 and line.startswith("Error: no space left on the device")
    monkeypatch.undo()
    assert sorted(os.listdir(run)) == listing  # no .export-* or .export-old-* folder, no half-written `new`
    assert tree(hf) == first

    code, out = alpaca(["export", "--run-dir", run, "--step", "40", "--overwrite"], capsys, monkeypatch)
    assert code == 0 and out.strip() == hf
    assert open_run(run).export.step == 40 and tree(hf) != first
    assert sorted(os.listdir(run)) == listing

    # an export of another run (its marker says so) is not replaced, even with --overwrite
    with open(os.path.join(hf, EXPORT_MARKER), "w") as f:
        json.dump({**marker, "run_id": "another-run", "run_dir": "/elsewhere/run"}, f)
    code, line = alpaca(["export", "--run-dir", run, "--overwrite"], capsys, monkeypatch)
    assert code == 1 and line.startswith(f"Error: --output {hf} holds an export of another run (/elsewhere/run); ")


def test_export_into_a_non_empty_gcs_folder_is_refused(trained, gcs, capsys, monkeypatch):
    from alpaca_cli import io

    run, _, _ = trained
    url = f"{gcs.url}/someone-elses/model"
    io.write_text_atomic(f"{url}/weights.bin", "not ours")
    code, line = alpaca(["export", "--run-dir", run, "--output", url], capsys, monkeypatch)
    assert code == 1
    assert line == (f"Error: --output {url} is not empty; an export replaces only an earlier export of this run\n"
                    "  hint: give another --output, or empty that folder yourself")
    assert io.listdir(url) == ["weights.bin"] and io.read_text(f"{url}/weights.bin") == "not ours"


def test_generate_output_over_a_file_it_did_not_write_is_refused(trained, tmp_path, capsys, monkeypatch):
    run, _, records = trained
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"instruction": r["instruction"], "input": r.get("input", "")}
                                    for r in records[:2]]))
    before = requests.read_text()
    code, line = alpaca(["generate", "--run-dir", run, "--file", str(requests), "--output", str(requests)],
                        capsys, monkeypatch)
    assert code == 1 and line == (f"Error: --output {requests} is the --file it would answer\n"
                                  "  hint: write the answers to another file")
    results = tmp_path / "results.json"  # somebody's JSON: the same shape, another generator
    results.write_text(json.dumps([{"instruction": "x", "output": "y", "generator": "gpt4"}]))
    code, line = alpaca(["generate", "--run-dir", run, "--file", str(requests), "--output", str(results)],
                        capsys, monkeypatch)
    assert code == 1 and line == (f"Error: --output {results} already exists and is not an earlier output of "
                                  "generator 'run'\n  hint: give another --output, or delete that file yourself")
    assert requests.read_text() == before and json.loads(results.read_text())[0]["generator"] == "gpt4"

    answers = tmp_path / "answers.jsonl"  # generate's own earlier output is answered again
    args = ["generate", "--run-dir", run, "--file", str(requests), "--output", str(answers), "--max-new-tokens", "4"]
    assert alpaca(args, capsys, monkeypatch)[0] == 0
    first = answers.read_text()
    assert alpaca(args, capsys, monkeypatch)[0] == 0
    assert answers.read_text() == first and len(first.splitlines()) == 2
