"""Prepare's work in chunks, on every core: one pure function per chunk (`validate_chunk` for the first pass,
`tokenize_chunk` for the second), run in this process (`InProcess`) or in spawned worker processes (`ProcessPool`),
whose results come back in the chunks' order to one writer.

A chunk's size never depends on the number of workers (CHUNK_BYTES of a JSON Lines file, CHUNK_RECORDS of records
read whole), and every record is tokenized on its own, so the examples, in order, and so the cache's bytes, are the
same for any number of workers. A worker that dies (killed, out of memory) is replaced and its chunk retried, up to
MAX_ATTEMPTS tries in all; then the prepare fails in one line (StageError), before the cache is sealed.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from collections import deque
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from alpaca_cli.config import PrepareConfig
from alpaca_cli.core import data as datamod
from alpaca_cli.errors import DataError, StageError

logger = logging.getLogger(__name__)

CHUNK_RECORDS = 4096
"""Records per chunk of data read whole (a .json file, a Hub dataset)."""
CHUNK_BYTES = 4 << 20
"""Bytes per chunk of a JSON Lines file (a chunk ends at the first newline from there on)."""
MAX_ATTEMPTS = 3
"""Tries of a chunk whose worker died, the first included."""
FAULT_ENV = "ALPACA_PREPARE_FAULT"
"""Test-only: `kill:<chunk>:once|always` makes the worker tokenizing chunk <chunk> SIGKILL itself (a worker process
only, never this one); `once` leaves a marker file (in $ALPACA_PREPARE_FAULT_DIR, default the temp folder) so that
only the first try dies."""
FAULT_DIR_ENV = "ALPACA_PREPARE_FAULT_DIR"

# The first pass's errors, by precedence (the order one process reading the whole file finds them in): a byte that
# is not UTF-8 anywhere, then a JSON list in a .jsonl file, then malformed JSON (or a key given twice), then a record
# that is not valid. Within a class, the first in the file.
UTF8, NOT_JSON_LINES, MALFORMED, INVALID = range(4)


@dataclass
class Chunk:
    """A piece of one source: a JSON Lines block (bytes: its lines from first_line on), a Hub dataset's rows (a list
    of (where, record)) or validated Records."""

    index: int
    payload: Any
    first_line: int = 0
    first_record: int = 0
    """Index in the source of the chunk's first record (known in the second pass)."""
    records: int = 0
    """How many records it holds (known in the second pass)."""

    def describe(self, where: str) -> str:
        if self.records:
            return f"records {self.first_record}-{self.first_record + self.records - 1} of {where}"
        if self.first_line:
            return f"the lines from {self.first_line} on of {where}"
        return f"chunk {self.index} of {where}"


@dataclass
class Job:
    """What a worker needs beside its chunk (small: it travels with every chunk)."""

    cfg: PrepareConfig
    where: str
    """--data as given, as errors name it."""
    fmt: str | None
    """alpaca, messages or sharegpt; None when the first record's format is unknown (an error comes first)."""
    first_where: str | None = None
    """The source's first record (`line 1`), which --format auto's one-format error names."""
    template_text: str | None = None
    fast: bool = False
    """Alpaca records: prompt lengths from offsets (core.tokenize.prefix_stable)."""
    tokenizer_dir: str | None = None
    tokenizer_fingerprint: str | None = None


@dataclass
class Checked:
    """The first pass over a chunk: how many records it holds, and the first error found (class, error)."""

    records: int
    error: tuple[int, DataError] | None = None


@dataclass
class ChunkResult:
    """A chunk's examples (concatenated, cut by `lengths`) and its statistics."""

    records: int
    ids: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    source_index: np.ndarray
    trained: int
    """Tokens trained on (targets beyond each example's first position, which is never predicted)."""
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: list[tuple[int, str]] = field(default_factory=list)
    prompts_tokenized_alone: int = 0
    special_text: int = 0
    """Records whose text holds a special token's string."""
    chat: Any = None
    """core.chat.ChatStats of conversations."""


# -- chunks -------------------------------------------------------------------------------------------------------


def block_chunks(stream: datamod.JsonlStream, counts: list[int] | None = None) -> Iterator[Chunk]:
    """A JSON Lines file's chunks; with the first pass's record counts, each knows its records' place."""
    start = 0
    for i, (line, block) in enumerate(stream.blocks(CHUNK_BYTES)):
        n = counts[i] if counts is not None and i < len(counts) else 0
        yield Chunk(i, block, first_line=line, first_record=start, records=n)
        start += n


def table_chunks(table: datamod.HubTable) -> Iterator[Chunk]:
    """A Hub dataset's chunks (each CHUNK_RECORDS rows as (where, record), read from its Arrow files when made)."""
    n = len(table)
    for i, start in enumerate(range(0, n, CHUNK_RECORDS)):
        stop = min(start + CHUNK_RECORDS, n)
        yield Chunk(i, table.rows(start, stop), first_record=start, records=stop - start)


