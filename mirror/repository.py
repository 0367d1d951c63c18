"""Repositories as a request sees them: hosted, mirrored, or hosted in front of mirrored (the default route).

``Repositories.resolve`` turns a request's name (and containerd's ``?ns=``) into one of these, once; handlers
and commands call only the repository. Content is served from a repository only where it is linked there:

- ``Hosted``: what was pushed or imported into that store repository.
- ``Mirrored``: an upstream's store repository (``docker.io/library/alpine``). A blob is linked there once
  the upstream confirmed this repository has it, by serving it or answering a HEAD, or when a cached
  manifest of this repository lists it and its bytes came from the same upstream (shared base layers cost no
  extra request). Bytes pushed, imported or fetched from another upstream are never served here without
  that confirmation: an upstream manifest naming a private digest unlocks nothing. Writes are refused
  unless the upstream has ``allow_push``.
- ``DefaultRoute``: the docker daemon's ``/v2/library/alpine`` with a default upstream: the hosted
  repository of that name first, then the upstream's. Writes go to the hosted one; what a HEAD through it
  says exists, a manifest PUT through it accepts (and links into the hosted repository).

Each repository names the store repositories it may serve from (``access_names``: access rules must allow
reading all of them) and the one writes land in (``write_name``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from mirror import manifest as manifests
from mirror.config import Config, Upstream
from mirror.digest import Digest
from mirror.errors import (
    BlobUnknown,
    BlobUploadUnknown,
    ManifestUnknown,
    MirrorError,
    NameUnknown,
    Unsupported,
    UpstreamDenied,
    UpstreamError,
    UpstreamNotFound,
)
from mirror.fetch import HIT, MISS, BlobSource, Fetcher, StoredBlob
from mirror.manifest import OCI_INDEX
from mirror.reference import RequestName, resolve_name, store_prefix
from mirror.registry import Registry, StoredManifest
from mirror.storage.base import BlobWriter
from mirror.storage.paths import TAG_PATTERN
from mirror.upstream import UpstreamClient

log = logging.getLogger("mirror.repository")
PAGE_REFERRERS = 1000  # descriptors in one page of a referrers listing at most
PAGE_BYTES = 4 << 20  # and bytes of them encoded, unless the first alone is larger (a page holds at least one)
Descriptor = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class ReferrersPage:
    """One page of a referrers listing: its descriptors encoded as JSON, and the digest the next page starts
    after (None on the last page)."""

    descriptors: list[bytes]
    next_last: str | None

    def index(self) -> bytes:
        """The page as the OCI image index the referrers API answers."""
        opening = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()[:-2]
        return b"".join((opening, b", ".join(self.descriptors), b"]}"))


class Referrers:
    """The referrers of one subject by digest: descriptors an upstream listed are held, stored ones are read only
    when a page needs them, so a listing costs the memory of one page however large its descriptors are."""

    def __init__(self, entries: Mapping[str, Descriptor | Callable[[], Descriptor | None]] | None = None):
        self.entries = dict(entries or {})

    @classmethod
    def stored(cls, registry: Registry, name: str, subject: Digest) -> Referrers:
        """The referrers of ``subject`` recorded in store repository ``name`` (their descriptors not read yet)."""
        metadata = registry.metadata
        return cls({str(digest): functools.partial(metadata.referrer, name, subject, digest)
                    for digest in metadata.referrer_digests(name, subject)})

    @classmethod
    def listed(cls, descriptors: list[Descriptor]) -> Referrers:
        """Referrers an upstream listed."""
        return cls({str(descriptor.get("digest")): descriptor for descriptor in descriptors})

    def __or__(self, other: Referrers) -> Referrers:
        """These and ``other``'s referrers; of a digest in both, this descriptor."""
        return Referrers({**other.entries, **self.entries})

    def __len__(self) -> int:
        return len(self.entries)

    def page(self, artifact_type: str | None = None, last: str | None = None, limit: int = PAGE_REFERRERS,
             budget: int = PAGE_BYTES) -> ReferrersPage:
        """The page after digest ``last``, in digest order, of the referrers of ``artifact_type`` (any if None):
        at most ``limit`` descriptors of at most ``budget`` bytes encoded, but at least one. Reads the stored
        descriptors it needs and one more, to tell whether there is a next page."""
        chosen: list[bytes] = []
        size, chosen_last = 0, None
        for digest in sorted(digest for digest in self.entries if last is None or digest > last):
            entry = self.entries[digest]
            descriptor = entry() if callable(entry) else entry
            if descriptor is None or (artifact_type and descriptor.get("artifactType") != artifact_type):
                continue
            encoded = json.dumps(descriptor).encode()
            if chosen and (len(chosen) >= limit or size + len(encoded) > budget):
                return ReferrersPage(chosen, chosen_last)
            chosen.append(encoded)
            size, chosen_last = size + len(encoded) + 2, digest
        return ReferrersPage(chosen, None)


