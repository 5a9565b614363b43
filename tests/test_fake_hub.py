"""The fake Hub (tests/fake_hub.py) against the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT when it is imported, so the client side runs in a subprocess whose environment holds
``hub.env()``; each script prints one JSON line that the test reads back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from fake_hub import LFS_SIZE_THRESHOLD, FakeHub

TOKEN = "hf_fake_SECRET_token_0123456789"
USER = "tester"


def run_client(hub: FakeHub, script: str, tmp_path, *, token: bool = True, extra_env: dict | None = None) -> dict:
    """Run `script` with huggingface_hub pointed at `hub`; it must print one JSON object as its last line."""
    env = {**os.environ, **hub.env(), "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if not token:
        env.pop("HF_TOKEN")
    env.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, f"client failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_tree(root, files: dict) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_tree(root) -> dict:
    """path -> bytes under root, leaving out what the Hub/huggingface_hub add (.gitattributes, the .cache folder)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".cache"]
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != ".gitattributes":
                with open(full, "rb") as f:
                    out[rel] = f.read()
    return out


@pytest.fixture
def hub():
    server = FakeHub.start(token=TOKEN, user=USER)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """One push (create_repo, upload_folder with regular, nested, empty and LFS files) and downloads of it."""
    tmp = tmp_path_factory.mktemp("fake-hub-push")
    src, dst, cache = tmp / "src", tmp / "dst", tmp / "cache"
    source = {
        "README.md": b"# tiny model\n\nSome text, unicode \xc3\xa9 too.\n",
        "sub/dir/config.json": b'{"hidden_size": 32}\n',
        "empty.txt": b"",
        # Over the 10 MiB threshold and a *.safetensors name: the Hub stores it in LFS on both counts.
        "model.safetensors": os.urandom(LFS_SIZE_THRESHOLD + 123_457),
    }
    write_tree(src, source)
    server = FakeHub.start(token=TOKEN, user=USER)
    try:
        out = run_client(
            server,
            f"""
            import json
            from huggingface_hub import HfApi, snapshot_download
            api = HfApi()
            repo_id = "{USER}/tiny"
            url = api.create_repo(repo_id, private=True, exist_ok=True)
            again = api.create_repo(repo_id, private=True, exist_ok=True)  # 409 answered, exist_ok swallows it
            info = api.upload_folder(repo_id=repo_id, folder_path={str(src)!r}, commit_message="Push tiny model")
            path = snapshot_download(repo_id, local_dir={str(dst)!r})
            cached = snapshot_download(repo_id, revision="main", cache_dir={str(cache)!r})
            model = api.model_info(repo_id, files_metadata=True)
            print(json.dumps({{
                "url": str(url), "again": str(again), "oid": info.oid, "commit_url": info.commit_url,
                "path": path, "cached": cached, "sha": model.sha, "private": model.private,
                "lfs": sorted(s.rfilename for s in model.siblings if s.lfs is not None),
                "files": sorted(api.list_repo_files(repo_id)),
                "exists": api.repo_exists(repo_id), "missing": api.repo_exists("{USER}/nope"),
            }}))
            """,
            tmp,
        )
        yield server, source, out, dst
    finally:
        server.stop()


def test_whoami(hub, tmp_path):
    out = run_client(
        hub,
        """
        import json
        from huggingface_hub import HfApi
        me = HfApi().whoami()
        print(json.dumps({"name": me["name"], "role": me["auth"]["accessToken"]["role"]}))
        """,
        tmp_path,
    )
    assert out == {"name": USER, "role": "write"}


def test_roundtrip_is_byte_exact(pushed):
    server, source, out, dst = pushed
    assert out["url"] == out["again"] == f"{server.endpoint}/{USER}/tiny"
    assert read_tree(dst) == source
    assert read_tree(out["cached"]) == source
    assert out["path"] == str(dst)
    assert server.files(f"{USER}/tiny") == {**source, ".gitattributes": server.files(f"{USER}/tiny")[".gitattributes"]}
    assert out["files"] == sorted([*source, ".gitattributes"])
    assert out["exists"] is True and out["missing"] is False
    assert out["private"] is True and server.repos()[f"{USER}/tiny"]["private"] is True


def test_commit_recorded(pushed):
    server, _, out, _ = pushed
    head = server.repos()[f"{USER}/tiny"]["branches"]["main"]
    assert out["oid"] == out["sha"] == head and len(head) == 40
    assert out["commit_url"] == f"{server.endpoint}/{USER}/tiny/commit/{head}"
    assert [c["title"] for c in server.commits(f"{USER}/tiny")] == ["Push tiny model", "initial commit"]


