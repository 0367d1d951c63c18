"""The access index of pull-through blobs: size and last use of each, for least-recently-used eviction.

Only blobs the cache fetched from an upstream are in it; pushed and imported content never is (a cached
blob that is pushed or imported leaves it), so eviction never touches hosted content. diskcache keeps it
in ``state/cache-index/``, safe for every worker process sharing the store.
"""
from __future__ import annotations

import time
from pathlib import Path

import diskcache

from mirror.digest import Digest

TOUCH_INTERVAL = 60.0
TOTAL_KEY = "total-bytes"  # beside the digests (no digest looks like it)


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