class Repository(Protocol):
    """What every kind of repository answers."""

    access_names: tuple[str, ...]
    write_name: str

    async def blob(self, digest: Digest) -> BlobSource:
        """The blob's bytes; raise BlobUnknown when this repository may not serve it."""

    def linked_size(self, digest: Digest) -> int | None:
        """The size of blob ``digest`` if it is linked here and in the store (a mount source), else None."""

    async def manifest(self, reference: str) -> StoredManifest:
        """The manifest a tag or digest names here; raise ManifestUnknown."""

    async def tags(self) -> list[str]:
        """The tags, sorted; raise NameUnknown for a repository that does not exist."""

    async def referrers(self, subject: Digest) -> Referrers:
        """The manifests referring to ``subject``."""

    def start_upload(self) -> BlobWriter:
        """Open an upload session."""

    def resume_upload(self, session: str) -> BlobWriter:
        """Reopen upload ``session`` of this repository."""

    def upload_size(self, session: str) -> int:
        """How many bytes upload ``session`` holds."""

    def cancel_upload(self, session: str) -> None:
        """Abandon upload ``session``."""

    def finish_upload(self, writer: BlobWriter, expected: Digest) -> Digest:
        """Commit the upload as blob ``expected`` and link it here."""

    def mount(self, digest: Digest) -> None:
        """Link blob ``digest`` (readable by the caller elsewhere) here as pushed content."""

    async def put_manifest(self, reference: str, body: bytes, content_type: str | None) -> manifests.Manifest:
        """Validate and store a pushed manifest under a tag or its digest; return it parsed."""

    def delete_manifest(self, reference: str) -> None:
        """Delete a tag, or a manifest by digest."""

    def delete_blob(self, digest: Digest) -> None:
        """Stop serving blob ``digest`` here."""


class Hosted:
    """A store repository served as it is: pushed and imported content."""

    def __init__(self, registry: Registry, name: str):
        self.registry, self.name = registry, name
        self.access_names, self.write_name = (name,), name

    async def blob(self, digest: Digest) -> BlobSource:
        """The blob's bytes, when linked here."""
        return StoredBlob(self.registry.store, digest, self.registry.blob_size(self.name, digest))

    def linked_size(self, digest: Digest) -> int | None:
        """The size of a blob linked here."""
        return self.registry.linked_size(self.name, digest)

    async def manifest(self, reference: str) -> StoredManifest:
        """The manifest ``reference`` names here."""
        return self.registry.get_manifest(self.name, reference)

    async def tags(self) -> list[str]:
        """The tags here."""
        return self.registry.tags(self.name)

    async def referrers(self, subject: Digest) -> Referrers:
        """The referrers recorded here."""
        return Referrers.stored(self.registry, self.name, subject)

    def start_upload(self) -> BlobWriter:
        """Open an upload session here."""
        return self.registry.start_upload(self.name)

    def resume_upload(self, session: str) -> BlobWriter:
        """Reopen an upload session of this repository."""
        return self.registry.resume_upload(self.name, session)

    def upload_size(self, session: str) -> int:
        """Bytes received by an upload session of this repository."""
        return self.registry.upload_size(self.name, session)

    def cancel_upload(self, session: str) -> None:
        """Abandon an upload session of this repository."""
        self.registry.cancel_upload(self.name, session)

    def finish_upload(self, writer: BlobWriter, expected: Digest) -> Digest:
        """Commit and link the upload."""
        return self.registry.finish_upload(self.name, writer, expected)

    def mount(self, digest: Digest) -> None:
        """Link a blob here as pushed content."""
        self.registry.link_pushed(self.name, digest)

    async def put_manifest(self, reference: str, body: bytes, content_type: str | None) -> manifests.Manifest:
        """Store a manifest whose references are all linked here."""
        return self.registry.put_manifest(self.name, reference, body, content_type)

    def delete_manifest(self, reference: str) -> None:
        """Delete a tag, or a manifest by digest."""
        self.registry.delete_manifest(self.name, reference)

    def delete_blob(self, digest: Digest) -> None:
        """Unlink a blob."""
        self.registry.delete_blob(self.name, digest)


