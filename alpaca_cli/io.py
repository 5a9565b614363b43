"""Paths that may be local or remote (gs://, any fsspec URL): one place for reading, writing and copying them."""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from typing import Iterator

import fsspec


def is_remote(url: str) -> bool:
    """True for URLs with a scheme other than file:// (gs://, s3://, http://, memory://...)."""
    return "://" in url and not url.startswith("file://")


def normalize(url: str) -> str:
    """Absolute local paths; remote URLs unchanged (without a trailing slash)."""
    if is_remote(url):
        return url.rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    if is_remote(url):
        return posixpath.join(url, *parts)
    return os.path.join(url, *parts)


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    if url.startswith("gs://"):
        check_gcs(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


_GCS_CHECKED: set[str] = set()
GCS_TIMEOUT_S = 5.0


def check_gcs(url: str) -> None:
    """Fail fast, in one line, when a gs:// URL cannot work: no credentials, or no way to reach the storage
    endpoint. (gcsfs would retry each request six times with backoff, about a minute, and log two tracebacks.)
    Checked once per bucket and process."""
    bucket = url[len("gs://"):].split("/", 1)[0]
    if bucket in _GCS_CHECKED:
        return
    from alpaca_cli.errors import RunDirError, first_line

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    hint = ("authenticate with `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a "
            "service-account key); STORAGE_EMULATOR_HOST points gs:// at an emulator instead")
    if not emulator and os.environ.get("FSSPEC_GCS_TOKEN") != "anon":
        try:
            import google.auth

            google.auth.default()
        except Exception as e:  # noqa: BLE001 - DefaultCredentialsError and transport errors alike
            first = (first_line(e, None) or type(e).__name__).split(". ")[0]
            raise RunDirError(f"{url}: no Google Cloud credentials ({first[:160]})", hint=hint) from None
    endpoint = (emulator or "https://storage.googleapis.com").rstrip("/")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}?fields=name", timeout=GCS_TIMEOUT_S)
    except urllib.error.HTTPError:
        pass  # an answer (401, 403, 404...): the endpoint is there; gcsfs reports what the answer means
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RunDirError(f"{url}: cannot reach Google Cloud Storage at {endpoint} ({reason})",
                          hint=f"check your network; {hint}") from None
    _GCS_CHECKED.add(bucket)


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.isdir(path)


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole file so that readers see the old content or the new, never a part.

    Local files go through a temporary file and os.replace. Object stores (GCS) make an object visible only
    when its upload completes, so a single put is already atomic there.
    """
    if not is_remote(url):
        os.makedirs(os.path.dirname(url), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(url))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, url)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    fs, path = fs_and_path(url)
    fs.pipe_file(path, data)


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def makedirs(url: str) -> None:
    fs, path = fs_and_path(url)
    if not is_remote(url):
        os.makedirs(path, exist_ok=True)
    # object stores have no directories: nothing to do.


def rm_tree(url: str) -> None:
    fs, path = fs_and_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def rm_file(url: str) -> None:
    """Delete one file; nothing when it is not there."""
    fs, path = fs_and_path(url)
    if fs.exists(path):
        fs.rm_file(path)


def move(src: str, dst: str) -> None:
    """Move a folder (a rename on local disks; a copy and delete on object stores)."""
    if not is_remote(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)
        return
    fs, path = fs_and_path(src)
    fs.mv(path, fs_and_path(dst)[1], recursive=True)


def listdir(url: str) -> list[str]:
    """Names (not paths) directly under url; empty if it does not exist."""
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@contextlib.contextmanager
def local_dir(url: str) -> Iterator[str]:
    """A local directory holding url's files: url itself when local, else a temporary download."""
    if not is_remote(url):
        yield url
        return
    tmp = tempfile.mkdtemp(prefix="alpaca-dl-")
    try:
        fs, path = fs_and_path(url)
        for remote in fs.find(path):
            rel = posixpath.relpath(remote, path)
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(remote, dest)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload_dir(local: str, url: str) -> None:
    """Copy a local directory's files to url (local or remote), overwriting files of the same name."""
    if not is_remote(url):
        if os.path.abspath(local) != os.path.abspath(url):
            shutil.copytree(local, url, dirs_exist_ok=True)
        return
    fs, path = fs_and_path(url)
    for root, _, files in os.walk(local):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local)
            fs.put_file(src, posixpath.join(path, rel.replace(os.sep, "/")))
