"""Pull-through caching: the only module that sees both the store and the upstreams.

Reads go hosted content first, then the cache, then upstream. Upstream content lives in the store under
``<upstream>/<path>`` (``reference.store_repository``), whichever of the three request forms asked for it:
the docker daemon's ``/v2/library/alpine`` (default upstream), containerd's ``?ns=docker.io`` and the path
prefix ``/v2/docker.io/library/alpine``.

A missing blob is fetched once, however many clients want it: the first request starts a ``Fetch`` that
writes the upstream's bytes into an upload session; every client (the first too) streams them as they
arrive, from memory until they are on disk, then from that file. The last byte is held back until the
digest is verified, so a corrupt transfer is never delivered whole, and nothing is committed to the store
unless it verified.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import diskcache

from mirror import manifest as manifests
from mirror.config import Config, Upstream
from mirror.digest import Digest
from mirror.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    MirrorError,
    NameInvalid,
    NameUnknown,
    RegistryError,
    Unsupported,
    UpstreamError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.reference import DOCKER_HUB, Reference, normalise_registry, store_repository
from mirror.registry import Registry, StoredManifest
from mirror.storage.filesystem import CHUNK, BackgroundAppend, write_atomic
from mirror.storage.paths import Layout
from mirror.storage.pins import Pins
from mirror.upstream import UpstreamClient

log = logging.getLogger("mirror.cache")
NEGATIVE_TTL = 15.0
NEGATIVE_ENTRIES = 10_000
HOSTED, HIT, MISS = "hosted", "hit", "miss"  # where a blob or manifest came from (``origin``)
TOUCH_INTERVAL = 60.0
TOTAL_KEY = "total-bytes"  # in the access index, beside the digests (no digest looks like it)
FOREIGN_POLL = 0.01  # seconds between looks at a fetch another worker process is doing


@dataclass(frozen=True)
class Route:
    """Where a repository's content comes from: a registry, its upstream (None when none is configured: only
    what was imported or cached is served), the path there, and the store repository."""

    registry: str
    upstream: Upstream | None
    path: str
    store: str
    explicit: bool  # named by path prefix or ?ns=, not just the default


class Router:
    """Maps the repository names clients ask for onto registries and their upstreams."""

    def __init__(self, config: Config):
        self.by_prefix = {upstream.name.replace(":", "_"): upstream for upstream in config.upstreams}
        self.default = config.default_upstream

    def route(self, name: str, ns: str | None = None) -> Route | None:
        """The route of repository ``name`` (with containerd's ``ns`` query); None for a hosted-only name."""
        first, _, rest = name.partition("/")
        if rest and (first in self.by_prefix or "." in first or first == "localhost"):
            registry, path, explicit = first, rest, True
        elif ns:
            registry, path, explicit = normalise_registry(ns), name, True
        elif self.default:
            registry, path, explicit = self.default, name, False
        else:
            return None
        if normalise_registry(registry) == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        upstream = self.by_prefix.get(normalise_registry(registry).replace(":", "_"))
        return Route(registry, upstream, path, store_repository(registry, path), explicit)

    def repositories(self, name: str, ns: str | None) -> tuple[str, ...]:
        """The store repositories a pull of ``name`` may be served from, whatever exists (for access rules)."""
        route = self.route(name, ns)
        if route is None:
            return (name,)
        return (route.store,) if route.explicit else (name, route.store)


class BlobSource(Protocol):
    """Bytes of a blob that a handler can stream, from the store or from a fetch in progress."""

    size: int | None
    origin: str

    def chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """The bytes in ``[start, end)`` (to the end when ``end`` is None)."""


class StoredBlob:
    """A blob that is in the store."""

    def __init__(self, registry: Registry, digest: Digest, size: int, origin: str = HOSTED):
        self.registry, self.digest, self.size, self.origin = registry, digest, size, origin

    async def chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """Read the stored file chunk by chunk."""
        remaining = (self.size if end is None else end) - start
        with self.registry.blobs.open(self.digest, start) as file:
            while remaining > 0 and (chunk := file.read(min(CHUNK, remaining))):
                remaining -= len(chunk)
                yield chunk


class Fetch:
    """One upstream GET of a missing blob, written to an upload session and followed by every client.

    Bytes received but not yet on disk stay in memory, so clients are not held up by a disk slower than
    the upstream; ``BackgroundAppend`` bounds how many.
    """

    def __init__(self, digest: Digest, committed: Path):
        self.digest = digest
        self.committed = committed
        self.size: int | None = None
        self.available = 0  # bytes received
        self.written = 0  # of which in the session file
        self.done = False
        self.error: MirrorError | None = None
        self.started = asyncio.Event()
        self._unwritten: deque[tuple[int, bytes]] = deque()  # (offset, chunk) received, not yet written
        self._progress = asyncio.Event()
        self._fd: int | None = None

    def open(self, path: Path) -> None:
        """Start following the session file at ``path``."""
        self._fd = os.open(path, os.O_RDONLY)

    def receive(self, chunk: bytes) -> None:
        """Hold the next ``chunk`` from upstream in memory until it is written, and wake the followers."""
        self._unwritten.append((self.available, chunk))
        self.available += len(chunk)
        self._wake()

    def wrote(self, count: int) -> None:
        """Record ``count`` more bytes written to the session file, and let go of them in memory."""
        self.written += count
        while self._unwritten and self._unwritten[0][0] + len(self._unwritten[0][1]) <= self.written:
            self._unwritten.popleft()

    def read(self, fd: int, position: int, size: int) -> bytes:
        """Up to ``size`` received bytes from ``position``: from memory if not yet written, else from ``fd``."""
        if position >= self.written:
            for offset, chunk in self._unwritten:
                if offset <= position < offset + len(chunk):
                    return chunk[position - offset:position - offset + size]
        return os.pread(fd, size, position)

    def verified(self) -> None:
        """Release every byte: the digest checked out (the blob may still be being written and committed)."""
        self.done = True
        self._wake()

    def finish(self, error: MirrorError | None) -> None:
        """End the fetch: committed, or failed with ``error`` (readers see it only if not yet verified)."""
        if not self.done:
            self.done, self.error = error is None, error
        self.started.set()
        self._wake()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def reader(self) -> int:
        """A file descriptor to read the bytes from: the session file while fetching, the blob once stored."""
        if self.error is not None:
            raise self.error
        return os.dup(self._fd) if self._fd is not None else os.open(self.committed, os.O_RDONLY)

    async def progress(self) -> None:
        """Wait until more bytes arrive or the fetch ends."""
        await self._progress.wait()

    def _wake(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()


class FetchClaim:
    """One worker process's exclusive right to fetch a blob, visible to the other workers sharing the store.

    The holder keeps an ``flock`` on ``state/fetching/<digest>.lock`` for the whole fetch and names its upload
    session in the ``.json`` beside it once the upstream answered. It commits the blob before it deletes the
    lock file and unlocks, so a worker that gets the lock next finds the blob in the store.
    """

    def __init__(self, lock: Path, note: Path, fd: int):
        self.lock, self.note, self._fd = lock, note, fd

    @classmethod
    def take(cls, layout: Layout, digest: Digest) -> FetchClaim | None:
        """The claim on ``digest``, or None while another process holds it."""
        lock, note = layout.fetch_claim(digest)
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(lock, note, fd)

    @staticmethod
    def held(layout: Layout, digest: Digest) -> bool:
        """Whether some process is fetching ``digest`` right now."""
        claim = FetchClaim.take(layout, digest)
        if claim is None:
            return True
        claim.release()
        return False

    def publish(self, session: str, size: int | None) -> None:
        """Tell the other workers which upload session receives the bytes."""
        write_atomic(self.note, json.dumps({"session": session, "size": size}).encode(), durable=False)

    def release(self) -> None:
        """Give the claim up (after the blob was committed or the fetch failed)."""
        for path in (self.note, self.lock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.close(self._fd)


class ForeignFetch:
    """A fetch that another worker process is doing, followed through its upload session file."""

    def __init__(self, layout: Layout, digest: Digest, fd: int, size: int | None):
        self.layout, self.digest, self.size = layout, digest, size
        self.available, self.done, self.error = 0, False, None
        self._fd = fd
        self._refresh()

    @classmethod
    async def join(cls, layout: Layout, digest: Digest) -> ForeignFetch | None:
        """Follow the fetch of ``digest`` once its holder has published it; None if the holder let go first."""
        _, note = layout.fetch_claim(digest)
        while FetchClaim.held(layout, digest):
            with contextlib.suppress(OSError, ValueError, KeyError):
                info = json.loads(note.read_bytes())
                for path in (layout.session(info["session"]) / "data", layout.blob(digest)):
                    with contextlib.suppress(FileNotFoundError):
                        return cls(layout, digest, os.open(path, os.O_RDONLY | os.O_CLOEXEC), info["size"])
            await asyncio.sleep(FOREIGN_POLL)
        return None

    def reader(self) -> int:
        """The file descriptor to read from (handed over: the follower closes it)."""
        return self._fd

    @staticmethod
    def read(fd: int, position: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``position`` of the file the other worker writes."""
        return os.pread(fd, size, position)

    async def progress(self) -> None:
        """Wait a moment and look again at how far the other worker got."""
        await asyncio.sleep(FOREIGN_POLL)
        self._refresh()

    def _refresh(self) -> None:
        committed = self.layout.blob(self.digest).exists()  # before the size: a committed file is complete
        if not committed and not FetchClaim.held(self.layout, self.digest):
            committed = self.layout.blob(self.digest).exists()
            if not committed:
                self.error = UpstreamUnavailable(f"the worker fetching {self.digest} gave up")
        self.available = os.fstat(self._fd).st_size
        self.done = committed  # committed, hence verified: the file we follow is the blob now


class FetchFollower:
    """Streams a fetch's bytes as they land on disk, holding back the last byte until it is verified."""

    origin = MISS

    def __init__(self, fetch: Fetch | ForeignFetch):
        if fetch.error is not None:
            raise fetch.error
        self.fetch = fetch
        self.size = fetch.size

    async def chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """Yield ``[start, end)`` as the fetch writes it; raise the fetch's error if it fails."""
        fetch, position = self.fetch, start
        fd = fetch.reader()
        try:
            while end is None or position < end:
                ready = self._releasable()
                if position < ready:
                    limit = ready if end is None else min(ready, end)
                    chunk = fetch.read(fd, position, min(CHUNK, limit - position))
                    position += len(chunk)
                    yield chunk
                elif fetch.error is not None:
                    raise fetch.error
                elif fetch.done:
                    return
                else:
                    await fetch.progress()
        finally:
            os.close(fd)

    def _releasable(self) -> int:
        """How many bytes may be sent: all once verified, before that all but the blob's last byte (a size
        known up front keeps that from splitting every chunk)."""
        fetch = self.fetch
        if fetch.done:
            return fetch.available
        return min(fetch.available, (fetch.available if fetch.size is None else fetch.size) - 1)


class AccessIndex:
    """Sizes and last use of pull-through blobs, for least-recently-used eviction (diskcache, multi-process safe).

    The sum of the sizes is kept beside the entries and changed in the same transaction as they are, so
    checking the cache's bound costs one read however many blobs are cached.
    """

    def __init__(self, directory: Path):
        self._index = diskcache.Cache(str(directory))
        self._touched: dict[str, float] = {}
        with self._index.transact():  # an index written before the sum was kept gets it once
            if TOTAL_KEY not in self._index:
                self._index.set(TOTAL_KEY, sum(size for _, size, _ in self._entries()))

    def record(self, digest: Digest, size: int) -> None:
        """Note a newly cached blob."""
        key = str(digest)
        with self._index.transact():
            previous = self._index.get(key)
            self._index.set(key, (size, time.time()))
            self._index.incr(TOTAL_KEY, size - (previous[0] if previous else 0))

    def touch(self, digest: Digest) -> None:
        """Note that a cached blob was used (written at most once a minute per blob)."""
        key, now = str(digest), time.time()
        if now - self._touched.get(key, 0) > TOUCH_INTERVAL:
            self._touched[key] = now
            with self._index.transact():  # never brings back an entry another worker just forgot
                entry = self._index.get(key)
                if entry is not None:
                    self._index.set(key, (entry[0], now))

    def total(self) -> int:
        """Bytes of all indexed blobs."""
        return self._index.get(TOTAL_KEY, 0)

    def oldest_first(self) -> list[tuple[Digest, int]]:
        """Every indexed blob with its size, least recently used first."""
        return [(Digest.parse(key), size) for key, size, _ in sorted(self._entries(), key=lambda entry: entry[2])]

    def _entries(self) -> list[tuple[str, int, float]]:
        # another worker may forget a key between listing and reading it
        entries = ((key, self._index.get(key)) for key in self._index if key != TOTAL_KEY)
        return [(key, *entry) for key, entry in entries if entry is not None]

    def forget(self, digest: Digest) -> None:
        """Drop a blob from the index."""
        with self._index.transact():
            entry = self._index.pop(str(digest))
            if entry is not None:
                self._index.incr(TOTAL_KEY, -entry[0])
        self._touched.pop(str(digest), None)

    def close(self) -> None:
        """Close the index."""
        self._index.close()


class PullThrough:
    """Serves manifests and blobs from hosted content, the cache, or upstream, in that order."""

    def __init__(self, config: Config, registry: Registry, router: Router,
                 client_factory: Callable[[Upstream], UpstreamClient] = UpstreamClient, metrics: Metrics | None = None):
        self.config = config
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.router = router
        self.pins = Pins(config.storage.root)
        self.index = AccessIndex(registry.blobs.layout.cache_index)
        self._clients = {upstream.name: client_factory(upstream) for upstream in config.upstreams}
        self._fetches: dict[Digest, Fetch] = {}
        self._manifest_fetches: dict[tuple[str, str], asyncio.Future[StoredManifest]] = {}
        self._missing: dict[tuple[str, str], float] = {}

    async def close_when_idle(self, timeout: float | None = None) -> None:
        """Close once no fetch is in progress (they finish committing), or after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (self._fetches or self._manifest_fetches) and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.1)
        await self.close()

    async def close(self) -> None:
        """Release upstream connections and the index."""
        for client in self._clients.values():
            await client.close()
        self.index.close()

    # writes
    def check_writable(self, name: str, ns: str | None) -> None:
        """Refuse a push into a repository that mirrors an upstream, unless that upstream allows pushes."""
        route = self.router.route(name, ns)
        if route and route.explicit and route.upstream is not None and not route.upstream.allow_push:
            raise Unsupported(f"{name} mirrors upstream {route.registry}; pushes go to that registry",
                              detail={"upstream": route.registry})

    # manifests
    async def manifest(self, name: str, reference: str, ns: str | None = None) -> StoredManifest:
        """The manifest ``reference`` of ``name``: hosted, cached (revalidated after its TTL) or fetched."""
        route = self.router.route(name, ns)
        if route is None:
            return self.registry.get_manifest(name, reference)
        if not route.explicit:
            with contextlib.suppress(ManifestUnknown, NameUnknown):
                return self.registry.get_manifest(name, reference)
        return await self._cached_manifest(route, reference)

    async def _cached_manifest(self, route: Route, reference: str) -> StoredManifest:
        store, metadata = route.store, self.registry.metadata
        digest = Digest.parse(reference) if Digest.is_digest(reference) else metadata.resolve_tag(store, reference)
        media_type = metadata.manifest_media_type(store, digest) if digest is not None else None
        if digest is not None and media_type is not None:
            if Digest.is_digest(reference) or self._fresh(route, reference, digest):
                return self._hit(digest, media_type)
            return await self._revalidate(route, reference, digest, media_type)
        return await self._single_manifest_fetch(route, reference)

    def _fresh(self, route: Route, tag: str, digest: Digest) -> bool:
        if route.upstream is None or self.pins.is_pinned(digest):
            return True
        written = self.registry.metadata.tag_mtime(route.store, tag)
        return written is not None and time.time() - written < route.upstream.manifest_ttl

    async def _revalidate(self, route: Route, tag: str, cached: Digest, media_type: str) -> StoredManifest:
        try:
            digest, _, _ = await self._client(route).head_manifest(route.path, tag)
        except UpstreamError as exc:
            log.info("serving %s:%s stale: %s", route.store, tag, exc.message)
            return self._hit(cached, media_type)
        if digest == cached:
            self.registry.metadata.touch_tag(route.store, tag)
            return self._hit(cached, media_type)
        return await self._single_manifest_fetch(route, tag)

    async def _single_manifest_fetch(self, route: Route, reference: str) -> StoredManifest:
        key = (route.store, reference)
        if route.upstream is None or time.time() < self._missing.get(key, 0):
            raise ManifestUnknown(f"manifest {reference} is not in {route.registry}/{route.path}",
                                  detail={"name": route.store, "reference": reference[:200]})
        future = self._manifest_fetches.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch_manifest(route, reference))
            self._manifest_fetches[key] = future
            future.add_done_callback(lambda _: self._manifest_fetches.pop(key, None))
        return await asyncio.shield(future)

    async def _fetch_manifest(self, route: Route, reference: str) -> StoredManifest:
        try:
            body, media_type, digest = await self._client(route).get_manifest(route.path, reference)
        except UpstreamNotFound as exc:
            now = time.time()
            if len(self._missing) > NEGATIVE_ENTRIES:  # forget expired entries: clients choose the keys
                self._missing = {key: until for key, until in self._missing.items() if until > now}
            self._missing[(route.store, reference)] = now + NEGATIVE_TTL
            raise ManifestUnknown(f"manifest {reference} is not in {route.registry}/{route.path}",
                                  detail={"name": route.store, "reference": reference[:200]}) from exc
        parsed = _lenient_parse(body, media_type, digest)
        self.registry.store_manifest(route.store, parsed)
        for descriptor in parsed.blobs:
            with contextlib.suppress(MirrorError):
                self.registry.metadata.link_blob(route.store, Digest.parse(descriptor["digest"]))
        if not Digest.is_digest(reference):
            self.registry.metadata.tag(route.store, reference, digest)
        return StoredManifest(digest, media_type, body, MISS)

    def _hit(self, digest: Digest, media_type: str) -> StoredManifest:
        return StoredManifest(digest, media_type, self.registry.manifest_body(digest), HIT)

    # blobs
    async def blob(self, name: str, digest: Digest, ns: str | None = None) -> BlobSource:
        """The blob ``digest`` of ``name``: hosted, cached, or being fetched from upstream right now."""
        route = self.router.route(name, ns)
        if route is None:
            return StoredBlob(self.registry, digest, self.registry.blob_size(name, digest))
        if not route.explicit:
            with contextlib.suppress(BlobUnknown):
                return StoredBlob(self.registry, digest, self.registry.blob_size(name, digest))
        size = self.registry.blobs.stat(digest)
        if size is not None and self.registry.metadata.has_blob(route.store, digest):
            self.index.touch(digest)
            return StoredBlob(self.registry, digest, size, HIT)
        if route.upstream is None:
            raise BlobUnknown(f"blob {digest} is not in {route.store}", detail={"digest": str(digest)})
        layout = self.registry.blobs.layout
        while True:
            fetch = self._fetches.get(digest)
            if fetch is None:
                claim = FetchClaim.take(layout, digest)
                foreign = await ForeignFetch.join(layout, digest) if claim is None else None
                if foreign is not None:
                    return FetchFollower(foreign)
                if (size := self.registry.blobs.stat(digest)) is not None:  # another worker committed it meanwhile
                    if claim is not None:
                        claim.release()
                    self.registry.metadata.link_blob(route.store, digest)
                    return StoredBlob(self.registry, digest, size, HIT)
                if claim is None:
                    continue  # the other worker gave up: try to take over
                fetch = self._fetches[digest] = Fetch(digest, layout.blob(digest))
                asyncio.ensure_future(self._fetch_blob(route, fetch, claim))
            await fetch.started.wait()
            return FetchFollower(fetch)

    async def _fetch_blob(self, route: Route, fetch: Fetch, claim: FetchClaim) -> None:
        writer = self.registry.blobs.writer()
        error: MirrorError | None = UpstreamUnavailable(f"fetch of {fetch.digest} was interrupted")
        try:
            async with self._client(route).stream_blob(route.path, fetch.digest) as stream:
                fetch.size = stream.size
                fetch.open(writer.path)
                claim.publish(writer.id, stream.size)
                fetch.started.set()
                appending = BackgroundAppend(writer, fetch.wrote)
                try:
                    async for chunk in stream.aiter():
                        fetch.receive(chunk)
                        await appending.append(chunk)
                    hashed = await appending.digest(fetch.digest.algorithm)
                    if hashed is not None and hashed != fetch.digest:
                        raise DigestInvalid(f"content digest {hashed} does not match {fetch.digest}")
                    if hashed is not None:
                        fetch.verified()  # clients need not wait for the disk, nor for the commit's fsync
                finally:
                    await appending.close()
            await asyncio.to_thread(self._make_room, fetch.digest, fetch.written)
            try:
                await asyncio.to_thread(writer.commit, fetch.digest)
            except MirrorError:
                self.index.forget(fetch.digest)
                raise
            self.registry.metadata.link_blob(route.store, fetch.digest)
            error = None
        except UpstreamNotFound as exc:
            error = BlobUnknown(f"blob {fetch.digest} is not in upstream {route.registry}/{route.path}",
                                detail={"digest": str(fetch.digest)})
            error.__cause__ = exc
        except DigestInvalid as exc:
            error = UpstreamInvalid(f"upstream sent corrupt content for {fetch.digest}: {exc.message}")
        except MirrorError as exc:
            error = exc
        finally:
            if error is not None:
                writer.cancel()
                log.warning("fetch of %s from %s failed: %s", fetch.digest, route.registry, error.message)
            self._fetches.pop(fetch.digest, None)
            claim.release()
            fetch.finish(error)

    # listings
    def tags_repository(self, name: str, ns: str | None) -> str:
        """The store repository whose tags answer a tag listing of ``name``."""
        route = self.router.route(name, ns)
        if route is None or (not route.explicit and self.registry.metadata.exists(name)):
            return name
        return route.store

    # eviction
    def _make_room(self, digest: Digest, size: int) -> None:
        """Evict for, then count, a blob about to be committed: the bound holds whatever runs concurrently."""
        self.evict(size)
        self.index.record(digest, size)

    def evict(self, incoming: int = 0) -> int:
        """Evict least recently used cached blobs until they and ``incoming`` more bytes fit in
        ``max_cache_size``; return the bytes freed. Pinned and hosted blobs leave the index, not the store."""
        limit = self.config.storage.max_cache_size
        if limit is None:
            return 0
        total = self.index.total() + incoming
        if total <= limit:
            return 0
        hosted = [name for name in self.registry.metadata.repositories() if self._is_hosted(name)]
        freed = count = 0
        for digest, size in self.index.oldest_first():
            if total <= limit:
                break
            total -= size
            self.index.forget(digest)
            if self.pins.is_pinned(digest) or any(self.registry.metadata.has_blob(h, digest) for h in hosted):
                continue
            self.registry.blobs.delete(digest)
            freed, count = freed + size, count + 1
        self.metrics.evicted_blobs(count, freed)
        log.info("evicted %d bytes of cached blobs", freed)
        return freed

    def _is_hosted(self, name: str) -> bool:
        return name.partition("/")[0] not in self.router.by_prefix

    def _client(self, route: Route) -> UpstreamClient:
        return self._clients[route.upstream.name]


def _lenient_parse(body: bytes, media_type: str, digest: Digest) -> manifests.Manifest:
    """Parse upstream content; types this registry does not validate are cached as they are."""
    try:
        return manifests.parse(body, media_type, digest.algorithm)
    except ManifestInvalid:
        if media_type in manifests.MANIFEST_TYPES:
            raise UpstreamInvalid(f"upstream sent an invalid {media_type} manifest") from None
        return manifests.Manifest(body, media_type, digest, {})


async def prefetch_images(pull: PullThrough, references: list[str], default_registry: str) -> int:
    """Pull every image (all platforms of an index) through the cache; return how many failed."""
    failures = 0
    for text in references:
        try:
            reference = Reference.parse(text, default_registry)
            name = reference.store_name
            count = await _prefetch_manifest(pull, name, reference.reference)
            print(f"prefetched {reference}: {count} blobs", flush=True)
        except (RegistryError, UpstreamError, NameInvalid) as exc:
            failures += 1
            print(f"failed {text}: {exc.message}", flush=True)
    return failures


async def _prefetch_manifest(pull: PullThrough, name: str, reference: str) -> int:
    stored = await pull.manifest(name, reference)
    parsed = _lenient_parse(stored.body, stored.media_type, stored.digest)
    count = 0
    for child in parsed.children:
        count += await _prefetch_manifest(pull, name, child["digest"])
    for descriptor in parsed.blobs:
        if descriptor.get("urls"):
            continue
        source = await pull.blob(name, Digest.parse(descriptor["digest"]))
        async for _ in source.chunks(0, source.size):
            pass
        count += 1
    return count


def prefetch(config: Config, images: list[str], list_file: str | None = None) -> int:
    """``mirror prefetch``: warm the cache with ``images`` and those listed in ``list_file``; exit status."""
    from mirror.server import build

    references = list(images)
    if list_file:
        lines = Path(list_file).read_text().splitlines()
        references += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not references:
        print("mirror prefetch: no images given", flush=True)
        return 2

    async def run() -> int:
        appliance = build(config)
        try:
            return await prefetch_images(appliance.cache, references, config.default_upstream or DOCKER_HUB)
        finally:
            await appliance.cache.close_when_idle()

    return 1 if asyncio.run(run()) else 0
