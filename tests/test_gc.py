"""Garbage collection frees exactly what no manifest references any more, also while pushes go on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mirror import gc, storage
from mirror import manifest as manifests
from mirror.digest import Digest
from mirror.errors import ManifestBlobUnknown
from mirror.manifest import OCI_MANIFEST
from mirror.registry import Registry
from tests.images import Blob, Image, Index, build_image, build_index, push_blob, put_manifest, write_oci_layout
from tests.peers import REPO_ROOT, MirrorProcess

HOUR = 3600.0


@pytest.fixture
def registry(tmp_path) -> Registry:
    """A hosted registry over an empty store."""
    return Registry(storage.open(tmp_path))


def collector(registry: Registry, grace: float = 0.0, upload_expiry: float = 24 * HOUR) -> gc.Collector:
    """A collector of ``registry``'s store (no grace period unless given)."""
    return gc.Collector(registry, registry.store.pins, grace, upload_expiry)


def upload(registry: Registry, name: str, blob: Blob) -> None:
    """Push ``blob`` into ``name`` as a client would."""
    writer = registry.start_upload(name)
    writer.write(blob.data)
    registry.finish_upload(name, writer, Digest.parse(blob.digest))


def push(registry: Registry, name: str, tag: str, artifact: Image | Index) -> Digest:
    """Push ``artifact`` as ``name:tag`` (blobs, child manifests by digest, then the tag)."""
    for blob in artifact.blobs:
        upload(registry, name, blob)
    for image in artifact.images if isinstance(artifact, Index) else ():
        registry.put_manifest(name, image.digest, image.manifest.data, image.manifest.media_type)
    registry.put_manifest(name, tag, artifact.manifest.data, artifact.manifest.media_type)
    return Digest.parse(artifact.digest)


def digests(*blobs: Blob) -> set[Digest]:
    """The digests of ``blobs``."""
    return {Digest.parse(blob.digest) for blob in blobs}


def stored(registry: Registry) -> set[Digest]:
    """Every blob in the store."""
    return set(registry.blobs.iter())


def files(root: Path) -> dict[str, float]:
    """Every file under ``root`` with its mtime: a fingerprint of the whole store."""
    return {str(path.relative_to(root)): path.stat().st_mtime for path in root.rglob("*") if path.is_file()}


def assert_pullable(registry: Registry, name: str, tag: str, artifact: Image | Index) -> None:
    """Every manifest and blob of ``artifact`` can be read back from ``name:tag``."""
    assert registry.get_manifest(name, tag).body == artifact.manifest.data
    for image in artifact.images:
        assert registry.get_manifest(name, image.digest).body == image.manifest.data
    for blob in artifact.blobs:
        with registry.open_blob(name, Digest.parse(blob.digest)) as file:
            assert file.read() == blob.data


def referrer(subject: Image, seed: str) -> Blob:
    """An OCI artifact manifest (a signature, say) whose subject is ``subject``."""
    config = Blob("application/vnd.oci.empty.v1+json", b"{}")
    layer = Blob("application/vnd.example.signature", seed.encode())
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example",
                       "config": config.descriptor(), "layers": [layer.descriptor()],
                       "subject": subject.manifest.descriptor()}).encode()
    return Blob(OCI_MANIFEST, body)


def push_referrer(registry: Registry, name: str, subject: Image, seed: str) -> tuple[Blob, set[Digest]]:
    """Push a referrer of ``subject`` by digest; return its manifest and every digest it owns."""
    manifest = referrer(subject, seed)
    data = json.loads(manifest.data)
    for descriptor, content in ((data["config"], b"{}"), (data["layers"][0], seed.encode())):
        upload(registry, name, Blob(descriptor["mediaType"], content))
    registry.put_manifest(name, manifest.digest, manifest.data, OCI_MANIFEST)
    owned = {Digest.parse(manifest.digest), Digest.parse(data["layers"][0]["digest"])}
    return manifest, owned


