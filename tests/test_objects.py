"""The ``Objects`` seam: files on local disk and objects in a real Ceph RGW bucket answer alike, so repository
metadata and pins, written once over it, behave the same on both kinds of store."""
from __future__ import annotations

import time

import pytest

from mirror.config import S3Storage
from mirror.digest import Digest
from mirror.storage.metadata import Metadata
from mirror.storage.objects import FileObjects
from mirror.storage.pins import Pins
from mirror.storage.s3 import Bucket, S3Objects

A, B = Digest.of(b"a"), Digest.of(b"b")


@pytest.fixture(params=["files", "bucket"])
def objects(request, tmp_path):
    """Objects on local disk, or in a new bucket of the test session's gateway."""
    if request.param == "files":
        return FileObjects(tmp_path)
    gateway = request.getfixturevalue("ceph_rgw")
    name = gateway.bucket(f"objects-{abs(hash(request.node.nodeid)) % 10**9}")
    return S3Objects(Bucket(S3Storage(gateway.endpoint, name, gateway.access_key, gateway.secret_key,
                                      prefix="store/")))


def test_objects_are_written_whole_listed_by_folder_and_deleted(objects):
    assert objects.get("a/b/c") is None and not objects.exists("a/b/c") and objects.changed("a/b/c") == 0
    objects.put("a/b/c", b"one")
    objects.put("a/b/d", b"")
    objects.put("a/e/f", b"two")
    assert objects.get("a/b/c") == b"one" and objects.exists("a/b/d")
    assert sorted(objects.children("a")) == ["b", "e"] and sorted(objects.children("a/b")) == ["c", "d"]
    assert objects.children("missing") == []
    written = objects.changed("a/b/c")
    assert abs(written - time.time()) < 120
    assert objects.delete("a/b/c") and not objects.delete("a/b/c")
    objects.delete_folder("a")
    assert objects.children("a/b") == [] and objects.get("a/e/f") is None


def test_metadata_and_pins_answer_the_same_on_both(objects):
    metadata, pins = Metadata(objects), Pins(objects)
    metadata.link_blob("team/app", A)
    metadata.link_manifest("team/app", B, "application/vnd.oci.image.manifest.v1+json")
    metadata.tag("team/app", "1", B)
    metadata.tag("team/app", "2", B)
    metadata.add_referrer("team/app", B, A, {"digest": str(A)})
    metadata.link_blob("docker.io/library/alpine", A)
    assert metadata.repositories() == ["docker.io/library/alpine", "team/app"]
    assert list(metadata.blobs("team/app")) == [A] and metadata.has_blob("team/app", A)
    assert metadata.tags("team/app") == ["1", "2"] and metadata.resolve_tag("team/app", "1") == B
    assert metadata.referrers("team/app", B) == [{"digest": str(A)}]
    assert metadata.exists("team/app") and not metadata.exists("team/other")
    metadata.touch_tag("team/app", "1")
    assert metadata.tag_mtime("team/app", "1") is not None
    assert metadata.unlink_manifest("team/app", B) and metadata.tags("team/app") == []
    pins.hold("team/app", "1", {A, B})
    pins.hold("team/app", "2", {A})
    assert pins.is_pinned(A) and pins.is_pinned(B)
    pins.release("team/app", "1")
    assert pins.is_pinned(A) and not pins.is_pinned(B) and list(pins.all()) == [A]
    pins.release("team/app", "2")
    assert list(pins.all()) == []
