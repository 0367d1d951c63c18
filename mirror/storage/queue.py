"""Durable queues of JSON records: any process sharing the store appends, one consumer reads and removes.

A record is one file, written atomically (a reader never sees half of one) and named by the time it was
queued, so a queue reads oldest first; a record stays until the consumer removes it, across restarts, or
until an append finds the queue at the bound it was given (records, bytes on disk) and drops the oldest to
make room. The consumer is whichever process holds the queues' lock (see ``paths.py`` for where all of it
lives).
"""
from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from mirror.storage.filesystem import FileLock, storage_error, write_atomic
from mirror.storage.paths import QUEUE_ENTRY_PATTERN, Layout

log = logging.getLogger("mirror.storage")


BLOCK = 4096  # bytes of the smallest file on the usual file systems (ext4, xfs, tmpfs)

class Queues:
    """The durable queues of one store, each named by any string (the events use endpoint URLs)."""

    def __init__(self, root: Path):
        self.layout = Layout(root)
        self._sizes: dict[str, dict[str, int]] = {}  # per queue, the bytes on disk of each record seen

    def capacity(self) -> int:
        """The size in bytes of the filesystem the store is on; raise StorageError when it cannot be told."""
        try:
            stats = os.statvfs(self.layout.root)
        except OSError as exc:
            raise storage_error(exc) from exc
        return stats.f_blocks * stats.f_frsize

    def put(self, name: str, record: Any, max_records: float = math.inf, max_bytes: float = math.inf) -> int:
        """Append ``record`` (JSON-serialisable) to queue ``name``, first dropping its oldest records as needed
        for it to hold at most ``max_records`` records of at most ``max_bytes`` bytes on disk; return how many
        were dropped. Raise StorageError when it cannot be written."""
        data = json.dumps(record).encode()
        on_disk = -(-len(data) // BLOCK) * BLOCK  # a file takes whole blocks, as the records already there count
        dropped = self._make_room(name, on_disk, max_records, max_bytes)
        entry = f"{time.time_ns():020d}-{uuid.uuid4()}.json"
        write_atomic(self.layout.queue_entry(name, entry), data)
        return dropped

    def _make_room(self, name: str, size: int, max_records: float, max_bytes: float) -> int:
        """Drop the oldest records of queue ``name`` until one more of ``size`` bytes fits; return how many."""
        records = self._records(name)
        used, dropped = sum(records.values()), 0
        oldest = list(records)
        heapq.heapify(oldest)
        while oldest and (len(records) >= max_records or used + size > max_bytes):
            entry = heapq.heappop(oldest)
            used -= records.pop(entry)
            try:
                self.layout.queue_entry(name, entry).unlink()
                dropped += 1
            except FileNotFoundError:
                pass  # delivered meanwhile
            except OSError as exc:
                raise storage_error(exc) from exc
        return dropped

    def _records(self, name: str) -> dict[str, int]:
        """The records of queue ``name`` now, with their bytes on disk (each looked at once by this process)."""
        try:
            entries = os.listdir(self.layout.queue(name))
        except FileNotFoundError:
            entries = []
        known, records = self._sizes.get(name, {}), {}
        for entry in entries:
            size = known.get(entry)
            if size is None and QUEUE_ENTRY_PATTERN.fullmatch(entry):
                with contextlib.suppress(FileNotFoundError):  # the consumer removed it meanwhile
                    stat = os.stat(self.layout.queue_entry(name, entry))
                    size = max(stat.st_size, stat.st_blocks * 512)
            if size is not None:
                records[entry] = size
        self._sizes[name] = records
        return records

    def peek(self, name: str, limit: int) -> list[tuple[str, Any]]:
        """The oldest records of queue ``name`` (at most ``limit``) with their ids, oldest first; a record that
        is not JSON is dropped (and logged)."""
        try:
            entries = sorted(entry for entry in os.listdir(self.layout.queue(name))
                             if QUEUE_ENTRY_PATTERN.fullmatch(entry))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries[:limit]:
            path = self.layout.queue_entry(name, entry)
            try:
                found.append((entry, json.loads(path.read_bytes())))
            except ValueError:
                log.error("dropping unreadable record %s of queue %s", entry, name)
                path.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        return found

    def remove(self, name: str, entries: list[str]) -> None:
        """Remove the records ``entries`` (ids ``peek`` gave) from queue ``name``."""
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                self.layout.queue_entry(name, entry).unlink()

    def consumer_lock(self) -> FileLock | None:
        """The right to consume the queues (held until released), or None while another process holds it."""
        return FileLock.take(self.layout.queue_lock)
