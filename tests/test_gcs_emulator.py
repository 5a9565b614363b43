"""The GCS the tests write to keeps GCS's object preconditions, which checkpoints from several hosts rely on.

fake-gcs-server 1.54.0 drops `ifGenerationMatch` on simple uploads; tests/gcs_preconditions.py, in front of it for
tensorstore, keeps it (why, in that file). These tests say what that front must do, and that without it two writers
of one OCDBT database (two hosts saving one checkpoint) silently lose keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request


def upload(endpoint, bucket, name, body, if_generation_match=None):
    """A simple upload (uploadType=media, as tensorstore writes): (HTTP status, generation or None)."""
    url = f"{endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}"
    if if_generation_match is not None:
        url += f"&ifGenerationMatch={if_generation_match}"
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, int(json.loads(r.read())["generation"])
    except urllib.error.HTTPError as e:
        return e.code, None


def test_a_conditional_upload_holds_only_against_the_live_generation(gcs):
    front, b = gcs.front_endpoint, gcs.bucket
    status, first = upload(front, b, "cond/a", b"1", if_generation_match=0)
    assert status == 200
    assert upload(front, b, "cond/a", b"2", if_generation_match=0) == (412, None)  # it exists now
    assert upload(front, b, "cond/a", b"3", if_generation_match=first + 1) == (412, None)
    status, second = upload(front, b, "cond/a", b"4", if_generation_match=first)
    assert status == 200 and second != first
    assert upload(front, b, "cond/a", b"5", if_generation_match=first) == (412, None)  # no longer the live one
    with urllib.request.urlopen(f"{front}/storage/v1/b/{b}/o/cond%2Fa?alt=media") as r:
        assert r.read() == b"4"  # what the refused writes carried never landed
    # the emulator alone accepts what GCS refuses: the reason for the front (remove it when this fails)
    assert upload(gcs.endpoint, b, "cond/a", b"6", if_generation_match=0)[0] == 200


def test_two_writers_of_one_ocdbt_database_keep_every_key(gcs):
    """Against the emulator alone (TENSORSTORE_GCS_HTTP_URL=gcs.endpoint) this kept 8 or fewer of the 16 keys."""
    import tensorstore as ts

    spec = {"driver": "ocdbt", "base": {"driver": "gcs", "bucket": gcs.bucket, "path": f"ocdbt-{os.getpid()}"}}

    async def writer(who):  # its own context: no cache shared with the other writer, as on another host
        kv = await ts.KvStore.open(spec, context=ts.Context())
        for i in range(8):
            await kv.write(f"{who}/{i}", b"x")

    async def both():
        await asyncio.gather(writer("host0"), writer("host1"))

    asyncio.run(both())
    kept = ts.KvStore.open(spec, context=ts.Context()).result().list().result()
    assert sorted(k.decode() for k in kept) == sorted(f"host{h}/{i}" for h in (0, 1) for i in range(8))
