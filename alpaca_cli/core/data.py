"""Reading records from files or the Hugging Face Hub: Alpaca-style (instruction, optional input, output), or
conversations (`messages` lists of {role, content}, ShareGPT `conversations` lists of {from, value})."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import itertools
import logging
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from alpaca_cli import io
from alpaca_cli.config import PrepareConfig
from alpaca_cli.errors import AlpacaError, DataError, first_line
from alpaca_cli.records import DataSource

logger = logging.getLogger(__name__)

FILE_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass
class Records:
    """Columns of validated records, in source order: Alpaca records' three columns, or conversations."""

    instructions: list[str]
    inputs: list[str]
    outputs: list[str]
    where: str
    """--data as given."""
    source: DataSource = field(default_factory=DataSource)
    """What identifies the data: sha256 of a file's bytes, or a Hub dataset's commit."""
    format: str = "alpaca"
    """alpaca, messages or sharegpt: what the records were (--format, or what auto found)."""
    conversations: list[list[dict]] = field(default_factory=list)
    """For messages and sharegpt: each record's messages ({role, content}, roles system/user/assistant/tool), as
    core.chat.to_messages gives them."""

    def __len__(self) -> int:
        return len(self.outputs) if self.format == "alpaca" else len(self.conversations)


def is_file_source(data: str) -> bool:
    return "://" in data or os.path.exists(data) or data.endswith(FILE_SUFFIXES) or data.startswith((".", "/", "~"))


def load_records(cfg: PrepareConfig) -> Records:
    """Read and validate every record; DataError (one line) on the first problem found."""
    if is_file_source(cfg.data):
        return _load_file(cfg)
    if _HUB_ID.match(cfg.data):
        return _load_hub(cfg)
    raise DataError(f"--data {cfg.data!r} is neither an existing file nor a Hub dataset id (owner/name)")


# -- files --------------------------------------------------------------------------------------------------------


def read_rows(url: str, flag: str = "--data") -> list[tuple[str, Any]]:
    """(where, record) of a JSON list or JSON Lines file (local or remote, gzip allowed), with the same errors as
    --data gets: the file is read whole, a BOM is skipped, a JSON list named .jsonl is recognised."""
    return _read_file(url, flag)[0]


def _load_file(cfg: PrepareConfig) -> Records:
    rows, digest, size = _read_file(cfg.data, "--data")
    records = _records(rows, cfg, cfg.data)
    records.source = DataSource(kind="file", sha256=digest, bytes=size)
    return records


def _check_file(spec: str, flag: str) -> str:
    """The URL of a --data file (a local path expanded), refused in one line when it is a directory or not a
    JSON (Lines) file."""
    url = spec if io.is_remote(spec) else os.path.expanduser(spec)
    if not io.is_remote(url) and os.path.isdir(url):
        inside = sorted(f for f in os.listdir(url) if f.lower().endswith(FILE_SUFFIXES))[:5]
        raise DataError(
            f"{flag} {spec} is a directory; give one .json/.jsonl/.jsonl.gz file"
            + (f" (in it: {', '.join(inside)})" if inside else "")
        )
    if not url.lower().endswith(FILE_SUFFIXES):
        raise DataError(f"{flag} {spec}: unsupported file type; use .json, .jsonl or .jsonl.gz (or .json.gz)")
    return url


def _read_error(e: Exception, spec: str, flag: str) -> AlpacaError:
    """The one-line error for a file that cannot be read (any fsspec backend, or gzip)."""
    if isinstance(e, AlpacaError):
        return e
    if isinstance(e, FileNotFoundError):
        return DataError(f"{flag} {spec}: no such file")
    if isinstance(e, IsADirectoryError):
        return DataError(f"{flag} {spec}: is a directory, not a .json/.jsonl file")
    return DataError(f"{flag} {spec}: cannot read ({type(e).__name__}: {e})")


