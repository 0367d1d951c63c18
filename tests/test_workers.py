"""Several worker processes sharing the port: uploads and single-flight pull-through work across them."""
from __future__ import annotations

import concurrent.futures
import hashlib
import signal
from pathlib import Path

import httpx

from tests.images import build_image, push
from tests.peers import DistributionRegistry, MirrorProcess


def workers(parent: int) -> list[int]:
    """The child processes of ``parent``."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children]


def test_workers_share_uploads_and_fetch_each_blob_once(tmp_path):
    with DistributionRegistry(tmp_path / "upstream") as upstream:
        big = build_image("workers", layers=1, layer_size=24 * 1024 * 1024)
        push(upstream.url, "org/big", "1", big)
        layer = big.layers[0]
        config = {"workers": 2, "upstreams": [{"name": "ghcr.io", "url": upstream.url}]}
        mirror = MirrorProcess(tmp_path / "mirror", config).start()
        try:
            def fetch(_: int) -> str:
                with httpx.Client(timeout=120) as client:  # a connection each: the kernel spreads them
                    response = client.get(f"{mirror.url}/v2/ghcr.io/org/big/blobs/{layer.digest}")
                    assert response.status_code == 200
                    return "sha256:" + hashlib.sha256(response.content).hexdigest()

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                assert list(pool.map(fetch, range(8))) == [layer.digest] * 8
            assert upstream.count_requests("GET", f"/blobs/{layer.digest}") == 1
            assert len(workers(mirror.pid)) == 2
            # a chunked upload whose chunks land on different connections, so on either worker
            data = bytes(range(256)) * 4096
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            location = httpx.post(f"{mirror.url}/v2/team/app/blobs/uploads/").headers["Location"]
            for start in range(0, len(data), 100_000):
                chunk = data[start:start + 100_000]
                response = httpx.patch(f"{mirror.url}{location}", content=chunk,
                                       headers={"Content-Range": f"{start}-{start + len(chunk) - 1}"})
                assert response.status_code == 202
                location = response.headers["Location"]
            assert httpx.put(f"{mirror.url}{location}", params={"digest": digest}).status_code == 201
            assert httpx.get(f"{mirror.url}/v2/team/app/blobs/{digest}").content == data
            mirror.send_signal(signal.SIGTERM)
            assert mirror.wait(30) == 0
        finally:
            mirror.stop()
