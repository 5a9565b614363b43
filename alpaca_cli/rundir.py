"""The run directory: the only module that knows its layout and writes its manifest.

```
RUN/
  manifest.json      schema_version, versions, stages{prepare,train,export}: status, times, config, inputs, outputs
  configs/           prepare.yaml train.yaml export.yaml: the resolved configuration of each stage
  tokenizer/         the tokenizer as prepared (with [PAD] when it was added)
  data/cache/        the Levanter token cache (input_ids, targets, source_index)
  data/stats.json    what prepare counted
  checkpoints/       Levanter checkpoints (step-N/)
  metrics.jsonl      one JSON object per training step
  logs/              log files (local runs)
  hf/                the exported Hugging Face checkpoint (default export location)
```

Every path in the manifest is relative to the run directory, so a run can be copied or moved (e.g. to gs://).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from typing import Any

from alpaca_cli import io
from alpaca_cli.errors import RunDirError

SCHEMA_VERSION = 1
STAGES = ("prepare", "train", "export")
_MAKES = {"prepare": "alpaca prepare", "train": "alpaca train", "export": "alpaca export"}

RUNNING, COMPLETE, FAILED = "running", "complete", "failed"


def default_run_dir() -> str:
    return os.environ.get("ALPACA_RUN_DIR") or "alpaca-run"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    """Versions of what computes the results, read from package metadata (no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("alpaca-cli", "levanter", "haliax", "jax", "jaxlib", "transformers", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class RunDir:
    """A run directory, local or remote. Only the writer process (process 0 of a pod) changes it."""

    url: str
    writer: bool = True
    manifest: dict[str, Any] = field(default_factory=dict)

    # -- layout -------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return io.join(self.url, *parts)

    @property
    def manifest_path(self) -> str:
        return self.path("manifest.json")

    def config_path(self, stage: str) -> str:
        return self.path("configs", f"{stage}.yaml")

    @property
    def tokenizer_dir(self) -> str:
        return self.path("tokenizer")

    @property
    def data_dir(self) -> str:
        return self.path("data")

    @property
    def cache_dir(self) -> str:
        return self.path("data", "cache")

    @property
    def stats_path(self) -> str:
        return self.path("data", "stats.json")

    @property
    def checkpoints_dir(self) -> str:
        return self.path("checkpoints")

    @property
    def metrics_path(self) -> str:
        return self.path("metrics.jsonl")

    @property
    def logs_dir(self) -> str:
        return self.path("logs")

    @property
    def export_dir(self) -> str:
        return self.path("hf")

    @property
    def name(self) -> str:
        """The run's name: the last component of its path."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def relative(self, url: str) -> str:
        """url relative to the run dir when inside it, else unchanged (absolute)."""
        prefix = self.url.rstrip("/") + "/"
        return url[len(prefix) :] if url.startswith(prefix) else url

    def resolve(self, rel: str) -> str:
        """Inverse of relative()."""
        if io.is_remote(rel) or os.path.isabs(rel):
            return rel
        return self.path(rel)

    # -- manifest -----------------------------------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        self.manifest = read_manifest(self.url) or _empty_manifest()
        return self.manifest

    def save(self) -> None:
        if not self.writer:
            return
        self.manifest["updated"] = now()
        io.write_text_atomic(self.manifest_path, json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.manifest.get("stages", {}).get(name)

    def is_complete(self, name: str) -> bool:
        st = self.stage(name)
        return bool(st) and st.get("status") == COMPLETE

    def require(self, name: str) -> dict[str, Any]:
        """The stage's record, or an error naming the command that makes it."""
        st = self.stage(name)
        if not st or st.get("status") != COMPLETE:
            state = "no" if not st else f"an incomplete ({st.get('status')})"
            raise RunDirError(
                f"run {self.url} has {state} `{name}` stage; run `{_MAKES[name]} --run-dir {self.url}` first"
            )
        return st

    def start_stage(self, name: str, *, config: dict[str, Any], inputs: dict[str, Any] | None = None) -> None:
        stages = self.manifest.setdefault("stages", {})
        stages[name] = {
            "status": RUNNING,
            "started": now(),
            "finished": None,
            "config": config,
            "inputs": inputs or {},
            "outputs": {},
            "summary": {},
            "versions": package_versions(),
            "writer": _writer_info(),
        }
        self.save()

    def update_stage(self, name: str, **fields: Any) -> None:
        st = self.manifest.setdefault("stages", {}).setdefault(name, {})
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(st.get(key), dict):
                st[key].update(value)
            else:
                st[key] = value
        self.save()

    def complete_stage(self, name: str, *, outputs: dict[str, Any] | None = None, summary: dict | None = None) -> None:
        self.update_stage(name, status=COMPLETE, finished=now(), outputs=outputs or {}, summary=summary or {})

    def fail_stage(self, name: str, error: str) -> None:
        st = self.stage(name)
        if st is None or st.get("status") == COMPLETE:
            return
        self.update_stage(name, status=FAILED, finished=now(), error=error)

    def drop_stages(self, *names: str) -> None:
        for name in names:
            self.manifest.get("stages", {}).pop(name, None)
        self.save()

    def write_config(self, stage: str, text: str) -> None:
        if self.writer:
            io.write_text_atomic(self.config_path(stage), text)


def _writer_info() -> dict[str, Any]:
    """Which process wrote the stage (process 0 of N on a pod)."""
    import socket

    from alpaca_cli.core import distributed

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_index": distributed.process_index(),
        "process_count": distributed.process_count(),
    }


def _empty_manifest() -> dict[str, Any]:
    from alpaca_cli import __version__

    return {"schema_version": SCHEMA_VERSION, "alpaca_version": __version__, "created": now(), "stages": {}}


def read_manifest(url: str) -> dict[str, Any] | None:
    """The manifest at url, None when there is none; RunDirError when it is unreadable or from the future."""
    path = io.join(url, "manifest.json")
    try:
        text = io.read_text(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e}") from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); restore it or start a new --run-dir") from e
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunDirError(
            f"{path} has manifest schema_version {version!r}, this alpaca reads {SCHEMA_VERSION}",
            hint="use the alpaca version that made this run, or start a new --run-dir",
        )
    return manifest


def open_run(url: str | None, *, create: bool = False, writer: bool = True) -> RunDir:
    """Open the run at url (default $ALPACA_RUN_DIR, else ./alpaca-run).

    create=False: the run must exist (have a manifest). create=True: start one if there is none.
    """
    url = io.normalize(url or default_run_dir())
    manifest = read_manifest(url)
    if manifest is None:
        if not create:
            raise RunDirError(f"no run at {url}; run `alpaca prepare --run-dir {url}` first")
        manifest = _empty_manifest()
    return RunDir(url=url, writer=writer, manifest=manifest)
