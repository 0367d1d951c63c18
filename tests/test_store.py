"""The store's one entry point, ``storage.open``: creation, the v1 -> v2 migration, refusing newer layouts; and
the store operations the rest of the appliance uses instead of the store's files."""
from __future__ import annotations

import os
import stat
import time

import pytest

from mirror import storage
from mirror.digest import Digest
from mirror.errors import BlobUnknown, StorageError
from mirror.storage import Store
from mirror.storage.store import LAYOUT_VERSION
from tests.images import Blob, build_image

HOUR = 3600.0


def put(store: Store, data: bytes) -> Digest:
    """Commit ``data`` as a blob of ``store``."""
    writer = store.blobs.writer()
    writer.write(data)
    return writer.commit()


def store_image(store: Store, name: str, blobs: tuple[Blob, ...], manifest: Blob) -> Digest:
    """Commit ``blobs`` and ``manifest`` and link all of them into ``name``."""
    for blob in blobs:
        store.metadata.link_blob(name, put(store, blob.data))
    digest = put(store, manifest.data)
    store.metadata.link_manifest(name, digest, manifest.media_type)
    return digest


# storage.open
def test_open_creates_a_store_with_the_current_layout_version(tmp_path):
    root = tmp_path / "new"
    assert not storage.exists(root)
    store = storage.open(root)
    assert (root / "layout-version").read_text() == f"{LAYOUT_VERSION}\n"
    assert storage.exists(root) and store.metadata.repositories() == []
    storage.open(root)  # reopening a current store changes nothing
    assert (root / "layout-version").read_text() == f"{LAYOUT_VERSION}\n"


def test_a_v1_store_loses_only_the_unlisted_blob_links_of_registry_named_repositories(tmp_path):
    store = storage.open(tmp_path)
    image = build_image("v1")
    store_image(store, "docker.io/library/a", image.blobs, image.manifest)
    unfounded, hosted = put(store, b"linked by v1 pull-through"), put(store, b"pushed, no manifest yet")
    store.metadata.link_blob("docker.io/library/a", unfounded)
    store.metadata.link_blob("team/app", hosted)
    (tmp_path / "layout-version").unlink()  # as version 1 left it

    migrated = storage.open(tmp_path)

    listed = {Digest.parse(blob.digest) for blob in image.blobs}
    assert set(migrated.metadata.blobs("docker.io/library/a")) == listed
    assert set(migrated.metadata.blobs("team/app")) == {hosted}
    assert migrated.blobs.stat(unfounded) is not None  # only the link goes; the bytes are gc's to judge
    assert (tmp_path / "layout-version").read_text() == f"{LAYOUT_VERSION}\n"


def test_a_store_of_a_newer_layout_is_refused(tmp_path):
    storage.open(tmp_path)
    (tmp_path / "layout-version").write_text(f"{LAYOUT_VERSION + 1}\n")
    with pytest.raises(StorageError, match=f"layout version {LAYOUT_VERSION + 1}"):
        storage.open(tmp_path)
    (tmp_path / "layout-version").write_text("two\n")
    with pytest.raises(StorageError, match="not a layout version"):
        storage.open(tmp_path)


# secrets, readiness, stats
def test_a_secret_is_made_once_private_and_kept(tmp_path):
    store = storage.open(tmp_path)
    assert store.secret("token.key", lambda: b"first") == b"first"
    assert storage.open(tmp_path).secret("token.key", lambda: pytest.fail("made again")) == b"first"
    assert stat.S_IMODE((tmp_path / "state" / "auth" / "token.key").stat().st_mode) == 0o600
    assert [path.name for path in (tmp_path / "state" / "auth").iterdir()] == ["token.key"]
    with pytest.raises(StorageError):
        store.secret("../escape", lambda: b"")


def test_writable_problem_names_the_problem_but_no_path(tmp_path):
    store = storage.open(tmp_path)
    assert store.writable_problem() is None
    state = tmp_path / "state"
    state.rename(tmp_path / "state-moved")
    state.write_text("not a directory")
    problem = store.writable_problem()
    assert problem is not None and problem.startswith("store is not writable") and str(tmp_path) not in problem


def test_stats_count_blobs_and_pinned_blobs(tmp_path):
    store = storage.open(tmp_path)
    assert store.stats() == storage.StoreStats()
    put(store, b"s" * 10)
    store.pins.pin(put(store, b"l" * 1000))
    assert store.stats() == storage.StoreStats(blobs=2, blob_bytes=1010, pinned=1, pinned_bytes=1000)


