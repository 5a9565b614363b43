"""An export's folder: where it may go, and how a finished one is put in place.

Every export folder holds a marker (`EXPORT_MARKER`) with the identity of the run it came from; a folder is replaced
only when it holds this run's marker, so nothing an export did not write is ever deleted or overwritten.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from alpaca_cli import io
from alpaca_cli.errors import ConfigError
from alpaca_cli.rundir import RunDir

EXPORT_MARKER = ".alpaca-export.json"
"""Written into every export folder with the identity of the run it came from (`run_id`): a folder is replaced only
when it holds this run's marker (and --overwrite is given); any other non-empty folder is refused. Not pushed."""


def check_writable(url: str) -> None:
    if io.is_remote(url):
        return
    probe = os.path.dirname(url.rstrip("/")) or "."
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK) or (os.path.exists(url) and not os.path.isdir(url)):
        raise ConfigError(f"--output {url}: cannot create a folder there ({probe} is not a writable directory)")


def check_output(out: str, run: RunDir, overwrite: bool) -> None:
    """Refuse an --output whose export would replace what this run's exports did not write: the run directory, a
    folder holding it, its own state, a non-empty folder that is not an export of this run, or (without overwrite)
    an earlier export of this run."""
    hint = f"export to a folder of its own, e.g. --output {run.export_dir} (the default)"
    real_out, real_run = _real(out), _real(run.url)
    if _within(real_run, real_out):
        what = "is the run directory" if real_out == real_run else f"holds the run directory {run.url}"
        raise ConfigError(f"--output {out} {what}: an export there would replace the run", hint=hint)
    for state in run.state_paths():
        if _within(real_out, _real(state)):
            where = "" if real_out == _real(state) else "inside "
            raise ConfigError(f"--output {out} is {where}the run's own {run.relative(state)}", hint=hint)
    names = io.listdir(out) if io.is_remote(out) or os.path.isdir(out) else []
    if not names:
        return
    marker = _read_marker(out) if EXPORT_MARKER in names else {}
    if marker.get("run_id") != run.run_id:
        what = f"holds an export of another run ({marker.get('run_dir')})" if marker else "is not empty"
        raise ConfigError(f"--output {out} {what}; an export replaces only an earlier export of this run",
                          hint="give another --output, or empty that folder yourself")
    if not overwrite:
        raise ConfigError(f"--output {out} holds an earlier export of this run",
                          hint="add --overwrite to replace it, or give another --output")


def _real(url: str) -> str:
    return url.rstrip("/") if io.is_remote(url) else os.path.realpath(url)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _read_marker(folder: str) -> dict:
    try:
        marker = json.loads(io.read_text(io.join(folder, EXPORT_MARKER)))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def seal(run: RunDir, step: int, staging: str, export_dir: str) -> list[str]:
    """Mark the finished folder as this run's export, put it in place; the names of its files."""
    with open(os.path.join(staging, EXPORT_MARKER), "w") as f:
        json.dump({"run_id": run.run_id, "run_dir": run.url, "step": step}, f, indent=2)
    files = sorted(os.listdir(staging))
    _publish(staging, export_dir)
    return files


def _publish(staging: str, out_url: str) -> None:
    """Put the finished folder in place (check_output has made sure nothing else is there). Locally the earlier export
    (if any) is swapped out only once the new one is complete, and put back if the swap fails; a failure leaves no
    hidden folder behind. On object stores the marker goes first (a partial upload is recognisably this run's),
    then the files, then any stale file of the earlier export is removed; a failed upload into an empty folder is
    removed again."""
    if io.is_remote(out_url):
        old = set(io.listdir(out_url))
        try:
            with open(os.path.join(staging, EXPORT_MARKER), "rb") as f:
                io.write_bytes_atomic(io.join(out_url, EXPORT_MARKER), f.read())
            io.upload_dir(staging, out_url)
        except BaseException:
            if not old:
                with contextlib.suppress(Exception):
                    io.rm_tree(out_url)
            raise
        fs, path = io.fs_and_path(out_url)
        for name in old - set(os.listdir(staging)):
            fs.rm(f"{path}/{name}", recursive=True)
        return
    parent = os.path.dirname(out_url.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    trash = None
    try:
        shutil.copytree(staging, tmp, dirs_exist_ok=True)
        if os.path.exists(out_url):
            trash = tempfile.mkdtemp(prefix=".export-old-", dir=parent)
            os.replace(out_url, os.path.join(trash, "old"))
            try:
                os.replace(tmp, out_url)
            except BaseException:
                os.replace(os.path.join(trash, "old"), out_url)  # the earlier export back in place
                raise
        else:
            os.replace(tmp, out_url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the swap succeeded
        if trash is not None and os.path.exists(out_url):  # never the earlier export while it is not back in place
            shutil.rmtree(trash, ignore_errors=True)
