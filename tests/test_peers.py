"""The real-peer harness works on its own: each peer class against the reference Distribution registry."""
from __future__ import annotations

import json
import os
import ssl

import httpx
import pytest

from tests.images import OCI_MANIFEST, BearerAuth, build_image, build_index, push
from tests.peers import (
    DistributionRegistry,
    MirrorProcess,
    PeerError,
    TokenServer,
    require,
    write_hosts_toml,
    write_self_signed_certificate,
)


@pytest.fixture
def registry(tmp_path):
    """A plain (no auth) Distribution registry."""
    with DistributionRegistry(tmp_path / "registry") as server:
        yield server


@pytest.fixture
def token_registry(tmp_path):
    """A Distribution registry behind a Docker-Hub-like token server."""
    with TokenServer(tmp_path / "token") as tokens, \
            DistributionRegistry(tmp_path / "registry", auth=tokens) as server:
        yield server


def test_require_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require("no-such-peer-program")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        require("/bin/sh", root=True)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        require("no-such-peer-program")


def test_images_are_deterministic_and_valid():
    image = build_image(seed="x")
    assert image == build_image(seed="x") and image.digest != build_image(seed="y").digest
    config = json.loads(image.config.data)
    assert len(config["rootfs"]["diff_ids"]) == len(image.layers) == 2
    index = build_index(seed="x", oci=True)
    assert [entry["platform"]["architecture"] for entry in json.loads(index.manifest.data)["manifests"]] == [
        "amd64", "arm64"]


def test_skopeo_pushes_an_oci_layout_and_copies_it_back(registry, skopeo, tmp_path):
    skopeo.round_trip(build_index(seed="skopeo", oci=True), f"docker://{registry.host}/test/multi:v1", tmp_path)


def test_http_push_and_request_counting(registry):
    image = build_image(seed="count")
    assert push(registry.url, "test/counted", "latest", image) == image.digest
    layer = image.layers[0]
    for _ in range(3):
        assert httpx.get(f"{registry.url}/v2/test/counted/blobs/{layer.digest}").content == layer.data
    assert registry.count_requests("GET", f"/v2/test/counted/blobs/{layer.digest}") == 3
    assert registry.count_requests("PUT", "/v2/test/counted/manifests/latest", status=201) == 1


def test_token_registry_refuses_anonymous_private_pulls(token_registry):
    tokens = token_registry.auth
    public, private = build_image(seed="public"), build_image(seed="private")
    push(token_registry.url, "library/public", "1", public, tokens.username, tokens.password)
    push(token_registry.url, "team/private-app", "1", private, tokens.username, tokens.password)
    with httpx.Client(auth=BearerAuth()) as anonymous:
        assert anonymous.get(f"{token_registry.url}/v2/library/public/manifests/1").status_code == 200
        refused = anonymous.get(f"{token_registry.url}/v2/team/private-app/manifests/1")
        assert refused.status_code == 401 and refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
    with httpx.Client(auth=BearerAuth(tokens.username, tokens.password)) as alice:
        assert alice.get(f"{token_registry.url}/v2/team/private-app/manifests/1").status_code == 200
    with httpx.Client(auth=BearerAuth(tokens.username, "wrong")) as mallory, \
            pytest.raises(httpx.HTTPStatusError):
        mallory.get(f"{token_registry.url}/v2/team/private-app/manifests/1")
    assert {request.status for request in tokens.requests} == {200, 401}
    anonymous_private = [request for request in tokens.requests
                         if request.account is None and any("private" in scope for scope in request.scopes)]
    assert anonymous_private and all(entry["actions"] == [] for entry in anonymous_private[0].access)


def test_proxy_mode_registry_pulls_through(token_registry, tmp_path):
    tokens = token_registry.auth
    image = build_image(seed="proxied")
    push(token_registry.url, "team/private-proxied", "1", image, tokens.username, tokens.password)
    with DistributionRegistry(tmp_path / "proxy", proxy_remote_url=token_registry.url,
                              username=tokens.username, password=tokens.password) as proxy:
        for _ in range(2):
            response = httpx.get(f"{proxy.url}/v2/team/private-proxied/blobs/{image.layers[0].digest}")
            assert response.content == image.layers[0].data
    # Distribution's proxy fetches a cold blob twice: once for the client, once to store it.
    assert token_registry.count_requests("GET", f"/blobs/{image.layers[0].digest}", status=200) in (1, 2)


def test_startup_failure_names_the_log(tmp_path):
    registry = DistributionRegistry(tmp_path / "broken")
    registry.config = lambda: {"version": 0.1, "storage": {"nonexistent-driver": {}}}  # type: ignore[method-assign]
    with pytest.raises(PeerError, match="last lines of"):
        registry.start()
    assert not registry.running()


