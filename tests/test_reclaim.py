"""Reclaiming space: imported images are pinned by their tags until deleted, cached images are purged by DELETE and
``mirror cache purge`` (by name or unused for a while), and ``mirror gc`` then frees their bytes."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mirror import gc, storage
from mirror.digest import Digest
from mirror.registry import Registry
from mirror.storage.paths import Layout, tag_key
from tests.consistency import assert_store_consistent
from tests.images import Image, Index, build_image, build_index, push
from tests.peers import REPO_ROOT, DistributionRegistry, MirrorProcess, run
from tests.test_auth import write_htpasswd
from tests.test_bundle import fill, mirror, write_config
from tests.test_repository_model import pull

DAY = 86400.0
USERS = {"alice": "alice-secret", "bob": "bob-secret"}  # alice may delete in ghcr.io/*, bob only read


def cli(server: MirrorProcess, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mirror ARGS --config <server's config>`` from this checkout, as its own process."""
    return run([sys.executable, "-m", "mirror", *map(str, args), "--config", str(server.config_path)],
               env={"PYTHONPATH": str(REPO_ROOT)}, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a command that must have succeeded."""
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def root_of(server: MirrorProcess) -> Path:
    """The store root of ``server``."""
    return Path(server.config["storage"]["root"])


def blob_bytes(root: Path) -> int:
    """The disk usage of ``blobs/``: the sum of its files' sizes."""
    return sum(path.stat().st_size for path in (root / "blobs").rglob("*") if path.is_file())


def stored(root: Path) -> set[str]:
    """The digests ``blobs/`` holds."""
    return {f"sha256:{path.name}" for path in (root / "blobs").rglob("*") if path.is_file()}


def owned(*artifacts: Image | Index) -> set[str]:
    """Every digest of ``artifacts``: manifests, configs and layers."""
    return {blob.digest for artifact in artifacts
            for blob in (*artifact.blobs, artifact.manifest, *(image.manifest for image in artifact.images))}


def bundle_of(tmp_path: Path, images: dict[str, Image | Index]) -> Path:
    """A bundle of ``images`` (reference -> image), exported from a store of their own."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "source-store"
    for reference, artifact in images.items():
        fill(root, reference, artifact)
    config = write_config(tmp_path / "source.yaml", root)
    out = tmp_path / "images.tar"
    assert mirror("bundle", "export", "--config", config, "--output", out, *images) == 0
    return out


def manifests_of(root: Path, name: str) -> set[str]:
    """The manifests repository ``name`` links (read through the store)."""
    store = storage.open(root)
    try:
        return {str(digest) for digest in store.metadata.manifests(name)}
    finally:
        store.close()


@pytest.fixture
def hosted(tmp_path):
    """A hosted-only ``mirror serve`` (collecting with no grace period) holding one pushed image already."""
    with MirrorProcess(tmp_path / "mirror", {"upstreams": [], "storage": {"gc_grace": 0}}) as server:
        push(server.url, "team/app", "1", build_image("pushed-before"))
        yield server


@pytest.fixture(scope="module")
def ghcr(tmp_path_factory):
    """An anonymous upstream registry standing in for ghcr.io."""
    with DistributionRegistry(tmp_path_factory.mktemp("ghcr")) as registry:
        yield registry


def caching(workdir: Path, upstream: DistributionRegistry, **extra: object) -> MirrorProcess:
    """A ``mirror serve`` caching ``upstream`` as ghcr.io (no default upstream, no gc grace), started."""
    config = {"upstreams": [{"name": "ghcr.io", "url": upstream.url}], "storage": {"gc_grace": 0}, **extra}
    return MirrorProcess(workdir, config).start()


# imported images
def test_deleting_an_imported_image_by_digest_and_gc_frees_its_bytes(hosted, tmp_path):
    alpine = build_image("imported-alpine", layers=2)
    bundle = bundle_of(tmp_path, {"alpine:3.20": alpine})
    before = blob_bytes(root_of(hosted))

    ok(cli(hosted, "bundle", "import", bundle))
    assert blob_bytes(root_of(hosted)) > before
    assert "freed 0 bytes" in ok(cli(hosted, "gc"))  # pinned: the tag holds it
    with httpx.Client(base_url=hosted.url, timeout=30) as client:
        assert client.delete(f"/v2/docker.io/library/alpine/manifests/{alpine.digest}").status_code == 202
        assert client.get("/v2/docker.io/library/alpine/manifests/3.20").status_code == 404

        ok(cli(hosted, "gc"))

        assert blob_bytes(root_of(hosted)) == before
        assert client.get("/v2/team/app/manifests/1").status_code == 200
    assert_store_consistent(root_of(hosted))


def test_deleting_an_imported_tag_and_gc_untagged_frees_its_bytes(hosted, tmp_path):
    app = build_index("imported-app")
    bundle = bundle_of(tmp_path, {"ghcr.io/org/app:1.0": app})
    before = blob_bytes(root_of(hosted))
    ok(cli(hosted, "bundle", "import", bundle))
    imported = blob_bytes(root_of(hosted))

    with httpx.Client(base_url=hosted.url, timeout=30) as client:
        assert client.delete("/v2/ghcr.io/org/app/manifests/1.0").status_code == 202
        assert client.delete("/v2/ghcr.io/org/app/manifests/1.0").status_code == 404
    ok(cli(hosted, "gc"))
    assert blob_bytes(root_of(hosted)) == imported  # its manifests are still there, untagged: plain gc keeps them

    out = ok(cli(hosted, "gc", "--untagged"))

    assert f"removed untagged manifest ghcr.io/org/app@{app.digest}" in out
    assert blob_bytes(root_of(hosted)) == before
    assert manifests_of(root_of(hosted), "ghcr.io/org/app") == set()
    assert_store_consistent(root_of(hosted))


def test_a_blob_pinned_by_two_imported_tags_survives_deleting_one(hosted, tmp_path):
    one = build_image("shared-base", layers=2)
    two = build_image("shared-base", layers=3)  # the same first two layers, its own config and third layer
    bundle = bundle_of(tmp_path, {"example.com/one:1": one, "example.com/two:1": two})
    ok(cli(hosted, "bundle", "import", bundle))

    with httpx.Client(base_url=hosted.url, timeout=30) as client:
        assert client.delete("/v2/example.com/one/manifests/1").status_code == 202
        ok(cli(hosted, "gc", "--untagged"))

        gone = {one.config.digest, one.manifest.digest}
        assert not gone & stored(root_of(hosted))
        assert owned(two) <= stored(root_of(hosted))
        pull(client, "example.com/two", "1", two)
    store = storage.open(root_of(hosted))
    assert all(store.pins.is_pinned(Digest.parse(blob.digest)) for blob in (*two.blobs, two.manifest))
    store.close()
    assert_store_consistent(root_of(hosted))


def test_reimporting_a_tag_at_another_image_releases_what_only_the_old_one_held(tmp_path):
    root = tmp_path / "store"
    old, new = build_image("moved", layers=2), build_image("moved", layers=3)
    for number, image in enumerate((old, new)):
        assert mirror("bundle", "import", "--config", write_config(tmp_path / "target.yaml", root),
                      bundle_of(tmp_path / f"bundle-{number}", {"example.com/app:1": image})) == 0
    store = storage.open(root)
    pinned = {str(digest) for digest in store.pins.all()}
    assert owned(new) <= pinned and not {old.config.digest, old.manifest.digest} & pinned


# migrating layout version 2's bare pins
def test_bare_pins_of_a_version_2_store_become_held_by_tags_digests_or_legacy(tmp_path):
    registry = Registry(storage.open(tmp_path))
    tagged, by_digest = build_image("v2-tagged"), build_image("v2-by-digest")
    fill(tmp_path, "example.com/tagged:1", tagged)
    fill(tmp_path, "example.com/bydigest:1", by_digest)
    registry.metadata.untag("example.com/bydigest", "1")  # as an import by digest left it
    orphan = Digest.of(b"pinned, its manifest deleted in version 2")
    bare = [Digest.parse(digest) for digest in owned(tagged, by_digest)] + [orphan]
    layout = Layout(tmp_path)
    for digest in bare:  # version 2's pins: one bare file each, no holder
        path = layout.pins_v2 / digest.algorithm / digest.hex
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    (tmp_path / "layout-version").write_text("2\n")

    store = storage.open(tmp_path)

    assert (tmp_path / "layout-version").read_text() == "3\n" and not layout.pins_v2.exists()
    assert set(store.pins.all()) == set(bare) and set(store.pins.legacy()) == {orphan}
    registry = Registry(store)
    registry.delete_manifest("example.com/tagged", "1")  # the tag held the image: released
    assert not any(store.pins.is_pinned(Digest.parse(digest)) for digest in owned(tagged))
    assert all(store.pins.is_pinned(Digest.parse(digest)) for digest in owned(by_digest))
    collector = gc.Collector(registry, store.pins, 0.0, DAY)
    assert collector.collect(dry_run=True, untagged=True).released == [orphan]
    report = collector.collect(untagged=True)
    assert report.released == [orphan] and set(store.pins.all()) == {Digest.parse(d) for d in owned(by_digest)}
    assert stored(tmp_path) == owned(by_digest)
    assert_store_consistent(tmp_path)


# cached images
def test_a_cached_image_is_purged_by_delete_with_delete_rights(tmp_path, ghcr):
    image = build_image("cached-tool")
    push(ghcr.url, "org/tool", "2.0", image)
    rules = [{"repository": "ghcr.io/*", "read": ["*"], "write": ["alice"]}]
    auth = {"htpasswd": str(write_htpasswd(tmp_path / "htpasswd", USERS)), "access": rules}
    server = caching(tmp_path / "mirror", ghcr, auth=auth)
    try:
        before = blob_bytes(root_of(server))
        with httpx.Client(base_url=server.url, auth=("bob", USERS["bob"]), timeout=30) as bob, \
                httpx.Client(base_url=server.url, auth=("alice", USERS["alice"]), timeout=30) as alice:
            pull(bob, "ghcr.io/org/tool", "2.0", image)
            server.wait_until(lambda: owned(image) <= stored(root_of(server)), "the cached blobs' commits")
            layer = image.layers[0].digest

            assert bob.delete(f"/v2/ghcr.io/org/tool/manifests/{image.digest}").status_code == 403
            assert bob.delete(f"/v2/ghcr.io/org/tool/blobs/{layer}").status_code == 403
            assert alice.delete(f"/v2/ghcr.io/org/tool/blobs/{layer}").status_code == 202
            assert alice.delete(f"/v2/ghcr.io/org/tool/blobs/{layer}").status_code == 404  # unlinked
            assert alice.delete("/v2/ghcr.io/org/tool/manifests/2.0").status_code == 202
            assert alice.delete(f"/v2/ghcr.io/org/tool/manifests/{image.digest}").status_code == 404

        assert manifests_of(root_of(server), "ghcr.io/org/tool") == set()
        assert ghcr.count_requests("DELETE", "/v2/") == 0  # never forwarded upstream
        ok(cli(server, "gc"))
        assert blob_bytes(root_of(server)) == before
        assert_store_consistent(root_of(server))
    finally:
        server.stop()


def test_cache_purge_removes_named_cached_images_and_gc_frees_their_bytes(tmp_path, ghcr):
    multi, kept = build_index("purged-multi"), build_image("kept-tool")
    push(ghcr.url, "org/multi", "1", multi)
    push(ghcr.url, "org/kept", "1", kept)
    hosted, imported = build_image("hosted-not-purged"), build_image("imported-not-purged")
    bundle = bundle_of(tmp_path, {"ghcr.io/org/imported:1": imported})
    server = caching(tmp_path / "mirror", ghcr)
    try:
        push(server.url, "team/app", "1", hosted)
        ok(cli(server, "bundle", "import", bundle))
        ok(cli(server, "prefetch", "ghcr.io/org/kept:1"))
        before = stored(root_of(server))
        ok(cli(server, "prefetch", "ghcr.io/org/multi:1"))
        assert owned(multi) <= stored(root_of(server))

        out = ok(cli(server, "cache", "purge", "ghcr.io/org/multi:1"))

        assert f"purged ghcr.io/org/multi:1: {1 + len(multi.images)} manifests from ghcr.io/org/multi" in out
        assert manifests_of(root_of(server), "ghcr.io/org/multi") == set()
        refused = cli(server, "cache", "purge", "team/app:1", "ghcr.io/org/imported:1", "ghcr.io/org/absent:1")
        assert refused.returncode == 1
        assert "failed team/app:1: team/app is hosted" in refused.stdout
        assert "failed ghcr.io/org/imported:1: ghcr.io/org/imported@" in refused.stdout
        assert "failed ghcr.io/org/absent:1: manifest 1 is not cached" in refused.stdout
        ok(cli(server, "gc"))
        assert stored(root_of(server)) == before
        with httpx.Client(base_url=server.url, timeout=30) as client:
            pull(client, "ghcr.io/org/kept", "1", kept)
            pull(client, "team/app", "1", hosted)
            pull(client, "ghcr.io/org/imported", "1", imported)
        assert_store_consistent(root_of(server))
    finally:
        server.stop()


def test_cache_purge_older_than_purges_only_what_was_not_used_that_long(tmp_path, ghcr):
    old, recent = build_index("unused-index"), build_image("recently-used")
    push(ghcr.url, "org/old", "1", old)
    push(ghcr.url, "org/recent", "1", recent)
    server = caching(tmp_path / "mirror", ghcr)
    try:
        ok(cli(server, "prefetch", "ghcr.io/org/recent:1"))
        before = stored(root_of(server))
        ok(cli(server, "prefetch", "ghcr.io/org/old:1"))
        long_ago = time.time() - 3 * DAY  # the tag was written (or revalidated) three days ago
        os.utime(root_of(server) / tag_key("ghcr.io/org/old", "1"), (long_ago, long_ago))

        assert "no cached image unused for 4d" in ok(cli(server, "cache", "purge", "--older-than", "4d"))
        out = ok(cli(server, "cache", "purge", "--older-than", "2d"))

        assert f"purged {1 + len(old.images)} manifests of ghcr.io/org/old not used for 2d" in out
        assert manifests_of(root_of(server), "ghcr.io/org/old") == set()
        assert manifests_of(root_of(server), "ghcr.io/org/recent") == {recent.digest}
        ok(cli(server, "gc"))
        assert stored(root_of(server)) == before
        with httpx.Client(base_url=server.url, timeout=30) as client:
            pull(client, "ghcr.io/org/recent", "1", recent)
        assert_store_consistent(root_of(server))
    finally:
        server.stop()
