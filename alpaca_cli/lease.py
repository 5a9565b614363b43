"""One writer per run directory: a lease file that names its holder, refreshed while held, taken over when its
holder is dead. (rundir.py says where the file lives and when a command takes it.)

The file holds the command, host, pid, when it was taken, a heartbeat and a random token that identifies the holder.
Taking, refreshing and releasing it are compare-and-replace operations, so two processes can never both hold it:
- local disks: the file is created with os.link from a complete temporary file (fails when it exists, like
  O_CREAT|O_EXCL, and no reader ever sees it half-written); it is re-read and rewritten in place, or deleted, only
  under an exclusive flock of the file itself (readers take a shared one), and only when it still is the file that
  was judged dead (or our own). The kernel drops a dead process's flock, so a crash never leaves it locked.
- gs://: the object's generation is the compare: created with ifGenerationMatch=0, replaced (and deleted) with
  ifGenerationMatch=<the generation read>; GCS answers 412 to the loser. (fake-gcs-server honours the precondition on
  multipart uploads, which is how gcsfs uploads small files too; it ignores it on deletes.)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import tempfile
import threading
import uuid
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from alpaca_cli import io
from alpaca_cli.errors import RunDirError

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
"""How often the holder refreshes the lease's heartbeat (a daemon thread)."""
STALE_AFTER_SECONDS = 5 * HEARTBEAT_SECONDS
"""A lease whose heartbeat is older than this is taken over, whatever host holds it (a host that died, a frozen VM)."""


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """The lease file's content."""

    command: str
    host: str
    pid: int
    token: str
    taken: str
    heartbeat: str
    pid_namespace: str = ""
    """Which processes `pid` is one of (Linux): containers that share a host name (host networking) do not share
    their process ids, so a pid missing here says nothing about one in another container."""

    @classmethod
    def me(cls, command: str) -> "Holder":
        t = _now().isoformat(timespec="seconds")
        return cls(command, socket.gethostname(), os.getpid(), uuid.uuid4().hex, t, t, _pid_namespace())

    @classmethod
    def parse(cls, data: bytes) -> Optional["Holder"]:
        """The holder, or None for a file that is not a lease (edited by hand, or from another version)."""
        try:
            obj = json.loads(data)
            holder = cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})  # newer fields: ignored
            _dt.datetime.fromisoformat(holder.heartbeat)
            return holder
        except (ValueError, TypeError):
            return None

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    def beat(self) -> "Holder":
        return replace(self, heartbeat=_now().isoformat(timespec="seconds"))

    def silent_for(self) -> float:
        """Seconds since the last heartbeat."""
        return (_now() - _dt.datetime.fromisoformat(self.heartbeat)).total_seconds()

    def dead(self, stale_after_s: float = STALE_AFTER_SECONDS) -> Optional[str]:
        """Why the holder is dead (its process is gone, or it stopped refreshing), None while it may be alive."""
        if (self.host, self.pid_namespace) == (socket.gethostname(), _pid_namespace()) and not pid_alive(self.pid):
            return f"its process {self.pid} is gone"
        age = self.silent_for()
        if age > stale_after_s:
            return f"no sign of life for {_duration(age)}"
        return None

    def describe(self) -> str:
        """`alpaca train` (pid 1234 on host h, since 21:50:03, last sign of life 12 s ago)"""
        taken = _dt.datetime.fromisoformat(self.taken).astimezone()
        since = taken.strftime("%H:%M:%S" if taken.date() == _dt.date.today() else "%Y-%m-%d %H:%M:%S")
        return (f"`{self.command}` (pid {self.pid} on host {self.host}, since {since}, "
                f"last sign of life {_duration(self.silent_for())} ago)")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


# -- where the file lives: compare-and-replace on a local file or a GCS object ---------------------------------


class _LocalFile:
    """A local file; the version compared is its content (which holds a unique token)."""

    def __init__(self, path: str):
        self.path = path
        self.made_dir: Optional[str] = None

    @contextlib.contextmanager
    def _locked(self, exclusive: bool):
        """The file open and flocked, or None when there is none. An exclusive lock is only kept on the file that is
        still at the path (not one deleted or replaced while we waited for the lock)."""
        try:
            fd = os.open(self.path, os.O_RDWR if exclusive else os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            yield fd if same else None
        finally:
            os.close(fd)  # drops the lock

    @staticmethod
    def _content(fd: int) -> bytes:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)

    def read(self) -> tuple[Optional[bytes], object]:
        with self._locked(exclusive=False) as fd:
            if fd is None:
                return None, None
            data = self._content(fd)
            return data, data

    def create(self, data: bytes) -> bool:
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            os.makedirs(directory, exist_ok=True)
            self.made_dir = directory
        fd, tmp = tempfile.mkstemp(prefix=".lease-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, self.path)  # atomic, and fails when the file exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def replace(self, data: bytes, version: object) -> bool:
        with self._locked(exclusive=True) as fd:
            if fd is None or self._content(fd) != version:
                return False
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, data)
            os.fsync(fd)
            return True

    def delete(self, version: object) -> bool:
        with self._locked(exclusive=True) as fd:
            if fd is None or self._content(fd) != version:
                return False
            os.unlink(self.path)
        if self.made_dir:  # a run directory made only to hold the lease (a prepare that failed at once) goes too
            with contextlib.suppress(OSError):
                os.rmdir(self.made_dir)  # only when empty: never removes anything else
        return True


