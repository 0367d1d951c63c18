"""One repository model: every request name (and containerd's ``?ns=``) resolves to one repository, hosted,
mirrored or hosted in front of mirrored, and a blob or manifest is served only where it is linked. Against a
Docker-Hub-like token-auth upstream, with httpx probes, dockerd, skopeo and bundles."""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.images import (
    BearerAuth,
    Blob,
    Image,
    basic_authorization,
    build_image,
    canonical_json,
    push,
    put_manifest,
    random_layer,
)
from tests.peers import REPO_ROOT, DistributionRegistry, MirrorProcess, TokenServer, require, run, wait_until
from tests.scripted import Answer, ScriptedUpstream, http, manifest_answer

HUB_USER, HUB_PASSWORD = "hubuser", "hub-secret"
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}
ARTIFACT_TYPE = "application/vnd.example.signature.v1+json"
EMPTY_CONFIG = Blob("application/vnd.oci.empty.v1+json", b"{}")
APP = build_image("repository-model-app")
REFUSED = (401, 403, 404)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def referrer_of(subject: Image, seed: str) -> Image:
    """An OCI artifact manifest with an ``artifactType`` whose ``subject`` is ``subject`` (a signature)."""
    payload = Blob(ARTIFACT_TYPE, f"signature {seed} of {subject.digest}".encode())
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
                "config": EMPTY_CONFIG.descriptor(), "layers": [payload.descriptor()],
                "subject": subject.manifest.descriptor()}
    return Image(EMPTY_CONFIG, (payload,), Blob(OCI_MANIFEST, canonical_json(manifest)), "", "")


def referrers_tag(subject: Image) -> str:
    """The tag of the OCI 1.1 referrers tag schema: ``sha256-<hex of the subject>``."""
    return subject.digest.replace(":", "-")


def referrers_index(*referrers: Image) -> Blob:
    """The OCI index a client without the referrers API pushes under the referrers tag."""
    manifests = [referrer.manifest.descriptor(artifactType=ARTIFACT_TYPE) for referrer in referrers]
    return Blob(OCI_INDEX, canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))


APP_REFERRER = referrer_of(APP, "upstream")