def test_large_file_goes_through_lfs(pushed):
    server, source, out, _ = pushed
    assert out["lfs"] == ["model.safetensors"]
    puts = [r for r in server.requests if r[0] == "PUT" and r[1].startswith("/_fakehub/lfs-upload/")]
    assert len(puts) == 1 and puts[0][3] == source["model.safetensors"]
    assert any(r[1].endswith(".git/info/lfs/objects/batch") for r in server.requests)
    (commit_body,) = [r[3] for r in server.requests if r[0] == "POST" and "/commit/" in r[1]]
    ops = {op["value"].get("path"): op["key"] for op in map(json.loads, commit_body.splitlines())}
    assert ops["model.safetensors"] == "lfsFile"
    assert ops["README.md"] == ops["sub/dir/config.json"] == ops["empty.txt"] == "file"


def test_token_only_in_authorization_header(pushed):
    server, *_ = pushed
    token = TOKEN.encode()
    authorized = 0
    for method, path, headers, body in server.requests:
        assert TOKEN not in path and token not in body, (method, path)
        for name, value in headers.items():
            if name.lower() == "authorization":
                assert value == f"Bearer {TOKEN}"
                authorized += 1
            else:
                assert TOKEN not in value, (method, path, name)
    assert authorized > 0
    # The LFS content goes to an upload URL that carries no credentials.
    lfs_puts = [r for r in server.requests if r[0] == "PUT" and "lfs-upload" in r[1]]
    assert lfs_puts and all("authorization" not in {k.lower() for k in r[2]} for r in lfs_puts)


def test_upload_to_new_branch(hub, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    source = {"weights/tokenizer.model": b"\x00\x01tokenizer", "notes.txt": b"branch only\n"}
    write_tree(src, source)
    branch = "exports/step-10"  # a slash, quoted in URLs
    out = run_client(
        hub,
        f"""
        import json
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import RevisionNotFoundError
        api = HfApi()
        repo_id = "{USER}/branchy"
        api.create_repo(repo_id, exist_ok=True)
        try:
            api.upload_folder(repo_id=repo_id, folder_path={str(src)!r}, revision="{branch}")
            missing_branch = "no error"
        except RevisionNotFoundError as e:
            missing_branch = "RevisionNotFoundError"
        api.create_branch(repo_id, branch="{branch}", exist_ok=True)
        api.create_branch(repo_id, branch="{branch}", exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path={str(src)!r}, revision="{branch}",
                                 commit_message="Export step 10")
        snapshot_download(repo_id, revision="{branch}", local_dir={str(dst)!r})
        print(json.dumps({{
            "missing_branch": missing_branch, "oid": info.oid,
            "main": sorted(api.list_repo_files(repo_id)),
            "branch": sorted(api.list_repo_files(repo_id, revision="{branch}")),
            "branches": sorted(b.name for b in api.list_repo_refs(repo_id).branches),
            "titles": [c.title for c in api.list_repo_commits(repo_id, revision="{branch}")],
        }}))
        """,
        tmp_path,
    )
    assert out["missing_branch"] == "RevisionNotFoundError"
    assert read_tree(dst) == source
    assert out["main"] == [".gitattributes"]
    assert out["branch"] == sorted([".gitattributes", *source])
    assert out["branches"] == sorted(["main", branch])
    assert out["titles"] == ["Export step 10", "initial commit"]
    assert hub.repos()[f"{USER}/branchy"]["branches"][branch] == out["oid"]
    assert set(hub.files(f"{USER}/branchy", branch)) == {".gitattributes", *source}
    assert set(hub.files(f"{USER}/branchy")) == {".gitattributes"}


def test_requests_without_valid_token_are_rejected(hub, tmp_path):
    src = tmp_path / "src"
    write_tree(src, {"a.txt": b"a"})
    script = f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        statuses = {{}}
        def attempt(name, fn):
            try:
                fn()
                statuses[name] = "ok"
            except Exception as e:  # whoami re-raises a plain HTTPError in 0.36; httpx-based in 1.x
                statuses[name] = getattr(getattr(e, "response", None), "status_code", repr(e))
        attempt("create", lambda: api.create_repo("{USER}/anon", exist_ok=True))
        attempt("upload", lambda: api.upload_folder(repo_id="{USER}/owned", folder_path={str(src)!r}))
        attempt("read_private", lambda: api.model_info("{USER}/owned"))
        attempt("read_public", lambda: api.model_info("{USER}/public"))
        attempt("whoami_bad_token", lambda: api.whoami(token="hf_wrong"))
        print(json.dumps(statuses))
        """
    run_client(
        hub,
        f"""
        import json
        from huggingface_hub import HfApi
        HfApi().create_repo("{USER}/owned", private=True)
        HfApi().create_repo("{USER}/public", private=False)
        print("{{}}")
        """,
        tmp_path,
    )
    out = run_client(hub, script, tmp_path, token=False)
    assert out == {"create": 401, "upload": 401, "read_private": 401, "read_public": "ok", "whoami_bad_token": 401}
    assert set(hub.repos()) == {f"{USER}/owned", f"{USER}/public"}
    assert hub.files(f"{USER}/owned").keys() == {".gitattributes"}


def test_stop_releases_port():
    import socket

    server = FakeHub.start()
    port = int(server.endpoint.rsplit(":", 1)[1])
    server.stop()
    server.stop()  # idempotent
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
