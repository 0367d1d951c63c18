"""The small protocols every blob store implements."""
from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Protocol

from mirror.digest import Digest


class BlobWriter(Protocol):
    """An open upload: bytes go in, and ``commit`` makes them a blob atomically or not at all."""

    id: str
    size: int

    def write(self, data: bytes) -> None:
        """Append ``data``."""

    def close(self) -> None:
        """Stop writing for now; the session stays and can be resumed."""

    def commit(self, expected: Digest | None = None) -> Digest:
        """Verify against ``expected``, make durable and publish; return the digest."""

    def cancel(self) -> None:
        """Throw the bytes away."""


class BlobStore(Protocol):
    """Content-addressed blob bytes, shared by every repository."""

    def stat(self, digest: Digest) -> int | None:
        """The size of ``digest``, or None when the store lacks it."""

    def open(self, digest: Digest, offset: int = 0) -> BinaryIO:
        """A binary file of the blob positioned at ``offset``; raise BlobUnknown when absent."""

    def read(self, digest: Digest) -> bytes:
        """The whole blob (for small ones: manifests, configs); raise BlobUnknown when absent."""

    def writer(self, session: str | None = None) -> BlobWriter:
        """A new writer, or the resumed writer of an existing ``session``."""

    def delete(self, digest: Digest) -> None:
        """Remove the blob's bytes (no-op when absent)."""

    def iter(self) -> Iterator[Digest]:
        """Every blob in the store."""
