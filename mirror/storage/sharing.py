"""Coordination of pull-through fetches between the instances that share one bucket, through Redis.

The instance fetching a blob holds the Redis claim ``fetch:<digest>`` (``SharedFetchClaim``), heartbeated while
its process lives, and publishes in it its upload session, the blob's size, how many bytes are in part objects
already and, once the digest checked out, that they are verified. Clients of other instances follow those part
objects as they appear (``SharedForeignFetch``) instead of asking the upstream again. When the fetching instance
dies its claim expires: followers then report ``FetchAbandoned`` and the fetcher makes one of them fetch anew.

Without Redis a claim is this process's alone and nobody follows from elsewhere: each instance (and worker)
then fetches for itself (degraded: more upstream requests, never wrong bytes).
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

from mirror.digest import Digest
from mirror.errors import FetchAbandoned
from mirror.storage.s3 import list_parts, read_parts

if TYPE_CHECKING:
    from mirror.storage.coordination import Claim, Coordination
    from mirror.storage.s3 import S3BlobWriter
    from mirror.storage.store import Store

CLAIM_TTL = 6.0  # seconds a dead instance's claim outlives it
POLL = 0.05  # seconds between looks at a fetch another instance is doing
FOLLOWED_CHECK = 0.2  # seconds between the fetching instance's looks for followers on other instances
_LOCAL: set[Digest] = set()  # claims of this process while there is no Redis
_LOCAL_LOCK = threading.Lock()


def _key(digest: Digest) -> str:
    return f"fetch:{digest}"


def _followed(digest: Digest) -> str:
    return f"followed:{digest}"


class SharedFetchClaim:
    """This instance's exclusive right to fetch a blob, published in Redis for the other instances."""

    def __init__(self, digest: Digest, claim: Claim | None, coordination: Coordination | None = None):
        self.digest, self._claim, self._coordination = digest, claim, coordination
        self._info: dict[str, Any] = {}
        self._writer: S3BlobWriter | None = None
        self._looked = 0.0

    @classmethod
    def take(cls, store: Store, digest: Digest) -> SharedFetchClaim | None:
        """The claim on ``digest``, or None while another process or instance holds it."""
        if store.coordination is not None:
            claim = store.coordination.claim(_key(digest), {}, ttl=CLAIM_TTL)
            return None if claim is None else cls(digest, claim, store.coordination)
        with _LOCAL_LOCK:
            if digest in _LOCAL:
                return None
            _LOCAL.add(digest)
        return cls(digest, None)

    def publish(self, writer: S3BlobWriter, size: int | None) -> None:
        """Name the upload session receiving the bytes; its parts go to the bucket as they fill only once another
        instance follows (until then the bucket would only slow this instance's own clients)."""
        self._writer = writer
        writer.eager = False
        self._update(session=writer.id, size=size, flushed=0, verified=False)

    def progress(self) -> None:
        """Publish how many bytes the other instances can read from part objects now, and upload parts as they
        fill once another instance follows."""
        writer = self._writer
        if writer is None:
            return
        if not writer.eager and self._coordination is not None and time.monotonic() - self._looked > FOLLOWED_CHECK:
            self._looked = time.monotonic()
            writer.eager = self._coordination.marked(_followed(self.digest))
        if writer.flushed != self._info.get("flushed"):
            self._update(flushed=writer.flushed)

    def verified(self) -> None:
        """Publish that the bytes checked out: followers may release every byte."""
        self._update(verified=True)

    def _update(self, **changes: Any) -> None:
        self._info = {**self._info, **changes}
        if self._claim is not None:
            self._claim.update(self._info)

    def release(self) -> None:
        """Give the claim up (after the blob was committed or the fetch failed)."""
        if self._claim is not None:
            self._claim.release()
        else:
            with _LOCAL_LOCK:
                _LOCAL.discard(self.digest)


class SharedForeignFetch:
    """A fetch another instance is doing, followed through its part objects in the bucket."""

    def __init__(self, store: Store, digest: Digest, info: dict[str, Any]):
        self.store, self.digest = store, digest
        self.session: str = info["session"]
        self.size: int | None = info.get("size")
        self.available, self.done, self.error = 0, False, None
        self.verify = True  # bytes come from another process: the follower checks what it sends, whole
        self._parts: list[tuple[int, int]] = []
        self._update(info)

    @classmethod
    async def join(cls, store: Store, digest: Digest) -> SharedForeignFetch | None:
        """Follow the fetch of ``digest`` once its holder published its session; None when nobody holds it."""
        if store.coordination is None:
            return None
        await asyncio.to_thread(store.coordination.mark, _followed(digest), CLAIM_TTL)
        while True:
            info = await asyncio.to_thread(store.coordination.holder, _key(digest))
            if info is None:
                return None
            if info.get("session"):
                return cls(store, digest, info)
            await asyncio.sleep(POLL)

    @property
    def finished(self) -> bool:
        """Whether every byte is verified."""
        return self.done

    def reader(self) -> SharedForeignFetch:
        """Itself: reads go to the part objects, or to the blob once they are gone."""
        return self

    def close(self) -> None:
        """Nothing to release."""

    async def read(self, reader: SharedForeignFetch, position: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``position``."""
        return await asyncio.to_thread(self._read, position, size)

    def _read(self, position: int, size: int) -> bytes:
        bucket = self.store.bucket
        if not any(offset <= position < offset + length for offset, length in self._parts):
            self._parts = list_parts(bucket, self.session)
        data = read_parts(bucket, self.session, self._parts, position, size)
        if not data and self.store.blobs.stat(self.digest) is not None:  # committed: the parts are gone
            data = self.store.blobs.read_range(self.digest, position, size)  # type: ignore[attr-defined]
        return data

    async def progress(self) -> None:
        """Wait a moment and look again at how far the other instance got."""
        await asyncio.sleep(POLL)
        coordination = self.store.coordination
        info = await asyncio.to_thread(coordination.holder, _key(self.digest)) if coordination else None
        if info is not None and info.get("session") == self.session:
            self._update(info)
        elif self.done:
            return
        elif self.size is not None and await asyncio.to_thread(self.store.blobs.stat, self.digest) == self.size:
            self.available, self.done = self.size, True  # committed and let go between two looks
        else:
            self.error = FetchAbandoned(f"the instance fetching {self.digest} stopped before it was verified")

    def _update(self, info: dict[str, Any]) -> None:
        self.available = max(self.available, int(info.get("flushed") or 0))
        if info.get("verified") and self.size is not None and self.available >= self.size:
            self.done = True
