"""Bundles against real peers: export from a token-auth upstream, skopeo and ``docker load`` read the tar as it
is, and an isolated mirror that imported it serves dockerd (registry-mirrors) and podman (path prefix)."""
from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from mirror.manifest import OCI_MANIFEST
from tests.images import OCI_CONFIG, Blob, Image, build_image, build_index, canonical_json, push
from tests.peers import DistributionRegistry, MirrorProcess, TokenServer
from tests.test_bundle import mirror, write_config

USER, PASSWORD = "alice", "secret"
REFS = ("alpine:3.20", "docker.io/acme/private-app:v1", "docker.io/library/multi:latest", "ghcr.io/org/tool:2.0")


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory):
    """A Docker-Hub-like token-auth upstream (with a private repository) and an anonymous ghcr.io."""
    workdir = tmp_path_factory.mktemp("bundle-upstreams")
    images = {"alpine": build_image("bundle-alpine"), "private": build_image("bundle-private"),
              "multi": build_index("bundle-multi"), "tool": build_image("bundle-tool", oci=True)}
    with TokenServer(workdir / "token", USER, PASSWORD) as tokens, \
            DistributionRegistry(workdir / "hub", auth=tokens) as hub, \
            DistributionRegistry(workdir / "ghcr") as ghcr:
        push(hub.url, "library/alpine", "3.20", images["alpine"], USER, PASSWORD)
        push(hub.url, "acme/private-app", "v1", images["private"], USER, PASSWORD)
        push(hub.url, "library/multi", "latest", images["multi"], USER, PASSWORD)
        push(ghcr.url, "org/tool", "2.0", images["tool"])
        signature = cosign_signature()
        push(ghcr.url, "org/tool", images["tool"].digest.replace(":", "-") + ".sig", signature)
        yield {"hub": hub, "ghcr": ghcr, "tokens": tokens, "images": images, "signature": signature}


def cosign_signature() -> Image:
    """A manifest shaped like a cosign signature (pushed under the ``sha256-<hex>.sig`` tag)."""
    config = Blob(OCI_CONFIG, b"{}")
    payload = Blob("application/vnd.dev.cosign.simplesigning.v1+json", b'{"critical": {"type": "test"}}')
    manifest = Blob(OCI_MANIFEST, canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                                  "config": config.descriptor(), "layers": [payload.descriptor()]}))
    return Image(config, (payload,), manifest, "", "")


@pytest.fixture(scope="module")
def bundle(upstreams, tmp_path_factory):
    """A signed bundle of every test image, exported through the upstreams (nothing in the local store)."""
    workdir = tmp_path_factory.mktemp("bundle-export")
    config = write_config(workdir / "export.yaml", workdir / "empty-store", upstreams=[
        {"name": "docker.io", "url": upstreams["hub"].url, "username": USER, "password": PASSWORD},
        {"name": "ghcr.io", "url": upstreams["ghcr"].url}], default_upstream="docker.io")
    assert mirror("bundle", "keygen", workdir / "key") == 0
    out = workdir / "images.tar"
    assert mirror("bundle", "export", "--config", config, "--output", out, "--sign-key", workdir / "key", *REFS) == 0
    return {"path": out, "pub": workdir / "key.pub"}


def test_export_uses_the_upstream_credentials_and_verifies(upstreams, bundle):
    assert any(request.account == USER for request in upstreams["tokens"].requests)
    assert mirror("bundle", "verify", "--trust", bundle["pub"], bundle["path"]) == 0


def test_skopeo_reads_the_bundle_as_an_oci_archive(upstreams, bundle, skopeo, tmp_path):
    images = upstreams["images"]
    for ref, image in (("docker.io/library/alpine:3.20", images["alpine"]),
                       ("ghcr.io/org/tool:2.0", images["tool"]),
                       ("docker.io/library/multi:latest", images["multi"].images[0])):
        inspected = skopeo.inspect(f"oci-archive:{bundle['path']}:{ref}")
        assert f"TEST_IMAGE_SEED={'bundle-' + ref.split('/')[-1].split(':')[0]}" in inspected["Env"]
        copied = tmp_path / ref.replace("/", "_")
        skopeo.copy(f"oci-archive:{bundle['path']}:{ref}", f"dir:{copied}", all=False)
        assert "sha256:" + hashlib.sha256((copied / "manifest.json").read_bytes()).hexdigest() == image.digest


def test_docker_load_reads_the_bundle(upstreams, bundle, dockerd):
    loaded = dockerd.docker("load", "-i", str(bundle["path"])).stdout
    assert "alpine:3.20" in loaded and "acme/private-app:v1" in loaded and "ghcr.io/org/tool:2.0" in loaded
    inspected = json.loads(dockerd.docker("image", "inspect", "acme/private-app:v1").stdout)
    assert "TEST_IMAGE_SEED=bundle-private" in inspected[0]["Config"]["Env"]


def test_isolated_mirror_serves_an_imported_bundle_to_dockerd_and_podman(upstreams, bundle, dockerd, podman,
                                                                         tmp_path):
    config = {"upstreams": [], "default_upstream": "docker.io"}  # no upstream: docker.io is served from the store
    with MirrorProcess(tmp_path / "isolated", config) as isolated:
        assert mirror("bundle", "import", "--config", isolated.config_path, "--trust", bundle["pub"],
                      bundle["path"]) == 0
        dockerd.configure({"registry-mirrors": [isolated.url]})
        dockerd.docker("pull", "alpine:3.20")
        dockerd.docker("pull", "acme/private-app:v1")
        dockerd.docker("pull", "multi:latest")
        inspected = json.loads(dockerd.docker("image", "inspect", "alpine:3.20").stdout)
        assert inspected[0]["RepoDigests"] == [f"alpine@{upstreams['images']['alpine'].digest}"]
        podman.pull(f"{isolated.host}/ghcr.io/org/tool:2.0")
        tag = upstreams["images"]["tool"].digest.replace(":", "-") + ".sig"
        signature = httpx.get(f"{isolated.url}/v2/ghcr.io/org/tool/manifests/{tag}",
                              headers={"Accept": OCI_MANIFEST}, timeout=30)
        assert signature.status_code == 200 and signature.content == upstreams["signature"].manifest.data