class _GCSObject:
    """A GCS object; the version compared is its generation."""

    def __init__(self, url: str):
        self.fs, path = io.fs_and_path(url)
        self.bucket, self.key = path.split("/", 1)

    def read(self) -> tuple[Optional[bytes], object]:
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None, None
        return data, headers["X-Goog-Generation"]

    def _upload(self, data: bytes, generation: object) -> bool:
        from gcsfs.core import quote

        # a multipart upload, as gcsfs' own small-file upload (simple_upload), which takes no generation to match
        meta = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
                f"Content-Type: application/json\n\n").encode() + data + b"\n--==0==--"
        try:
            self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o",
                         uploadType="multipart", ifGenerationMatch=str(generation), data=body,
                         headers={"Content-Type": 'multipart/related; boundary="==0=="'}, json_out=True)
        except FileExistsError:  # gcsfs' name for 412 Precondition Failed
            return False
        return True

    def create(self, data: bytes) -> bool:
        return self._upload(data, 0)

    def replace(self, data: bytes, version: object) -> bool:
        return self._upload(data, version)

    def delete(self, version: object) -> bool:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(version))
        except (FileExistsError, FileNotFoundError):
            return False
        return True


def _store(url: str):
    if url.startswith("gs://"):
        return _GCSObject(url)
    if io.is_remote(url):
        raise RunDirError(f"{url}: a run directory on this storage cannot be locked against a second writer",
                          hint="use a local or gs:// --run-dir")
    return _LocalFile(url)


def read_holder(url: str) -> Optional[Holder]:
    """Who holds the lease at url (None when nobody does, or the file is not a lease)."""
    data, _ = _store(url).read()
    return Holder.parse(data) if data is not None else None


# -- the lease -----------------------------------------------------------------------------------------------------


class Lease:
    """The lease at `url` on run `run_url`, held by this process for `command` between acquire() and release()."""

    def __init__(self, url: str, run_url: str, command: str):
        self.url, self.run_url = url, run_url
        self.store = _store(url)
        self.holder = Holder.me(command)
        self.heartbeat_s, self.stale_after_s = HEARTBEAT_SECONDS, STALE_AFTER_SECONDS
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> "Lease":
        """Take the lease (taking over a dead holder's), start the heartbeat; RunDirError naming a live holder."""
        for _ in range(10):  # each round loses only to another process that changed the file meanwhile
            data, version = self.store.read()
            if data is None:
                if self.store.create(self.holder.encode()):
                    return self._started()
                continue
            other = Holder.parse(data)
            if other is not None and other.token == self.holder.token:
                return self._started()  # a retried request had landed
            why = other.dead(self.stale_after_s) if other is not None else "the file is not a lease"
            if why is None:
                raise RunDirError(
                    f"run {self.run_url} is in use by {other.describe()}",
                    hint="wait for it to finish, or stop it; a lease whose holder is dead is taken over automatically",
                )
            if self.store.replace(self.holder.encode(), version):
                logger.warning("run %s was left in use by %s, which is dead (%s): taking it over", self.run_url,
                               other.describe() if other else self.url, why)
                return self._started()
        raise RunDirError(f"run {self.run_url}: could not take its lease {self.url} (other processes keep taking it)",
                          hint="stop the other alpaca commands on this run")

    def _started(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name="alpaca-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.refresh():
                    return
            except Exception as e:  # noqa: BLE001 - a network blip: try again next period
                logger.warning("run %s: could not refresh the lease (%s); retrying", self.run_url, e)

    def refresh(self) -> bool:
        """Renew the heartbeat; False (and `lost` set, an error logged) when another process has taken the lease."""
        data, version = self.store.read()
        other = Holder.parse(data) if data is not None else None
        if other is not None and other.token == self.holder.token:
            beat = self.holder.beat()
            if self.store.replace(beat.encode(), version):
                self.holder = beat
                return True
            data, _ = self.store.read()
            other = Holder.parse(data) if data is not None else None
        self.lost = (f"run {self.run_url} was taken over by " + other.describe() if other is not None
                     else f"the lease of run {self.run_url} ({self.url}) was removed")
        logger.error("%s: this command stops at its next write", self.lost)
        return False

    def check(self) -> None:
        """RunDirError when the lease was lost: a second writer may be writing the run now."""
        if self.lost:
            raise RunDirError(f"{self.lost} while this command was writing it; stopped",
                              hint="the run was being written by two commands: check it with `alpaca status`, "
                                   "and run one command at a time on it")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        data, version = self.store.read()
        mine = Holder.parse(data) if data is not None else None
        if mine is not None and mine.token == self.holder.token:
            self.store.delete(version)


__all__ = ["Lease", "Holder", "read_holder", "pid_alive", "HEARTBEAT_SECONDS", "STALE_AFTER_SECONDS"]