def _read_file(spec: str, flag: str) -> tuple[list[tuple[str, Any]], str, int]:
    """(rows, sha256 of the file's bytes, byte count)."""
    url = _check_file(spec, flag)
    name = url.lower()
    try:
        raw = io.read_bytes(url)
    except Exception as e:  # noqa: BLE001 - any fsspec backend error is a user-facing "cannot read"
        raise _read_error(e, spec, flag) from None

    digest = hashlib.sha256(raw).hexdigest()
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{flag} {spec}: not a valid gzip file ({e})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (spreadsheet tools write one) is not part of the data
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{spec} line {line}: not valid UTF-8") from None
    if not text.strip():
        raise DataError(f"{flag} {spec}: the file is empty")

    if name.endswith(JSONL_SUFFIXES):
        if list_error := not_json_lines(text, spec):
            raise list_error
        rows = parse_lines(text, 1, spec)
    else:
        rows = _parse_json(text, spec)
    if not rows:
        raise DataError(f"{flag} {spec}: holds no records")
    return rows, digest, len(raw)


# -- JSON Lines as a stream ---------------------------------------------------------------------------------------


def streams(spec: str) -> bool:
    """Whether --data is a JSON Lines file (.jsonl, .jsonl.gz), which prepare reads as a stream of byte blocks
    (JsonlStream); other sources are read whole (load_records)."""
    return is_file_source(spec) and spec.lower().endswith(JSONL_SUFFIXES)


class _Hashing:
    """A binary file whose bytes read are hashed and counted."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.n += len(b)
        return b


class JsonlStream:
    """A .jsonl or .jsonl.gz file (local or any fsspec URL) read as blocks of whole lines, never whole: `blocks`
    yields (the block's first line number, its bytes) and, once the file is read to its end, sets `source` (what
    load_records's DataSource would be: sha256 of the file's bytes, the decompressed byte count). A block ends at
    the first newline at or after `size` bytes from its start (or at the end of the file), so the blocks depend on
    the file and `size` only."""

    def __init__(self, spec: str, flag: str = "--data"):
        self.spec, self.flag = spec, flag
        self.url = _check_file(spec, flag)
        self.source: DataSource | None = None

    def blocks(self, size: int) -> Iterator[tuple[int, bytes]]:
        self.source = None
        try:
            fs, path = io.fs_and_path(self.url)
            raw = fs.open(path, "rb")
        except Exception as e:  # noqa: BLE001
            raise _read_error(e, self.spec, self.flag) from None
        with raw:
            hashed = _Hashing(raw)
            f = gzip.GzipFile(fileobj=hashed, mode="rb") if self.url.lower().endswith(".gz") else hashed
            n, line = 0, 1
            for block in self._cut(f, size):
                n += len(block)
                yield line, block
                line += block.count(b"\n")
            while hashed.read(1 << 20):  # whatever follows the last gzip member is part of the file's hash
                pass
        self.source = DataSource(kind="file", sha256=hashed.sha.hexdigest(), bytes=n)

    def _cut(self, f, size: int) -> Iterator[bytes]:
        buf, scanned, eof = bytearray(), 0, False
        while True:
            cut = buf.find(b"\n", max(scanned, size - 1))
            if cut < 0 and not eof:
                scanned = max(len(buf), size - 1)
                piece = self._read(f, max(size, 1 << 16))
                eof = not piece
                buf += piece
                continue
            if cut < 0:
                if buf:
                    yield bytes(buf)
                return
            yield bytes(buf[: cut + 1])
            del buf[: cut + 1]
            scanned = 0

    def _read(self, f, n: int) -> bytes:
        try:
            return f.read(n)
        except (OSError, EOFError, zlib.error) as e:
            if self.url.lower().endswith(".gz") and not isinstance(e, FileNotFoundError):
                raise DataError(f"{self.flag} {self.spec}: not a valid gzip file ({e})") from None
            raise _read_error(e, self.spec, self.flag) from None


def decode_block(block: bytes, first_line: int, spec: str, first: bool) -> str:
    """A block's text (the file's first block without its byte-order mark); DataError naming the line of a byte
    that is not UTF-8."""
    if first and block.startswith(codecs.BOM_UTF8):
        block = block[len(codecs.BOM_UTF8):]
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + block[: e.start].count(b"\n")
        raise DataError(f"{spec} line {line}: not valid UTF-8") from None


def not_json_lines(text: str, spec: str) -> DataError | None:
    """The error for a JSON list in a .jsonl file (text: from the file's first non-blank character on)."""
    if text.lstrip().startswith("[") and not _first_line_is_json(text):
        return DataError(
            f"{spec} line 1: malformed JSON Lines (the file looks like one JSON list, not one record per line)",
            hint="name it .json, or write one record per line",
        )
    return None


def first_record(text: str, first_line: int) -> tuple[str, Any] | None:
    """(where, record) of the first non-blank line of a block; None when the block has none or it is not JSON."""
    for k, line in enumerate(text.split("\n")):
        if line.strip():
            try:
                return f"line {first_line + k}", _loads(line)
            except json.JSONDecodeError:
                return None
    return None


def parse_rows(rows: list[tuple[str, Any]], cfg: PrepareConfig, fmt: str, source: str,
               first_where: str | None, null_is_missing: bool = False) -> Records:
    """Validated records of a known format (a chunk of a file: first_where is the file's first record, which
    --format auto's one-format check names; null_is_missing for a Hub dataset's rows)."""
    if fmt == "alpaca":
        return _columns(rows, cfg, source, null_is_missing)
    return _conversations(rows, cfg, fmt, source, null_is_missing, first_where=first_where)


class _Duplicated(dict):
    """A JSON object in which a key appeared more than once (json keeps the last value silently)."""

    key: str = ""


def _object(pairs: list[tuple[str, Any]]) -> dict:
    """json's object_pairs_hook: a plain dict, or a _Duplicated one naming the first key given twice (in it or in an
    object inside it), so that the reader can refuse the record with its place."""
    out = dict(pairs)
    dup = None
    if len(out) < len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
    dup = dup or next((v.key for v in out.values() if isinstance(v, _Duplicated)), None)
    if dup is None:
        return out
    marked = _Duplicated(out)
    marked.key = dup
    return marked


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object)


