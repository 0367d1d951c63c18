"""The signature policy enforced on manifest GETs of a real ``mirror serve``, pulling through a real Distribution
registry: signed images are served, unsigned ones refused before any blob is fetched; warn mode; reload."""
from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from mirror import storage
from mirror.registry import Registry
from tests.images import Image, build_image, push
from tests.peers import REPO_ROOT, DistributionRegistry, MirrorProcess
from tests.test_signatures import dsse_bundle, keys, push_bundle, push_cosign  # noqa: F401 (keys: a fixture)

RULE = "docker.io/library/*"


def policy(workdir, keys, mode: str, require: str) -> dict[str, Any]:  # noqa: F811
    """A ``signatures`` config of ``mode``: keys release and stranger; ``require`` for docker.io/library/* and
    team/*."""
    configured = []
    for name in ("release", "stranger"):
        path = workdir / f"{name}.pub"
        path.write_bytes(keys[name].public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
        configured.append({"name": name, "public_key": str(path)})
    rules = [{"repository": RULE, "require": [require]}, {"repository": "team/*", "require": [require]}]
    return {"mode": mode, "keys": configured, "rules": rules}


def mirror_config(upstream: DistributionRegistry, signatures: dict[str, Any]) -> dict[str, Any]:
    """Pull-through of docker.io from ``upstream`` (manifests always revalidated) with ``signatures``."""
    return {"upstreams": [{"name": "docker.io", "url": upstream.url, "manifest_ttl": 0}],
            "default_upstream": "docker.io", "signatures": signatures}


@pytest.fixture(scope="module")
def images(tmp_path_factory, keys) -> Any:  # noqa: F811
    """The upstream with library/signed (cosign, release), library/bundled (a bundle in the referrers tag schema,
    release), library/unsigned and library/stranger (cosign, another key), each as tag 1."""
    workdir = tmp_path_factory.mktemp("policy-upstream")
    with DistributionRegistry(workdir) as upstream:
        built = {name: build_image(f"policy-{name}", layers=1, layer_size=1024, oci=True)
                 for name in ("signed", "bundled", "unsigned", "stranger")}
        for name, image in built.items():
            push(upstream.url, f"library/{name}", "1", image)
        push_cosign(upstream, "library/signed", built["signed"], keys["release"])
        push_bundle(upstream, "library/bundled", built["bundled"], dsse_bundle(built["bundled"].digest,
                                                                                 keys["release"]), tag_schema=True)
        push_cosign(upstream, "library/stranger", built["stranger"], keys["stranger"])
        yield upstream, built


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, images, keys):  # noqa: F811
    """A mirror enforcing: release must sign docker.io/library/* and team/*."""
    workdir = tmp_path_factory.mktemp("policy-mirror")
    upstream, _ = images
    with MirrorProcess(workdir / "mirror", mirror_config(upstream, policy(workdir, keys, "enforce", "release"))) as m:
        yield m


def blob_gets(upstream: DistributionRegistry, image: Image) -> int:
    """GETs of ``image``'s config and layers the upstream answered."""
    return sum(upstream.count_requests("GET", f"/blobs/{blob.digest}") for blob in image.blobs)


def decisions(mirror: MirrorProcess, decision: str) -> float:
    """The mirror's ``mirror_signature_decisions_total`` of ``decision``."""
    text = httpx.get(f"{mirror.url}/metrics", timeout=30).text
    prefix = f'mirror_signature_decisions_total{{decision="{decision}"}} '
    return sum(float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix))


def assert_refused(response: httpx.Response) -> None:
    """A 403 DENIED naming the rule and the missing key."""
    assert response.status_code == 403, response.text
    error = response.json()["errors"][0]
    assert error["code"] == "DENIED"
    assert f"signature rule {RULE!r}" in error["message"] or "signature rule 'team/*'" in error["message"]
    assert "missing a valid signature by release" in error["message"]


@pytest.mark.parametrize("name", ["signed", "bundled"])
def test_signed_image_pulls_through(mirror, images, name):
    _, built = images
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        manifest = client.get(f"/v2/library/{name}/manifests/1", headers={"Accept": built[name].manifest.media_type})
        assert manifest.status_code == 200, manifest.text
        assert manifest.headers["Docker-Content-Digest"] == built[name].digest
        for blob in built[name].blobs:
            assert client.get(f"/v2/library/{name}/blobs/{blob.digest}").status_code == 200
    assert decisions(mirror, "allowed") >= 1


def test_dockerd_pulls_a_signed_image_through_the_mirror(mirror, dockerd):
    dockerd.configure({"registry-mirrors": [mirror.url]})
    dockerd.docker("pull", "signed:1")
    assert "GET /v2/library/signed/manifests/" in mirror.log() and "GET /v2/library/signed/blobs/" in mirror.log()


