"""Pull-through caching against real upstreams: a Docker-Hub-like registry behind bearer-token auth
(``docker.io``) and an anonymous one (``ghcr.io``), pulled by dockerd, containerd, podman and plain HTTP."""
from __future__ import annotations

import concurrent.futures
import hashlib
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mirror import storage
from mirror.digest import Digest
from tests.images import build_image, build_index, push
from tests.peers import DistributionRegistry, MirrorProcess, TokenServer, require, wait_until, write_hosts_toml

USER, PASSWORD = "alice", "secret"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A token-auth upstream standing in for Docker Hub, with a public and a private image."""
    workdir = tmp_path_factory.mktemp("hub")
    with TokenServer(workdir / "token", USER, PASSWORD) as tokens, DistributionRegistry(workdir, auth=tokens) as hub:
        hub.tokens = tokens
        push(hub.url, "library/busybox", "1.0", build_image("busybox"), USER, PASSWORD)
        push(hub.url, "acme/private-app", "v1", build_image("private"), USER, PASSWORD)
        push(hub.url, "library/multi", "latest", build_index("multi"), USER, PASSWORD)
        yield hub


@pytest.fixture(scope="module")
def ghcr(tmp_path_factory):
    """An anonymous upstream standing in for ghcr.io."""
    with DistributionRegistry(tmp_path_factory.mktemp("ghcr")) as registry:
        push(registry.url, "org/tool", "2.0", build_image("tool"))
        yield registry


def mirror_config(hub, ghcr, **storage):
    return {"upstreams": [
        {"name": "docker.io", "url": hub.url, "username": USER, "password": PASSWORD, "manifest_ttl": 1},
        {"name": "ghcr.io", "url": ghcr.url, "manifest_ttl": "5m"},
    ], "default_upstream": "docker.io", "storage": storage}


@pytest.fixture
def mirror(tmp_path, hub, ghcr):
    with MirrorProcess(tmp_path / "mirror", mirror_config(hub, ghcr)) as server:
        yield server


def blob_gets(registry: DistributionRegistry, digest: str) -> int:
    return registry.count_requests("GET", f"/blobs/{digest}", status=200)


def test_dockerd_pulls_public_and_private_images_through_registry_mirrors(dockerd, mirror, hub):
    dockerd.configure({"registry-mirrors": [mirror.url]})
    dockerd.docker("pull", "busybox:1.0")
    dockerd.docker("pull", "acme/private-app:v1")
    inspected = dockerd.docker("image", "inspect", "acme/private-app:v1").stdout
    assert '"TEST_IMAGE_SEED=private"' in inspected
    assert any(request.account == USER for request in hub.tokens.requests)
    assert hub.count_requests("GET", "/v2/acme/private-app/manifests/v1", status=200) == 1


def test_three_routes_share_one_cache_entry(mirror, ghcr, podman, containerd, tmp_path):
    image = build_image("tool")
    layer = image.layers[0].digest
    # path prefix, as podman and `docker pull mirror/ghcr.io/...` ask
    podman.pull(f"{mirror.host}/ghcr.io/org/tool:2.0")
    assert blob_gets(ghcr, layer) == 1
    # ?ns=ghcr.io, as containerd asks
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "ghcr.io", mirror.url)
    containerd.pull("ghcr.io/org/tool:2.0", hosts)
    # the path form and ns form reach the same store repository: no new upstream blob GET
    with httpx.Client(base_url=mirror.url) as client:
        assert client.get(f"/v2/org/tool/blobs/{layer}", params={"ns": "ghcr.io"}).status_code == 200
        assert client.get(f"/v2/ghcr.io/org/tool/blobs/{layer}").content == image.layers[0].data
    assert blob_gets(ghcr, layer) == 1
    assert "/v2/ghcr.io/org/tool" in mirror.log() and "ns=ghcr.io" in mirror.log()


def test_default_route_goes_to_default_upstream(mirror, hub):
    image = build_image("busybox")
    with httpx.Client(base_url=mirror.url) as client:
        response = client.get("/v2/library/busybox/manifests/1.0",
                              headers={"Accept": image.manifest.media_type})
        assert response.status_code == 200 and response.content == image.manifest.data
        # docker.io's implicit library/ prefix
        assert client.get("/v2/docker.io/busybox/manifests/1.0").content == image.manifest.data


def test_concurrent_cold_gets_of_one_blob_cost_one_upstream_get(tmp_path, ghcr, hub):
    big = build_image("big", layers=1, layer_size=48 * 1024 * 1024)
    push(ghcr.url, "org/big", "1", big)
    layer = big.layers[0]
    with MirrorProcess(tmp_path / "mirror", mirror_config(hub, ghcr)) as mirror:
        def fetch(_: int) -> str:
            with httpx.Client(timeout=120) as client:
                response = client.get(f"{mirror.url}/v2/ghcr.io/org/big/blobs/{layer.digest}")
                assert response.status_code == 200
                return "sha256:" + hashlib.sha256(response.content).hexdigest()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            digests = list(pool.map(fetch, range(8)))
    assert digests == [layer.digest] * 8
    assert ghcr.count_requests("GET", f"/blobs/{layer.digest}") == 1


def test_offline_upstream_serves_cached_and_fails_fast_for_uncached(tmp_path, dockerd):
    with DistributionRegistry(tmp_path / "upstream") as upstream:
        push(upstream.url, "library/cached", "1", build_image("cached"))
        push(upstream.url, "library/never", "1", build_image("never"))
        config = {"upstreams": [{"name": "docker.io", "url": upstream.url, "manifest_ttl": 0}],
                  "default_upstream": "docker.io"}
        with MirrorProcess(tmp_path / "mirror", config) as mirror:
            dockerd.configure({"registry-mirrors": [mirror.url]})
            dockerd.docker("pull", "cached:1")
            dockerd.remove_all_images()
            upstream.stop()
            dockerd.docker("pull", "cached:1")
            started = time.monotonic()
            with httpx.Client(base_url=mirror.url, timeout=60) as client:
                response = client.get("/v2/library/never/manifests/1")
            assert response.status_code == 503
            assert response.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert time.monotonic() - started < 30  # "fails fast": far below docker's own minutes-long timeout


def test_mirror_starts_with_no_upstream_reachable(tmp_path):
    config = {"upstreams": [{"name": "docker.io", "url": "http://127.0.0.1:9"}], "default_upstream": "docker.io"}
    with MirrorProcess(tmp_path / "mirror", config) as mirror, httpx.Client(base_url=mirror.url) as client:
        assert client.get("/v2/").status_code == 200
        assert client.get("/v2/library/x/manifests/1").status_code == 503


def test_moved_tag_is_seen_after_its_ttl(mirror, hub):
    first, second = build_image("moving-1"), build_image("moving-2")
    push(hub.url, "library/moving", "v", first, USER, PASSWORD)
    with httpx.Client(base_url=mirror.url) as client:
        assert client.get("/v2/library/moving/manifests/v").content == first.manifest.data
        push(hub.url, "library/moving", "v", second, USER, PASSWORD)
        time.sleep(2.0)  # manifest_ttl is 1 s: "within its TTL plus a second"
        assert client.get("/v2/library/moving/manifests/v").content == second.manifest.data


def test_cached_tag_within_ttl_does_not_touch_upstream(mirror, ghcr):
    with httpx.Client(base_url=mirror.url) as client:
        client.get("/v2/ghcr.io/org/tool/manifests/2.0")
        before = ghcr.count_requests("HEAD", "/v2/org/tool/manifests/2.0") + \
            ghcr.count_requests("GET", "/v2/org/tool/manifests/2.0")
        for _ in range(5):
            assert client.get("/v2/ghcr.io/org/tool/manifests/2.0").status_code == 200
    after = ghcr.count_requests("HEAD", "/v2/org/tool/manifests/2.0") + \
        ghcr.count_requests("GET", "/v2/org/tool/manifests/2.0")
    assert after == before


def test_corrupt_upstream_bytes_are_never_delivered_whole_nor_cached(tmp_path, hub, ghcr):
    image = build_image("corrupt", layers=1, layer_size=256 * 1024)
    push(ghcr.url, "org/corrupt", "1", image)
    layer = image.layers[0].digest
    data_file = Path(ghcr.workdir, "data/docker/registry/v2/blobs/sha256", layer[7:9], layer[7:], "data")
    original = data_file.read_bytes()
    data_file.write_bytes(original[:1000] + bytes([original[1000] ^ 0xFF]) + original[1001:])
    try:
        with MirrorProcess(tmp_path / "mirror", mirror_config(hub, ghcr)) as mirror:
            with pytest.raises(httpx.HTTPError), httpx.Client(timeout=30) as client:
                response = client.get(f"{mirror.url}/v2/ghcr.io/org/corrupt/blobs/{layer}")
                response.raise_for_status()  # only reached if the transfer completed
            assert not Path(mirror.workdir, "store/blobs/sha256", layer[7:9], layer[7:]).exists()
            with httpx.Client(timeout=30) as client:
                assert client.get(f"{mirror.url}/v2/").status_code == 200
    finally:
        data_file.write_bytes(original)


def test_a_full_disk_aborts_the_fetch_and_the_store_stays_consistent(tmp_path, hub, ghcr):
    mount = require("mount", root=True)
    image = build_image("too-big", layers=1, layer_size=24 * 1024 * 1024)
    push(ghcr.url, "org/too-big", "1", image)
    layer, store = image.layers[0].digest, tmp_path / "small-disk"
    store.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(store)], check=True)
    try:
        with MirrorProcess(tmp_path / "mirror", mirror_config(hub, ghcr, root=str(store))) as mirror:
            with pytest.raises(httpx.HTTPError), httpx.Client(timeout=30) as client:
                client.get(f"{mirror.url}/v2/ghcr.io/org/too-big/blobs/{layer}").raise_for_status()
            assert "no space left in the store" in mirror.log()
            with httpx.Client(timeout=30) as client:
                assert client.get(f"{mirror.url}/v2/ghcr.io/org/tool/manifests/2.0").status_code == 200
            assert not (store / "blobs/sha256" / layer[7:9] / layer[7:]).exists()
            wait_until(lambda: not any((store / "uploads").iterdir()), 10, "the failed fetch's session to go")
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_head_and_range_on_uncached_blob(mirror, ghcr):
    image = build_image("ranges", layers=1, layer_size=200_000)
    push(ghcr.url, "org/ranges", "1", image)
    layer = image.layers[0]
    with httpx.Client(base_url=mirror.url) as client:
        head = client.head(f"/v2/ghcr.io/org/ranges/blobs/{layer.digest}")
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(layer.data)
        part = client.get(f"/v2/ghcr.io/org/ranges/blobs/{layer.digest}", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == layer.data[100:200]


def test_multi_arch_index_cached_whole_children_on_demand(mirror):
    index = build_index("multi")
    with httpx.Client(base_url=mirror.url) as client:
        got = client.get("/v2/library/multi/manifests/latest")
        assert got.content == index.manifest.data
        child = index.images[1]
        assert client.get(f"/v2/library/multi/manifests/{child.digest}").content == child.manifest.data


def test_eviction_keeps_the_cache_under_its_bound_and_pinned_content(tmp_path, hub, ghcr):
    images = [build_image(f"evict-{n}", layers=1, layer_size=400_000) for n in range(4)]
    for n, image in enumerate(images):
        push(ghcr.url, f"org/evict{n}", "1", image)
    bound = 1_000_000
    with MirrorProcess(tmp_path / "mirror", mirror_config(hub, ghcr, max_cache_size=bound)) as mirror, \
            httpx.Client(base_url=mirror.url, timeout=30) as client:
        hosted = build_image("hosted", layers=1, layer_size=400_000)
        push(mirror.url, "team/app", "1", hosted)
        pinned = images[0].layers[0]  # as a bundle import pins what it brings
        assert client.get(f"/v2/ghcr.io/org/evict0/blobs/{pinned.digest}").status_code == 200
        storage.open(Path(mirror.workdir, "store")).pins.pin(Digest.parse(pinned.digest))
        for n, image in enumerate(images):
            for blob in image.blobs:
                assert client.get(f"/v2/ghcr.io/org/evict{n}/blobs/{blob.digest}").status_code == 200
        store = Path(mirror.workdir, "store/blobs")
        last = images[-1].layers[0].digest  # delivered once verified; its commit may still be under way
        wait_until(lambda: (store / "sha256" / last[7:9] / last[7:]).exists(), 30, "the last commit")
        cached = [blob for image in images for blob in image.blobs
                  if (store / "sha256" / blob.digest[7:9] / blob.digest[7:]).exists()]
        assert pinned in cached  # never evicted, and not counted against the bound
        assert sum(b.size for b in cached if b != pinned) <= bound
        assert images[-1].layers[0] in cached  # the most recently used stays
        assert client.get(f"/v2/team/app/blobs/{hosted.layers[0].digest}").content == hosted.layers[0].data
        # an evicted blob comes back from upstream on demand
        evicted = next(blob for blob in images[1].blobs if blob not in cached)
        assert client.get(f"/v2/ghcr.io/org/evict1/blobs/{evicted.digest}").content == evicted.data


def test_push_into_a_mirrored_repository_is_refused(mirror):
    with httpx.Client(base_url=mirror.url) as client:
        response = client.post("/v2/docker.io/library/busybox/blobs/uploads/")
        assert response.status_code == 405
        assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
        assert client.post("/v2/myteam/app/blobs/uploads/").status_code == 202


def test_hosted_content_is_served_before_upstream(mirror, hub):
    local = build_image("local-busybox")
    push(mirror.url, "library/busybox", "1.0", local)
    with httpx.Client(base_url=mirror.url) as client:
        assert client.get("/v2/library/busybox/manifests/1.0").content == local.manifest.data


def test_prefetch_warms_the_cache(tmp_path, hub, ghcr):
    image = build_image("tool")
    with MirrorProcess(tmp_path / "mirror", mirror_config(hub, ghcr)) as mirror:
        result = mirror.run_cli("prefetch", "ghcr.io/org/tool:2.0", "busybox:1.0")
        assert result.returncode == 0, result.stderr
        before = blob_gets(ghcr, image.layers[0].digest)
        with httpx.Client(base_url=mirror.url) as client:
            got = client.get(f"/v2/ghcr.io/org/tool/blobs/{image.layers[0].digest}")
            assert got.content == image.layers[0].data
        assert blob_gets(ghcr, image.layers[0].digest) == before