def test_dockerd_pulls_tags_pushes_saves_and_loads(registry, dockerd, tmp_path):
    image = build_image(seed="dockerd")
    push(registry.url, "test/dockerd", "v1", image)
    dockerd.docker("pull", f"{registry.host}/test/dockerd:v1")
    inspected = json.loads(dockerd.docker("image", "inspect", f"{registry.host}/test/dockerd:v1").stdout)[0]
    assert inspected["RepoDigests"] == [f"{registry.host}/test/dockerd@{image.digest}"]
    assert inspected["RootFS"]["Layers"] == json.loads(image.config.data)["rootfs"]["diff_ids"]
    dockerd.docker("tag", f"{registry.host}/test/dockerd:v1", f"{registry.host}/test/pushed:v2")
    dockerd.docker("push", f"{registry.host}/test/pushed:v2")
    assert registry.count_requests("PUT", "/v2/test/pushed/manifests/v2", status=201) == 1
    dockerd.docker("save", "--output", str(tmp_path / "saved.tar"), f"{registry.host}/test/pushed:v2")
    dockerd.remove_all_images()
    assert "Loaded image" in dockerd.docker("load", "--input", str(tmp_path / "saved.tar")).stdout


def test_dockerd_pulls_docker_hub_names_through_registry_mirrors(registry, dockerd):
    image = build_image(seed="hub")
    push(registry.url, "library/hubimage", "v1", image)
    dockerd.configure({"registry-mirrors": [registry.url]})
    mirrors = dockerd.docker("info", "--format", "{{json .RegistryConfig.Mirrors}}").stdout
    assert json.loads(mirrors) == [registry.url + "/"]
    dockerd.docker("pull", "hubimage:v1")
    assert registry.count_requests("GET", f"/v2/library/hubimage/manifests/{image.digest}", status=200) == 1


def test_dockerd_checks_the_ca_of_a_tls_registry_named_0000(tmp_path, dockerd):
    certificate, key = write_self_signed_certificate(tmp_path / "tls")
    with DistributionRegistry(tmp_path / "registry", tls=(certificate, key)) as registry:
        with httpx.Client(verify=ssl.create_default_context(cafile=certificate)) as client:
            push(registry.url, "test/tls", "v1", build_image(seed="tls"), client=client)
        reference = f"0.0.0.0:{registry.port}/test/tls:v1"
        refused = dockerd.docker("pull", reference, check=False)
        assert refused.returncode != 0 and "certificate signed by unknown authority" in refused.stderr
        dockerd.trust(f"0.0.0.0:{registry.port}", certificate)
        dockerd.docker("pull", reference)


def test_podman_pulls_through_its_registries_conf(registry, podman):
    image = build_image(seed="podman", oci=True)
    push(registry.url, "test/podman", "v1", image)
    podman.write_registries_conf(f'[[registry]]\nprefix = "registry.test"\nlocation = "{registry.host}"\n')
    podman.pull("registry.test/test/podman:v1")
    inspected = json.loads(podman.podman("image", "inspect", "registry.test/test/podman:v1").stdout)[0]
    assert inspected["Digest"] == image.digest


def test_containerd_pulls_through_a_hosts_toml_mirror(registry, containerd, tmp_path):
    index = build_index(seed="containerd")
    push(registry.url, "library/ctr", "v1", index)
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "registry.test", registry.url)
    containerd.pull("registry.test/library/ctr:v1", hosts)
    listed = containerd.ctr("images", "list", "--quiet").stdout.split()
    assert "registry.test/library/ctr:v1" in listed
    assert registry.count_requests("HEAD", "/v2/library/ctr/manifests/v1?ns=registry.test", status=200) == 1


def test_mirror_process_serves_and_restarts_on_its_port(tmp_path):
    image = build_image(seed="mirror", oci=True)
    with MirrorProcess(tmp_path / "mirror", {"upstreams": []}) as mirror:
        push(mirror.url, "test/mirror", "v1", image)
        mirror.stop()
        mirror.start()
        response = httpx.get(f"{mirror.url}/v2/test/mirror/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert response.content == image.manifest.data
    assert not mirror.running()


def test_mirror_process_reports_a_config_error(tmp_path):
    mirror = MirrorProcess(tmp_path / "mirror", {"listen": "not an address"})
    with pytest.raises(PeerError, match="exited while waiting"):
        mirror.start()


def test_peers_cannot_reach_beyond_loopback(dockerd):
    refused = dockerd.docker("pull", "registry.example.com/nothing:1", check=False, timeout=60)
    assert refused.returncode != 0 and "proxyconnect" in refused.stderr