def test_deleted_image_frees_exactly_its_unique_blobs(registry):
    a = build_image("shared", layers=2)
    b = build_image("shared", layers=3)  # the same first two layers, its own config and third layer
    push(registry, "team/a", "1", a)
    push(registry, "team/b", "1", b)
    registry.delete_manifest("team/a", a.digest)

    report = collector(registry).collect()

    assert set(report.blobs) == digests(a.config, a.manifest)
    assert report.freed == a.config.size + a.manifest.size
    assert stored(registry) == digests(*b.blobs, b.manifest)
    assert_pullable(registry, "team/b", "1", b)
    assert not registry.metadata.has_blob("team/a", Digest.parse(a.config.digest))
    assert registry.metadata.has_blob("team/a", Digest.parse(a.layers[0].digest))


def test_dry_run_reports_the_same_and_changes_nothing(registry):
    a, b = build_image("dry", layers=2), build_image("dry", layers=3)
    push(registry, "team/a", "1", a)
    push(registry, "team/b", "1", b)
    registry.delete_manifest("team/a", a.digest)
    before = files(registry.blobs.layout.root)

    report = collector(registry).collect(dry_run=True)

    assert set(report.blobs) == digests(a.config, a.manifest)
    assert files(registry.blobs.layout.root) == before
    assert report.lines()[-1].startswith(f"gc: would free {gc.human(a.config.size + a.manifest.size)}: 2 blobs")


def test_young_blobs_wait_for_their_manifest(registry):
    image = build_image("pending")
    for blob in image.blobs:  # pushed, but the manifest PUT has not come yet
        upload(registry, "team/pending", blob)

    assert collector(registry, grace=HOUR).collect().blobs == {}

    push(registry, "team/pending", "1", image)
    assert_pullable(registry, "team/pending", "1", image)


def test_an_upload_in_progress_is_kept_and_an_expired_one_removed(registry):
    active = registry.start_upload("team/up")
    active.write(b"x" * 1000)
    active.close()
    stale = registry.start_upload("team/up")
    stale.write(b"y" * 300)
    stale.close()
    data = registry.blobs.layout.session(stale.id) / "data"
    os.utime(data, (time.time() - 2 * HOUR, time.time() - 2 * HOUR))

    report = collector(registry, upload_expiry=HOUR).collect()

    assert report.uploads == {stale.id: 300}
    assert registry.upload_size("team/up", active.id) == 1000
    writer = registry.resume_upload("team/up", active.id)
    writer.write(b"z")
    assert registry.finish_upload("team/up", writer, Digest.of(b"x" * 1000 + b"z"))


def test_an_abandoned_import_staging_store_is_removed_and_a_recent_one_kept(registry):
    layout = registry.blobs.layout
    for key, age in (("a" * 32, 2 * HOUR), ("b" * 32, 0)):
        folder = layout.import_staging(key)
        (folder / "blobs").mkdir(parents=True)
        (folder / "blobs" / "data").write_bytes(b"s" * 500)
        for path in (folder / "blobs" / "data", folder / "blobs", folder):
            os.utime(path, (time.time() - age, time.time() - age))

    assert collector(registry, upload_expiry=HOUR).collect(dry_run=True).imports == {"a" * 32: 500}
    report = collector(registry, upload_expiry=HOUR).collect()

    assert report.imports == {"a" * 32: 500} and report.freed == 500
    assert not layout.import_staging("a" * 32).exists() and layout.import_staging("b" * 32).exists()


def test_index_children_stay_while_the_index_does(registry):
    index = build_index("multi")
    push(registry, "team/multi", "1", index)

    assert collector(registry).collect(untagged=True).blobs == {}
    assert_pullable(registry, "team/multi", "1", index)

    registry.delete_manifest("team/multi", index.digest)
    assert set(collector(registry).collect().blobs) == digests(index.manifest)  # children: still linked
    report = collector(registry).collect(untagged=True)
    assert set(report.blobs) == digests(*index.blobs, *(image.manifest for image in index.images))
    assert set(report.manifests) == {("team/multi", Digest.parse(image.digest)) for image in index.images}
    assert stored(registry) == set()