# the garbage collector's operations
def test_trash_hides_a_blob_until_restored_or_purged(tmp_path):
    store = storage.open(tmp_path)
    digest = put(store, b"garbage?")
    assert store.blobs.changed(digest) > 0
    written = store.blobs.trash(digest)
    assert written is not None and written <= time.time()
    assert store.blobs.stat(digest) is None and list(store.blobs.trashed()) == [digest]
    assert store.blobs.read_any(digest) == b"garbage?"  # gc still reads trashed manifests
    assert store.blobs.changed(digest) == 0.0

    store.blobs.restore(digest)
    assert store.blobs.read(digest) == b"garbage?" and list(store.blobs.trashed()) == []

    store.blobs.trash(digest)
    put(store, b"garbage?")  # pushed again meanwhile: the restore keeps the new copy
    store.blobs.restore(digest)
    assert store.blobs.read(digest) == b"garbage?" and list(store.blobs.trashed()) == []

    store.blobs.trash(digest)
    store.blobs.purge(digest)
    with pytest.raises(BlobUnknown):
        store.blobs.read_any(digest)
    assert store.blobs.trash(digest) is None and list(store.blobs.trashed()) == []


def test_link_changes_are_dated(tmp_path):
    store = storage.open(tmp_path)
    digest = put(store, b"config")
    assert store.metadata.blob_link_changed("team/app", digest) == 0.0
    assert store.metadata.manifest_link_changed("team/app", digest) == 0.0
    before = time.time() - 1
    store.metadata.link_blob("team/app", digest)
    store.metadata.link_manifest("team/app", digest, "application/vnd.oci.image.manifest.v1+json")
    assert store.metadata.blob_link_changed("team/app", digest) > before
    assert store.metadata.manifest_link_changed("team/app", digest) > before


# bundle import staging
def test_staged_blobs_are_promoted_and_the_staging_store_discarded(tmp_path):
    store = storage.open(tmp_path)
    staging = store.imports.staging("a" * 32)
    writer = staging.writer()
    writer.write(b"imported")
    digest = writer.commit()
    assert store.blobs.stat(digest) is None

    store.imports.promote(staging, digest)
    store.imports.promote(staging, digest)  # no longer staged: nothing to do
    assert store.blobs.read(digest) == b"imported" and staging.stat(digest) is None

    store.imports.discard("a" * 32)
    assert store.imports.expire(0.0) == {}
    with pytest.raises(StorageError):
        store.imports.staging("../../blobs")


def test_staging_stores_nobody_wrote_for_long_expire(tmp_path):
    store = storage.open(tmp_path)
    for key, data in (("a" * 32, b"old"), ("b" * 32, b"recent")):
        writer = store.imports.staging(key).writer()
        writer.write(data)
        writer.commit()
    old = time.time() - 2 * HOUR
    for folder, subfolders, files in os.walk(tmp_path / "state" / "imports" / ("a" * 32)):
        for name in [*subfolders, *files, "."]:
            os.utime(os.path.join(folder, name), (old, old))

    assert store.imports.expire(HOUR, dry_run=True) == {"a" * 32: 3}
    assert store.imports.expire(HOUR) == {"a" * 32: 3}
    assert store.imports.expire(HOUR) == {}
    assert store.imports.staging("b" * 32).read(Digest.of(b"recent")) == b"recent"


# queues
def test_queues_keep_records_in_order_until_removed(tmp_path):
    store = storage.open(tmp_path)
    assert store.queues.peek("https://a.example/hook", 10) == []
    for number in range(5):
        store.queues.put("https://a.example/hook", {"n": number})
    store.queues.put("https://b.example/hook", {"n": "b"})

    batch = storage.open(tmp_path).queues.peek("https://a.example/hook", 3)  # another process sees them
    assert [record for _, record in batch] == [{"n": 0}, {"n": 1}, {"n": 2}]
    store.queues.remove("https://a.example/hook", [entry for entry, _ in batch])
    assert [record for _, record in store.queues.peek("https://a.example/hook", 10)] == [{"n": 3}, {"n": 4}]
    assert [record for _, record in store.queues.peek("https://b.example/hook", 10)] == [{"n": "b"}]


def test_an_unreadable_queue_record_is_dropped(tmp_path):
    store = storage.open(tmp_path)
    store.queues.put("hook", {"n": 1})
    store.queues.put("hook", {"n": 2})
    (entry, _), _ = store.queues.peek("hook", 10)
    [path] = (tmp_path / "state" / "events").glob(f"*/{entry}")
    path.write_bytes(b"{half")
    assert [record for _, record in store.queues.peek("hook", 10)] == [{"n": 2}]
    assert len(store.queues.peek("hook", 10)) == 1


def test_one_consumer_holds_the_queues_at_a_time(tmp_path):
    first = storage.open(tmp_path).queues.consumer_lock()
    assert first is not None
    assert storage.open(tmp_path).queues.consumer_lock() is None
    first.release()
    second = storage.open(tmp_path).queues.consumer_lock()
    assert second is not None
    second.release()


# fetch claims
def test_one_process_at_a_time_claims_a_fetch(tmp_path):
    store, digest = storage.open(tmp_path), Digest.of(b"upstream blob")
    claim = store.claim_fetch(digest)
    assert claim is not None
    assert storage.open(tmp_path).claim_fetch(digest) is None
    claim.release()
    again = store.claim_fetch(digest)
    assert again is not None
    again.release()
