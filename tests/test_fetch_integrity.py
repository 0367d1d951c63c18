"""Bytes of a fetch that does not verify reach no client as a complete response: not through another worker
that follows the fetch, and not as a range that ends before the blob's last byte."""
from __future__ import annotations

import asyncio
import hashlib

import httpx
import pytest

from mirror import storage
from mirror.digest import Digest
from mirror.errors import UpstreamUnavailable
from mirror.fetch import FetchFollower
from tests.peers import MirrorProcess
from tests.scripted import Answer, ScriptedUpstream, http

GOOD = bytes(range(256)) * 4096  # 1 MiB
BAD = bytes(reversed(GOOD))
DIGEST = "sha256:" + hashlib.sha256(GOOD).hexdigest()


def test_a_follower_of_a_failed_fetch_does_not_complete_when_another_fetch_commits(tmp_path):
    store = storage.open(tmp_path)
    digest = Digest.parse(DIGEST)
    claim = store.claim_fetch(digest)
    writer = store.blobs.writer()
    writer.write(BAD)  # what a corrupt upstream sent; this fetch will fail
    claim.publish(writer, len(GOOD))

    async def follow() -> bytes:
        foreign = await store.join_fetch(digest)
        received = bytearray()
        chunks = FetchFollower(foreign).chunks(0, None)
        received += await anext(chunks)  # everything but the last byte is released before verification
        writer.cancel()  # the fetch failed ...
        claim.release()
        retry = store.blobs.writer()  # ... and a retry by another worker committed the right bytes
        retry.write(GOOD)
        retry.commit(digest)
        async for chunk in chunks:
            received += chunk
        return bytes(received)

    with pytest.raises(UpstreamUnavailable):
        asyncio.run(follow())
    assert store.blobs.read(digest) == GOOD


def corrupt(method: str, path: str, headers: dict[str, str]) -> Answer:
    """A registry that sends the wrong bytes for every blob, slowly enough (2 MiB/s) that a client's range is
    answered before the fetch ends."""
    if "/blobs/" in path:
        return Answer(http(200, length=len(BAD)), BAD, 2 << 20)
    return Answer(http(200 if path == "/v2/" else 404, b"{}"))


def test_a_range_of_an_uncached_blob_that_fails_to_verify_is_never_a_clean_206(tmp_path):
    upstream = ScriptedUpstream(corrupt)
    config = {"upstreams": [{"name": "corrupt.example", "url": upstream.url}], "default_upstream": None}
    try:
        with MirrorProcess(tmp_path / "mirror", config) as server:
            url = f"{server.url}/v2/corrupt.example/app/blobs/{DIGEST}"
            with pytest.raises(httpx.HTTPError):  # the connection is cut before the range's last byte
                response = httpx.get(url, headers={"Range": "bytes=0-9"}, timeout=30)
                assert response.status_code != 206 or response.content != GOOD[:10], "a clean 206 of bad bytes"
                raise AssertionError(f"answered {response.status_code} {response.content[:40]!r}")
            assert httpx.get(f"{server.url}/v2/", timeout=10).status_code == 200  # and it stays up
    finally:
        upstream.close()