def test_untagged_removes_what_no_tag_reaches_but_keeps_referrers_of_kept_manifests(registry):
    old, new = build_image("moving", layers=2), build_image("moving", layers=3)
    push(registry, "team/app", "latest", old)
    push(registry, "team/app", "latest", new)  # the tag moves on; ``old`` is untagged now
    old_signature_manifest, old_signature = push_referrer(registry, "team/app", old, "signature of old")
    new_signature, _ = push_referrer(registry, "team/app", new, "signature of new")

    assert collector(registry).collect().blobs == {}  # without --untagged every linked manifest stays

    report = collector(registry).collect(untagged=True)

    assert set(report.manifests) == {("team/app", digest) for digest in digests(old.manifest, old_signature_manifest)}
    assert set(report.blobs) == digests(old.config, old.manifest) | old_signature
    assert_pullable(registry, "team/app", "latest", new)
    subject = Digest.parse(new.digest)
    assert [r["digest"] for r in registry.referrers("team/app", subject)] == [
        new_signature.digest]
    assert registry.referrers("team/app", Digest.parse(old.digest)) == []


def test_untagged_keeps_recently_pushed_manifests(registry):
    index = build_index("half-pushed")
    for blob in index.blobs:
        upload(registry, "team/half", blob)
    for image in index.images:  # children arrive by digest first; the index's tag comes last
        registry.put_manifest("team/half", image.digest, image.manifest.data, image.manifest.media_type)

    report = collector(registry, grace=HOUR).collect(untagged=True)

    assert report.manifests == [] and report.blobs == {}
    registry.put_manifest("team/half", "1", index.manifest.data, index.manifest.media_type)
    assert_pullable(registry, "team/half", "1", index)


def test_pinned_blobs_are_kept(registry):
    image = build_image("pinned")
    push(registry, "team/pinned", "1", image)
    registry.delete_manifest("team/pinned", image.digest)
    registry.store.pins.pin(Digest.parse(image.layers[0].digest))

    report = collector(registry).collect()

    assert set(report.blobs) == digests(image.config, image.layers[1], image.manifest)
    assert stored(registry) == digests(image.layers[0])


def test_a_manifest_pushed_during_the_collection_keeps_its_blobs(registry, monkeypatch):
    """An old unreferenced blob taken by a manifest between the mark and the sweep is not deleted."""
    orphan = build_image("orphan")
    push(registry, "team/orphan", "1", orphan)
    registry.delete_manifest("team/orphan", orphan.digest)
    late = collector(registry)
    find_candidates = late._candidates

    def candidates_then_push(*args):
        found = find_candidates(*args)
        assert Digest.parse(orphan.config.digest) in found
        registry.put_manifest("team/orphan", "again", orphan.manifest.data, orphan.manifest.media_type)
        return found

    monkeypatch.setattr(late, "_candidates", candidates_then_push)
    report = late.collect()

    assert report.blobs == {}
    assert_pullable(registry, "team/orphan", "again", orphan)


def test_a_manifest_put_while_its_blob_is_in_the_trash_fails_cleanly(registry, monkeypatch):
    orphan = build_image("trashed")
    push(registry, "team/trashed", "1", orphan)
    registry.delete_manifest("team/trashed", orphan.digest)
    sweeper = collector(registry)
    mark_new = sweeper._mark_new

    def push_then_mark(*args):
        with pytest.raises(ManifestBlobUnknown):
            registry.put_manifest("team/trashed", "again", orphan.manifest.data, orphan.manifest.media_type)
        return mark_new(*args)

    monkeypatch.setattr(sweeper, "_mark_new", push_then_mark)
    assert set(sweeper.collect().blobs) == digests(*orphan.blobs, orphan.manifest)


def test_a_collection_that_died_halfway_is_undone(registry):
    image = build_image("crash")
    push(registry, "team/crash", "1", image)
    victim = Digest.parse(image.layers[0].digest)
    registry.blobs.trash(victim)  # as a killed run would leave it

    assert collector(registry).collect().blobs == {}
    assert_pullable(registry, "team/crash", "1", image)