def build_image_on(base: Image, seed: str, layer_size: int) -> Image:
    """An image of ``base``'s layers plus one new layer of its own (a new config and manifest)."""
    layer, diff_id = random_layer(seed, layer_size, media_type=base.layers[0].media_type)
    config = json.loads(base.config.data)
    config["rootfs"]["diff_ids"].append(diff_id)
    config["history"].append({"created": "1970-01-01T00:00:00Z", "created_by": f"layer {seed}"})
    config_blob = Blob(base.config.media_type, canonical_json(config))
    manifest = {**json.loads(base.manifest.data), "config": config_blob.descriptor(),
                "layers": [blob.descriptor() for blob in (*base.layers, layer)]}
    return Image(config_blob, (*base.layers, layer), Blob(base.manifest.media_type, canonical_json(manifest)),
                 base.os, base.architecture)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A token-auth Docker Hub stand-in: library/app:1, a referrer of it, and its referrers-tag-schema index."""
    workdir = tmp_path_factory.mktemp("model-hub")
    with TokenServer(workdir / "token", HUB_USER, HUB_PASSWORD) as tokens, \
            DistributionRegistry(workdir, auth=tokens) as registry, \
            httpx.Client(timeout=60, auth=BearerAuth(HUB_USER, HUB_PASSWORD)) as client:
        push(registry.url, "library/app", "1", APP, client=client)
        push(registry.url, "library/app", APP_REFERRER.digest, APP_REFERRER, client=client)
        put_manifest(client, registry.url, "library/app", referrers_tag(APP), referrers_index(APP_REFERRER))
        yield registry


def hub_upstream(hub: DistributionRegistry, name: str = "docker.io", **extra: object) -> dict[str, object]:
    """The ``upstreams`` entry of the token-auth upstream, with its credentials."""
    return {"name": name, "url": hub.url, "username": HUB_USER, "password": HUB_PASSWORD, **extra}


@pytest.fixture(scope="module")
def mirror(hub, tmp_path_factory):
    """The mirror most tests share: no auth, the upstream as docker.io and the default upstream."""
    config = {"upstreams": [hub_upstream(hub)], "default_upstream": "docker.io"}
    with MirrorProcess(tmp_path_factory.mktemp("model-mirror"), config) as server:
        yield server


@pytest.fixture(scope="module")
def hosted(tmp_path_factory):
    """A purely hosted mirror: no upstreams and no default upstream."""
    config = {"upstreams": [], "default_upstream": None}
    with MirrorProcess(tmp_path_factory.mktemp("model-hosted"), config) as server:
        yield server


def write_htpasswd(path: Path) -> Path:
    """An htpasswd file of alice and bob, written by ``htpasswd -bnB`` itself (bcrypt)."""
    program = require("htpasswd")
    path.write_text("".join(run([program, "-bnB", user, password]).stdout.strip() + "\n"
                            for user, password in PASSWORDS.items()))
    return path


@pytest.fixture(scope="module")
def guarded(hub, tmp_path_factory):
    """A mirror with auth: anonymous pull, secret/* read and written by alice only, the upstream as docker.io."""
    workdir = tmp_path_factory.mktemp("model-guarded")
    auth = {"htpasswd": str(write_htpasswd(workdir / "htpasswd")), "anonymous_pull": True,
            "access": [{"repository": "secret/*", "read": ["alice"], "write": ["alice"]}]}
    config = {"upstreams": [hub_upstream(hub)], "default_upstream": "docker.io", "auth": auth}
    with MirrorProcess(workdir, config) as server:
        yield server


def basic(user: str) -> dict[str, str]:
    """Headers carrying ``user``'s Basic credentials."""
    return {"Authorization": basic_authorization(user, PASSWORDS[user])}


@dataclass(frozen=True)
class Secret:
    """What alice put in secret/app: an image, a referrer of it and an open upload session."""

    image: Image
    referrer: Image
    session: str


@pytest.fixture(scope="module")
def secret(guarded):
    """alice pushes secret/app:1 and a referrer of it, and opens an upload session there."""
    image = build_image("repository-model-secret")
    referrer = referrer_of(image, "secret")
    with httpx.Client(timeout=60, auth=BearerAuth("alice", PASSWORDS["alice"])) as client:
        push(guarded.url, "secret/app", "1", image, client=client)
        push(guarded.url, "secret/app", referrer.digest, referrer, client=client)
        opened = client.post(f"{guarded.url}/v2/secret/app/blobs/uploads/")
    assert opened.status_code == 202, opened.text
    return Secret(image, referrer, opened.headers["Docker-Upload-UUID"])


@pytest.fixture
def strangers(guarded) -> Iterator[dict[str, httpx.Client]]:
    """Clients of callers who may not read secret/*: anonymous and bob, each with and without the token flow."""
    with contextlib.ExitStack() as stack:
        options = {"anonymous": {}, "anonymous token": {"auth": BearerAuth()},
                   "bob basic": {"headers": basic("bob")},
                   "bob token": {"auth": BearerAuth("bob", PASSWORDS["bob"])}}
        yield {caller: stack.enter_context(httpx.Client(base_url=guarded.url, timeout=30, **option))
               for caller, option in options.items()}


def foreign_paths(kind: str, digest: str) -> list[str]:
    """Every route form naming another repository than secret/app, for ``kind`` (blobs or manifests)."""
    return [f"/v2/library/anything/{kind}/{digest}", f"/v2/docker.io/anything/{kind}/{digest}",
            f"/v2/anything/{kind}/{digest}?ns=docker.io", f"/v2/other/app/{kind}/{digest}",
            f"/v2/secret/app/{kind}/{digest}?ns=docker.io"]


def answers(client: httpx.Client, paths: list[str]) -> dict[tuple[str, str], httpx.Response]:
    """GET and HEAD of every path: the responses by (method, path)."""
    return {(method, path): client.request(method, path) for path in paths for method in ("GET", "HEAD")}


def unknown(responses: dict[tuple[str, str], httpx.Response], code: str) -> list[tuple[str, str, int, str]]:
    """The responses that are not a 404 with ``code`` (or NAME_UNKNOWN; a HEAD has no body to tell)."""
    wrong = []
    for (method, path), response in responses.items():
        codes = {error["code"] for error in response.json()["errors"]} if method == "GET" and \
            response.status_code == 404 else set()
        if response.status_code != 404 or (method == "GET" and not codes & {code, "NAME_UNKNOWN"}):
            body = response.text[:200] if "json" in response.headers.get("content-type", "") else ""
            wrong.append((method, path, response.status_code, body))
    return wrong


def blob_path(server: MirrorProcess, digest: str) -> Path:
    """Where the store of ``server`` keeps blob ``digest``."""
    hex_ = digest.removeprefix("sha256:")
    return Path(server.config["storage"]["root"], "blobs", "sha256", hex_[:2], hex_)


def pull(client: httpx.Client, repository: str, reference: str, image: Image, **params: str) -> None:
    """Fetch ``image`` through ``/v2/<repository>/`` as a client pulls it; assert every byte."""
    manifest = client.get(f"/v2/{repository}/manifests/{reference}", params=params,
                          headers={"Accept": image.manifest.media_type})
    assert manifest.status_code == 200, f"{repository}:{reference}: {manifest.status_code} {manifest.text[:300]}"
    assert manifest.content == image.manifest.data
    for blob in image.blobs:
        got = client.get(f"/v2/{repository}/blobs/{blob.digest}", params=params)
        assert got.status_code == 200, f"{repository}@{blob.digest}: {got.status_code} {got.text[:300]}"
        assert got.content == blob.data


def mirror_cli(*args: str | Path) -> None:
    """Run ``python -m mirror ARGS`` as its own process; raise with its output if it fails."""
    run([sys.executable, "-m", "mirror", *map(str, args)], env={"PYTHONPATH": str(REPO_ROOT)})


def repository_folders(server: MirrorProcess) -> set[str]:
    """The repository folders under ``<store>/repositories`` (not their ``_blobs``, ``_tags``... folders)."""
    root = Path(server.config["storage"]["root"], "repositories")
    return {str(path.relative_to(root)) for path in root.rglob("*")
            if path.is_dir() and not any(part.startswith("_") for part in path.relative_to(root).parts)}


def catalog(server: MirrorProcess) -> list[str]:
    """Every repository ``/v2/_catalog`` lists."""
    response = httpx.get(f"{server.url}/v2/_catalog", params={"n": 10000}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["repositories"]


# 1
def test_content_is_not_read_through_other_repositories_without_auth(mirror, hosted):
    image = build_image("repository-model-open")
    for server in (mirror, hosted):
        push(server.url, "secret/app", "1", image)
    layer = image.layers[0].digest
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, "secret/app", "1", image)  # the owner's repository serves it
        blobs = answers(client, foreign_paths("blobs", layer))
        manifests = answers(client, foreign_paths("manifests", image.digest))
    with httpx.Client(base_url=hosted.url, timeout=30) as client:
        pull(client, "secret/app", "1", image)
        blobs |= {(m, f"hosted {p}"): r for (m, p), r in answers(client, [f"/v2/other/blobs/{layer}"]).items()}
        manifests |= {(m, f"hosted {p}"): r
                      for (m, p), r in answers(client, [f"/v2/other/manifests/{image.digest}"]).items()}
    wrong = unknown(blobs, "BLOB_UNKNOWN") + unknown(manifests, "MANIFEST_UNKNOWN")
    assert not wrong, "\n".join(map(str, wrong))


# 2
def test_callers_who_may_not_read_never_get_the_content_through_another_route(guarded, secret, strangers):
    image, layer = secret.image, secret.image.layers[0].digest
    with httpx.Client(base_url=guarded.url, timeout=30, headers=basic("alice")) as alice:
        pull(alice, "secret/app", "1", image)  # the owner reads its own content
        assert alice.get(f"/v2/secret/app/blobs/uploads/{secret.session}").status_code == 204
        listed = alice.get(f"/v2/secret/app/referrers/{image.digest}")
        assert secret.referrer.digest in [m["digest"] for m in listed.json()["manifests"]]
    paths = [*foreign_paths("blobs", layer), f"/v2/team/bob/blobs/{layer}",
             *foreign_paths("manifests", image.digest), f"/v2/team/bob/manifests/{image.digest}",
             f"/v2/secret/app/blobs/{layer}", f"/v2/secret/app/manifests/{image.digest}"]
    leaks = []
    for caller, client in strangers.items():
        for (method, path), response in answers(client, paths).items():
            if response.status_code not in REFUSED:
                leaks.append((caller, method, path, response.status_code))
        for params in ({}, {"ns": "docker.io"}):
            upload = client.get(f"/v2/secret/app/blobs/uploads/{secret.session}", params=params)
            if upload.status_code not in REFUSED:
                leaks.append((caller, "GET", f"upload status {params}", upload.status_code))
            referrers = client.get(f"/v2/secret/app/referrers/{image.digest}", params=params)
            # a spec registry lists referrers with 200 even when none are known: what must not show is alice's
            if referrers.status_code not in REFUSED and secret.referrer.digest in referrers.text:
                leaks.append((caller, "GET", f"referrers {params}", referrers.status_code))
    assert not leaks, "\n".join(map(str, leaks))


# 3
def test_mount_from_a_repository_the_caller_may_not_read_opens_an_upload(guarded, secret):
    layer = secret.image.layers[0].digest
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        mounted = client.post(f"/v2/secret/copy/blobs/uploads/?mount={layer}&from=secret/app", headers=basic("alice"))
        assert mounted.status_code == 201  # the owner may mount
        refused = client.post(f"/v2/team/bob/blobs/uploads/?mount={layer}&from=secret/app", headers=basic("bob"))
        assert refused.status_code == 202, f"{refused.status_code} {refused.headers.get('Location')}"
        assert client.get(refused.headers["Location"], headers=basic("bob")).status_code == 204  # an open upload


# 4
def test_dockerd_pushes_an_image_it_pulled_through_the_default_route_into_a_hosted_repository(mirror, dockerd):
    dockerd.configure({"registry-mirrors": [mirror.url], "insecure-registries": [mirror.host]})
    source, target = f"{mirror.host}/library/app:1", f"{mirror.host}/team/app:1"
    dockerd.docker("pull", source)
    dockerd.docker("tag", source, target)
    pushed = dockerd.docker("push", target).stdout
    digest = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed)
    assert digest, pushed
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        response = client.get("/v2/team/app/manifests/1", headers={"Accept": APP.manifest.media_type})
        assert response.status_code == 200 and "sha256:" + hashlib.sha256(response.content).hexdigest() == \
            digest[1]
        manifest = response.json()
        for descriptor in [manifest["config"], *manifest["layers"]]:
            blob = client.get(f"/v2/team/app/blobs/{descriptor['digest']}")
            assert blob.status_code == 200, f"{descriptor['digest']}: {blob.status_code} {blob.text[:200]}"
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == descriptor["digest"]
            assert client.head(f"/v2/team/app/blobs/{descriptor['digest']}").status_code == 200


# 5
def test_skopeo_copies_a_cached_image_into_a_hosted_repository(mirror, skopeo):
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, "docker.io/library/app", "1", APP)
        skopeo.copy(f"docker://{mirror.host}/docker.io/library/app:1", f"docker://{mirror.host}/team/copied:1")
        pull(client, "team/copied", "1", APP)
    assert skopeo.inspect(f"docker://{mirror.host}/team/copied:1", raw=True) == json.loads(APP.manifest.data)


# 6
def test_referrers_of_an_upstream_image_are_listed_through_every_route(mirror):
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        tag_index = client.get(f"/v2/docker.io/library/app/manifests/{referrers_tag(APP)}",
                               headers={"Accept": OCI_INDEX})
        assert tag_index.content == referrers_index(APP_REFERRER).data  # what the upstream has to tell
        for path, params in ((f"/v2/library/app/referrers/{APP.digest}", {}),
                             (f"/v2/docker.io/library/app/referrers/{APP.digest}", {}),
                             (f"/v2/library/app/referrers/{APP.digest}", {"ns": "docker.io"})):
            response = client.get(path, params=params)
            assert response.status_code == 200, f"{path} {params}: {response.status_code} {response.text[:300]}"
            listed = response.json()["manifests"]
            assert APP_REFERRER.digest in [m["digest"] for m in listed], f"{path} {params}: {listed}"


# 7
def test_reads_of_unknown_names_create_no_repository(mirror, hosted):
    for server in (mirror, hosted):
        before_catalog, before_folders = catalog(server), repository_folders(server)
        unexpected = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for n in range(20):
                name = f"ghost{secrets.token_hex(6)}/app{n}"
                path, params = [(name, {}), (f"docker.io/{name}", {}), (name, {"ns": "docker.io"})][n % 3]
                digest = "sha256:" + secrets.token_hex(32)
                for method in ("GET", "HEAD"):
                    for kind in (f"manifests/{digest}", "manifests/latest", f"blobs/{digest}"):
                        response = client.request(method, f"/v2/{path}/{kind}", params=params)
                        if response.status_code != 404:
                            unexpected.append((method, path, kind, params, response.status_code))
                tags = client.get(f"/v2/{path}/tags/list", params=params)
                if tags.status_code != 404:
                    unexpected.append(("GET", path, "tags/list", params, tags.status_code))
                referrers = client.get(f"/v2/{path}/referrers/{digest}", params=params)
                if referrers.status_code not in (200, 404) or \
                        (referrers.status_code == 200 and referrers.json()["manifests"]):
                    unexpected.append(("GET", path, "referrers", params, referrers.status_code))
        assert not unexpected, "\n".join(map(str, unexpected))
        assert catalog(server) == before_catalog
        assert repository_folders(server) == before_folders


# 8
def test_content_pushed_into_an_allow_push_upstream_survives_eviction(hub, tmp_path):
    base = build_image("evict-base", layers=2, layer_size=100 * 1024)
    others = [build_image(f"evict-other-{n}", layers=2, layer_size=100 * 1024) for n in range(3)]
    with httpx.Client(timeout=60, auth=BearerAuth(HUB_USER, HUB_PASSWORD)) as client:
        for name, image in (("library/evict-base", base), *((f"library/evict-{n}", i) for n, i in enumerate(others))):
            push(hub.url, name, "1", image, client=client)
    pushed = build_image_on(base, "evict-pushed", 100 * 1024)  # every layer of base, and one of its own
    config = {"upstreams": [hub_upstream(hub, allow_push=True)], "default_upstream": "docker.io",
              "storage": {"max_cache_size": 300 * 1024}}
    with MirrorProcess(tmp_path / "mirror", config) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        pull(client, "docker.io/library/evict-base", "1", base)
        wait_until(lambda: all(blob_path(server, b.digest).exists() for b in base.blobs), 30, "base committed")
        push(server.url, "docker.io/team/pushed", "1", pushed)
        pull(client, "docker.io/team/pushed", "1", pushed)  # allowed, and served before any eviction
        for n, image in enumerate(others):
            pull(client, f"docker.io/library/evict-{n}", "1", image)
        last = others[-1].layers[-1].digest
        wait_until(lambda: blob_path(server, last).exists(), 30, "the last commit")
        cached_only = [base.config, *(blob for image in others for blob in image.blobs)]
        assert any(not blob_path(server, blob.digest).exists() for blob in cached_only), "nothing was evicted"
        pull(client, "docker.io/team/pushed", "1", pushed)


# 9
def test_an_upstream_named_index_docker_io_serves_docker_io_pulls(hub, tmp_path):
    config = {"upstreams": [hub_upstream(hub, name="index.docker.io")], "default_upstream": "index.docker.io"}
    with MirrorProcess(tmp_path / "mirror", config) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        pull(client, "library/app", "1", APP)
        pull(client, "docker.io/library/app", "1", APP)
        pull(client, "library/app", "1", APP, ns="docker.io")


# 10
def test_the_shipped_isolated_example_serves_registry_mirrors_pulls_after_an_import(mirror, tmp_path):
    key = tmp_path / "bundle.key"
    mirror_cli("bundle", "keygen", key)
    bundle = tmp_path / "app.tar"
    mirror_cli("bundle", "export", "--config", mirror.config_path, "--output", bundle, "--sign-key", key,
               "docker.io/library/app:1")
    example: dict[str, Any] = yaml.safe_load((REPO_ROOT / "systemd" / "config.example.yaml").read_text())
    server = MirrorProcess(tmp_path / "isolated")
    example["listen"] = server.host
    example["storage"] = {**example["storage"], "root": str(tmp_path / "isolated" / "store")}
    if "trusted_keys" in example:
        example["trusted_keys"] = [str(key) + ".pub"]
    server.write_config(example)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        mirror_cli("bundle", "import", "--config", server.config_path, "--trust", str(key) + ".pub", bundle)
        assert client.get("/v2/docker.io/library/app/manifests/1").status_code == 200  # imported, by prefix
        pull(client, "library/app", "1", APP)  # as docker's registry-mirrors asks


# 11
def test_a_hosted_repository_exports_and_imports_into_a_hosted_mirror(mirror, tmp_path):
    image = build_image("repository-model-hosted-export")
    push(mirror.url, "team/app", "1", image)
    bundle = tmp_path / "hosted.tar"
    mirror_cli("bundle", "export", "--config", mirror.config_path, "--output", bundle, "team/app:1")
    config = {"upstreams": [], "default_upstream": None}
    with MirrorProcess(tmp_path / "fresh", config) as fresh, httpx.Client(base_url=fresh.url, timeout=30) as client:
        mirror_cli("bundle", "import", "--config", fresh.config_path, bundle)
        pull(client, "team/app", "1", image)


def lure(private: str) -> bytes:
    """An upstream manifest listing ``private``, a digest the upstream does not have."""
    config = Blob("application/vnd.oci.image.config.v1+json", b"{}")
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": private, "size": 1}
    return canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(),
                           "layers": [layer]})


def test_an_upstream_manifest_naming_a_private_digest_does_not_unlock_it(tmp_path):
    image = build_image("repository-model-private")
    private = image.layers[0].digest
    manifest = lure(private)
    upstream = ScriptedUpstream(lambda method, path, headers: Answer(
        manifest_answer(manifest) if path == "/v2/lure/manifests/1" else http(200 if path == "/v2/" else 404)))
    config = {"upstreams": [{"name": "lying.example", "url": upstream.url}], "default_upstream": None}
    try:
        with MirrorProcess(tmp_path / "mirror", config) as server, \
                httpx.Client(base_url=server.url, timeout=30) as client:
            push(server.url, "secret/app", "1", image)
            assert client.get("/v2/lying.example/lure/manifests/1").content == manifest
            for method in ("GET", "HEAD"):
                response = client.request(method, f"/v2/lying.example/lure/blobs/{private}")
                assert response.status_code == 404, (method, response.status_code, response.text[:200])
            asked = [(method, path) for method, path, _ in upstream.requests]
            assert ("HEAD", f"/v2/lure/blobs/{private}") in asked  # it asked, and was told no
            pull(client, "secret/app", "1", image)  # the owner's repository still serves it
    finally:
        upstream.close()
