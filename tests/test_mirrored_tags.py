"""Tag lists of mirrored repositories against a real Distribution registry: the upstream's list through every
route (the default route's merged with the hosted tags of the name), kept in the store for ``manifest_ttl``,
merged with the tags of cached manifests, and served as last listed while the upstream is hung (SIGSTOP)."""
from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.images import build_image, push
from tests.peers import DistributionRegistry, MirrorProcess

TAGS = ["1.0", "1.1", "2.0", "latest"]
FAST = 0.1  # seconds: "at once"


@pytest.fixture
def registry(tmp_path) -> Iterator[DistributionRegistry]:
    """An upstream with library/app tagged ``TAGS``."""
    with DistributionRegistry(tmp_path / "upstream") as upstream:
        for tag in TAGS:
            push(upstream.url, "library/app", tag, build_image(f"app-{tag}"))
        yield upstream


@pytest.fixture
def mirror(tmp_path, registry) -> Iterator[MirrorProcess]:
    """``mirror serve`` with the registry as docker.io (``manifest_ttl: 1``, ``timeout: 2s``, pushes allowed) and as
    ghcr.io (``manifest_ttl: 5m``), and a hosted tag ``local`` of library/app (the default route's)."""
    config = {"upstreams": [
        {"name": "docker.io", "url": registry.url, "manifest_ttl": 1, "timeout": "2s", "allow_push": True},
        {"name": "ghcr.io", "url": registry.url, "manifest_ttl": "5m", "timeout": "2s"}],
        "default_upstream": "docker.io"}
    with MirrorProcess(tmp_path / "mirror", config) as server:
        push(server.url, "library/app", "local", build_image("hosted"))
        yield server


def listed(client: httpx.Client, path: str, **params: str) -> list[str]:
    """The tags ``GET /v2/<path>/tags/list`` answers."""
    response = client.get(f"/v2/{path}/tags/list", params=params)
    assert response.status_code == 200, response.text
    return response.json()["tags"]


def test_the_upstreams_tags_through_the_prefix_ns_and_the_default_route_merged_with_hosted_tags(mirror, registry):
    upstream = httpx.get(f"{registry.url}/v2/library/app/tags/list").json()["tags"]
    assert sorted(upstream) == TAGS
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        assert listed(client, "docker.io/library/app") == TAGS
        assert listed(client, "docker.io/app") == TAGS  # Docker Hub's implicit library/
        assert listed(client, "library/app", ns="docker.io") == TAGS
        assert listed(client, "library/app") == sorted([*TAGS, "local"])
        assert listed(client, "library/app", n="2") == ["1.0", "1.1"]
        assert listed(client, "library/app", n="2", last="2.0") == ["latest", "local"]


def test_a_listing_is_kept_for_manifest_ttl_and_merged_with_cached_tags(mirror, registry):
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        assert listed(client, "ghcr.io/library/app") == TAGS
        push(registry.url, "library/app", "3.0", build_image("app-3.0"))
        assert listed(client, "ghcr.io/library/app") == TAGS  # within its 5 minutes: not asked again
        assert registry.count_requests("GET", "/v2/library/app/tags/list") == 1
        time.sleep(1.1)  # docker.io's manifest_ttl
        assert listed(client, "docker.io/library/app") == sorted([*TAGS, "3.0"])
        push(mirror.url, "docker.io/library/app", "pushed", build_image("pushed"))  # allow_push: a cached tag
        assert listed(client, "docker.io/library/app") == sorted([*TAGS, "3.0", "pushed"])
        assert "pushed" not in httpx.get(f"{registry.url}/v2/library/app/tags/list").json()["tags"]


def test_the_last_listing_is_served_while_the_upstream_is_hung(mirror, registry):
    routes = [("docker.io/library/app", {}), ("library/app", {"ns": "docker.io"}), ("library/app", {})]
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        before = [listed(client, path, **params) for path, params in routes]
        time.sleep(1.1)  # past the manifest_ttl: the next listing asks the upstream
        registry.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            first = listed(client, "docker.io/library/app")  # waits for the timeout once
            waited = time.monotonic() - started
            during, took = [], []
            for path, params in routes:
                started = time.monotonic()
                during.append(listed(client, path, **params))
                took.append(time.monotonic() - started)
        finally:
            registry.send_signal(signal.SIGCONT)
    print(f"tag lists with the upstream hung: first {waited:.2f} s, then "
          f"{', '.join(f'{seconds * 1000:.1f} ms' for seconds in took)}")
    assert first == before[0] == TAGS and during == before
    assert max(took) < FAST, took