def mirror_gc(config: Path, *args: str) -> str:
    """Run ``python -m mirror gc --config CONFIG ARGS``; return its output."""
    result = subprocess.run([sys.executable, "-m", "mirror", "gc", "--config", str(config), *args],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_gc_on_a_serving_mirror_frees_a_deleted_image_and_keeps_a_push_in_flight(tmp_path, skopeo):
    """Pushed with skopeo to a real ``mirror serve``; ``mirror gc`` runs while a third push is half done."""
    a, b = build_image("served", layers=2, oci=True), build_image("served", layers=3, oci=True)
    c = build_image("in-flight")
    layout = write_oci_layout(tmp_path / "layout", {"a": a, "b": b})
    with MirrorProcess(tmp_path / "mirror", {"upstreams": []}) as mirror, \
            httpx.Client(base_url=mirror.url, timeout=60) as client:
        for tag in ("a", "b"):
            skopeo.copy(f"oci:{layout}:{tag}", f"docker://{mirror.host}/gc/{tag}:1", all=False)
        for blob in c.blobs:  # the push of c is half done: blobs uploaded, manifest not yet put
            push_blob(client, mirror.url, "gc/c", blob)
        session = client.post("/v2/gc/c/blobs/uploads/")
        chunk = client.patch(session.headers["location"], content=b"partial",
                             headers={"Content-Type": "application/octet-stream"})
        assert chunk.status_code == 202
        assert client.delete(f"/v2/gc/a/manifests/{a.digest}").status_code == 202

        assert "freed 0 bytes: 0 blobs" in mirror_gc(mirror.config_path)  # all of it is younger than 1h

        put_manifest(client, mirror.url, "gc/c", "1", c.manifest)
        now = tmp_path / "gc-now.yaml"
        now.write_text(yaml.safe_dump({**mirror.config, "storage": {**mirror.config["storage"], "gc_grace": 0}}))
        store = Path(mirror.config["storage"]["root"])
        before = files(store)
        dry = mirror_gc(now, "--dry-run")
        assert files(store) == before
        out = mirror_gc(now)
        assert dry.replace("would remove", "removed").replace("would free", "freed") == out
        assert {line.split()[3] for line in out.splitlines() if " blob " in line} == {a.config.digest,
                                                                                      a.manifest.digest}
        assert client.patch(chunk.headers["location"], content=b" and the rest",
                            headers={"Content-Type": "application/octet-stream"}).status_code == 202
        for tag, image in (("b", b), ("c", c)):
            assert client.get(f"/v2/gc/{tag}/manifests/1", headers={"Accept": image.manifest.media_type}
                              ).content == image.manifest.data
            for blob in image.blobs:
                assert client.get(f"/v2/gc/{tag}/blobs/{blob.digest}").content == blob.data
        assert client.get(f"/v2/gc/a/blobs/{a.config.digest}").status_code == 404
        assert client.get(f"/v2/gc/b/blobs/{a.layers[0].digest}").status_code == 200


def test_a_manifest_that_cannot_be_read_stops_the_sweep(registry):
    kept = build_image("unreadable", layers=2)
    push(registry, "team/kept", "1", kept)
    orphan = build_image("orphan-of-unreadable", layers=1)
    push(registry, "team/orphan", "1", orphan)
    registry.delete_manifest("team/orphan", orphan.digest)
    garbage = b"not json at all"  # stored as a manifest of team/broken by a store written by other code
    registry.store_manifest("team/broken", manifests.Manifest(garbage, OCI_MANIFEST, Digest.of(garbage), {}))

    report = collector(registry).collect()

    assert report.blobs == {} and report.unreadable
    assert any("cannot read manifest team/broken" in problem for problem in report.problems)
    assert digests(*orphan.blobs) <= stored(registry)  # garbage too, but nothing may go while one is unknown
    assert_pullable(registry, "team/kept", "1", kept)


def test_references_are_read_whatever_the_declared_type(registry):
    image = build_image("ambiguous-old", layers=2)
    push(registry, "team/img", "1", image)
    document = json.loads(image.manifest.data) | {"manifests": []}  # ambiguous: refused today, stored by older code
    body = json.dumps(document).encode()
    registry.store_manifest("team/old", manifests.Manifest(body, OCI_MANIFEST, Digest.of(body), {}))
    registry.delete_manifest("team/img", image.digest)

    report = collector(registry).collect()

    assert not report.unreadable
    assert digests(*image.blobs) <= stored(registry)  # team/old still needs them
