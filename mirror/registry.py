"""The hosted registry: every Distribution API operation over the blob store and repository metadata.

Handlers call this and nothing below it; the pull-through cache wraps it. No HTTP here.
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from mirror import manifest as manifests
from mirror.digest import Digest
from mirror.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestUnknown,
    MirrorError,
    NameUnknown,
    PaginationInvalid,
    RangeInvalid,
)
from mirror.storage import FilesystemBlobStore, Metadata
from mirror.storage.filesystem import FileBlobWriter
from mirror.storage.paths import check_name, check_tag

MAX_PAGE = 1000


@dataclass(frozen=True)
class StoredManifest:
    """A manifest as the registry returns it."""

    digest: Digest
    media_type: str
    body: bytes
    origin: str = "hosted"  # or, from the pull-through cache, "hit" or "miss"


@dataclass(frozen=True)
class Page:
    """One page of a listing and the ``last`` value of the next page, if there is one."""

    items: list[str]
    next_last: str | None


def page_size(n: str | None) -> int:
    """The page size asked for by ``?n=``, capped at MAX_PAGE; raise PaginationInvalid when unusable."""
    if n is None or n == "":
        return MAX_PAGE
    if not n.isdigit():
        raise PaginationInvalid(f"n must be a non-negative integer, not {n[:40]!r}")
    return min(int(n), MAX_PAGE)


def paginate(items: list[str], n: str | None, last: str | None) -> Page:
    """The page of sorted ``items`` after ``last`` with at most ``n`` entries."""
    size = page_size(n)
    if last:
        items = [item for item in items if item > last]
    chosen = items[:size]
    return Page(chosen, chosen[-1] if size and len(items) > size else None)


class BodyCache:
    """Manifest bodies by digest, least recently used dropped beyond ``budget`` bytes."""

    def __init__(self, budget: int = 32 << 20):
        self.budget, self.size = budget, 0
        self._bodies: OrderedDict[Digest, bytes] = OrderedDict()

    def get(self, digest: Digest) -> bytes | None:
        """The body of ``digest`` if kept."""
        body = self._bodies.get(digest)
        if body is not None:
            self._bodies.move_to_end(digest)
        return body

    def put(self, digest: Digest, body: bytes) -> None:
        """Keep ``body``, dropping the least recently used beyond the budget."""
        if len(body) <= self.budget // 16 and digest not in self._bodies:
            self._bodies[digest] = body
            self.size += len(body)
            while self.size > self.budget:
                self.size -= len(self._bodies.popitem(last=False)[1])


class Registry:
    """Hosted repositories in one store: blobs, uploads, manifests, tags, referrers."""

    def __init__(self, blobs: FilesystemBlobStore, metadata: Metadata):
        self.blobs = blobs
        self.metadata = metadata
        self._bodies = BodyCache()

    # blobs
    def blob_size(self, name: str, digest: Digest) -> int:
        """The size of blob ``digest`` in ``name``; raise BlobUnknown when the repository lacks it."""
        size = self.blobs.stat(digest) if self.metadata.has_blob(check_name(name), digest) else None
        if size is None:
            raise BlobUnknown(f"blob {digest} is not in {name}", detail={"digest": str(digest)})
        return size

    def open_blob(self, name: str, digest: Digest, offset: int = 0) -> BinaryIO:
        """The blob's bytes from ``offset``."""
        self.blob_size(name, digest)
        return self.blobs.open(digest, offset)

    def delete_blob(self, name: str, digest: Digest) -> None:
        """Stop serving ``digest`` in ``name`` (its bytes go at the next garbage collection)."""
        if not self.metadata.unlink_blob(check_name(name), digest):
            raise BlobUnknown(f"blob {digest} is not in {name}", detail={"digest": str(digest)})

    def mount(self, name: str, source: str, digest: Digest) -> bool:
        """Link ``digest`` from repository ``source`` into ``name``; return whether it could."""
        try:
            source = check_name(source)
        except Exception:  # noqa: BLE001 - a bad ``from`` just means "cannot mount"
            return False
        if self.metadata.has_blob(source, digest) and self.blobs.stat(digest) is not None:
            self.metadata.link_blob(check_name(name), digest)
            return True
        return False

    # uploads
    def start_upload(self, name: str) -> FileBlobWriter:
        """Open a new upload session in ``name``."""
        return self.blobs.writer(repository=check_name(name))

    def resume_upload(self, name: str, session: str) -> FileBlobWriter:
        """Reopen upload ``session`` of ``name``."""
        self._check_session(name, session)
        return self.blobs.writer(session)

    def upload_size(self, name: str, session: str) -> int:
        """How many bytes upload ``session`` holds."""
        self._check_session(name, session)
        return self.blobs.session_size(session)

    def check_chunk_start(self, writer: FileBlobWriter, start: int | None) -> None:
        """Refuse a chunk that does not begin where the upload stands."""
        if start is not None and start != writer.size:
            writer.close()
            raise RangeInvalid(f"chunk starts at {start} but the upload holds {writer.size} bytes",
                               detail={"size": writer.size})

    def finish_upload(self, name: str, writer: FileBlobWriter, expected: Digest) -> Digest:
        """Commit ``writer`` as blob ``expected`` and link it into ``name``."""
        digest = writer.commit(expected)
        self.metadata.link_blob(name, digest)
        return digest

    def cancel_upload(self, name: str, session: str) -> None:
        """Abandon upload ``session`` of ``name``."""
        self._check_session(name, session)
        self.blobs.writer(session).cancel()

    def expire_uploads(self, max_age: float, dry_run: bool = False) -> dict[str, int]:
        """Delete upload sessions idle longer than ``max_age`` seconds (unless ``dry_run``); return their sizes."""
        cutoff = time.time() - max_age
        expired: dict[str, int] = {}
        for session, mtime in list(self.blobs.sessions()):
            if mtime >= cutoff:
                continue
            with contextlib.suppress(MirrorError):  # finished or cancelled meanwhile
                expired[session] = self.blobs.session_size(session)
                if not dry_run:
                    self.blobs.writer(session).cancel()
        return expired

    def _check_session(self, name: str, session: str) -> None:
        if self.blobs.session_repository(session) != check_name(name):
            raise BlobUploadUnknown(f"upload {session[:100]} is not known in {name}",
                                    detail={"session": session[:100]})

    # manifests
    def get_manifest(self, name: str, reference: str) -> StoredManifest:
        """The manifest ``reference`` (tag or digest) names in ``name``, byte for byte as pushed."""
        check_name(name)
        if Digest.is_digest(reference):
            digest: Digest | None = Digest.parse(reference)
        else:
            digest = self.metadata.resolve_tag(name, check_tag(reference))
        media_type = self.metadata.manifest_media_type(name, digest) if digest is not None else None
        if digest is None or media_type is None:
            raise ManifestUnknown(f"manifest {reference} is not in {name}",
                                  detail={"name": name, "reference": reference[:200]})
        return StoredManifest(digest, media_type, self.manifest_body(digest))

    def manifest_body(self, digest: Digest) -> bytes:
        """The bytes of manifest ``digest`` (kept in memory: content-addressed bytes never change)."""
        body = self._bodies.get(digest)
        if body is None:
            try:
                body = self.blobs.read(digest)
            except BlobUnknown as exc:
                raise ManifestUnknown(f"manifest {digest} is not in the store") from exc
            self._bodies.put(digest, body)
        return body

    def put_manifest(self, name: str, reference: str, body: bytes, content_type: str | None) -> manifests.Manifest:
        """Validate and store a manifest, tag it when ``reference`` is a tag; return it parsed."""
        check_name(name)
        is_digest = Digest.is_digest(reference)
        expected = Digest.parse(reference) if is_digest else None
        if not is_digest:
            check_tag(reference)
        manifest = manifests.parse(body, content_type, expected.algorithm if expected else "sha256")
        if expected is not None and manifest.digest != expected:
            raise DigestInvalid(f"manifest digest {manifest.digest} does not match {expected}")
        self._check_references(name, manifest)
        self.store_manifest(name, manifest)
        if not is_digest:
            self.metadata.tag(name, reference, manifest.digest)
        return manifest

    def store_manifest(self, name: str, manifest: manifests.Manifest) -> None:
        """Write a validated manifest's bytes and links (used by pushes, the cache and bundle imports)."""
        if self.blobs.stat(manifest.digest) is None:
            writer = self.blobs.writer()
            writer.write(manifest.body)
            writer.commit(manifest.digest)
        self.metadata.link_manifest(name, manifest.digest, manifest.media_type)
        if manifest.subject is not None:
            self.metadata.add_referrer(name, manifest.subject, manifest.digest, manifest.descriptor())

    def _check_references(self, name: str, manifest: manifests.Manifest) -> None:
        for descriptor in manifest.blobs:
            digest = Digest.parse(descriptor["digest"])
            if descriptor.get("urls"):
                continue  # foreign layers live elsewhere by design
            if not self.metadata.has_blob(name, digest) or self.blobs.stat(digest) is None:
                raise ManifestBlobUnknown(f"blob {digest} is not in {name}", detail={"digest": str(digest)})
        for descriptor in manifest.children:
            digest = Digest.parse(descriptor["digest"])
            if self.metadata.manifest_media_type(name, digest) is None:
                raise ManifestBlobUnknown(f"manifest {digest} is not in {name}", detail={"digest": str(digest)})

    def delete_manifest(self, name: str, reference: str) -> None:
        """Delete a tag, or a manifest by digest together with the tags pointing at it."""
        check_name(name)
        if not Digest.is_digest(reference):
            if not self.metadata.untag(name, check_tag(reference)):
                raise ManifestUnknown(f"tag {reference} is not in {name}")
            return
        digest = Digest.parse(reference)
        media_type = self.metadata.manifest_media_type(name, digest)
        if media_type is None:
            raise ManifestUnknown(f"manifest {digest} is not in {name}")
        try:
            subject = manifests.parse(self.blobs.read(digest), media_type).subject
        except Exception:  # noqa: BLE001 - an unreadable manifest has no referrer entry to remove
            subject = None
        if subject is not None:
            self.metadata.remove_referrer(name, subject, digest)
        self.metadata.unlink_manifest(name, digest)

    # listings
    def tags(self, name: str, n: str | None, last: str | None) -> Page:
        """One page of the tags of ``name``."""
        if not self.metadata.exists(check_name(name)):
            raise NameUnknown(f"repository {name} is not known", detail={"name": name})
        return paginate(self.metadata.tags(name), n, last)

    def catalog(self, n: str | None, last: str | None, visible: Callable[[str], bool] = lambda name: True) -> Page:
        """One page of the names of the repositories that ``visible`` accepts."""
        return paginate([name for name in self.metadata.repositories() if visible(name)], n, last)

    def referrers(self, name: str, subject: Digest, artifact_type: str | None) -> dict[str, Any]:
        """An OCI image index of the manifests referring to ``subject``, filtered by ``artifact_type``."""
        descriptors = self.metadata.referrers(check_name(name), subject)
        if artifact_type:
            descriptors = [d for d in descriptors if d.get("artifactType") == artifact_type]
        return {"schemaVersion": 2, "mediaType": manifests.OCI_INDEX, "manifests": descriptors}