@pytest.mark.parametrize("name", ["unsigned", "stranger"])
def test_unsigned_or_foreign_signed_image_is_refused_before_any_blob(mirror, images, name):
    upstream, built = images
    refused = decisions(mirror, "refused")
    response = httpx.get(f"{mirror.url}/v2/library/{name}/manifests/1", timeout=60)
    assert_refused(response)
    assert f"docker.io/library/{name}@{built[name].digest}" in response.json()["errors"][0]["message"]
    assert blob_gets(upstream, built[name]) == 0
    assert decisions(mirror, "refused") == refused + 1
    assert any('"level": "warning", "logger": "mirror.signatures"' in line and built[name].digest in line
               for line in mirror.log().splitlines())


def test_head_and_signature_artifacts_are_not_refused(mirror, images):
    _, built = images
    with httpx.Client(base_url=mirror.url, timeout=60) as client:
        assert client.head("/v2/library/unsigned/manifests/1").status_code == 200
        tag = f"sha256-{built['stranger'].digest.removeprefix('sha256:')}.sig"
        signature = client.get(f"/v2/library/stranger/manifests/{tag}")
        assert signature.status_code == 200, signature.text
        by_digest = client.get(f"/v2/library/stranger/manifests/{signature.headers['Docker-Content-Digest']}")
        assert by_digest.status_code == 200, by_digest.text


def test_hosted_push_is_accepted_and_served_once_signed(mirror, keys):  # noqa: F811
    image = build_image("policy-hosted", layers=1, layer_size=1024, oci=True)
    push(mirror.url, "team/app", "v1", image)  # the PUT is not refused
    assert_refused(httpx.get(f"{mirror.url}/v2/team/app/manifests/v1", timeout=30))
    push_cosign(mirror, "team/app", image, keys["release"])
    assert httpx.get(f"{mirror.url}/v2/team/app/manifests/v1", timeout=30).status_code == 200


def test_warn_mode_serves_and_a_reload_to_another_key_refuses(tmp_path, images, keys):  # noqa: F811
    upstream, _ = images
    with MirrorProcess(tmp_path / "mirror", mirror_config(upstream, policy(tmp_path, keys, "warn", "release"))) as m:
        assert httpx.get(f"{m.url}/v2/library/unsigned/manifests/1", timeout=60).status_code == 200
        assert decisions(m, "warned") == 1
        assert "signature policy (warn)" in m.log()
        assert httpx.get(f"{m.url}/v2/library/signed/manifests/1", timeout=60).status_code == 200
        m.write_config(mirror_config(upstream, policy(tmp_path, keys, "enforce", "stranger")))
        reloads = m.log().count("reloaded config")
        m.send_signal(signal.SIGHUP)
        m.wait_until(lambda: m.log().count("reloaded config") > reloads, "the reload")
        response = httpx.get(f"{m.url}/v2/library/signed/manifests/1", timeout=60)
        assert response.status_code == 403 and "missing a valid signature by stranger" in response.text
        assert httpx.get(f"{m.url}/v2/library/stranger/manifests/1", timeout=60).status_code == 200


def mirror_command(*argv: Any) -> subprocess.CompletedProcess[str]:
    """``python -m mirror ARGV``."""
    return subprocess.run([sys.executable, "-m", "mirror", *map(str, argv)], capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT, check=False)


def test_bundle_import_verifies_each_image_before_publishing(tmp_path, keys):  # noqa: F811
    with MirrorProcess(tmp_path / "source", {"upstreams": []}) as source:
        signed = build_image("policy-bundle-signed", layers=1, layer_size=1024, oci=True)
        push(source.url, "team/signed", "v1", signed)
        push_cosign(source, "team/signed", signed, keys["release"])
        push(source.url, "team/unsigned", "v1", build_image("policy-bundle-unsigned", layers=1, layer_size=1024,
                                                            oci=True))
        bundles = {}
        for name in ("signed", "unsigned"):
            bundles[name] = tmp_path / f"{name}.tar"
            exported = mirror_command("bundle", "export", "--config", source.config_path, "--output", bundles[name],
                                      f"team/{name}:v1")
            assert exported.returncode == 0, exported.stdout + exported.stderr
    root = tmp_path / "target-store"
    config = tmp_path / "target.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "upstreams": [],
                                      "signatures": policy(tmp_path, keys, "enforce", "release")}))
    refused = mirror_command("bundle", "import", "--config", config, bundles["unsigned"])
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "mirror: import refused: image team/unsigned:v1" in refused.stderr
    assert "signature rule 'team/*': missing a valid signature by release" in refused.stderr
    imported = mirror_command("bundle", "import", "--config", config, bundles["signed"])
    assert imported.returncode == 0, imported.stdout + imported.stderr
    registry = Registry(storage.open(root))
    assert registry.get_manifest("team/signed", "v1").digest.hex == signed.digest.removeprefix("sha256:")
    assert registry.metadata.tags("team/unsigned") == []
