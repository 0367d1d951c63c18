"""Coordination of pull-through fetches between the worker processes that share one store on local disk.

A worker fetching a blob holds an ``flock`` on ``state/fetching/<digest>.lock`` (``FetchClaim``) and names
its upload session beside it; other workers follow the bytes through that session file (``ForeignFetch``)
instead of asking the upstream again.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

from mirror.digest import Digest
from mirror.errors import FetchAbandoned
from mirror.storage.filesystem import FileBlobWriter, FileLock, FileReader, write_atomic
from mirror.storage.paths import Layout

FOREIGN_POLL = 0.01  # seconds between looks at a fetch another worker process is doing


class FetchClaim:
    """One worker process's exclusive right to fetch a blob, visible to the other workers sharing the store.

    The holder keeps an ``flock`` on ``state/fetching/<digest>.lock`` for the whole fetch and names its upload
    session in the ``.json`` beside it once the upstream answered. It commits the blob before it deletes the
    lock file and unlocks, so a worker that gets the lock next finds the blob in the store.
    """

    def __init__(self, lock: Path, note: Path, held: FileLock):
        self.lock, self.note, self._held = lock, note, held

    @classmethod
    def take(cls, layout: Layout, digest: Digest) -> FetchClaim | None:
        """The claim on ``digest``, or None while another process holds it."""
        lock, note = layout.fetch_claim(digest)
        held = FileLock.take(lock)
        return None if held is None else cls(lock, note, held)

    @staticmethod
    def held(layout: Layout, digest: Digest) -> bool:
        """Whether some process is fetching ``digest`` right now."""
        claim = FetchClaim.take(layout, digest)
        if claim is None:
            return True
        claim.release()
        return False

    def publish(self, writer: FileBlobWriter, size: int | None) -> None:
        """Tell the other workers which upload session receives the bytes."""
        write_atomic(self.note, json.dumps({"session": writer.id, "size": size}).encode(), durable=False)

    def progress(self) -> None:
        """Nothing: the other workers see the session file grow."""

    def verified(self) -> None:
        """Nothing: the other workers know the bytes verified when the file they follow becomes the blob."""

    def release(self) -> None:
        """Give the claim up (after the blob was committed or the fetch failed)."""
        for path in (self.note, self.lock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._held.release()


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

    @property
    def finished(self) -> bool:
        """Whether the blob is committed (then its bytes are all there and verified)."""
        return self.done

    def reader(self) -> FileReader:
        """The file the other worker writes (handed over: the follower closes it)."""
        return FileReader(self._fd)

    @staticmethod
    async def read(reader: FileReader, position: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``position`` of the file the other worker writes."""
        return await reader.read(position, size)

    async def progress(self) -> None:
        """Wait a moment and look again at how far the other worker got."""
        await asyncio.sleep(FOREIGN_POLL)
        self._refresh()

    def _refresh(self) -> None:
        if self.done or self.error is not None:
            return
        committed = self._committed()  # before the size: a committed file is complete
        if not committed and not FetchClaim.held(self.layout, self.digest):
            committed = self._committed()
            if not committed:  # gave up, or failed and another fetch committed the blob from other bytes
                self.error = FetchAbandoned(f"the worker fetching {self.digest} gave up")
        self.available = os.fstat(self._fd).st_size
        self.done = committed  # committed, hence verified: the file we follow is the blob now

    def _committed(self) -> bool:
        """Whether the file followed is the committed blob itself (not a failed fetch's session file)."""
        try:
            blob = os.stat(self.layout.blob(self.digest))
        except FileNotFoundError:
            return False
        ours = os.fstat(self._fd)
        return (blob.st_dev, blob.st_ino) == (ours.st_dev, ours.st_ino)