def _refuse_duplicates(row: Any, source: str, where: str) -> None:
    if isinstance(row, _Duplicated):
        raise DataError(f"{source} {where}: the key `{row.key}` appears twice in one record",
                        hint="keep one of them: JSON readers silently take the last")


def _parse_json(text: str, source: str) -> list[tuple[str, Any]]:
    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source} line {e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{source}: a .json file must hold a list of records, found a {type(data).__name__}")
    rows = [(f"record {i}", row) for i, row in enumerate(data)]
    for where, row in rows:
        _refuse_duplicates(row, source, where)
    return rows


def _first_line_is_json(text: str) -> bool:
    try:
        json.loads(text.lstrip().split("\n")[0])
        return True
    except (json.JSONDecodeError, IndexError):
        return False


def parse_lines(text: str, first_line: int, source: str) -> list[tuple[str, Any]]:
    """(where, record) of each non-blank line (lines end at \\n only: JSON strings may hold U+2028 raw)."""
    rows = []
    for k, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        lineno = first_line + k
        try:
            rows.append((f"line {lineno}", _loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{source} line {lineno}: malformed JSON ({e.msg})") from None
        _refuse_duplicates(rows[-1][1], source, rows[-1][0])
    return rows


def _columns(rows: Iterable[tuple[str, Any]], cfg: PrepareConfig, source: str, null_is_missing: bool = False) -> Records:
    """Validated columns. null_is_missing: Arrow tables (Hub datasets) store a field absent from a record as null."""
    ins, inp, out = [], [], []
    fi, fn, fo = cfg.instruction_field, cfg.input_field, cfg.output_field
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{source} {where}: a record must be a JSON object, found {type(row).__name__}")
        if null_is_missing:
            row = {k: v for k, v in row.items() if v is not None}
        for f, required in ((fi, True), (fn, False), (fo, True)):
            if f not in row:
                if required:
                    raise DataError(
                        f"{source} {where}: field `{f}` is missing"
                        + (f" (fields present: {', '.join(sorted(row)) or 'none'}; map yours with --{_flag(f, cfg)})"),
                        hint=(f"for conversations, a `{cfg.messages_field}` or `{cfg.conversations_field}` list, or "
                              "--set messages_field=NAME") if cfg.format == "auto" else None,
                    )
                continue
            if not isinstance(row[f], str):
                raise DataError(
                    f"{source} {where}: field `{f}` must be a string, found {_json_type(row[f])}"
                )
        ins.append(row[fi])
        inp.append(row.get(fn, ""))
        out.append(row[fo])
    return Records(instructions=ins, inputs=inp, outputs=out, where=source)


# -- the format, and conversations --------------------------------------------------------------------------------


def _records(rows: Iterable[tuple[str, Any]], cfg: PrepareConfig, source: str,
             null_is_missing: bool = False) -> Records:
    """Alpaca columns or conversations, in the format --format names or (auto) the first record's."""
    rows = iter(rows)
    first = next(rows, None)
    rows = itertools.chain([first] if first is not None else [], rows)
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect(first[1], cfg, null_is_missing, where=f"{source} {first[0]}") if first is not None else "alpaca"
    if fmt == "alpaca":
        return _columns(rows, cfg, source, null_is_missing)
    return _conversations(rows, cfg, fmt, source, null_is_missing)


def _canonical(row: dict, cfg: PrepareConfig, null_is_missing: bool) -> dict:
    """The record's conversation under core.chat's names (`messages`, `conversations`), whatever its fields are
    called (messages_field, conversations_field). Arrow tables (Hub datasets) store absent fields as null: dropped,
    in the record and in each message."""
    out = {}
    for name, key in ((cfg.messages_field, "messages"), (cfg.conversations_field, "conversations")):
        value = row.get(name)
        if value is None:
            continue
        if null_is_missing and isinstance(value, list):
            value = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in value]
        out[key] = value
    if isinstance(row.get("system"), str):  # LLaMA-Factory's ShareGPT keeps the system prompt beside the turns
        out["system"] = row["system"]
    return out


def detect(row: Any, cfg: PrepareConfig, null_is_missing: bool = False, *, where: str = "record") -> str:
    """alpaca, messages or sharegpt, from the record's fields (core.chat.detect_format on its conversation field);
    a record with neither conversation field is an Alpaca record (whose checks then name what is missing)."""
    if not isinstance(row, dict):
        return "alpaca"
    canonical = _canonical(row, cfg, null_is_missing)
    if "messages" not in canonical and "conversations" not in canonical:
        return "alpaca"
    from alpaca_cli.core import chat

    return chat.detect_format(canonical, where=where)


def _conversations(rows: Iterable[tuple[str, Any]], cfg: PrepareConfig, fmt: str, source: str,
                   null_is_missing: bool, first_where: str | None = None) -> Records:
    """Each record's messages, checked by core.chat.to_messages (roles, contents, an assistant turn); with --format
    auto every record must be of the first one's format."""
    from alpaca_cli.core import chat

    keys = ("messages",) if fmt == "messages" else ("conversations", "messages")  # ShareGPT turns under `messages`
    names = {"messages": cfg.messages_field, "conversations": cfg.conversations_field}
    conversations = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{source} {where}: a record must be a JSON object, found {type(row).__name__}")
        first_where = first_where or where
        if cfg.format == "auto" and (found := detect(row, cfg, null_is_missing, where=f"{source} {where}")) != fmt:
            raise DataError(f"{source} {where}: a {found} record, but {first_where} is a {fmt} one; one file holds "
                            "one format", hint="split the file, or pass --format to name the one expected")
        canonical = _canonical(row, cfg, null_is_missing)
        key = next((k for k in keys if k in canonical), None)
        if key is None:
            present = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
            raise DataError(f"{source} {where}: field `{names[keys[0]]}` is missing (fields present: {present}; map "
                            f"yours with --set {keys[0]}_field=NAME)")
        if not isinstance(canonical[key], list):
            raise DataError(f"{source} {where}: field `{names[key]}` must be a list of messages, found "
                            f"{_json_type(canonical[key])}")
        turns = {names[key]: canonical[key], **({"system": canonical["system"]} if "system" in canonical else {})}
        conversations.append(chat.to_messages(turns, fmt, where=f"{source} {where}", field=names[key]))
    return Records([], [], [], where=source, format=fmt, conversations=conversations)


def _flag(f: str, cfg: PrepareConfig) -> str:
    if f == cfg.instruction_field:
        return "instruction-field"
    if f == cfg.output_field:
        return "output-field"
    return "input-field"


def _json_type(v: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(v), type(v).__name__
    )


# -- the Hub ------------------------------------------------------------------------------------------------------


@dataclass
class HubTable:
    """A Hub dataset opened, not read: `datasets` keeps it as memory-mapped Arrow files on disk, and its rows are
    read in chunks (rows(start, stop)), so memory does not grow with the data set."""

    ds: Any
    where: str
    source: DataSource

    def __len__(self) -> int:
        return len(self.ds)

    def rows(self, start: int, stop: int) -> list[tuple[str, dict]]:
        """(where, record) of rows [start, stop); a field absent from a record is None (null_is_missing)."""
        batch = self.ds[start:stop]
        columns = list(batch)
        return [(f"row {start + i}", {c: batch[c][i] for c in columns}) for i in range(stop - start)]


def open_hub(cfg: PrepareConfig) -> HubTable:
    """A Hub dataset, pinned to the commit it resolved to (that commit is the fingerprint), its columns checked."""
    try:
        from huggingface_hub import HfApi

        info = HfApi().dataset_info(cfg.data, revision=cfg.revision)
        sha = info.sha
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all end the same way for the user
        raise DataError(
            f"--data {cfg.data}: cannot resolve this Hub dataset ({type(e).__name__}: {first_line(e, None)})",
            hint="check the id and your network, or pass a local .json/.jsonl file with --data",
        ) from None
    try:
        import datasets

        ds = datasets.load_dataset(cfg.data, split=cfg.split, revision=sha)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"--data {cfg.data} (split {cfg.split}): cannot load ({type(e).__name__}: {first_line(e, None)})") from None
    _check_columns(cfg, ds.column_names)
    if not len(ds):
        raise DataError(f"--data {cfg.data} (split {cfg.split}): holds no records")
    return HubTable(ds, cfg.data, DataSource(kind="hub", id=cfg.data, revision=sha, split=cfg.split))


def is_hub(spec: str) -> bool:
    return not is_file_source(spec) and bool(_HUB_ID.match(spec))


def _load_hub(cfg: PrepareConfig) -> Records:
    """A Hub dataset's records, read whole (held-out data; prepare reads its training data in chunks)."""
    table = open_hub(cfg)
    records = _records(table.rows(0, len(table)), cfg, cfg.data, null_is_missing=True)
    records.source = table.source
    return records


def _check_columns(cfg: PrepareConfig, columns: list[str]) -> None:
    """The columns the format needs (auto: a conversation column, else Alpaca's) are there."""
    fmt = cfg.format
    if fmt == "auto":
        conversational = cfg.messages_field in columns or cfg.conversations_field in columns
        fmt = "messages" if conversational else "alpaca"
    if fmt == "alpaca":
        missing = [f for f in (cfg.instruction_field, cfg.output_field) if f not in columns]
        hint = "map yours with --instruction-field / --input-field / --output-field"
    else:
        name = cfg.messages_field if fmt == "messages" else cfg.conversations_field
        found = name in columns or (fmt == "sharegpt" and cfg.messages_field in columns)  # ShareGPT under messages
        missing = [] if cfg.format == "auto" or found else [name]
        hint = f"map yours with --set {'messages_field' if fmt == 'messages' else 'conversations_field'}=NAME"
    if missing:
        raise DataError(
            f"--data {cfg.data}: column(s) {', '.join(missing)} missing (columns: {', '.join(columns)})", hint=hint
        )
