"""A small in-memory fake of the Hugging Face Hub HTTP API, for tests (stdlib only).

It speaks enough of the Hub protocol for the real ``huggingface_hub`` client (0.36, and the same routes in newer
releases) to run ``whoami``, ``create_repo``, ``delete_repo``, ``create_branch``/``delete_branch``,
``upload_folder``/``upload_file``/``create_commit`` (regular files inline, large or binary files through the LFS batch
API and a presigned-style PUT), ``model_info``/``repo_info``/``repo_exists``, ``list_repo_files``/``list_repo_tree``,
``list_repo_refs``, ``list_repo_commits``, ``get_paths_info``, ``update_repo_settings(private=...)``,
``hf_hub_download`` and ``snapshot_download``. Checked with huggingface_hub 0.36.2, 1.33.0 and 2.4.0.

Usage::

    hub = FakeHub.start()                       # 127.0.0.1, random free port, background threads
    env = {**os.environ, **hub.env()}           # HF_ENDPOINT, HF_TOKEN, ... for a subprocess
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    assert hub.files("tester/my-model")["config.json"] == b"..."
    hub.stop()

``huggingface_hub`` reads ``HF_ENDPOINT`` once, at import time, so the client side has to run in a process whose
environment already holds ``hub.env()`` (a subprocess, in practice). ``HF_HUB_DISABLE_XET=1`` keeps uploads and
downloads on the plain LFS/HTTP paths that this fake implements.

Behaviour worth knowing:

- Authentication: writes (create/delete repo, branches, preupload, LFS batch, commit) and ``whoami`` need
  ``Authorization: Bearer <token>``; without it the answer is 401, with a wrong token 401
  ("Invalid credentials in Authorization header"), as on the real Hub. Public repos can be read anonymously; a private
  repo read without the token answers 401 ``RepoNotFound``. Writes are allowed in the user's namespace and in ``orgs``.
- A new repo gets an initial commit holding the Hub's default ``.gitattributes`` (pass ``gitattributes=False`` to
  ``start`` for an empty initial commit), so ``files()`` and downloads include that file, as on the real Hub.
- The preupload answer decides regular vs LFS like the Hub: LFS when a ``filter=lfs`` pattern of the revision's
  ``.gitattributes`` matches (``*.safetensors``, ``*.bin``, ``*.model``, ...), when the file is 10 MiB or more, or when
  its first 512 bytes hold a NUL byte; empty files are always regular (the client enforces that).
- The LFS upload URL carries a random one-time nonce, never the token; the client PUTs there without credentials and
  then calls the ``verify`` action (with credentials). The sha256 and size of the upload are checked.
- Commits go to branches only (no pull requests, no tags); ``parent_commit`` is honoured (412 when stale). Commit oids
  are sha1 hex strings; any commit oid of a repo is a valid ``revision`` for reads.
- ``.gitignore`` handling (``shouldIgnore``) is not implemented: nothing is ignored server-side.
- ``requests`` logs every request as ``(method, path, headers, body)``; ``path`` includes the query string.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files of 10 MiB and more in LFS whatever their name

# The .gitattributes the Hub puts in the initial commit of a new repository.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "saved_model/**/*",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
).encode()

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass(frozen=True)
class _Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def oid(self) -> str:
        """Git oid: of the content for a regular file, of the pointer file for an LFS file (as git does)."""
        return git_blob_sha1(lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)

    def entry(self, path: str) -> dict:
        """The tree / paths-info JSON entry of this file."""
        out = {"type": "file", "oid": self.oid, "size": len(self.data), "path": path}
        if self.lfs:
            out["lfs"] = {
                "oid": self.sha256,
                "size": len(self.data),
                "pointerSize": len(lfs_pointer(self.sha256, len(self.data))),
            }
        return out


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, _Commit] = field(default_factory=dict)  # oid -> commit

    @property
    def key(self) -> str:
        return URL_PREFIX[self.repo_type] + self.repo_id


class _HubError(Exception):
    """An HTTP error answer, with the Hub's X-Error-Code / X-Error-Message headers."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


def _private_from(payload: dict) -> bool | None:
    """`private` (huggingface_hub < 1.x) or `visibility` (newer releases) of a create/settings payload."""
    if payload.get("visibility") is not None:
        return payload["visibility"] != "public"
    return None if payload.get("private") is None else bool(payload["private"])


def _repo_not_found(status: int = 404) -> _HubError:
    return _HubError(status, "Repository not found", "RepoNotFound")


