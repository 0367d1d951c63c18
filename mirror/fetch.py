"""Fetch coordination: one upstream request per missing blob or manifest, however many clients want it.

A missing blob is fetched once: the first request starts a ``Fetch`` that writes the upstream's bytes into
an upload session; every client (the first too) streams them as they arrive, from memory until they are on
disk, then from that file. Worker processes sharing the store follow each other's fetches through the
store (``storage.fetching``). The last byte is held back until the digest is verified, so a corrupt
transfer is never delivered whole, and nothing is committed unless it verified.

Which repository may see the bytes is not decided here: a request joins a fetch (or finds the bytes in the
store) only after its ``confirm`` callback said that its own repository may serve them.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Protocol, TypeVar

from mirror.config import Config, Upstream
from mirror.digest import Digest, Hasher
from mirror.errors import (
    BlobUnknown,
    DigestInvalid,
    FetchAbandoned,
    MirrorError,
    UpstreamInvalid,
    UpstreamNotFound,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.reference import store_prefix
from mirror.storage import Store
from mirror.storage.base import BlobWriter, Reader
from mirror.storage.coordination import Coordination
from mirror.storage.fetching import FetchClaim, ForeignFetch
from mirror.storage.filesystem import CHUNK, BackgroundAppend
from mirror.upstream import UpstreamClient

log = logging.getLogger("mirror.fetch")
HOSTED, HIT, MISS = "hosted", "hit", "miss"  # where a blob or manifest came from (``origin``)
NEGATIVE_TTL = 15.0  # seconds an upstream 404 is remembered
STALE_RETRY = 10.0  # seconds a failed revalidation is not retried (unless its upstream came back meanwhile)
MARKS = 10_000  # remembered keys, beyond which expired ones are forgotten
RECENT = 8 << 20  # bytes a fetch keeps in memory after they are written: followers close behind read them there
T = TypeVar("T")


class BlobSource(Protocol):
    """Bytes of a blob that a handler can stream, from the store or from a fetch in progress."""

    size: int | None
    origin: str

    @property
    def redirect(self) -> str | None:
        """A URL the client may fetch the bytes from instead (object storage's presigned URL), or None."""

    def chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """The bytes in ``[start, end)`` (to the end when ``end`` is None)."""

    async def settle(self) -> None:
        """Wait until the blob is committed to the store; raise the fetch's error if it failed."""


class StoredBlob:
    """A blob that is in the store."""

    def __init__(self, store: Store, digest: Digest, size: int, origin: str = HOSTED):
        self.store, self.digest, self.size, self.origin = store, digest, size, origin

    @property
    def redirect(self) -> str | None:
        """The store's direct URL of the blob, when it gives them out."""
        return self.store.blob_url(self.digest)

    async def chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """Read the stored blob chunk by chunk."""
        async for chunk in self.store.blobs.chunks(self.digest, start, self.size if end is None else end):
            yield chunk

    async def settle(self) -> None:
        """Stored already."""


class Fetch:
    """One upstream GET of a missing blob, written to an upload session and followed by every client.

    Bytes received but not yet on disk stay in memory, so clients are not held up by a disk slower than
    the upstream (``BackgroundAppend`` bounds how many); so do the last ``RECENT`` bytes received, so clients
    keeping pace are sent them without reading them back from the disk.
    """

    def __init__(self, store: Store, digest: Digest, repository: str):
        self.store, self.digest, self.repository = store, digest, repository
        self.size: int | None = None
        self.available = 0  # bytes received
        self.written = 0  # of which in the session file
        self.done = False  # verified: every byte may be released
        self.finished = False  # committed or failed
        self.error: MirrorError | None = None
        self.started = asyncio.Event()
        self._held: deque[tuple[int, bytes]] = deque()  # (offset, chunk) received, not yet written or recent
        self._progress = asyncio.Event()
        self._source: Reader | None = None

    def follow(self, writer: BlobWriter) -> None:
        """Start following the session ``writer`` appends to."""
        self._source = writer.reader()

    def receive(self, chunk: bytes) -> None:
        """Hold the next ``chunk`` from upstream in memory until it is written and not recent, and wake the
        followers."""
        self._held.append((self.available, chunk))
        self.available += len(chunk)
        self._wake()

    def wrote(self, count: int) -> None:
        """Record ``count`` more bytes written to the session file, and let go of those no longer recent."""
        self.written += count
        held = self._held
        while held and held[0][0] + len(held[0][1]) <= min(self.written, self.available - RECENT):
            held.popleft()

    async def read(self, reader: Reader, position: int, size: int) -> bytes:
        """Up to ``size`` received bytes from ``position``: from memory while held there, else from ``reader``."""
        for offset, chunk in reversed(self._held):  # from the newest: followers are mostly close behind
            if offset <= position:
                if position < offset + len(chunk):
                    return chunk[position - offset:position - offset + size]
                break
        return await reader.read(position, size)

    def verified(self) -> None:
        """Release every byte: the digest checked out (the blob may still be being written and committed)."""
        self.done = True
        self._wake()

    def finish(self, error: MirrorError | None) -> None:
        """End the fetch: committed, or failed with ``error`` (readers see it only if not yet verified)."""
        if not self.done:
            self.done, self.error = error is None, error
        self.finished = True
        self.started.set()
        self._wake()
        if self._source is not None:
            self._source.close()
            self._source = None

    def reader(self) -> Reader:
        """Where to read the bytes from: the session while fetching, the blob once stored."""
        if self.error is not None:
            raise self.error
        return self._source.dup() if self._source is not None else self.store.blobs.reader(self.digest)

    async def progress(self) -> None:
        """Wait until more bytes arrive or the fetch ends."""
        await self._progress.wait()

    def _wake(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()


class FetchFollower:
    """Streams a fetch's bytes as they land, holding back the last byte until it is verified.

    Following another instance's fetch, it also hashes what it sends of a whole blob and checks the digest before
    the last byte; and when that instance stops halfway, ``rejoin()`` gives the source to go on from (a fetch this
    instance now does, or the blob another one committed).
    """

    origin = MISS
    redirect = None  # the bytes are not in the store yet

    def __init__(self, fetch: Fetch | ForeignFetch, rejoin: Callable[[], Awaitable[BlobSource]] | None = None):
        if fetch.error is not None:
            raise fetch.error
        self.fetch, self.rejoin = fetch, rejoin
        self.size = fetch.size

    def chunks(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """Yield ``[start, end)`` as the fetch writes it; raise the fetch's error if it fails."""
        return self._follow(start, end) if self.rejoin is None else self._relay(start, end)

    async def _relay(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        """``_follow`` another process's fetch, going on from a new source when it stops halfway."""
        position, digest = start, self.fetch.digest
        checked = getattr(self.fetch, "verify", False) and start == 0 and self.size is not None and end == self.size
        hasher = Hasher(digest.algorithm) if checked else None
        source = self._follow(start, end)
        while True:
            try:
                async for chunk in source:
                    position += len(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                        if position == end and hasher.digest() != digest:
                            raise UpstreamInvalid(f"the bytes relayed for {digest} do not match it")
                    yield chunk
                return
            except FetchAbandoned:
                log.info("the fetch of %s that a request followed stopped; going on from byte %d", digest, position)
                source = (await self.rejoin()).chunks(position, end)

    async def _follow(self, start: int, end: int | None) -> AsyncIterator[bytes]:
        fetch, position = self.fetch, start
        reader = fetch.reader()
        try:
            while end is None or position < end:
                ready = self._releasable(end)
                if position < ready:
                    limit = ready if end is None else min(ready, end)
                    chunk = await fetch.read(reader, position, min(CHUNK, limit - position))
                    if not chunk:  # the bytes went away under us (another instance's parts, once it committed)
                        raise FetchAbandoned(f"the bytes of {fetch.digest} from {position} are gone")
                    position += len(chunk)
                    yield chunk
                elif fetch.error is not None:
                    raise fetch.error
                elif fetch.done:
                    return
                else:
                    await fetch.progress()
        finally:
            reader.close()

    async def settle(self) -> None:
        """Wait until the fetch committed the blob; raise its error if it failed."""
        while not self.fetch.finished and self.fetch.error is None:
            await self.fetch.progress()
        if self.fetch.error is not None:
            raise self.fetch.error

    def _releasable(self, end: int | None) -> int:
        """How many bytes may be sent: all once verified; before that, all but the last byte the client asked
        for, so no client completes a transfer (a whole blob or a range) of bytes that may yet fail to verify.
        A size known up front keeps that from splitting every chunk."""
        fetch = self.fetch
        if fetch.done:
            return fetch.available
        last = end if end is not None else fetch.size if fetch.size is not None else fetch.available
        return min(fetch.available, last - 1)


class Marks:
    """Keys remembered for ``seconds`` each."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._until: dict[Hashable, float] = {}

    def __contains__(self, key: Hashable) -> bool:
        """Whether ``key`` was remembered less than ``seconds`` ago."""
        return time.monotonic() < self._until.get(key, 0)

    def add(self, key: Hashable) -> None:
        """Remember ``key`` for ``seconds`` from now."""
        now = time.monotonic()
        if len(self._until) > MARKS:  # forget expired entries: clients choose the keys
            self._until = {key: until for key, until in self._until.items() if until > now}
        self._until[key] = now + self.seconds


class SharedMarks:
    """Keys remembered for ``seconds`` by every instance (in Redis; by this process while Redis is away)."""

    def __init__(self, coordination: Coordination, kind: str, seconds: float):
        self.coordination, self.kind, self.seconds = coordination, kind, seconds

    def __contains__(self, key: Hashable) -> bool:
        """Whether any instance remembered ``key`` less than ``seconds`` ago."""
        return self.coordination.marked(f"{self.kind}:{key!r}")

    def add(self, key: Hashable) -> None:
        """Remember ``key`` for ``seconds`` from now, for every instance."""
        self.coordination.mark(f"{self.kind}:{key!r}", self.seconds)


class Fetcher:
    """The upstream clients and every fetch in flight in this process: blobs, manifests, known misses, stale tags."""

    def __init__(self, config: Config, store: Store, metrics: Metrics,
                 client_factory: Callable[[Upstream], UpstreamClient] = UpstreamClient):
        self.config, self.store, self.metrics = config, store, metrics
        self._clients = {upstream.name: client_factory(upstream) for upstream in config.upstreams}
        for name, client in self._clients.items():
            client.health.watch(metrics.upstream_up.labels(name).set)
        self._fetches: dict[Digest, Fetch] = {}
        self._singles: dict[Hashable, asyncio.Future] = {}
        coordination = store.coordination
        self._missing = Marks(NEGATIVE_TTL) if coordination is None else SharedMarks(coordination, "missing",
                                                                                      NEGATIVE_TTL)
        self._stale = Marks(STALE_RETRY)
        if coordination is not None:
            coordination.watch(lambda up: metrics.redis_up.set(int(up)))

    def client(self, upstream: Upstream) -> UpstreamClient:
        """The client of ``upstream``."""
        return self._clients[upstream.name]

    # manifests and other small answers
    async def single(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        """The result of ``work()``, shared by every caller asking with the same ``key`` meanwhile."""
        future = self._singles.get(key)
        if future is None:
            future = asyncio.ensure_future(work())
            self._singles[key] = future
            future.add_done_callback(lambda _: self._singles.pop(key, None))
        return await asyncio.shield(future)

    def background(self, key: Hashable, work: Callable[[], Awaitable[object]]) -> None:
        """Start ``work()`` as ``single`` would, without waiting for it; a failure is logged."""
        asyncio.ensure_future(self.single(key, work)).add_done_callback(_log_failure)

    def missing(self, key: Hashable) -> bool:
        """Whether the upstream said ``key`` does not exist less than ``NEGATIVE_TTL`` seconds ago."""
        return key in self._missing

    def remember_missing(self, key: Hashable) -> None:
        """Note that the upstream says ``key`` does not exist."""
        self._missing.add(key)

    def stale(self, upstream: Upstream, key: Hashable) -> bool:
        """Whether refreshing ``key`` failed in the last ``STALE_RETRY`` s and ``upstream`` did not come back since."""
        return (key, self.client(upstream).health.recoveries) in self._stale

    def remember_stale(self, upstream: Upstream, key: Hashable) -> None:
        """Note that refreshing ``key`` from ``upstream`` failed."""
        self._stale.add((key, self.client(upstream).health.recoveries))

    # blobs
    async def blob(self, upstream: Upstream, path: str, repository: str, digest: Digest,
                   confirm: Callable[[], Awaitable[None]]) -> BlobSource:
        """Blob ``digest`` of ``path`` at ``upstream``, for store ``repository``: from the store, from a fetch in
        progress, or fetched now (then linked into ``repository`` once committed). Bytes this request did not
        ask the upstream for itself are served only after ``confirm()`` returned."""
        blobs = self.store.blobs
        while True:
            fetch = self._fetches.get(digest)
            if fetch is not None:
                if fetch.repository != repository:
                    await confirm()
                await fetch.started.wait()
                return FetchFollower(fetch)
            if (size := blobs.stat(digest)) is not None:
                await confirm()
                self.store.access.touch(digest)
                return StoredBlob(self.store, digest, size, HIT)
            claim = self.store.claim_fetch(digest)
            if claim is None:  # another worker process is fetching it
                foreign = await self.store.join_fetch(digest)
                if foreign is not None:
                    await confirm()
                    return FetchFollower(foreign, functools.partial(self.blob, upstream, path, repository, digest,
                                                                    confirm))
                continue  # it committed or gave up: look again
            if blobs.stat(digest) is not None:  # committed by another worker just before we took the claim
                claim.release()
                continue
            fetch = self._fetches[digest] = Fetch(self.store, digest, repository)
            asyncio.ensure_future(self._fetch_blob(upstream, path, fetch, claim))
            await fetch.started.wait()
            return FetchFollower(fetch)

    def fetching(self) -> bool:
        """Whether any fetch is in flight in this process."""
        return bool(self._fetches or self._singles)

    async def _fetch_blob(self, upstream: Upstream, path: str, fetch: Fetch, claim: FetchClaim) -> None:
        writer = self.store.blobs.writer()
        error: MirrorError | None = UpstreamUnavailable(f"fetch of {fetch.digest} was interrupted")

        def wrote(count: int) -> None:
            fetch.wrote(count)
            claim.progress()

        try:
            async with self.client(upstream).stream_blob(path, fetch.digest) as stream:
                fetch.size = stream.size
                fetch.follow(writer)
                claim.publish(writer, stream.size)
                fetch.started.set()
                appending = BackgroundAppend(writer, wrote)
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
            await asyncio.to_thread(writer.flush)
            claim.progress()
            if fetch.done:
                claim.verified()
            await asyncio.to_thread(self._make_room, fetch.digest, fetch.written)
            try:
                await asyncio.to_thread(writer.commit, fetch.digest)
            except MirrorError:
                self.store.access.forget(fetch.digest)
                raise
            self.store.metadata.note_origin(store_prefix(upstream.name), fetch.digest)
            self.store.metadata.link_blob(fetch.repository, fetch.digest)
            error = None
        except UpstreamNotFound as exc:
            error = BlobUnknown(f"blob {fetch.digest} is not in upstream {upstream.name}/{path}",
                                detail={"digest": str(fetch.digest)})
            error.__cause__ = exc
        except DigestInvalid as exc:
            error = UpstreamInvalid(f"upstream sent corrupt content for {fetch.digest}: {exc.message}")
        except MirrorError as exc:
            error = exc
        finally:
            if error is not None:
                writer.cancel()
                log.warning("fetch of %s from %s failed: %s", fetch.digest, upstream.name, error.message)
            self._fetches.pop(fetch.digest, None)
            claim.release()
            fetch.finish(error)

    # eviction
    def _make_room(self, digest: Digest, size: int) -> None:
        """Evict for, then count, a blob about to be committed: the bound holds whatever runs concurrently."""
        self.evict(size)
        self.store.access.record(digest, size)

    def evict(self, incoming: int = 0) -> int:
        """Evict least recently used cached blobs until they and ``incoming`` more bytes fit in
        ``max_cache_size``; return the bytes freed. Only fetched blobs are in the access index: pushed and
        imported ones left it when they were pushed or imported, and pinned ones are kept."""
        limit = self.config.storage.max_cache_size
        if limit is None:
            return 0
        if self.store.coordination is None:
            return self._evict(limit, incoming)
        if rebuilt := self.store.rebuild_access_index():  # nothing unless Redis lost the index since
            log.info("rebuilt the shared access index from the store: %d cached blobs", rebuilt)
        with self.store.coordination.exclusive("evict") as held:  # one instance at a time; the others go on
            return self._evict(limit, incoming) if held else 0

    def _evict(self, limit: int, incoming: int) -> int:
        index = self.store.access
        total = index.total() + incoming
        if total <= limit:
            return 0
        freed = count = 0
        for digest, size in index.oldest_first():
            if total <= limit:
                break
            total -= size
            index.forget(digest)
            if self.store.pins.is_pinned(digest):
                continue
            self.store.blobs.delete(digest)
            freed, count = freed + size, count + 1
        self.metrics.evicted_blobs(count, freed)
        log.info("evicted %d bytes of cached blobs", freed)
        return freed

    async def close_when_idle(self, timeout: float | None = None) -> None:
        """Close once no fetch is in progress (they finish committing), or after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.fetching() and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.1)
        await self.close()

    async def close(self) -> None:
        """Release upstream connections and the store's index."""
        for client in self._clients.values():
            await client.close()
        self.store.close()


def _log_failure(task: asyncio.Future) -> None:
    """Log why a background task failed."""
    if not task.cancelled() and (error := task.exception()) is not None:
        log.info("a background refresh failed: %s", getattr(error, "message", None) or repr(error))