class Mirrored:
    """An upstream's store repository: cached content, fetched from the upstream on demand.

    Cached tags and tag lists are trusted for ``manifest_ttl``, then refreshed; while the upstream is down
    (``upstream/health.py``) or after a refresh failed (for ``fetch.STALE_RETRY``, or until it is back) they are
    served as they are at once, and what was never cached fails at once.
    """

    def __init__(self, registry: Registry, fetcher: Fetcher, upstream: Upstream, request: RequestName):
        self.registry, self.fetcher, self.upstream = registry, fetcher, upstream
        self.name, self.path = request.store, request.path
        self.access_names, self.write_name = (self.name,), self.name
        self._pushes = Hosted(registry, self.name) if upstream.allow_push else None

    @property
    def client(self) -> UpstreamClient:
        """The upstream's client."""
        return self.fetcher.client(self.upstream)

    # blobs
    async def blob(self, digest: Digest) -> BlobSource:
        """A linked blob from the store, else the upstream's (fetched once, however many ask)."""
        size = self.registry.linked_size(self.name, digest)
        if size is not None:
            self.registry.store.access.touch(digest)
            return StoredBlob(self.registry.store, digest, size, HIT)
        return await self.fetcher.blob(self.upstream, self.path, self.name, digest, lambda: self._confirm(digest))

    async def _confirm(self, digest: Digest) -> None:
        """Link ``digest`` here once the upstream says this repository has it; raise BlobUnknown if not."""
        if self.registry.metadata.has_blob(self.name, digest):
            return
        try:
            await self.client.head_blob(self.path, digest)
        except UpstreamNotFound as exc:
            raise BlobUnknown(f"blob {digest} is not in {self.upstream.name}/{self.path}",
                              detail={"digest": str(digest)}) from exc
        self.registry.metadata.note_origin(store_prefix(self.upstream.name), digest)
        self.registry.metadata.link_blob(self.name, digest)

    def linked_size(self, digest: Digest) -> int | None:
        """The size of a blob linked here (no upstream is asked)."""
        return self.registry.linked_size(self.name, digest)

    # manifests
    async def manifest(self, reference: str) -> StoredManifest:
        """A cached manifest (a tag revalidated after its TTL, stale at once while it is down), else the upstream's."""
        digest = self.registry.resolve(self.name, reference)
        if digest is None and not Digest.is_digest(reference) and not _valid_tag(reference):
            raise ManifestUnknown(f"manifest {reference[:200]} is not in {self.name}")
        media_type = self.registry.metadata.manifest_media_type(self.name, digest) if digest else None
        if digest is not None and media_type is not None:
            if Digest.is_digest(reference) or self._fresh(reference, digest):
                return self._hit(digest, media_type)
            return await self._revalidate(reference, digest, media_type)
        return await self._fetch_manifest(reference)

    def _fresh(self, tag: str, digest: Digest) -> bool:
        if self.registry.store.pins.is_pinned(digest):
            return True
        written = self.registry.metadata.tag_mtime(self.name, tag)
        return written is not None and time.time() - written < self.upstream.manifest_ttl

    async def _revalidate(self, tag: str, cached: Digest, media_type: str) -> StoredManifest:
        return await self._refreshed(("revalidate", self.name, tag), lambda: self._hit(cached, media_type),
                                     lambda: self._check_tag(tag, cached, media_type))

    async def _check_tag(self, tag: str, cached: Digest, media_type: str) -> StoredManifest:
        try:
            digest, _, _ = await self.client.head_manifest(self.path, tag)
        except UpstreamError as exc:
            log.info("serving %s:%s stale: %s", self.name, tag, exc.message)
            self.fetcher.remember_stale(self.upstream, ("revalidate", self.name, tag))
            return self._hit(cached, media_type)
        if digest == cached:
            self.registry.metadata.touch_tag(self.name, tag)
            return self._hit(cached, media_type)
        return await self._fetch_manifest(tag)

    async def _fetch_manifest(self, reference: str) -> StoredManifest:
        key = (self.name, reference)
        if self.fetcher.missing(key):
            raise ManifestUnknown(f"manifest {reference} is not in {self.upstream.name}/{self.path}",
                                  detail={"name": self.name, "reference": reference[:200]})
        return await self.fetcher.single(key, lambda: self._cache_manifest(reference))

    async def _cache_manifest(self, reference: str) -> StoredManifest:
        try:
            body, media_type, digest = await self.client.get_manifest(self.path, reference)
        except UpstreamNotFound as exc:
            self.fetcher.remember_missing((self.name, reference))
            raise ManifestUnknown(f"manifest {reference} is not in {self.upstream.name}/{self.path}",
                                  detail={"name": self.name, "reference": reference[:200]}) from exc
        parsed = manifests.parse_lenient(body, media_type, digest)
        self.registry.store_manifest(self.name, parsed)
        origin = store_prefix(self.upstream.name)
        for descriptor in parsed.blobs:
            with contextlib.suppress(MirrorError):
                blob = Digest.parse(descriptor["digest"])
                if self.registry.metadata.has_origin(origin, blob):
                    self.registry.metadata.link_blob(self.name, blob)
        if not Digest.is_digest(reference):
            self.registry.metadata.tag(self.name, reference, digest)
        return StoredManifest(digest, media_type, body, MISS, self.name)

    def _hit(self, digest: Digest, media_type: str) -> StoredManifest:
        return StoredManifest(digest, media_type, self.registry.manifest_body(digest), HIT, self.name)

    async def _refreshed(self, key: Hashable, stale: Callable[[], T], refresh: Callable[[], Awaitable[T]]) -> T:
        """What ``refresh()`` gives (one call for concurrent callers), or ``stale()`` at once while the upstream is
        down or refreshing ``key`` failed a moment ago; a probe of the upstream that is due then refreshes in the
        background, so no client waits for it."""
        health = self.client.health
        if health.up and not self.fetcher.stale(self.upstream, key):
            return await self.fetcher.single(key, refresh)
        if health.probe_due():
            self.fetcher.background(key, refresh)
        return stale()

    # listings
    async def tags(self) -> list[str]:
        """The upstream's tag list (kept for ``manifest_ttl``; the last one while it fails) and the cached tags."""
        cached = self.registry.metadata.tags(self.name)
        listing = self.registry.metadata.cached_tag_list(self.name)
        if listing is not None and time.time() - listing[1] < self.upstream.manifest_ttl:
            listed: list[str] | None = listing[0]
        else:
            last = listing[0] if listing is not None else []
            listed = await self._refreshed(("tags", self.name), lambda: last, lambda: self._list_tags(last))
        if listed is None and not cached:
            raise NameUnknown(f"repository {self.name} is not known", detail={"name": self.name})
        return sorted(set(cached) | set(listed or ()))

    async def _list_tags(self, last: list[str]) -> list[str] | None:
        """The upstream's tags, kept in the store; None when it has no such repository; ``last`` when it fails."""
        try:
            listed = await self.client.tags(self.path)
        except UpstreamNotFound:
            return None
        except UpstreamError as exc:
            log.info("listing the cached tags of %s: %s", self.name, exc.message)
            self.fetcher.remember_stale(self.upstream, ("tags", self.name))
            return last
        listed = sorted({tag for tag in listed if _valid_tag(tag)})
        self.registry.metadata.cache_tag_list(self.name, listed)
        return listed

    async def referrers(self, subject: Digest) -> Referrers:
        """The referrers cached here and the upstream's (only the cached ones while the upstream fails)."""
        found = Referrers.stored(self.registry, self.name, subject)
        try:
            listed = await self.fetcher.single(("referrers", self.name, subject),
                                               lambda: self.client.referrers(self.path, subject))
        except UpstreamError as exc:
            log.info("listing the cached referrers of %s@%s: %s", self.name, subject, exc.message)
            listed = []
        return found | Referrers.listed(listed)

    # writes: only with allow_push, into the same store repository
    def _writes(self) -> Hosted:
        if self._pushes is None:
            raise Unsupported(f"{self.name} mirrors upstream {self.upstream.name}; pushes go to that registry",
                              detail={"upstream": self.upstream.name})
        return self._pushes

    def start_upload(self) -> BlobWriter:
        """Open an upload session (``allow_push`` only)."""
        return self._writes().start_upload()

    def resume_upload(self, session: str) -> BlobWriter:
        """Reopen an upload session (``allow_push`` only)."""
        return self._writes().resume_upload(session)

    def upload_size(self, session: str) -> int:
        """Bytes received by an upload session; a read-only repository has none."""
        if self._pushes is None:
            raise BlobUploadUnknown(f"upload {session[:100]} is not known in {self.name}")
        return self._pushes.upload_size(session)

    def cancel_upload(self, session: str) -> None:
        """Abandon an upload session; a read-only repository has none."""
        if self._pushes is None:
            raise BlobUploadUnknown(f"upload {session[:100]} is not known in {self.name}")
        self._pushes.cancel_upload(session)

    def finish_upload(self, writer: BlobWriter, expected: Digest) -> Digest:
        """Commit and link an upload (``allow_push`` only)."""
        return self._writes().finish_upload(writer, expected)

    def mount(self, digest: Digest) -> None:
        """Link a blob as pushed content (``allow_push`` only)."""
        self._writes().mount(digest)

    async def put_manifest(self, reference: str, body: bytes, content_type: str | None) -> manifests.Manifest:
        """Store a pushed manifest (``allow_push`` only)."""
        return await self._writes().put_manifest(reference, body, content_type)

    def delete_manifest(self, reference: str) -> None:
        """Purge the image a tag or digest names from the cache (see ``purge``); nothing is sent upstream."""
        self.purge([reference])

    def delete_blob(self, digest: Digest) -> None:
        """Unlink a blob here (its bytes go at the next gc unless something else references them)."""
        self.registry.delete_blob(self.name, digest)

    def purge(self, references: list[str]) -> list[Digest]:
        """Purge the images ``references`` name from the cache (``Registry.purge``); return the manifests removed."""
        # Nothing is asked upstream; blob bytes go at the next gc or eviction. A reference not cached here is a 404.
        roots = set()
        for reference in references:
            digest = self.registry.resolve(self.name, reference)
            if digest is None or self.registry.metadata.manifest_media_type(self.name, digest) is None:
                raise ManifestUnknown(f"manifest {reference[:200]} is not cached in {self.name}",
                                      detail={"name": self.name, "reference": reference[:200]})
            roots.add(digest)
        return self.registry.purge(self.name, roots)