class FakeHub:
    """An in-memory Hugging Face Hub served over HTTP on 127.0.0.1 (see the module docstring)."""

    endpoint: str
    token: str
    user: str
    requests: list[tuple[str, str, dict[str, str], bytes]]

    def __init__(self, token: str = "hf_test_token", user: str = "tester", orgs=(), gitattributes: bool = True):
        self.token, self.user, self.orgs = token, user, tuple(orgs)
        self.gitattributes = gitattributes
        self.requests = []
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}  # key: "owner/name" for models, "datasets/owner/name", "spaces/..."
        self._lfs: dict[str, bytes] = {}  # sha256 hex -> content (one content-addressed store for all repos)
        self._uploads: dict[str, tuple[str, int]] = {}  # upload nonce -> (sha256, size)
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ----------------------------------------------------------------------------------------------------- lifecycle

    @classmethod
    def start(cls, token: str = "hf_test_token", user: str = "tester", orgs=(), gitattributes: bool = True) -> FakeHub:
        """Start a threaded server on 127.0.0.1 on a random free port and return the hub.

        `orgs`: extra namespaces the user may write to; `gitattributes=False`: new repos start empty.
        """
        hub = cls(token=token, user=user, orgs=orgs, gitattributes=gitattributes)
        handler = type("FakeHubHandler", (_Handler,), {"hub": hub})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        hub._server = server
        hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        hub._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        hub._thread.start()
        return hub

    def stop(self) -> None:
        """Stop serving and close the listening socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment for a client process (huggingface_hub reads HF_ENDPOINT at import time)."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": self.token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ENABLE_HF_TRANSFER": "0",
            "HF_HUB_OFFLINE": "0",
        }

    # ----------------------------------------------------------------------------------------------- inspection API

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """What the repo holds at `revision` (a branch or commit oid): path -> bytes. KeyError if unknown."""
        with self._lock:
            repo = self._repos[URL_PREFIX[repo_type] + repo_id]
            oid = repo.branches.get(revision, revision)
            return {path: blob.data for path, blob in repo.commits[oid].files.items()}

    def repos(self) -> dict[str, dict]:
        """repo key ("owner/name", or "datasets/owner/name"...) -> {"type", "private", "branches": {name: oid}}."""
        with self._lock:
            return {
                key: {"type": r.repo_type, "private": r.private, "branches": dict(r.branches)}
                for key, r in self._repos.items()
            }

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict]:
        """History of `revision`, newest first: [{"oid", "title", "message", "parent", "files"}]."""
        with self._lock:
            repo = self._repos[URL_PREFIX[repo_type] + repo_id]
            oid: str | None = repo.branches.get(revision, revision)
            out = []
            while oid is not None:
                c = repo.commits[oid]
                out.append(
                    {
                        "oid": c.oid,
                        "title": c.title,
                        "message": c.message,
                        "parent": c.parent,
                        "files": sorted(c.files),
                    }
                )
                oid = c.parent
            return out

    # ------------------------------------------------------------------------------------------------------ helpers

    def _new_commit(
        self, repo: _Repo, parent: str | None, title: str, message: str, files: dict[str, _Blob]
    ) -> _Commit:
        self._counter += 1
        digest = hashlib.sha1()
        for part in (repo.key, parent or "", title, message, str(self._counter), str(time.time())):
            digest.update(part.encode() + b"\0")
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\0".encode())
        commit = _Commit(digest.hexdigest(), parent, title, message, _now(), dict(files))
        repo.commits[commit.oid] = commit
        return commit

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        oid = repo.branches.get(revision)
        if oid is None and revision in repo.commits:
            oid = revision
        if oid is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    @staticmethod
    def _is_lfs(files: dict[str, _Blob], path: str, size: int, sample: bytes) -> bool:
        if size == 0:
            return False
        if size >= LFS_SIZE_THRESHOLD or b"\0" in sample[:512]:
            return True
        attributes = files.get(".gitattributes")
        if attributes is None:
            return False
        name = path.rsplit("/", 1)[-1]
        for line in attributes.data.decode("utf-8", "replace").splitlines():
            parts = line.split()
            if len(parts) < 2 or parts[0].startswith("#") or "filter=lfs" not in parts[1:]:
                continue
            pattern = parts[0]
            target = path if "/" in pattern else name
            if fnmatch.fnmatchcase(target, pattern) or (
                pattern.endswith("/**/*") and path.startswith(pattern[: -len("**/*")])
            ):
                return True
        return False


# =================================================================================================== request handler


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the per-hub subclass
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    timeout = 60  # idle keep-alive connections do not pin a thread forever

    def log_message(self, format, *args):
        pass

    # ---------------------------------------------------------------------------------------------------- plumbing

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        content_type: str = "application/json; charset=utf-8",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _dispatch(self) -> None:
        body = self._read_body()
        self.body = body
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, dict(self.headers.items()), body))
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.segments = [s for s in split.path.split("/") if s != ""]
        try:
            self._route()
        except _HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json({"error": e.message, **e.extra}, e.status, headers)
        except (ValueError, KeyError) as e:  # malformed request bodies
            self._json({"error": f"Bad request: {e!r}"}, 400, {"X-Error-Message": "Bad request"})
        except Exception as e:  # noqa: BLE001 - a FakeHub bug: answer 500 rather than drop the connection
            self._json({"error": f"FakeHub internal error: {e!r}"}, 500, {"X-Error-Message": "Internal error"})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -------------------------------------------------------------------------------------------------------- auth

    def _auth(self) -> bool:
        """True with the right token, False without any; 401 with a wrong one (anywhere, as on the Hub)."""
        header = self.headers.get("Authorization")
        if header is None:
            return False
        if header != f"Bearer {self.hub.token}":
            raise _HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_auth(self) -> None:
        if not self._auth():
            raise _HubError(401, "Invalid username or password.")

    def _require_namespace(self, repo_id: str) -> None:
        namespace = repo_id.split("/")[0]
        if namespace not in (self.hub.user, *self.hub.orgs):
            raise _HubError(403, f"You don't have the rights to write in the namespace '{namespace}'")

    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> _Repo:
        if write:
            self._require_auth()
        authed = self._auth()
        repo = self.hub._repos.get(URL_PREFIX[repo_type] + repo_id)
        if repo is None:
            raise _repo_not_found(404)
        if repo.private and not authed:
            raise _repo_not_found(401)
        if write:
            self._require_namespace(repo_id)
        return repo

    # ------------------------------------------------------------------------------------------------------ routing

    def _route(self) -> None:
        seg, method = self.segments, self.command
        if seg[:2] == ["api", "whoami-v2"] and method == "GET":
            return self._whoami()
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if seg[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._json({"errors": [], "warnings": []})
        if len(seg) >= 4 and seg[0] == "api" and seg[1] in REPO_TYPES:
            repo_type, repo_id = REPO_TYPES[seg[1]], f"{unquote(seg[2])}/{unquote(seg[3])}"
            return self._repo_api(repo_type, repo_id, seg[4:])
        if len(seg) == 3 and seg[:2] == ["_fakehub", "lfs-upload"] and method == "PUT":
            return self._lfs_put(seg[2])
        # Git / file routes: [datasets|spaces/]owner/name(.git/info/lfs/objects/...|/resolve/rev/path)
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{unquote(seg[0])}/{unquote(seg[1][: -len('.git')])}"
            if seg[5] == "batch":
                return self._lfs_batch(repo_type, repo_id)
            if seg[5] == "verify":
                return self._lfs_verify(repo_type, repo_id)
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(seg[0])}/{unquote(seg[1])}"
            return self._resolve_file(repo_type, repo_id, unquote(seg[3]), unquote("/".join(seg[4:])))
        raise _HubError(404, f"FakeHub: no route for {method} {self.path}")

    def _repo_api(self, repo_type: str, repo_id: str, rest: list[str]) -> None:
        method = self.command
        action = rest[0] if rest else ""
        arg = unquote(rest[1]) if len(rest) > 1 else None
        with self.hub._lock:
            if method == "GET" and action == "":
                return self._info(repo_type, repo_id, "main")
            if method == "GET" and action == "revision" and arg is not None:
                return self._info(repo_type, repo_id, arg)
            if method == "GET" and action == "tree" and arg is not None:
                return self._tree(repo_type, repo_id, arg, unquote("/".join(rest[2:])))
            if method == "POST" and action == "paths-info" and arg is not None:
                return self._paths_info(repo_type, repo_id, arg)
            if method == "GET" and action == "refs":
                return self._refs(repo_type, repo_id)
            if method == "GET" and action == "commits" and arg is not None:
                return self._list_commits(repo_type, repo_id, arg)
            if method == "PUT" and action == "settings":
                return self._settings(repo_type, repo_id)
            if method == "POST" and action == "preupload" and arg is not None:
                return self._preupload(repo_type, repo_id, arg)
            if method == "POST" and action == "commit" and arg is not None:
                return self._commit(repo_type, repo_id, arg)
            if method in ("POST", "DELETE") and action == "branch" and arg is not None:
                branch = unquote("/".join(rest[1:]))
                if method == "POST":
                    return self._create_branch(repo_type, repo_id, branch)
                return self._delete_branch(repo_type, repo_id, branch)
        raise _HubError(404, f"FakeHub: no route for {method} {self.path}")

    # ---------------------------------------------------------------------------------------------- user and repos

    def _whoami(self) -> None:
        self._require_auth()
        hub = self.hub
        self._json(
            {
                "type": "user",
                "id": hashlib.sha1(hub.user.encode()).hexdigest()[:24],
                "name": hub.user,
                "fullname": hub.user,
                "email": f"{hub.user}@example.com",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "admin"} for org in hub.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "fake-hub", "role": "write", "createdAt": _now()},
                },
            }
        )

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.hub.endpoint}/{repo.key}"

    def _create_repo(self) -> None:
        self._require_auth()
        payload = json.loads(self.body or b"{}")
        name = payload["name"]
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        if not name or "/" in name or not all(c.isalnum() or c in "-_." for c in name):
            raise _HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        self._require_namespace(repo_id)
        with self.hub._lock:
            key = URL_PREFIX[repo_type] + repo_id
            if key in self.hub._repos:
                existing = self.hub._repos[key]
                raise _HubError(
                    409, f"You already created this {repo_type} repo", extra={"url": self._repo_url(existing)}
                )
            repo = _Repo(repo_type, repo_id, _private_from(payload) or False, _now())
            files = {".gitattributes": _Blob(DEFAULT_GITATTRIBUTES, False)} if self.hub.gitattributes else {}
            repo.branches["main"] = self.hub._new_commit(repo, None, "initial commit", "", files).oid
            self.hub._repos[key] = repo
        self._json({"url": self._repo_url(repo), "name": repo_id, "id": hashlib.sha1(key.encode()).hexdigest()[:24]})

    def _delete_repo(self) -> None:
        self._require_auth()
        payload = json.loads(self.body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.hub.user}/{payload['name']}"
        self._require_namespace(repo_id)
        with self.hub._lock:
            if self.hub._repos.pop(URL_PREFIX[repo_type] + repo_id, None) is None:
                raise _repo_not_found(404)
        self._json({})

    def _settings(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        private = _private_from(json.loads(self.body or b"{}"))
        if private is not None:
            repo.private = private
        self._json({"private": repo.private})

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self.hub._resolve(repo, revision)
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("true", "1")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict = {"rfilename": path}
            if blobs:
                entry = commit.files[path].entry(path)
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    sibling["lfs"] = {
                        "sha256": entry["lfs"]["oid"],
                        "size": entry["size"],
                        "pointerSize": entry["lfs"]["pointerSize"],
                    }
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo.key.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(b.data) for b in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        self._json(info)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self.hub._resolve(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        files, folders = [], set()
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            relative = file_path[len(prefix) :].split("/")
            if len(relative) > 1:  # the folders on the way
                depth = len(relative) - 1 if recursive else 1
                for i in range(1, depth + 1):
                    folders.add(prefix + "/".join(relative[:i]))
            if recursive or len(relative) == 1:
                files.append(commit.files[file_path].entry(file_path))
        if prefix and not files and not folders:
            raise _HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        entries = [self._folder_entry(commit, f) for f in sorted(folders)] + files
        self._json(entries)

    @staticmethod
    def _folder_entry(commit: _Commit, folder: str) -> dict:
        digest = hashlib.sha1(folder.encode())
        for path in sorted(commit.files):
            if path.startswith(folder + "/"):
                digest.update(f"{path}\0{commit.files[path].oid}\0".encode())
        return {"type": "directory", "oid": digest.hexdigest(), "path": folder}

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit = self.hub._resolve(repo, revision)
        if "json" in self.headers.get("Content-Type", ""):
            paths = json.loads(self.body or b"{}").get("paths", [])
        else:
            paths = parse_qs(self.body.decode(), keep_blank_values=True).get("paths", [])
        out = []
        for path in paths if isinstance(paths, list) else [paths]:
            path = path.strip("/")
            if path in commit.files:
                out.append(commit.files[path].entry(path))
            elif any(p.startswith(path + "/") for p in commit.files):
                out.append(self._folder_entry(commit, path))
        self._json(out)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo(repo_type, repo_id)
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
            for name, oid in sorted(repo.branches.items())
        ]
        self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": []})

    def _list_commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id)
        commit: _Commit | None = self.hub._resolve(repo, revision)
        out = []
        while commit is not None:
            out.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": self.hub.user, "avatar": ""}],
                }
            )
            commit = repo.commits[commit.parent] if commit.parent else None
        self._json(out)

    # ---------------------------------------------------------------------------------------------------- branches

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        payload = json.loads(self.body or b"{}")
        if not branch or ".." in branch or branch.startswith(("/", "refs/")) or branch.endswith("/"):
            raise _HubError(400, f"Invalid branch name: {branch!r}")
        if branch in repo.branches:
            raise _HubError(409, "Reference already exists")
        start = self.hub._resolve(repo, payload.get("startingPoint") or "main")
        if payload.get("emptyBranch"):
            start = self.hub._new_commit(repo, None, "initial commit", "", {})
        repo.branches[branch] = start.oid
        self._json({})

    def _delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if branch not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == "main":
            raise _HubError(403, "Cannot delete the default branch")
        del repo.branches[branch]
        self._json({})

    # ------------------------------------------------------------------------------------------------------ upload

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if self.query.get("create_pr"):
            raise _HubError(400, "FakeHub does not support pull requests")
        commit = self.hub._resolve(repo, revision)
        payload = json.loads(self.body or b"{}")
        out = []
        for f in payload["files"]:
            sample = base64.b64decode(f.get("sample", ""))
            lfs = FakeHub._is_lfs(commit.files, f["path"], int(f["size"]), sample)
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            remote = commit.files.get(f["path"])
            if remote is not None:  # lets the client skip unchanged files
                entry["oid"] = remote.sha256 if remote.lfs else git_blob_sha1(remote.data)
            out.append(entry)
        self._json({"files": out, "commitOid": commit.oid})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        with self.hub._lock:
            self._repo(repo_type, repo_id, write=True)
        payload = json.loads(self.body or b"{}")
        if payload.get("operation") != "upload":
            raise _HubError(400, "FakeHub only supports LFS uploads through the batch API")
        verify = f"{self.hub.endpoint}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify"
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            entry: dict = {"oid": oid, "size": size, "authenticated": True}
            with self.hub._lock:
                if oid not in self.hub._lfs:  # no "actions": the client skips content already stored
                    nonce = secrets.token_urlsafe(24)
                    self.hub._uploads[nonce] = (oid, size)
                    entry["actions"] = {
                        "upload": {"href": f"{self.hub.endpoint}/_fakehub/lfs-upload/{nonce}", "expires_in": 86400},
                        "verify": {"href": verify, "header": {}},
                    }
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, nonce: str) -> None:
        with self.hub._lock:
            expected = self.hub._uploads.pop(nonce, None)
        if expected is None:
            raise _HubError(403, "Unknown or already used upload URL")
        oid, size = expected
        if len(self.body) != size or hashlib.sha256(self.body).hexdigest() != oid:
            raise _HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        with self.hub._lock:
            self.hub._lfs[oid] = self.body
        self._send(200, b"", {"ETag": f'"{hashlib.md5(self.body).hexdigest()}"'}, content_type="text/plain")

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        with self.hub._lock:
            self._repo(repo_type, repo_id, write=True)
            payload = json.loads(self.body or b"{}")
            data = self.hub._lfs.get(payload["oid"])
        if data is None or len(data) != int(payload["size"]):
            raise _HubError(404, f"LFS object {payload['oid']} not found")
        self._json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_type, repo_id, write=True)
        if self.query.get("create_pr"):
            raise _HubError(400, "FakeHub does not support pull requests")
        if revision not in repo.branches:
            raise _HubError(404, f"Invalid rev id: {revision} (commits go to branches)", "RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value.get("path", "").strip("/")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                files[path] = _Blob(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.hub._lfs.get(value["oid"])
                if data is None or ("size" in value and int(value["size"]) != len(data)):
                    raise _HubError(400, f"LFS object {value['oid']} for {path} was not uploaded")
                files[path] = _Blob(data, True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise _HubError(400, f"Unknown commit operation {key!r}")
        commit = self.hub._new_commit(
            repo, head.oid, header.get("summary") or "", header.get("description") or "", files
        )
        repo.branches[revision] = commit.oid
        self._json(
            {
                "success": True,
                "commitOid": commit.oid,
                "hookOutput": "",
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}",
            }
        )

    # ---------------------------------------------------------------------------------------------------- download

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        with self.hub._lock:
            repo = self._repo(repo_type, repo_id)
            commit = self.hub._resolve(repo, revision)
            blob = commit.files.get(path)
        if blob is None:
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {})
        data = blob.data
        etag = f'"{blob.sha256 if blob.lfs else blob.oid}"'
        headers = {
            "ETag": etag,
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
        status = 200
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes=") and "," not in range_header:
            first, _, last = range_header[len("bytes=") :].partition("-")
            total = len(data)
            start = int(first) if first else max(total - int(last), 0)
            end = int(last) if (first and last) else total - 1
            if start >= total > 0:
                raise _HubError(416, "Requested range not satisfiable", extra={})
            end = min(end, total - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")
