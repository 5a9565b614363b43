"""Prepare's chunks on an existing Ray cluster (`alpaca prepare --ray-address ADDRESS|auto`): the same pure functions
as core.parallel's engines (validate_chunk, tokenize_chunk), as Ray tasks, results in the chunks' order to the one
writer in this process, so the cache is byte-identical to a one-process prepare.

Ray is an extra (`pip install 'alpaca-cli[ray]'`): marin-levanter, which we build on, no longer uses it (its cache
builder runs on zephyr), and nothing imports it without --ray-address. The cluster's nodes need this package
installed (the same version): a task imports alpaca_cli.core.parallel. The tokenizer travels through Ray's object
store (its files, once per prepare), so no node needs the driver's paths.

A task whose worker dies (killed, out of memory, its node lost) is retried by Ray (MAX_ATTEMPTS tries in all); then
the prepare fails in one line before the cache is sealed, as with local workers.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from alpaca_cli.core import parallel
from alpaca_cli.errors import AlpacaError, ConfigError, StageError, first_line

logger = logging.getLogger(__name__)


def _run(fn: Callable, job: parallel.Job, chunk: parallel.Chunk, tokenizer_files: dict[str, bytes] | None) -> Any:
    """A chunk's work in a Ray worker (a process Ray started: the fault hook applies, the tokenizer comes from the
    object store's copy of its files, written once per process)."""
    parallel.enter_worker()
    if tokenizer_files is not None:
        job = dataclasses.replace(job, tokenizer_dir=_tokenizer_dir(job.tokenizer_fingerprint, tokenizer_files))
    return fn(job, chunk)


_DIRS: dict[str, str] = {}


def _tokenizer_dir(fingerprint: str, files: dict[str, bytes]) -> str:
    """The tokenizer's files in a folder of this worker process, removed when it exits."""
    folder = _DIRS.get(fingerprint)
    if folder is None:
        folder = _DIRS[fingerprint] = tempfile.mkdtemp(prefix="alpaca-tokenizer-")
        atexit.register(shutil.rmtree, folder, True)
        for name, data in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
    return folder


def _reachable(address: str, timeout: float = 10.0) -> None:
    """OSError when nothing listens at host:port (ray.init would retry for minutes); `auto` is Ray's to find."""
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or not sep or not port.isdigit():
        return
    host = host.removeprefix("ray://")
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def _owned(result: Any) -> Any:
    """A task's result with arrays of its own. Ray hands a result's numpy arrays over as views into its object
    store, and a view keeps the whole object there (and mapped in this process) while it lives: the statistics keep
    every chunk's example lengths to the end, so each chunk's object (its tokens, a few MB) stayed, and the driver's
    resident memory grew with the data set (measured near the end of 200,000 records: 40 objects, 206 MiB of the
    store; with the copy, 8 to 10: the inputs and results of the 4 chunks in flight, and the tokenizer's files).
    Every array field of the result is copied (a memcpy per chunk; `lengths` alone would release the object, but a
    kept view of any of them would not); results hold no arrays inside other fields."""
    if dataclasses.is_dataclass(result):
        return dataclasses.replace(result, **{f.name: getattr(result, f.name).copy()
                                              for f in dataclasses.fields(result)
                                              if isinstance(getattr(result, f.name), np.ndarray)})
    return result


class RayCluster:
    """core.parallel's engine interface on a Ray cluster: chunks as tasks, at most 2 per CPU of the cluster in
    flight, results yielded in order."""

    cluster = True
    """engine_for uses it for every source, however small (it was asked for)."""

    def __init__(self, address: str):
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray-address needs Ray, which is an extra",
                              hint="pip install 'alpaca-cli[ray]' (here and on the cluster's nodes)") from None
        env = {k: os.environ[k] for k in (parallel.FAULT_ENV, parallel.FAULT_DIR_ENV) if k in os.environ}
        try:
            _reachable(address)
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"env_vars": env} if env else None)
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--ray-address {address}: no Ray cluster answered ({first_line(e)})",
                              hint="start one (ray start --head) or give its address, host:6379") from None
        self._ray = ray
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.description = f"the Ray cluster at {address} ({self.workers} CPUs)"
        self._task = ray.remote(num_cpus=1, max_retries=parallel.MAX_ATTEMPTS - 1)(_run)
        self._tokenizers: dict[str, Any] = {}
        logger.info("Preparing on %s", self.description)

    def _tokenizer_ref(self, job: parallel.Job):
        if job.tokenizer_dir is None:
            return None
        ref = self._tokenizers.get(job.tokenizer_fingerprint)
        if ref is None:
            files = {}
            for name in sorted(os.listdir(job.tokenizer_dir)):
                path = os.path.join(job.tokenizer_dir, name)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        files[name] = f.read()
            ref = self._tokenizers[job.tokenizer_fingerprint] = self._ray.put(files)
        return ref

    def map_ordered(self, fn: Callable, job: parallel.Job, chunks: Iterable[parallel.Chunk],
                    where: str) -> Iterator[Any]:
        from ray.exceptions import RayTaskError, WorkerCrashedError

        files = self._tokenizer_ref(job) if fn is parallel.tokenize_chunk else None
        chunks = iter(chunks)
        pending: deque = deque()

        def fill() -> None:
            while len(pending) < 2 * self.workers and (chunk := next(chunks, None)) is not None:
                pending.append((chunk, self._task.remote(fn, job, chunk, files)))

        fill()
        while pending:
            chunk, ref = pending.popleft()
            try:
                result = self._ray.get(ref)
            except RayTaskError as e:
                self._cancel(pending)
                if isinstance(e.cause, AlpacaError):
                    raise e.cause from None  # the task's own one-line error (a bad record)
                if isinstance(e.cause, ImportError):
                    raise ConfigError(f"a Ray node cannot run alpaca's tasks ({first_line(e.cause)})",
                                      hint="pip install 'alpaca-cli[ray]' (the same version) on every node") from None
                raise StageError(f"a Ray task failed on {chunk.describe(where)} "
                                 f"({type(e.cause).__name__}: {first_line(e.cause)}); the cache is left incomplete: "
                                 "rerun restarts the prepare") from None
            except (WorkerCrashedError, self._ray.exceptions.NodeDiedError, self._ray.exceptions.ObjectLostError):
                self._cancel(pending)
                raise StageError(f"a Ray worker died {parallel.MAX_ATTEMPTS} times on {chunk.describe(where)} "
                                 "(killed, out of memory or its node lost); the cache is left incomplete: rerun "
                                 "restarts the prepare") from None
            except self._ray.exceptions.RayError as e:  # out of memory, disk or object store; unschedulable
                self._cancel(pending)
                raise StageError(f"the Ray cluster could not run the task for {chunk.describe(where)} "
                                 f"({type(e).__name__}: {first_line(e)}); the cache is left incomplete: rerun "
                                 "restarts the prepare") from None
            yield _owned(result)
            fill()

    def _cancel(self, pending: deque) -> None:
        for _, ref in pending:
            self._ray.cancel(ref, force=True)
        pending.clear()

    def close(self) -> None:
        self._ray.shutdown()
