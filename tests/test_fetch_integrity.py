"""Bytes of a fetch that does not verify reach no client as a complete response: not through another worker
that follows the fetch, and not as a range that ends before the blob's last byte."""
from __future__ import annotations

import asyncio
import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from mirror import storage
from mirror.digest import Digest
from mirror.errors import UpstreamUnavailable
from mirror.fetch import FetchFollower
from tests.peers import MirrorProcess

GOOD = bytes(range(256)) * 4096  # 1 MiB
BAD = bytes(reversed(GOOD))
DIGEST = "sha256:" + hashlib.sha256(GOOD).hexdigest()


def test_a_follower_of_a_failed_fetch_does_not_complete_when_another_fetch_commits(tmp_path):
    store = storage.open(tmp_path)
    digest = Digest.parse(DIGEST)
    claim = store.claim_fetch(digest)
    writer = store.blobs.writer()
    writer.write(BAD)  # what a corrupt upstream sent; this fetch will fail
    claim.publish(writer.id, len(GOOD))

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


class CorruptUpstream:
    """A loopback registry that answers every blob GET with the wrong bytes for ``DIGEST``, slowly enough that a
    client's range is answered before the fetch ends."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @staticmethod
    def _handler() -> type[BaseHTTPRequestHandler]:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
                body = BAD if "/blobs/" in self.path else b"{}"
                self.send_response(200 if self.path == "/v2/" or "/blobs/" in self.path else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for offset in range(0, len(body), 64 << 10):
                    self.wfile.write(body[offset:offset + (64 << 10)])
                    self.wfile.flush()
                    threading.Event().wait(0.02)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def test_a_range_of_an_uncached_blob_that_fails_to_verify_is_never_a_clean_206(tmp_path):
    upstream = CorruptUpstream()
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
