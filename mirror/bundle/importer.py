"""``mirror bundle import``: verify and stream a bundle into the store, then publish its images.

Order, so that a client never sees half an image, nor some images of a bundle, and a failure changes nothing it
can see:

1. the signature is checked over the exact bytes of ``bundle.json`` (when keys are trusted), which are parsed only
   then, and a delta's base blobs are looked up in the store; either failing refuses the bundle before anything is
   written;
2. every blob streams from the tar into the store's staging store for this bundle (``store.imports``), its
   digest and size verified on commit; blobs the store or the staging store already hold are skipped, so a rerun
   after a kill resumes without rewriting them. Layout indexes (FORMAT.md), which only the OCI layout view
   needs, are not imported;
3. everything publishing relies on is checked, for every image (``verify.Closure``, as ``mirror bundle verify``
   does); a bad blob or any such problem discards the staging store (the bundle can never import) and nothing
   reaches the store; with ``signatures.mode: enforce``, every image must then pass the signature policy with
   the signatures the bundle carries (its ``.sig`` tags and referrers), or nothing is published;
4. staged blobs are promoted into the store (on the local disk a rename: no copy);
5. every image's manifests and blob links are written and pinned; then, last, every image's tags.

Run by root on a store another user owns (the service's), everything after opening the bundle runs with that
user's effective uid, gid and groups, so the service can read what the import wrote.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from mirror import signatures, storage
from mirror.bundle import format, signing, verify
from mirror.bundle.archive import BundleArchive
from mirror.bundle.format import BlobEntry, Bundle, ImageEntry
from mirror.bundle.progress import Progress
from mirror.config import Config
from mirror.digest import Digest
from mirror.errors import BundleError, BundleInvalid, DigestInvalid, MirrorError, SignatureRequired
from mirror.events import Events
from mirror.reference import Reference
from mirror.registry import Registry, StoredManifest
from mirror.repository import Referrers
from mirror.storage import BlobStore
from mirror.storage.pins import Pins


def run(config: Config, paths: Sequence[str], trust: Sequence[str] = ()) -> int:
    """Import the bundle of ``paths`` into the store of ``config``, as the store's owner; return the exit status."""
    root = config.storage.root.absolute()
    print(f"importing into {root}", flush=True)
    try:
        keys = [signing.load_public_key(path) for path in [*trust, *config.trusted_keys]]
        with BundleArchive(paths) as archive, _as_owner_of(root):
            print(signing.check(archive.bundle_json, archive.signature, keys))
            bundle = Bundle.from_json(archive.bundle_json)
            Importer(config, bundle, Digest.of(archive.bundle_json)).run(archive)
    except MirrorError as exc:
        print(f"mirror: import refused: {exc.message}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _as_owner_of(root: Path) -> Iterator[None]:
    """Within this, run as the user owning the store ``root`` (its uid, gid and groups) when root runs this and another
    user owns it (the service's store): files root wrote there would be unreadable to the service."""
    try:
        owner = root.stat()
    except FileNotFoundError:
        owner = None
    if owner is None or owner.st_uid == 0 or os.geteuid() != 0:
        yield
        return
    try:
        user = pwd.getpwuid(owner.st_uid)
        name, gid, groups = user.pw_name, user.pw_gid, os.getgrouplist(user.pw_name, user.pw_gid)
    except KeyError:  # an owner without a passwd entry: the store's group
        name, gid, groups = str(owner.st_uid), owner.st_gid, [owner.st_gid]
    print(f"writing as {name}, the owner of {root}", flush=True)
    saved_gid, saved_groups = os.getegid(), os.getgroups()
    os.setgroups(groups)
    os.setegid(gid)
    os.seteuid(owner.st_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(saved_gid)
        os.setgroups(saved_groups)


class Importer:
    """Brings one bundle's blobs and images into a store."""

    def __init__(self, config: Config, bundle: Bundle, bundle_id: Digest):
        self.bundle = bundle
        self.config = config
        self.bundle_id = bundle_id
        layout_only = {image.layout_index for image in bundle.images} - {image.digest for image in bundle.images}
        self.blobs = [blob for blob in bundle.blobs if blob.digest not in layout_only]

    def run(self, archive: BundleArchive) -> None:
        """Check the base, stage and verify every blob, move them into the store, publish the images."""
        opened = storage.connect(self.config) if storage.found(self.config) else None
        missing = [blob for blob in self.blobs
                   if blob.in_base and (opened is None or opened.blobs.stat(blob.digest) != blob.size)]
        if missing:
            raise BundleInvalid(f"the base of this delta is not in the store: {len(missing)} blobs missing: "
                                + ", ".join(str(blob.digest) for blob in missing))
        opened = opened or storage.connect(self.config)
        key = self.bundle_id.hex[:32]
        staging = opened.imports.staging(key)
        read = _reader(opened.blobs, staging)
        try:
            written, skipped = self._stage(archive, opened.blobs, staging)
            closure = self._check(opened.blobs, staging, read)
        except BundleError:
            opened.imports.discard(key)
            raise
        self._check_signatures(read)
        for blob in self.blobs:
            opened.imports.promote(staging, blob.digest)
        self._publish(Registry(opened), opened.pins, Events(self.config, opened.queues), closure)
        opened.imports.discard(key)
        print(f"imported {len(self.bundle.images)} images: {written} blobs written, {skipped} already present "
              f"(bundle id {self.bundle_id})")

    def _stage(self, archive: BundleArchive, store: BlobStore, staging: BlobStore) -> tuple[int, int]:
        expected = {blob.digest: blob for blob in self.blobs if not blob.in_base}
        written = skipped = 0
        with Progress("import", sum(blob.size for blob in expected.values())) as progress:
            for name, _, file in archive.members():
                digest = format.member_digest(name)
                blob = expected.pop(digest, None) if digest else None
                if blob is None or file is None:
                    continue  # layout members (and anything verify would flag) are not imported
                if blob.size in (store.stat(blob.digest), staging.stat(blob.digest)):
                    skipped += 1
                    progress.update(blob.size)
                else:
                    _stage_blob(archive, staging, blob, file, progress)
                    written += 1
        return written, skipped

    def _check(self, store: BlobStore, staging: BlobStore, read: Callable[[Digest], bytes]) -> verify.Closure:
        """Every blob is here and every image publishes as it should (``verify.Closure``), or BundleInvalid."""
        missing = [blob for blob in self.blobs
                   if blob.size not in (store.stat(blob.digest), staging.stat(blob.digest))]
        if missing:
            raise BundleInvalid("missing members: " + ", ".join(
                f"{format.blob_member(blob.digest)} (blob {blob.digest})" for blob in missing))
        closure = verify.Closure(self.bundle, read)
        if closure.problems:
            raise BundleInvalid("; ".join(closure.problems))
        return closure

    def _check_signatures(self, read: Callable[[Digest], bytes]) -> None:
        """With the signature policy enforced, raise SignatureRequired for the first image a rule refuses."""
        policy = self.config.signatures
        if policy.mode != "enforce":
            return
        keys = signatures.load_keys(policy)
        for image in self.bundle.images:
            name = Reference.parse(image.reference, None).store_name
            found = asyncio.run(signatures.find_signatures(_Staged(image, read), image.digest, read(image.digest),
                                                           keys))
            decision = signatures.decide(policy, name, image.digest, found)
            if not decision.allowed:
                raise SignatureRequired(f"image {image.reference} ({image.digest}) is refused by signature rule "
                                        f"{decision.rule!r}: missing a valid signature by "
                                        + " or ".join(decision.missing))

    def _publish(self, registry: Registry, pins: Pins, events: Events, closure: verify.Closure) -> None:
        """Pin every image's digests, held by its tag (or its digest when imported without one), and store its
        manifests and links; then tag each image."""
        refs = [Reference.parse(image.reference, None) for image in self.bundle.images]
        for image, ref, published in zip(self.bundle.images, refs, closure.published, strict=True):
            blobs = [[Digest.parse(blob["digest"]) for blob in manifest.blobs if not blob.get("urls")]
                     for manifest in published]
            pins.hold(ref.store_name, ref.tag or str(image.digest),
                      {digest for listed in blobs for digest in listed} | {manifest.digest for manifest in published})
            for manifest, listed in zip(published, blobs, strict=True):  # children first
                for digest in listed:
                    registry.metadata.link_blob(ref.store_name, digest)
                registry.store_manifest(ref.store_name, manifest)
        for image, ref in zip(self.bundle.images, refs, strict=True):
            self._tag(registry, events, image, ref)

    def _tag(self, registry: Registry, events: Events, image: ImageEntry, ref: Reference) -> None:
        name = ref.store_name
        for referrer in image.referrers:
            if referrer.tag:
                registry.metadata.tag(name, referrer.tag, referrer.digest)
        if ref.tag:
            registry.metadata.tag(name, ref.tag, image.digest)
        events.emit("import", name, ref.tag, registry.get_manifest(name, str(image.digest)))
        print(f"{image.reference}: {image.digest} published as {name}" + (f":{ref.tag}" if ref.tag else ""))


def _reader(store: BlobStore, staging: BlobStore) -> Callable[[Digest], bytes]:
    """Read a blob from the staging store, else the store; raise BundleInvalid when neither holds it."""
    def read(digest: Digest) -> bytes:
        for source in (staging, store):
            if source.stat(digest) is not None:
                return source.read(digest)
        raise BundleInvalid(f"manifest {digest} is in neither the bundle nor the store")

    return read


class _Staged:
    """One bundled image as the repository its signatures are found in: its referrers, their tags, staged blobs."""

    def __init__(self, image: ImageEntry, read: Callable[[Digest], bytes]) -> None:
        self.image, self.read = image, read
        self.tags = {referrer.tag: referrer.digest for referrer in image.referrers if referrer.tag}

    async def manifest(self, reference: str) -> StoredManifest:
        digest = self.tags.get(reference) or Digest.parse(reference)  # a tag the bundle lacks: DigestInvalid
        body = self.read(digest)
        return StoredManifest(digest, str(json.loads(body).get("mediaType", "")), body)

    async def blob(self, digest: Digest) -> _Bytes:
        return _Bytes(self.read(digest))

    async def referrers(self, subject: Digest) -> Referrers:
        descriptors = []
        for referrer in self.image.referrers:
            manifest = json.loads(self.read(referrer.digest))
            if (manifest.get("subject") or {}).get("digest") == str(subject):
                descriptors.append({"mediaType": referrer.media_type, "digest": str(referrer.digest),
                                    "artifactType": manifest.get("artifactType")})
        return Referrers.listed(descriptors)


class _Bytes:
    """A staged blob read whole, as the signature checks read blobs."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    async def chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        yield self.data[start:end]


def _stage_blob(archive: BundleArchive, staging: BlobStore, blob: BlobEntry, file: BinaryIO,
                progress: Progress) -> None:
    """Stream one member into the staging store; raise BundleInvalid naming the blob when it is wrong."""
    writer = staging.writer()
    try:
        for chunk in archive.chunks(file):
            writer.write(chunk)
            progress.update(len(chunk))
        problems = verify.blob_problems(blob, writer.size, None)
        if problems:
            raise BundleInvalid(problems[0])
        writer.commit(blob.digest)
    except DigestInvalid as exc:
        writer.cancel()
        actual = Digest.parse(exc.detail["actual"]) if isinstance(exc.detail, dict) else None
        raise BundleInvalid((verify.blob_problems(blob, blob.size, actual) or [exc.message])[0]) from exc
    except BaseException:
        writer.cancel()
        raise

