"""The client configuration snippets in README.md, used as written: dockerd's daemon.json, containerd's
hosts.toml and podman's registries.conf each pull through the mirror."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.images import build_image, push
from tests.peers import DistributionRegistry, MirrorProcess, free_port

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDER = "mirror.example:5000"


def snippet(name: str) -> str:
    """The fenced block that follows ``<!-- snippet: NAME -->`` in README.md."""
    match = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```\w*\n(.*?)```", README.read_text(), re.DOTALL)
    assert match, f"README.md has no snippet {name}"
    return match.group(1)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("snippets")
    with DistributionRegistry(workdir / "upstream") as upstream:
        push(upstream.url, "library/busybox", "1.0", build_image("snippet-busybox", oci=True))
        push(upstream.url, "org/tool", "2.0", build_image("snippet-tool", oci=True))
        config = {"upstreams": [{"name": "docker.io", "url": upstream.url},
                                {"name": "ghcr.io", "url": upstream.url}],
                  "default_upstream": "docker.io"}
        with MirrorProcess(workdir / "mirror", config) as server:
            yield server


def test_daemon_json(dockerd, mirror):
    dockerd.configure(json.loads(snippet("daemon.json").replace(PLACEHOLDER, mirror.host)))
    dockerd.docker("pull", "busybox:1.0")
    assert "/v2/library/busybox/manifests/1.0" in mirror.log()


def test_hosts_toml(containerd, mirror, tmp_path):
    text = snippet("hosts.toml").replace(PLACEHOLDER, mirror.host)
    text = text.replace("https://registry-1.docker.io", f"http://127.0.0.1:{free_port()}")  # never the internet
    (tmp_path / "certs.d" / "docker.io").mkdir(parents=True)
    (tmp_path / "certs.d" / "docker.io" / "hosts.toml").write_text(text)
    containerd.pull("docker.io/library/busybox:1.0", tmp_path / "certs.d")
    assert "ns=docker.io" in mirror.log()


def test_registries_conf(podman, mirror):
    podman.write_registries_conf("unqualified-search-registries = []\n\n" +
                                 snippet("registries.conf").replace(PLACEHOLDER, mirror.host))
    podman.pull("ghcr.io/org/tool:2.0")
    assert "/v2/ghcr.io/org/tool/manifests/2.0" in mirror.log()
