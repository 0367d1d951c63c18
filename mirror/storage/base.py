"""The protocols every blob store implements: on local disk (``filesystem.py``) and in a bucket (``s3.py``)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from mirror.digest import Digest


class Reader(Protocol):
    """Random access to bytes being written or stored."""

    async def read(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``position`` (fewer at the end of what is there)."""

    def dup(self) -> Reader:
        """Another reader of the same bytes, closed on its own."""

    def close(self) -> None:
        """Release what the reader holds."""


class BlobWriter(Protocol):
    """An open upload: bytes go in, and ``commit`` makes them a blob atomically or not at all. It is the session's
    only writer until ``close``, ``commit`` or ``cancel``."""

    id: str
    size: int

    def write(self, data: bytes) -> None:
        """Append and hash ``data``."""

    def append(self, data: bytes) -> None:
        """Append ``data`` without hashing it (``hash`` it too, in the same order, from another thread)."""

    def hash(self, data: bytes) -> None:
        """Feed ``data`` to the running hash."""

    def flush(self) -> None:
        """Make every byte appended so far readable by other processes sharing the store."""

    def reader(self) -> Reader:
        """Random access to the bytes written so far, for readers following the writes."""

    def digest(self, algorithm: str = "sha256") -> Digest | None:
        """The digest of the bytes written so far, when they were hashed on the way in."""

    def close(self) -> None:
        """Stop writing for now; the session stays and can be resumed."""

    def commit(self, expected: Digest | None = None) -> Digest:
        """Verify against ``expected``, make durable and publish; return the digest."""

    def cancel(self) -> None:
        """Throw the bytes away."""


class BlobStore(Protocol):
    """Content-addressed blob bytes, shared by every repository, with the upload sessions that make them."""

    def stat(self, digest: Digest) -> int | None:
        """The size of ``digest``, or None when the store lacks it."""

    def open(self, digest: Digest, offset: int = 0) -> BinaryIO:
        """A binary file of the blob positioned at ``offset``; raise BlobUnknown when absent."""

    def read(self, digest: Digest) -> bytes:
        """The whole blob (for small ones: manifests, configs); raise BlobUnknown when absent."""

    def reader(self, digest: Digest) -> Reader:
        """Random access to the blob's bytes; raise BlobUnknown when absent."""

    def chunks(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of the blob, chunk by chunk."""

    def changed(self, digest: Digest) -> float:
        """When the blob was last written (0 when absent)."""

    def writer(self, session: str | None = None, repository: str | None = None) -> BlobWriter:
        """A new writer (recording ``repository``), or the resumed writer of an existing ``session``."""

    def session_repository(self, session: str) -> str | None:
        """The repository an upload session was opened for, or None when the session is unknown."""

    def session_size(self, session: str) -> int:
        """How many bytes an upload session holds."""

    def sessions(self) -> Iterator[tuple[str, float]]:
        """Every upload session with the time it was last written."""

    def expire_assemblies(self, cutoff: float, dry_run: bool = False) -> dict[str, int]:
        """Remove (unless ``dry_run``) what commits that died halfway, before time ``cutoff``, left behind; return
        what it was, with its size."""

    def adopt(self, path: Path, digest: Digest) -> None:
        """Move the verified local file ``path`` in as blob ``digest``, never over the blob already there."""

    def delete(self, digest: Digest) -> None:
        """Remove the blob's bytes (no-op when absent)."""

    def trash(self, digest: Digest) -> float | None:
        """Move the blob where readers no longer find it; return when it was last written (None when absent)."""

    def restore(self, digest: Digest) -> None:
        """Put a trashed blob back, unless the same bytes were committed again meanwhile."""

    def purge(self, digest: Digest) -> None:
        """Delete a trashed blob for good."""

    def trashed(self) -> Iterator[Digest]:
        """Every blob in the trash."""

    def read_any(self, digest: Digest) -> bytes:
        """The whole blob, also while it is in the trash; raise BlobUnknown when it is in neither."""

    def iter(self) -> Iterator[Digest]:
        """Every blob in the store."""