def record_chunks(records: datamod.Records) -> Iterator[Chunk]:
    """Chunks of records read whole (each a Records of CHUNK_RECORDS of them)."""
    n = len(records)
    for i, start in enumerate(range(0, n, CHUNK_RECORDS)):
        stop = min(start + CHUNK_RECORDS, n)
        part = datamod.Records(records.instructions[start:stop], records.inputs[start:stop],
                               records.outputs[start:stop], where=records.where, format=records.format,
                               conversations=records.conversations[start:stop])
        yield Chunk(i, part, first_record=start, records=stop - start)


# -- the work on one chunk (pure: runs in any process) ------------------------------------------------------------


def validate_chunk(job: Job, chunk: Chunk) -> Checked:
    """The first pass over a JSON Lines block (or a Hub dataset's rows): its records counted and checked (no
    tokenizer)."""
    if isinstance(chunk.payload, list):  # a Hub dataset's rows
        try:
            datamod.parse_rows(chunk.payload, job.cfg, job.fmt, job.where, job.first_where, null_is_missing=True)
        except DataError as e:
            return Checked(len(chunk.payload), (INVALID, e))
        return Checked(len(chunk.payload))
    try:
        text = datamod.decode_block(chunk.payload, chunk.first_line, job.where, first=chunk.index == 0)
    except DataError as e:
        return Checked(0, (UTF8, e))
    try:
        rows = datamod.parse_lines(text, chunk.first_line, job.where)
    except DataError as e:
        return Checked(0, (MALFORMED, e))
    if job.fmt is not None:
        try:
            datamod.parse_rows(rows, job.cfg, job.fmt, job.where, job.first_where)
        except DataError as e:
            return Checked(len(rows), (INVALID, e))
    return Checked(len(rows))


def tokenize_chunk(job: Job, chunk: Chunk, tok=None) -> ChunkResult:
    """A chunk's examples, exactly as tokenizing the whole source in one process gives them (tok: the tokenizer
    when run in the process that loaded it; else the job's, loaded once per process)."""
    from alpaca_cli.core import chat
    from alpaca_cli.core import prompts as promptsmod
    from alpaca_cli.core.tokenize import Tokenized, tokenize_examples

    _fault(chunk.index)
    tok = tok if tok is not None else worker_tokenizer(job)
    records = chunk.payload
    if isinstance(records, list):  # a Hub dataset's rows
        records = datamod.parse_rows(records, job.cfg, job.fmt, job.where, job.first_where, null_is_missing=True)
    elif not isinstance(records, datamod.Records):
        text = datamod.decode_block(records, chunk.first_line, job.where, first=chunk.index == 0)
        records = datamod.parse_rows(datamod.parse_lines(text, chunk.first_line, job.where), job.cfg, job.fmt,
                                     job.where, job.first_where)
    cfg, out, stats = job.cfg, Tokenized(), None
    if records.format == "alpaca":
        prompts = [promptsmod.render(cfg.prompts, a, b) for a, b in zip(records.instructions, records.inputs)]
        tokenize_examples(tok, prompts, records.outputs, max_length=cfg.max_length, on_overflow=cfg.on_overflow,
                          mask_inputs=cfg.mask_inputs, fast_path=job.fast, source_offset=chunk.first_record,
                          into=out)
        texts: Iterable = zip(prompts, records.outputs)
    else:
        stats = chat.ChatStats()
        chat.tokenize_conversations(tok, job.template_text, records.conversations, max_length=cfg.max_length,
                                    on_overflow=cfg.on_overflow, train_on=cfg.train_on,
                                    source_offset=chunk.first_record, into=out, stats=stats)
        texts = ([m["content"] for m in conversation] for conversation in records.conversations)
    return _result(out, len(records), special_text(texts, tok), stats)


def _result(out, records: int, special: int, stats) -> ChunkResult:
    lengths = np.array([len(x) for x in out.input_ids], dtype=np.int32)
    empty_i, empty_u = np.zeros(0, np.int32), np.zeros(0, np.uint8)
    targets = np.concatenate(out.targets) if out.targets else empty_u
    trained = int(targets.sum(dtype=np.int64)) - sum(int(t[0]) for t in out.targets)
    return ChunkResult(
        records=records, ids=np.concatenate(out.input_ids) if out.input_ids else empty_i, targets=targets,
        lengths=lengths, source_index=np.asarray(out.source_index, dtype=np.int64), trained=trained,
        truncated=out.truncated, truncated_tokens=out.truncated_tokens, dropped=dict(out.dropped),
        dropped_examples=list(out.dropped_examples), prompts_tokenized_alone=out.prompts_tokenized_alone,
        special_text=special, chat=stats,
    )


def special_text(texts: Iterable, tok) -> int:
    """How many records' texts (each an iterable of strings) hold a special token's string."""
    specials = [s for s in tok.all_special_tokens if s]
    return sum(1 for parts in texts if any(s in part for s in specials for part in parts))


_TOKENIZERS: dict[str, Any] = {}


