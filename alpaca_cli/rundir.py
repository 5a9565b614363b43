"""The run directory: the only module that knows its layout and writes its manifest.

```
RUN/
  manifest.json      schema_version, versions, and one typed record per stage (records.py)
  configs/           prepare.yaml train.yaml export.yaml: the resolved configuration of each stage
  tokenizer/         the tokenizer as prepared (with [PAD] when it was added)
  data/cache/        the Levanter token cache (input_ids, targets, source_index)
  data/stats.json    what prepare counted
  data/val/<fp>/     held-out records (--val-data) prepared like the training data
  base/              the base model's config.json (and generation_config.json): export and generate need no Hub
  checkpoints/       Levanter checkpoints (step-N/), each sealed (seal.py) when whole
  checkpoints-unusable/  checkpoints a resume found damaged or not this run's, moved aside (never deleted)
  metrics.jsonl      one JSON object per training step
  logs/              log files (local runs)
  hf/                the exported Hugging Face checkpoint (default export directory)
  lease.json         who is writing the run now (lease.py): one writer at a time (prepare, train, export, eval)
```

Every path in the manifest is relative to the run directory, so a run can be copied or moved (e.g. to gs://).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, TypeVar

from alpaca_cli import io
from alpaca_cli import lease as leasemod
from alpaca_cli.errors import RunDirError, first_line
from alpaca_cli.records import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    RECORD_TYPES,
    RUNNING,
    SCHEMA_VERSION,
    STAGES,
    EvalRecord,
    ExportRecord,
    PrepareRecord,
    StageRecord,
    TrainRecord,
    Writer,
)

R = TypeVar("R", bound=StageRecord)
logger = logging.getLogger(__name__)

_MAKES = {"prepare": "alpaca prepare", "train": "alpaca train", "export": "alpaca export", "eval": "alpaca eval"}
HEARTBEAT_SECONDS = 60.0
"""How often a running stage refreshes its heartbeat (at most): `status` calls it stale after a few misses."""

__all__ = ["RunDir", "open_run", "read_manifest", "default_run_dir", "now", "STAGES", "SCHEMA_VERSION",
           "RUNNING", "COMPLETE", "FAILED", "INTERRUPTED"]


def default_run_dir() -> str:
    return os.environ.get("ALPACA_RUN_DIR") or "alpaca-run"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, Optional[str]]:
    """Versions of what computes the results, read from package metadata (no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Optional[str]] = {}
    for name in ("alpaca-cli", "marin-levanter", "marin-haliax", "jax", "jaxlib", "transformers", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class Manifest:
    schema_version: int = SCHEMA_VERSION
    run_id: str = ""
    """The run's identity, made once with the manifest: checkpoints and caches record it, so a copied-in checkpoint
    or one left by a run whose manifest was replaced is never taken for this run's own."""
    alpaca_version: str = ""
    created: str = ""
    updated: Optional[str] = None
    stages: dict[str, StageRecord] = field(default_factory=dict)

    def to_json(self) -> str:
        import draccus

        obj = {
            "schema_version": self.schema_version,
            "run_id": self.run_id,
            "alpaca_version": self.alpaca_version,
            "created": self.created,
            "updated": self.updated,
            "stages": {name: draccus.encode(rec) for name, rec in self.stages.items()},
        }
        return json.dumps(obj, indent=2) + "\n"

    @classmethod
    def from_json(cls, obj: dict, path: str) -> "Manifest":
        import draccus

        stages: dict[str, StageRecord] = {}
        for name, raw in (obj.get("stages") or {}).items():
            if name not in RECORD_TYPES:
                raise RunDirError(f"{path}: unknown stage {name!r}")
            try:
                stages[name] = draccus.decode(RECORD_TYPES[name], raw)
            except Exception as e:  # noqa: BLE001 - draccus' DecodingError names the field
                first = first_line(e, None) or type(e).__name__
                raise RunDirError(f"{path}: the `{name}` record is malformed ({first})",
                                  hint="restore the manifest, or start a new --run-dir") from None
        # a manifest written before runs had an identity gets one (saved with the next write)
        return cls(schema_version=obj["schema_version"], run_id=obj.get("run_id") or new_run_id(),
                   alpaca_version=obj.get("alpaca_version", ""),
                   created=obj.get("created", ""), updated=obj.get("updated"), stages=stages)


@dataclass
class RunDir:
    """A run directory, local or remote. Only the writer process (process 0 of a pod) changes it."""

    url: str
    writer: bool = True
    manifest: Manifest = field(default_factory=lambda: _empty_manifest())
    _local_logs: Optional[str] = field(default=None, repr=False)
    _lease: Optional[leasemod.Lease] = field(default=None, repr=False)

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
    def cache_dir(self) -> str:
        return self.path("data", "cache")

    @property
    def stats_path(self) -> str:
        return self.path("data", "stats.json")

    def val_cache_dir(self, fingerprint: str) -> str:
        """Held-out records prepared like the training data, one folder per (data, preparation) fingerprint."""
        return self.path("data", "val", fingerprint[:16])

    @property
    def base_dir(self) -> str:
        """The base model's config files (no weights): export and generate rebuild its shape from them."""
        return self.path("base")

    @property
    def checkpoints_dir(self) -> str:
        return self.path("checkpoints")

    @property
    def unusable_checkpoints_dir(self) -> str:
        """Where a resume moves checkpoints that are not whole or not this run's (never deleted)."""
        return self.path("checkpoints-unusable")

    @property
    def metrics_path(self) -> str:
        return self.path("metrics.jsonl")

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's records, [] when there is none. A torn last line (a kill or a full disk during an append)
        is skipped with a warning, as the next flush rewrites the file; a malformed line before it is refused."""
        try:
            text = io.read_text(self.metrics_path)
        except FileNotFoundError:
            return []
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        records = []
        for k, (n, line) in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if k == len(lines) - 1:
                    logger.warning("%s line %d was cut short (an interrupted write); skipping it",
                                   self.metrics_path, n)
                    break
                raise RunDirError(f"{self.metrics_path} line {n} is not valid JSON ({e.msg})",
                                  hint="repair or delete that line, then run again") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise RunDirError(f"{self.metrics_path} line {n} is not a metrics record (an object with a `step`)",
                                  hint="repair or delete that line, then run again")
            records.append(rec)
        return records

    @property
    def logs_dir(self) -> str:
        return self.path("logs")

    def local_logs_dir(self) -> str:
        """Where this process writes log files (Levanter's, W&B's): RUN/logs for a local run, a temporary folder
        for a remote one (log files are appended to, which object stores cannot do)."""
        if self._local_logs is None:
            if io.is_remote(self.url):
                import tempfile

                self._local_logs = tempfile.mkdtemp(prefix="alpaca-logs-")
            else:
                os.makedirs(self.logs_dir, exist_ok=True)
                self._local_logs = self.logs_dir
        return self._local_logs

    @property
    def lease_path(self) -> str:
        return self.path("lease.json")

    @property
    def export_dir(self) -> str:
        """The default export directory."""
        return self.path("hf")

    def state_paths(self) -> list[str]:
        """What holds the run's own state (folders and files): no other output may be written over or inside it."""
        return [self.manifest_path, self.path("configs"), self.tokenizer_dir, self.path("data"), self.base_dir,
                self.checkpoints_dir, self.metrics_path, self.logs_dir]

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

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

    def load_tokenizer(self):
        """The tokenizer as prepared (transformers), copied from a remote run directory when needed."""
        from transformers import AutoTokenizer

        with io.local_dir(self.tokenizer_dir) as local:
            return AutoTokenizer.from_pretrained(local)

    # -- records ------------------------------------------------------------------------------------------------
    @property
    def prepare(self) -> Optional[PrepareRecord]:
        return self.manifest.stages.get("prepare")  # type: ignore[return-value]

    @property
    def train(self) -> Optional[TrainRecord]:
        return self.manifest.stages.get("train")  # type: ignore[return-value]

    @property
    def export(self) -> Optional[ExportRecord]:
        return self.manifest.stages.get("export")  # type: ignore[return-value]

    @property
    def eval(self) -> Optional[EvalRecord]:
        return self.manifest.stages.get("eval")  # type: ignore[return-value]

    def record(self, name: str) -> Optional[StageRecord]:
        """The stage's record as the manifest has it (None before the stage first ran)."""
        return self.manifest.stages.get(name)

    def is_complete(self, name: str) -> bool:
        st = self.record(name)
        return st is not None and st.complete

    def require(self, name: str) -> StageRecord:
        """The stage's record, or an error naming the command that makes it."""
        st = self.record(name)
        if st is None or not st.complete:
            state = "no" if st is None else f"an incomplete ({st.status})"
            raise RunDirError(
                f"run {self.url} has {state} `{name}` stage; run `{_MAKES[name]} --run-dir {self.url}` first"
            )
        return st

    def require_prepare(self) -> PrepareRecord:
        return self.require("prepare")  # type: ignore[return-value]

    def require_train(self) -> TrainRecord:
        return self.require("train")  # type: ignore[return-value]

    def sync_from_writer(self) -> None:
        """Make every process of a pod see process 0's manifest (no-op on one process)."""
        from alpaca_cli import distributed

        if distributed.process_count() > 1:
            text = distributed.broadcast(self.manifest.to_json())
            self.manifest = Manifest.from_json(json.loads(text), self.manifest_path)

    # -- writing ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, stage: str) -> Iterator[None]:
        """Hold the run's lease while `alpaca <stage>` writes it: one writer per run directory. Taken by the writer
        process before anything is written (on a pod every process stops with its refusal), the manifest re-read
        under it, released at the end however the command ends. A lease lost to another process meanwhile stops the
        command at its next manifest write, or at the end."""
        from alpaca_cli import distributed

        held = distributed.on_writer(
            lambda: leasemod.Lease(self.lease_path, self.url, _MAKES[stage]).acquire() if self.writer else None,
            encode=lambda _: None, decode=lambda _: None)
        if held is not None:
            self.manifest = read_manifest(self.url) or self.manifest  # as the previous writer left it
        self._lease = held
        try:
            yield
        finally:
            self._lease = None
            if held is not None:
                held.release()
        if held is not None:
            held.check()

    def holder(self) -> Optional[leasemod.Holder]:
        """Who holds the run's lease now, if anyone."""
        return leasemod.read_holder(self.lease_path)

    def save(self) -> None:
        if not self.writer:
            return
        if self._lease is not None:
            self._lease.check()
        self.manifest.updated = now()
        io.write_text_atomic(self.manifest_path, self.manifest.to_json())

    @contextlib.contextmanager
    def stage(self, name: str, record: R) -> Iterator[R]:
        """A stage's life, in one place for every stage: `record` is written as running (by this process, now) when
        the block starts, complete when it ends, failed when it raises (interrupted on Ctrl-C) with the error's first
        line, and the exception goes on. What the block puts in `record` meanwhile is written with it, and by
        `touch` (the heartbeat) while it runs.

            with run.stage("prepare", PrepareRecord(...)) as record:
                ...
                record.summary = PrepareSummary(...)
        """
        self._start(name, record)
        try:
            yield record
        except BaseException as e:
            self._fail(name, f"{type(e).__name__}: {e}", interrupted=isinstance(e, KeyboardInterrupt))
            raise
        self._complete(name)

    def touch(self, name: str) -> None:
        """Refresh a running stage's heartbeat (and write whatever else changed in its record)."""
        st = self.record(name)
        if st is not None:
            st.heartbeat = now()
        self.save()

    def _start(self, name: str, record: R) -> R:
        record.status = RUNNING
        record.started = record.started or now()
        record.heartbeat = now()
        record.finished = None
        record.error = None
        record.versions = package_versions()
        record.writer = _writer()
        self.manifest.stages[name] = record
        self.save()
        return record

    def _complete(self, name: str) -> None:
        st = self.manifest.stages[name]
        st.status = COMPLETE
        st.finished = now()
        st.heartbeat = None
        self.save()

    def _fail(self, name: str, error: str, *, interrupted: bool = False) -> None:
        """Mark a running stage failed (or interrupted); a complete one stays complete."""
        st = self.record(name)
        if st is None or st.complete:
            return
        st.status = INTERRUPTED if interrupted else FAILED
        st.finished = now()
        st.error = error
        self.save()

    def write_config(self, stage: str, text: str) -> None:
        if self.writer:
            io.write_text_atomic(self.config_path(stage), text)


def _writer() -> Writer:
    """Which process wrote the stage (process 0 of N on a pod)."""
    import socket

    from alpaca_cli import distributed

    return Writer(host=socket.gethostname(), pid=os.getpid(), process_index=distributed.process_index(),
                  process_count=distributed.process_count())


def liveness(st: StageRecord, *, stale_after_s: float = 5 * HEARTBEAT_SECONDS) -> str:
    """For a stage whose record says `running`: `running`, or why it is not (its process is gone, or its
    heartbeat stopped). Other states are returned as they are."""
    import socket

    if st.status != RUNNING:
        return st.status
    if st.writer.host == socket.gethostname() and st.writer.pid and not leasemod.pid_alive(st.writer.pid):
        return f"dead (process {st.writer.pid} on {st.writer.host} is gone)"
    if st.heartbeat:
        age = (_dt.datetime.now(_dt.timezone.utc) - _dt.datetime.fromisoformat(st.heartbeat)).total_seconds()
        if age > stale_after_s:
            return f"stale (no sign of life for {int(age // 60)} min)"
    return RUNNING


def _empty_manifest() -> Manifest:
    from alpaca_cli import __version__

    return Manifest(schema_version=SCHEMA_VERSION, run_id=new_run_id(), alpaca_version=__version__, created=now())


def new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex


def read_manifest(url: str) -> Optional[Manifest]:
    """The manifest at url, None when there is none; RunDirError when it is unreadable or from another version."""
    path = io.join(url, "manifest.json")
    try:
        text = io.read_text(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise RunDirError(f"--run-dir {url} is a file, not a directory") from None
    except OSError as e:
        raise RunDirError(f"cannot read {path}: {e}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e}); restore it or start a new --run-dir") from e
    version = obj.get("schema_version") if isinstance(obj, dict) else None
    if version != SCHEMA_VERSION:
        raise RunDirError(
            f"{path} has manifest schema_version {version!r}, this alpaca reads {SCHEMA_VERSION}",
            hint="use the alpaca version that made this run, or start a new --run-dir",
        )
    return Manifest.from_json(obj, path)


def open_run(url: str | None, *, create: bool = False, writer: bool = True) -> RunDir:
    """Open the run at url (default $ALPACA_RUN_DIR, else ./alpaca-run).

    create=False: the run must exist (have a manifest). create=True: start one if there is none.
    """
    url = io.normalize(url or default_run_dir())
    if not io.is_remote(url) and os.path.exists(url) and not os.path.isdir(url):
        raise RunDirError(f"--run-dir {url} is a file, not a directory", hint="give a directory (new or existing)")
    manifest = read_manifest(url)
    if manifest is None:
        if not create:
            raise RunDirError(f"no run at {url}; run `alpaca prepare --run-dir {url}` first")
        manifest = _empty_manifest()
    return RunDir(url=url, writer=writer, manifest=manifest)
