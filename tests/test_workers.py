"""Several worker processes sharing the port: uploads, single-flight pull-through and /metrics work across them."""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import tempfile
from pathlib import Path

import httpx

from mirror.metrics import version
from tests.images import build_image, push
from tests.peers import DistributionRegistry, MirrorProcess, wait_until
from tests.test_metrics import pull, scrape, value

UPSTREAM = "ghcr.io"


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


def counted(mirror: MirrorProcess, pings: int, blob_gets: int) -> bool:
    """Whether a scrape of ``/metrics`` counts ``pings`` ``GET /healthz`` and ``blob_gets`` blob GETs (a request
    is counted just after its response went out, so the client may ask before)."""
    samples = scrape(mirror)
    return (value(samples, "mirror_http_requests_total", route="health", method="GET", status="200") == pings
            and value(samples, "mirror_http_requests_total", route="blob", method="GET", status="200") == blob_gets)


def ping(mirror: MirrorProcess, times: int) -> None:
    """``GET /healthz`` ``times`` times, each on a connection of its own (the kernel spreads them over the workers)."""
    for _ in range(times):
        assert httpx.get(f"{mirror.url}/healthz").status_code == 200


def test_every_scrape_counts_the_requests_of_every_worker(tmp_path):
    with DistributionRegistry(tmp_path / "upstream") as upstream:
        image = build_image("scrape")
        push(upstream.url, "org/tool", "1.0", image)
        config = {"workers": 2, "upstreams": [{"name": UPSTREAM, "url": upstream.url}]}
        with MirrorProcess(tmp_path / "mirror", config) as mirror:
            ping(mirror, 30)
            image_bytes = pull(mirror, f"{UPSTREAM}/org/tool", "1.0")
            pull(mirror, f"{UPSTREAM}/org/tool", "1.0")
            blob_gets = 2 * len(image.blobs)
            wait_until(lambda: counted(mirror, 30, blob_gets), 10, "the requests to be counted")
            first = [scrape(mirror) for _ in range(16)]

            # a worker that dies takes nothing away: its counts stay in the sum, the supervisor starts another
            killed = workers(mirror.pid)[0]
            os.kill(killed, signal.SIGKILL)
            wait_until(lambda: len(workers(mirror.pid)) == 2 and killed not in workers(mirror.pid), 30,
                       "a new worker")
            ping(mirror, 10)
            wait_until(lambda: counted(mirror, 40, blob_gets), 10, "the requests to be counted")
            second = [scrape(mirror) for _ in range(16)]
            pids = {str(pid) for pid in [mirror.pid, *workers(mirror.pid)]}
            metrics_dir = next(Path(tempfile.gettempdir()).glob(f"mirror-metrics-*/counter_{killed}.db")).parent
            mirror.send_signal(signal.SIGTERM)
            assert mirror.wait(30) == 0

    readings = [value(samples, "mirror_http_requests_total", route="health", method="GET", status="200")
                for samples in first + second]
    assert readings == [30] * 16 + [40] * 16
    assert [value(samples, "mirror_http_requests_total", route="blob", method="GET", status="200")
            for samples in first + second] == [blob_gets] * 32
    last = second[-1]
    for kind, count in (("manifest", 1), ("blob", len(image.blobs))):
        for result in ("miss", "hit"):
            assert value(last, "mirror_cache_requests_total", kind=kind, result=result, upstream=UPSTREAM) == count
    assert value(last, "mirror_cache_saved_bytes_total", upstream=UPSTREAM) == image_bytes
    assert value(last, "mirror_build_info", version=version()) == 1
    # the supervisor's and each live worker's memory, by pid
    rss = {dict(labels)["pid"]: sample for (name, labels), sample in last.items()
           if name == "process_resident_memory_bytes"}
    assert set(rss) == pids and all(size > 1 << 20 for size in rss.values())
    assert not metrics_dir.exists()  # removed when the service stopped