class DefaultRoute:
    """A hosted repository in front of the default upstream's: reads try the hosted one first; writes go there."""

    def __init__(self, hosted: Hosted, mirrored: Mirrored | Hosted):
        self.hosted, self.mirrored = hosted, mirrored
        self.access_names = (hosted.name, mirrored.name)
        self.write_name = hosted.name

    async def blob(self, digest: Digest) -> BlobSource:
        """The hosted blob, else the mirrored one (an upstream that refuses this name has nothing for it)."""
        if self.hosted.linked_size(digest) is not None:
            return await self.hosted.blob(digest)
        try:
            return await self.mirrored.blob(digest)
        except UpstreamDenied as exc:
            raise BlobUnknown(f"blob {digest} is not in {self.hosted.name} ({exc.message})",
                              detail={"digest": str(digest)}) from exc

    def linked_size(self, digest: Digest) -> int | None:
        """The size of a blob linked in either repository."""
        size = self.hosted.linked_size(digest)
        return size if size is not None else self.mirrored.linked_size(digest)

    async def manifest(self, reference: str) -> StoredManifest:
        """The hosted manifest, else the mirrored one."""
        with contextlib.suppress(ManifestUnknown, NameUnknown):
            return await self.hosted.manifest(reference)
        try:
            return await self.mirrored.manifest(reference)
        except UpstreamDenied as exc:
            raise ManifestUnknown(f"manifest {reference[:200]} is not in {self.hosted.name} ({exc.message})",
                                  detail={"name": self.hosted.name, "reference": reference[:200]}) from exc

    async def tags(self) -> list[str]:
        """The tags of both; NameUnknown only when neither exists."""
        found: set[str] = set()
        unknown = 0
        for repository in (self.hosted, self.mirrored):
            try:
                found.update(await repository.tags())
            except NameUnknown:
                unknown += 1
        if unknown == 2:
            raise NameUnknown(f"repository {self.hosted.name} is not known", detail={"name": self.hosted.name})
        return sorted(found)

    async def referrers(self, subject: Digest) -> Referrers:
        """The referrers of both."""
        return await self.hosted.referrers(subject) | await self.mirrored.referrers(subject)

    def start_upload(self) -> BlobWriter:
        """Open an upload session in the hosted repository."""
        return self.hosted.start_upload()

    def resume_upload(self, session: str) -> BlobWriter:
        """Reopen an upload session of the hosted repository."""
        return self.hosted.resume_upload(session)

    def upload_size(self, session: str) -> int:
        """Bytes received by an upload session of the hosted repository."""
        return self.hosted.upload_size(session)

    def cancel_upload(self, session: str) -> None:
        """Abandon an upload session of the hosted repository."""
        self.hosted.cancel_upload(session)

    def finish_upload(self, writer: BlobWriter, expected: Digest) -> Digest:
        """Commit and link an upload into the hosted repository."""
        return self.hosted.finish_upload(writer, expected)

    def mount(self, digest: Digest) -> None:
        """Link a blob into the hosted repository."""
        self.hosted.mount(digest)

    async def put_manifest(self, reference: str, body: bytes, content_type: str | None) -> manifests.Manifest:
        """Store the manifest in the hosted repository, first linking there what it lists that the mirrored
        repository serves (a HEAD through this route said those exist)."""
        manifest = Registry.parse_pushed(reference, body, content_type)
        blobs, children = self.hosted.registry.missing_references(self.hosted.name, manifest)
        for digest in blobs:
            with contextlib.suppress(BlobUnknown, UpstreamError):
                await (await self.mirrored.blob(digest)).settle()
            if self.mirrored.linked_size(digest) is not None:
                self.hosted.mount(digest)
        for digest in children:
            with contextlib.suppress(ManifestUnknown, NameUnknown, UpstreamError):
                child = await self.mirrored.manifest(str(digest))
                self.hosted.registry.metadata.link_manifest(self.hosted.name, child.digest, child.media_type)
        self.hosted.registry.push_manifest(self.hosted.name, reference, manifest)
        return manifest

    def delete_manifest(self, reference: str) -> None:
        """Delete from the hosted repository."""
        self.hosted.delete_manifest(reference)

    def delete_blob(self, digest: Digest) -> None:
        """Unlink from the hosted repository."""
        self.hosted.delete_blob(digest)


class Repositories:
    """Resolves request names into repositories, by the configured upstreams and default upstream."""

    def __init__(self, config: Config, registry: Registry, fetcher: Fetcher):
        self.config, self.registry, self.fetcher = config, registry, fetcher
        self._registries = frozenset(upstream.name for upstream in config.upstreams)

    def resolve(self, name: str, ns: str | None = None) -> Hosted | Mirrored | DefaultRoute:
        """The repository request name ``name`` (with containerd's ``ns``) means; raise NameInvalid."""
        request = resolve_name(name, ns, self._registries, self.config.default_upstream)
        if request.registry is None:
            return Hosted(self.registry, name)
        upstream = self.config.upstream(request.registry)
        inner = Mirrored(self.registry, self.fetcher, upstream, request) if upstream else Hosted(self.registry,
                                                                                                 request.store)
        return inner if request.explicit else DefaultRoute(Hosted(self.registry, name), inner)


def _valid_tag(tag: str) -> bool:
    return TAG_PATTERN.fullmatch(tag) is not None
