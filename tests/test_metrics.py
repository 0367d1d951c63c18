"""Observability against a real ``mirror serve``: /metrics moving as images are pulled through a real upstream,
/healthz and /readyz, and exactly one structured access log line per request."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client import ProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from mirror.metrics import BootProcessCollector, version
from tests.images import build_image, push
from tests.peers import DistributionRegistry, MirrorProcess, wait_until

UPSTREAM = "upstream.test"


def scrape(mirror: MirrorProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``/metrics``, keyed by name and labels."""
    response = httpx.get(f"{mirror.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def scrape_after(mirror: MirrorProcess, blob_gets: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``/metrics`` once ``blob_gets`` blob GETs were counted (a streamed response is counted just after its
    last byte went out, so the client may ask before)."""
    def counted() -> bool:
        samples = scrape(mirror)
        return value(samples, "mirror_http_requests_total", route="blob", method="GET", status="200") >= blob_gets

    wait_until(counted, 10, f"{blob_gets} blob GETs to be counted")
    return scrape(mirror)


def value(samples: dict, name: str, **labels: str) -> float:
    """One sample's value, 0 when the series does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def pull(mirror: MirrorProcess, repository: str, tag: str) -> int:
    """GET the manifest and every blob of ``repository:tag``; return the bytes received."""
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        manifest = client.get(f"/v2/{repository}/manifests/{tag}",
                              headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        assert manifest.status_code == 200, manifest.text
        received = len(manifest.content)
        for descriptor in [manifest.json()["config"], *manifest.json()["layers"]]:
            blob = client.get(f"/v2/{repository}/blobs/{descriptor['digest']}")
            assert blob.status_code == 200
            received += len(blob.content)
    return received


@pytest.fixture
def upstream(tmp_path):
    """An anonymous Distribution registry holding one image."""
    with DistributionRegistry(tmp_path / "upstream") as registry:
        registry.image = build_image("metrics")
        push(registry.url, "org/tool", "1.0", registry.image)
        yield registry


def test_metrics_count_misses_then_hits_upstream_latency_and_errors(tmp_path, upstream):
    image = upstream.image
    config = {"upstreams": [{"name": UPSTREAM, "url": upstream.url, "manifest_ttl": "1h", "timeout": 5}]}
    image_bytes = image.manifest.size + sum(blob.size for blob in image.blobs)
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        assert pull(mirror, f"{UPSTREAM}/org/tool", "1.0") == image_bytes
        cold = scrape_after(mirror, len(image.blobs))
        assert value(cold, "mirror_cache_requests_total", kind="manifest", result="miss", upstream=UPSTREAM) == 1
        assert value(cold, "mirror_cache_requests_total", kind="blob", result="miss", upstream=UPSTREAM) == len(
            image.blobs)
        assert value(cold, "mirror_cache_requests_total", kind="blob", result="hit", upstream=UPSTREAM) == 0
        assert value(cold, "mirror_cache_response_bytes_total", kind="blob", result="miss", upstream=UPSTREAM) == (
            image_bytes - image.manifest.size)
        assert value(cold, "mirror_cache_saved_bytes_total", upstream=UPSTREAM) == 0
        assert value(cold, "mirror_upstream_request_duration_seconds_count", upstream=UPSTREAM) >= 1 + len(image.blobs)
        assert value(cold, "mirror_store_blobs") == len(image.blobs) + 1  # and the manifest
        assert value(cold, "mirror_store_blob_bytes") == image_bytes

        assert pull(mirror, f"{UPSTREAM}/org/tool", "1.0") == image_bytes
        warm = scrape_after(mirror, 2 * len(image.blobs))
        assert value(warm, "mirror_cache_requests_total", kind="manifest", result="hit", upstream=UPSTREAM) == 1
        assert value(warm, "mirror_cache_requests_total", kind="blob", result="hit", upstream=UPSTREAM) == len(
            image.blobs)
        assert value(warm, "mirror_cache_response_bytes_total", kind="manifest", result="hit", upstream=UPSTREAM) == (
            image.manifest.size)
        assert value(warm, "mirror_cache_saved_bytes_total", upstream=UPSTREAM) == image_bytes
        assert value(warm, "mirror_http_requests_total", route="blob", method="GET", status="200") == 2 * len(
            image.blobs)
        assert value(warm, "mirror_http_response_bytes_total", route="blob") == 2 * (image_bytes - image.manifest.size)
        assert value(warm, "mirror_upstream_request_duration_seconds_count", upstream=UPSTREAM) == value(
            cold, "mirror_upstream_request_duration_seconds_count", upstream=UPSTREAM)  # nothing asked upstream
        assert value(warm, "mirror_upstream_errors_total", upstream=UPSTREAM, reason="connection") == 0

        upstream.stop()
        missing = httpx.get(f"{mirror.url}/v2/{UPSTREAM}/org/other/manifests/1.0", timeout=30)
        assert missing.status_code >= 400
        down = scrape(mirror)
        assert value(down, "mirror_upstream_errors_total", upstream=UPSTREAM, reason="connection") >= 1
        assert value(down, "mirror_cache_requests_total", kind="manifest", result="hit", upstream=UPSTREAM) == 1


def test_evictions_are_counted(tmp_path, upstream):
    config = {"upstreams": [{"name": UPSTREAM, "url": upstream.url}],
              "storage": {"max_cache_size": upstream.image.layers[0].size}}
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        pull(mirror, f"{UPSTREAM}/org/tool", "1.0")
        samples = scrape(mirror)
    assert value(samples, "mirror_cache_evictions_total") >= 1
    assert value(samples, "mirror_cache_evicted_bytes_total") >= upstream.image.config.size


def test_one_process_exposes_its_own_process_metrics_and_the_version(tmp_path):
    with MirrorProcess(tmp_path / "mirror", {"upstreams": []}) as mirror:
        samples = scrape(mirror)
        rss = int(Path(f"/proc/{mirror.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert value(samples, "mirror_build_info", version=version()) == 1
    assert value(samples, "process_resident_memory_bytes") == pytest.approx(rss, rel=0.2)
    assert value(samples, "process_open_fds") > 0


def test_process_metrics_also_where_proc_stat_is_hidden(tmp_path):
    """systemd's ``ProcSubset=pid`` (mirror.service) hides ``/proc/stat``, where the boot time is read."""
    (tmp_path / str(os.getpid())).symlink_to(f"/proc/{os.getpid()}")  # a /proc holding only this process
    hidden = {family.name: family.samples[0].value
              for family in BootProcessCollector(pid=os.getpid, proc=str(tmp_path), registry=None).collect()}
    full = {family.name: family.samples[0].value for family in ProcessCollector(registry=None).collect()}
    assert hidden["process_resident_memory_bytes"] > 0
    assert hidden["process_start_time_seconds"] == pytest.approx(full["process_start_time_seconds"], abs=1.5)


def test_health_and_readiness(tmp_path):
    with MirrorProcess(tmp_path / "mirror", {"upstreams": []}) as mirror:
        assert httpx.get(f"{mirror.url}/healthz").json() == {"status": "ok"}
        ready = httpx.get(f"{mirror.url}/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        state = tmp_path / "mirror" / "store" / "state"
        state.rename(state.with_name("state-moved"))
        state.write_text("not a directory: nothing can be written under state/")  # fails as root too
        try:
            unready = httpx.get(f"{mirror.url}/readyz")
            assert httpx.get(f"{mirror.url}/healthz").status_code == 200
        finally:
            state.unlink()
            state.with_name("state-moved").rename(state)
        assert httpx.get(f"{mirror.url}/readyz").status_code == 200
    assert unready.status_code == 503
    assert unready.json()["status"] == "unready" and "not writable" in unready.json()["reason"]
    assert str(tmp_path) not in unready.json()["reason"]


def access_lines(mirror: MirrorProcess, marker: str) -> list[dict]:
    """The JSON access log records whose path contains ``marker``."""
    records = [json.loads(line) for line in mirror.log().splitlines() if line.startswith("{")]
    return [record for record in records if record["logger"] == "mirror.access" and marker in record["path"]]


def test_one_structured_log_line_per_request(tmp_path):
    repository = f"logs/{uuid.uuid4().hex[:12]}"
    image = build_image("logs")
    layer = image.layers[0]
    with MirrorProcess(tmp_path / "mirror", {"upstreams": []}) as mirror:
        push(mirror.url, repository, "v1", image)
        # a line is written just after its response is sent: wait for the push's last one
        wait_until(lambda: any(r["method"] == "PUT" and r["path"].endswith("/manifests/v1")
                               for r in access_lines(mirror, repository)), 10, "the push to be logged")
        pushed = len(access_lines(mirror, repository))
        with httpx.Client(base_url=f"{mirror.url}/v2/{repository}", headers={"User-Agent": "log-test"}) as client:
            assert client.get("/manifests/v1").status_code == 200
            assert client.head("/manifests/v1").status_code == 200
            assert client.get(f"/blobs/{layer.digest}", headers={"Range": "bytes=0-99"}).status_code == 206
            assert client.get("/manifests/missing").status_code == 404
            assert client.put("/manifests/v2", content=b"{", headers={"Content-Type": image.manifest.media_type},
                              ).status_code == 400
            assert client.get("/tags/list", params={"n": "1"}).status_code == 200
    log = mirror.log()  # complete now that the server stopped
    records = access_lines(mirror, repository)[pushed:]
    assert [(r["method"], r["path"].removeprefix(f"/v2/{repository}"), r["status"]) for r in records] == [
        ("GET", "/manifests/v1", 200), ("HEAD", "/manifests/v1", 200), ("GET", f"/blobs/{layer.digest}", 206),
        ("GET", "/manifests/missing", 404), ("PUT", "/manifests/v2", 400), ("GET", "/tags/list", 200)]
    get, head, blob, missing, bad, tags = records
    assert get["bytes"] == image.manifest.size and get["cache"] == "hosted" and get["route"] == "manifest"
    assert all(record["upstream"] is None for record in records)  # hosted content, or none
    assert head["bytes"] == 0 and head["cache"] == "hosted"
    assert blob["bytes"] == 100 and blob["cache"] == "hosted"
    assert missing["cache"] is None and "missing" in missing["error"] and missing["level"] == "warning"
    assert bad["error"] and bad["cache"] is None
    assert tags["query"] == "n=1" and tags["cache"] is None
    for record in records:
        assert record["client"] == "127.0.0.1" and record["user"] is None and record["duration_ms"] >= 0
    # nothing else is logged about these requests: no Tornado access line, no separate error line
    assert sum(f"/v2/{repository}/" in line for line in log.splitlines()) == len(access_lines(mirror, repository))
    assert "tornado.access" not in log