def worker_tokenizer(job: Job):
    """The job's tokenizer (the folder prepare saved, with its added tokens), loaded once per process."""
    tok = _TOKENIZERS.get(job.tokenizer_fingerprint)
    if tok is None:
        from transformers import AutoTokenizer

        tok = _TOKENIZERS[job.tokenizer_fingerprint] = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    return tok


def _fault(index: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or not _IN_WORKER:
        return
    _, at, when = spec.split(":")[:3]
    if int(at) != index:
        return
    if when == "once":
        folder = os.environ.get(FAULT_DIR_ENV)  # shared by every try, wherever it runs (a Ray cluster's nodes)
        marker = (os.path.join(folder, f"alpaca-fault-{index}") if folder else
                  os.path.join(tempfile.gettempdir(), f"alpaca-fault-{os.getppid()}-{index}"))
        if os.path.exists(marker):
            return
        open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)


# -- engines ------------------------------------------------------------------------------------------------------

_IN_WORKER = False


def enter_worker() -> None:
    """This process is a worker (a spawned one, or one Ray started): one tokenizer thread (the cores are the
    workers'), no accelerator, no torch."""
    global _IN_WORKER
    _IN_WORKER = True
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["JAX_PLATFORMS"] = "cpu"
    # transformers imports torch whenever it is installed (measured here: its import and a tokenizer's load took
    # 3.8 s and 330 MB with torch, 1.0 s and 70 MB without); a worker only tokenizes (read when transformers is
    # first imported: at a worker's first chunk)
    os.environ["USE_TORCH"] = "0"


def _init_worker() -> None:
    """A spawned worker; Ctrl-C left to the parent (which stops the pool)."""
    enter_worker()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class InProcess:
    """Every chunk in this process, in order (tok: the tokenizer already loaded here)."""

    workers = 0

    def __init__(self, tok=None):
        self.tok = tok

    def map_ordered(self, fn: Callable, job: Job, chunks: Iterable[Chunk], where: str) -> Iterator[Any]:
        for chunk in chunks:
            yield fn(job, chunk, self.tok) if fn is tokenize_chunk else fn(job, chunk)

    def close(self) -> None:
        pass


class ProcessPool:
    """Chunks in `workers` spawned processes (spawn: this process holds JAX's and tensorstore's threads), at most
    2 per worker in flight, results yielded in the chunks' order."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def _start(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)
        return self._pool

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def close(self) -> None:
        self._restart()

    def map_ordered(self, fn: Callable, job: Job, chunks: Iterable[Chunk], where: str) -> Iterator[Any]:
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        chunks = iter(chunks)
        pending: deque = deque()

        def fill() -> None:
            while len(pending) < 2 * self.workers and (chunk := next(chunks, None)) is not None:
                try:
                    future = self._start().submit(fn, job, chunk)
                except BrokenProcessPool as e:  # a worker died since the last result: retried in order
                    future = Future()
                    future.set_exception(e)
                pending.append((chunk, future))

        fill()
        while pending:
            try:
                result = pending[0][1].result()
            except BrokenProcessPool:
                yield from self._recover(fn, job, pending, where)
            else:
                pending.popleft()
                yield result
            fill()

    def _recover(self, fn: Callable, job: Job, pending: deque, where: str) -> Iterator[Any]:
        """After a worker died: a new pool, and the chunks in flight again one at a time (so that the chunk that
        kills its worker is known), each tried MAX_ATTEMPTS times in all."""
        from concurrent.futures.process import BrokenProcessPool

        self._restart()
        while pending:
            chunk, future = pending.popleft()
            if not future.cancelled() and not isinstance(future.exception(), BrokenProcessPool):
                yield future.result()  # done before the worker died (or a worker's own error, raised in order)
                continue
            for attempt in range(2, MAX_ATTEMPTS + 1):
                logger.warning("A worker died on %s: trying again (%d of %d)", chunk.describe(where), attempt,
                               MAX_ATTEMPTS)
                try:
                    result = self._start().submit(fn, job, chunk).result()
                    break
                except BrokenProcessPool:
                    self._restart()
            else:
                raise StageError(f"a prepare worker died {MAX_ATTEMPTS} times on {chunk.describe(where)} (killed "
                                 "or out of memory); the cache is left incomplete: rerun restarts the prepare")
            yield result


def engine_for(workers: int | None, chunks: Iterator[Chunk],
               pool: ProcessPool | None = None) -> tuple[InProcess | ProcessPool, Iterator[Chunk]]:
    """The engine for a source's chunks: `workers` processes (None: one per available core; `pool` when given), or
    this process when workers is 0 or the source has at most 2 chunks (a worker's start costs more than it saves);
    a Ray cluster (core.ray_engine, --ray-address) for every source."""
    if getattr(pool, "cluster", False):
        return pool, chunks
    head = list(islice(chunks, 3))
    n = available_cores() if workers is None else workers
    engine = InProcess() if n == 0 or len(head) < 3 else (pool or ProcessPool(n))
    return engine, chain(head, chunks)
