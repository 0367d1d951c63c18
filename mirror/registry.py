"""Repository content in the store: every Distribution API operation on one store repository, by name.

The repositories of ``repository.py`` (hosted, mirrored, the default route) are made of this; so are the
commands that work on the store (gc, bundle import and export). Content is served from a repository only
where it is linked there. No HTTP and no upstream here.
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
    TagInvalid,
)
from mirror.storage import Store
from mirror.storage.base import BlobWriter
from mirror.storage.paths import check_name, check_tag

MAX_PAGE = 1000


@dataclass(frozen=True)
class StoredManifest:
    """A manifest as the registry returns it."""

    digest: Digest
    media_type: str
    body: bytes
    origin: str = "hosted"  # or, from the pull-through cache, "hit" or "miss"
    repository: str = ""  # the store repository that served it


@dataclass(frozen=True)
class Page:
    """One page of a listing and the ``last`` value of the next page, if there is one."""

    items: list[str]
    next_last: str | None


def page_size(n: str | None) -> int:
    """The page size asked for by ``?n=``, capped at MAX_PAGE; raise PaginationInvalid when unusable."""
    if n is None or n == "":
        return MAX_PAGE
    if not (n.isascii() and n.isdigit()):
        raise PaginationInvalid(f"n must be a non-negative integer, not {n[:40]!r}")
    digits = n.lstrip("0") or "0"  # int() refuses over 4300 digits: a number that long is over MAX_PAGE anyway
    return MAX_PAGE if len(digits) > len(str(MAX_PAGE)) else min(int(digits), MAX_PAGE)


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
    """The repositories of one store: blobs, uploads, manifests, tags, referrers."""

    def __init__(self, store: Store):
        self.store = store
        self.blobs = store.blobs
        self.metadata = store.metadata
        self._bodies = BodyCache()

    # blobs
    def linked_size(self, name: str, digest: Digest) -> int | None:
        """The size of blob ``digest`` if ``name`` links it and its bytes are in the store, else None."""
        return self.blobs.stat(digest) if self.metadata.has_blob(check_name(name), digest) else None

    def blob_size(self, name: str, digest: Digest) -> int:
        """The size of blob ``digest`` in ``name``; raise BlobUnknown when the repository lacks it."""
        size = self.linked_size(name, digest)
        if size is None:
            raise BlobUnknown(f"blob {digest} is not in {name}", detail={"digest": str(digest)})
        return size

    def link_pushed(self, name: str, digest: Digest) -> None:
        """Link blob ``digest`` into ``name`` as pushed content: from now on it is never evicted."""
        self.metadata.link_blob(name, digest)
        self.store.access.forget(digest)

    def open_blob(self, name: str, digest: Digest, offset: int = 0) -> BinaryIO:
        """The blob's bytes from ``offset``."""
        self.blob_size(name, digest)
        return self.blobs.open(digest, offset)

    def delete_blob(self, name: str, digest: Digest) -> None:
        """Stop serving ``digest`` in ``name`` (its bytes go at the next garbage collection)."""
        if not self.metadata.unlink_blob(check_name(name), digest):
            raise BlobUnknown(f"blob {digest} is not in {name}", detail={"digest": str(digest)})

    # uploads
    def start_upload(self, name: str) -> BlobWriter:
        """Open a new upload session in ``name``."""
        return self.blobs.writer(repository=check_name(name))

    def resume_upload(self, name: str, session: str) -> BlobWriter:
        """Reopen upload ``session`` of ``name``."""
        self._check_session(name, session)
        return self.blobs.writer(session)

    def upload_size(self, name: str, session: str) -> int:
        """How many bytes upload ``session`` holds."""
        self._check_session(name, session)
        return self.blobs.session_size(session)

    def check_chunk_start(self, writer: BlobWriter, start: int | None) -> None:
        """Refuse a chunk that does not begin where the upload stands."""
        if start is not None and start != writer.size:
            writer.close()
            raise RangeInvalid(f"chunk starts at {start} but the upload holds {writer.size} bytes",
                               detail={"size": writer.size})

    def finish_upload(self, name: str, writer: BlobWriter, expected: Digest) -> Digest:
        """Commit ``writer`` as blob ``expected`` and link it into ``name``."""
        digest = writer.commit(expected)
        self.link_pushed(name, digest)
        return digest

    def cancel_upload(self, name: str, session: str) -> None:
        """Abandon upload ``session`` of ``name``."""
        self._check_session(name, session)
        self.blobs.writer(session).cancel()

    def expire_uploads(self, max_age: float, dry_run: bool = False) -> dict[str, int]:
        """Delete upload sessions idle longer than ``max_age`` seconds, and what commits that died halfway that
        long ago left (unless ``dry_run``); return their sizes."""
        cutoff = time.time() - max_age
        expired: dict[str, int] = {}
        for session, mtime in list(self.blobs.sessions()):
            if mtime >= cutoff:
                continue
            with contextlib.suppress(MirrorError):  # finished or cancelled meanwhile, or being written right now
                size = self.blobs.session_size(session)
                if not dry_run:
                    self.blobs.writer(session).cancel()
                expired[session] = size
        return expired | self.blobs.expire_assemblies(cutoff, dry_run)

    def _check_session(self, name: str, session: str) -> None:
        if self.blobs.session_repository(session) != check_name(name):
            raise BlobUploadUnknown(f"upload {session[:100]} is not known in {name}",
                                    detail={"session": session[:100]})

    # manifests
    def get_manifest(self, name: str, reference: str) -> StoredManifest:
        """The manifest ``reference`` (tag or digest) names in ``name``, byte for byte as pushed."""
        check_name(name)
        digest = self.resolve(name, reference)
        media_type = self.metadata.manifest_media_type(name, digest) if digest is not None else None
        if digest is None or media_type is None:
            raise ManifestUnknown(f"manifest {reference[:200]} is not in {name}",
                                  detail={"name": name, "reference": reference[:200]})
        return StoredManifest(digest, media_type, self.manifest_body(digest), repository=name)

    def resolve(self, name: str, reference: str) -> Digest | None:
        """The digest ``reference`` names in ``name``: itself, or what the tag points at (None: no such tag;
        a malformed tag names nothing, as the spec's manifest GET wants a 404 for it)."""
        if Digest.is_digest(reference):
            return Digest.parse(reference)
        try:
            return self.metadata.resolve_tag(name, check_tag(reference))
        except TagInvalid:
            return None

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

    @staticmethod
    def parse_pushed(reference: str, body: bytes, content_type: str | None) -> manifests.Manifest:
        """Validate a pushed manifest against ``reference`` (its tag, or the digest it must have)."""
        expected = Digest.parse(reference) if Digest.is_digest(reference) else None
        if expected is None:
            check_tag(reference)
        manifest = manifests.parse(body, content_type, expected.algorithm if expected else "sha256")
        if expected is not None and manifest.digest != expected:
            raise DigestInvalid(f"manifest digest {manifest.digest} does not match {expected}")
        return manifest

    def missing_references(self, name: str, manifest: manifests.Manifest) -> tuple[list[Digest], list[Digest]]:
        """The blobs (foreign layers aside) and the child manifests ``manifest`` lists that ``name`` lacks."""
        blobs = [Digest.parse(d["digest"]) for d in manifest.blobs if not d.get("urls")]
        children = [Digest.parse(d["digest"]) for d in manifest.children]
        return ([d for d in blobs if self.linked_size(name, d) is None],
                [d for d in children if self.metadata.manifest_media_type(name, d) is None])

    def put_manifest(self, name: str, reference: str, body: bytes, content_type: str | None) -> manifests.Manifest:
        """Validate and store a pushed manifest whose references ``name`` all holds; return it parsed."""
        manifest = self.parse_pushed(reference, body, content_type)
        self.push_manifest(name, reference, manifest)
        return manifest

    def push_manifest(self, name: str, reference: str, manifest: manifests.Manifest) -> None:
        """Store a pushed manifest whose references ``name`` all holds, and tag it when ``reference`` is a tag."""
        blobs, children = self.missing_references(name, manifest)
        for digest in blobs:
            raise ManifestBlobUnknown(f"blob {digest} is not in {name}", detail={"digest": str(digest)})
        for digest in children:
            raise ManifestBlobUnknown(f"manifest {digest} is not in {name}", detail={"digest": str(digest)})
        self.store_manifest(name, manifest)
        self.store.access.forget(manifest.digest)
        if not Digest.is_digest(reference):
            self.metadata.tag(name, reference, manifest.digest)

    def store_manifest(self, name: str, manifest: manifests.Manifest) -> None:
        """Write a validated manifest's bytes and links (used by pushes, the cache and bundle imports)."""
        if self.blobs.stat(manifest.digest) is None:
            writer = self.blobs.writer()
            try:
                writer.write(manifest.body)
                writer.commit(manifest.digest)
            finally:
                writer.cancel()  # nothing after a commit; after a failure, the session and its lock go
        self.metadata.link_manifest(name, manifest.digest, manifest.media_type)
        if manifest.subject is not None:
            self.metadata.add_referrer(name, manifest.subject, manifest.digest, manifest.descriptor())

    def delete_manifest(self, name: str, reference: str) -> None:
        """Delete a tag, or a manifest by digest with the tags pointing at it, releasing the pins they held."""
        check_name(name)
        pins = self.store.pins
        if not Digest.is_digest(reference):
            pins.release(name, check_tag(reference))
            if not self.metadata.untag(name, reference):
                raise ManifestUnknown(f"tag {reference} is not in {name}")
            return
        digest = Digest.parse(reference)
        media_type = self.metadata.manifest_media_type(name, digest)
        if media_type is None:
            raise ManifestUnknown(f"manifest {digest} is not in {name}")
        for tag in self.metadata.tags(name):
            if self.metadata.resolve_tag(name, tag) == digest:
                pins.release(name, tag)
        pins.release(name, str(digest))
        try:
            subject = manifests.parse(self.blobs.read(digest), media_type).subject
        except Exception:  # noqa: BLE001 - an unreadable manifest has no referrer entry to remove
            subject = None
        if subject is not None:
            self.metadata.remove_referrer(name, subject, digest)
        self.metadata.unlink_manifest(name, digest)

    def purge(self, name: str, roots: set[Digest]) -> list[Digest]:
        """Delete manifests ``roots`` of ``name``, their tags and pins, and what only they reached; return them."""
        # Reached manifests (an index's platforms, referrers) go too unless a tag or another manifest of ``name``
        # reaches them or they are still pinned; so do the blob links. Blob bytes stay for the garbage collector.
        doomed, doomed_blobs = self.store.reach(name, roots)
        removed = []
        for digest in sorted(doomed & roots, key=str):
            with contextlib.suppress(ManifestUnknown):  # deleted meanwhile
                self.delete_manifest(name, str(digest))
                removed.append(digest)
        rest = doomed - roots
        pinned = {digest for digest in rest if self.store.pins.is_pinned(digest)}
        tagged = {self.metadata.resolve_tag(name, tag) for tag in self.metadata.tags(name)}
        live = (set(self.metadata.manifests(name)) - rest) | pinned | {digest for digest in tagged if digest}
        kept, kept_blobs = self.store.reach(name, live)
        for digest in sorted(rest - kept, key=str):
            with contextlib.suppress(ManifestUnknown):
                self.delete_manifest(name, str(digest))
                removed.append(digest)
        for digest in doomed_blobs - kept_blobs:
            self.metadata.unlink_blob(name, digest)
        return removed

    # listings
    def tags(self, name: str) -> list[str]:
        """The tags of ``name``; raise NameUnknown when nothing was ever written to it."""
        if not self.metadata.exists(check_name(name)):
            raise NameUnknown(f"repository {name} is not known", detail={"name": name})
        return self.metadata.tags(name)

    def catalog(self, n: str | None, last: str | None, visible: Callable[[str], bool] = lambda name: True) -> Page:
        """One page of the names of the repositories holding a manifest that ``visible`` accepts."""
        names = [name for name in self.metadata.repositories() if visible(name) and self.metadata.holds_manifest(name)]
        return paginate(names, n, last)

    def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]:
        """Descriptors of the manifests of ``name`` referring to ``subject``."""
        return self.metadata.referrers(check_name(name), subject)
