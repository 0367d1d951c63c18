"""Pins: blobs that eviction must never remove (imported bundle content), one empty file each.

Written by the bundle importer, read by the pull-through cache's eviction. File based so that every process
sharing the store agrees without a lock.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mirror.digest import Digest
from mirror.storage.filesystem import digests_in, write_atomic
from mirror.storage.paths import Layout


class Pins:
    """The set of pinned blob digests of one store."""

    def __init__(self, root: Path):
        self.layout = Layout(root)

    def pin(self, digest: Digest) -> None:
        """Pin ``digest``: it is never evicted."""
        path = self.layout.pin(digest)
        if not path.exists():
            write_atomic(path, b"", durable=False)

    def is_pinned(self, digest: Digest) -> bool:
        """Whether ``digest`` is pinned."""
        return self.layout.pin(digest).exists()

    def all(self) -> Iterator[Digest]:
        """Every pinned digest."""
        return digests_in(self.layout.pins)
