"""Seals: the list of a finished folder's files and their sizes, written last, checked before the folder is used.

Levanter calls a checkpoint complete once its metadata.json exists, and a token cache once its shard_ledger.json
does; neither says whether every array chunk is still there and whole. Upstream symptom (levanter 1.2.dev1644,
TensorStore's zarr driver): a missing chunk file is read as the fill value, zeros, without an error, so a partial copy
or a disk error gave an all-zero `lm_head`, training on nothing (every target masked) and resumes from damaged
weights, all with exit 0. (marin-levanter 0.2.20 writes a checkpoint as one OCDBT database, manifest.ocdbt and data
files under d/; a seal lists those like any other files.) A seal records every file with its size and what the folder belongs to (a run and a step,
a cache's fingerprint); `problem()` compares the folder with it in one listing.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from alpaca_cli import io

SEAL = "alpaca-seal.json"
"""The seal's file name, in the folder it describes."""


def _sizes(url: str) -> dict[str, int]:
    """Every file under url (recursively) with its size, by path relative to url; the seal itself left out."""
    fs, root = io.fs_and_path(url)
    if not fs.exists(root):
        return {}
    root = root.rstrip("/")
    out = {}
    for path, info in fs.find(root, detail=True).items():
        rel = posixpath.relpath(path, root)
        if rel != SEAL and info.get("type", "file") == "file":
            out[rel] = int(info["size"])
    return out


def write(url: str, identity: dict[str, Any]) -> None:
    """Seal the finished folder at url: its files and sizes as they are now, and identity (what it belongs to)."""
    record = {"identity": identity, "files": _sizes(url)}
    io.write_text_atomic(io.join(url, SEAL), json.dumps(record, indent=1, sort_keys=True) + "\n")


def read(url: str) -> dict[str, Any] | None:
    """The folder's seal, or None when it has none (or an unreadable one: a write cut short)."""
    try:
        record = json.loads(io.read_text(io.join(url, SEAL)))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return record if isinstance(record, dict) and "files" in record else None


def remove(url: str) -> None:
    """Unseal a folder first when deleting it, so that a deletion cut short never leaves one that looks whole."""
    fs, root = io.fs_and_path(io.join(url, SEAL))
    if fs.exists(root):
        fs.rm(root)


def problem(url: str, identity: dict[str, Any]) -> str | None:
    """None when the folder at url is whole and belongs to `identity` (every key given must match); else what is
    wrong, in a few words that can follow the folder's name."""
    record = read(url)
    if record is None:
        return (f"has no {SEAL} (its save was cut short, it was written by an older alpaca, or it was not written "
                "by alpaca)")
    theirs = record.get("identity") or {}
    for key, want in identity.items():
        if theirs.get(key) != want:
            if key == "run_id":
                return f"belongs to another run (run id {str(theirs.get(key))[:12]}, this run's is {str(want)[:12]})"
            return f"was sealed with {key} {theirs.get(key)!r}, not {want!r}"
    found = _sizes(url)
    expected: dict[str, int] = record["files"]
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"is damaged: {missing[0]}{more} of its {len(expected)} files missing"
    for name, size in sorted(expected.items()):
        if found[name] != size:
            return f"is damaged: {name} has {found[name]:,} bytes, {size:,} when it was written"
    return None
