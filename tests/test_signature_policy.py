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
from tests.images import Image, build_image, build_index, canonical_json, push
from tests.peers import REPO_ROOT, DistributionRegistry, MirrorProcess, wait_until
from tests.test_events import Receiver
from tests.test_signatures import (  # noqa: F401 (keys and sigstore_js: fixtures)
    dsse_bundle,
    keys,
    push_bundle,
    push_cosign,
    sigstore_js,
    sigstore_js_bundle,
)

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


def deny_events(receiver: Receiver, count: int) -> list[dict[str, Any]]:
    """The ``deny`` events ``receiver`` got, once it got ``count`` of them."""
    wait_until(lambda: receiver.actions().count("deny") >= count, 60, f"{count} deny events")
    return [event for event in receiver.events if event["action"] == "deny"]


def test_a_refusal_is_a_deny_event(tmp_path, images, keys):  # noqa: F811
    upstream, built = images
    receiver = Receiver()
    receiver.start()
    config = {**mirror_config(upstream, policy(tmp_path, keys, "enforce", "release")),
              "notifications": [{"url": receiver.url, "events": ["deny"]}]}
    try:
        with MirrorProcess(tmp_path / "mirror", config) as m:
            assert httpx.get(f"{m.url}/v2/library/signed/manifests/1", timeout=60).status_code == 200
            assert_refused(httpx.get(f"{m.url}/v2/library/unsigned/manifests/1", timeout=60))
            [event] = deny_events(receiver, 1)
    finally:
        receiver.stop()
    assert event["target"]["repository"] == "docker.io/library/unsigned"
    assert event["target"]["digest"] == built["unsigned"].digest and event["target"]["tag"] == "1"
    assert event["policy"] == {"mode": "enforce", "rule": RULE, "missing": ["release"]}
    assert event["request"]["method"] == "GET"


def test_warn_mode_serves_and_a_reload_to_another_key_refuses(tmp_path, images, keys):  # noqa: F811
    upstream, built = images
    receiver = Receiver()
    receiver.start()
    config = {**mirror_config(upstream, policy(tmp_path, keys, "warn", "release")),
              "notifications": [{"url": receiver.url, "events": ["deny"]}]}
    with MirrorProcess(tmp_path / "mirror", config) as m:
        assert httpx.get(f"{m.url}/v2/library/unsigned/manifests/1", timeout=60).status_code == 200
        assert decisions(m, "warned") == 1
        assert "signature policy (warn)" in m.log()
        try:
            [warned] = deny_events(receiver, 1)
        finally:
            receiver.stop()
        assert warned["target"]["digest"] == built["unsigned"].digest
        assert warned["policy"] == {"mode": "warn", "rule": RULE, "missing": ["release"]}
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


def test_an_exported_upstream_image_brings_its_tag_schema_bundle(tmp_path, images, keys):  # noqa: F811
    upstream, built = images
    config = tmp_path / "export.yaml"
    config.write_text(yaml.safe_dump({**mirror_config(upstream, {}), "storage": {"root": str(tmp_path / "none")}}))
    bundle = tmp_path / "bundled.tar"
    exported = mirror_command("bundle", "export", "--config", config, "--output", bundle, "library/bundled:1")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "(1 image, 2 referrers)" in exported.stdout  # the tag schema index and the bundle it lists
    target = {"upstreams": [], "signatures": policy(tmp_path, keys, "enforce", "release")}
    with MirrorProcess(tmp_path / "target", target) as m:
        imported = mirror_command("bundle", "import", "--config", m.config_path, bundle)
        assert imported.returncode == 0, imported.stdout + imported.stderr
        response = httpx.get(f"{m.url}/v2/docker.io/library/bundled/manifests/1", timeout=60)
        assert response.status_code == 200, response.text
        assert response.headers["Docker-Content-Digest"] == built["bundled"].digest
        assert decisions(m, "allowed") == 1


def test_images_signed_by_sigstore_js_are_served_and_unsigned_refused(tmp_path, keys, sigstore_js,  # noqa: F811
                                                                      dockerd):
    with DistributionRegistry(tmp_path / "upstream") as upstream:
        signed, unsigned, hosted = (build_image(f"sigstore-js-{name}", layers=1, layer_size=1024, oci=True)
                                    for name in ("signed", "unsigned", "hosted"))
        push(upstream.url, "library/js-signed", "1", signed)
        push(upstream.url, "library/js-unsigned", "1", unsigned)
        message = sigstore_js_bundle(sigstore_js, keys["release"], signed.manifest.data, dsse=False)
        push_bundle(upstream, "library/js-signed", signed, message, tag_schema=True)
        config = mirror_config(upstream, policy(tmp_path, keys, "enforce", "release"))
        with MirrorProcess(tmp_path / "mirror", config) as m:
            push(m.url, "team/js-hosted", "v1", hosted)
            subject = {"name": "team/js-hosted", "digest": {"sha256": hosted.digest[7:]}}
            statement = canonical_json({"_type": "https://in-toto.io/Statement/v1", "subject": [subject],
                                        "predicateType": "https://example.test/attested", "predicate": {}})
            push_bundle(m, "team/js-hosted", hosted, sigstore_js_bundle(sigstore_js, keys["release"], statement,
                                                                        dsse=True))
            response = httpx.get(f"{m.url}/v2/team/js-hosted/manifests/v1", timeout=60)
            assert response.status_code == 200, response.text
            assert_refused(httpx.get(f"{m.url}/v2/library/js-unsigned/manifests/1", timeout=60))
            assert blob_gets(upstream, unsigned) == 0
            dockerd.configure({"registry-mirrors": [m.url]})
            dockerd.docker("pull", "js-signed:1")
            assert blob_gets(upstream, signed) >= len(signed.blobs)
            assert "GET /v2/library/js-signed/blobs/" in m.log()


def test_a_signed_index_admits_the_platform_manifests_it_lists(mirror, keys):  # noqa: F811
    index = build_index("policy-multi-arch")
    push(mirror.url, "team/multi", "v1", index)
    child = index.images[0].digest
    assert_refused(httpx.get(f"{mirror.url}/v2/team/multi/manifests/{child}", timeout=30))  # nothing signed yet
    push_cosign(mirror, "team/multi", index, keys["release"])  # only the index is signed
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        assert client.get("/v2/team/multi/manifests/v1", headers={"Accept": index.manifest.media_type}).status_code \
            == 200
        for image in index.images:  # as a client pulls it: the index first, then its children by digest
            assert client.get(f"/v2/team/multi/manifests/{image.digest}").status_code == 200
