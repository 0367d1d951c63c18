"""Durable queues of JSON records: any process sharing the store appends, one consumer reads and removes.

A record is one file, written atomically (a reader never sees half of one) and named by the time it was
queued, so a queue reads oldest first; a record stays until the consumer removes it, across restarts. The
consumer is whichever process holds the queues' lock (see ``paths.py`` for where all of it lives).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from mirror.storage.filesystem import FileLock, write_atomic
from mirror.storage.paths import QUEUE_ENTRY_PATTERN, Layout

log = logging.getLogger("mirror.storage")


class Queues:
    """The durable queues of one store, each named by any string (the events use endpoint URLs)."""

    def __init__(self, root: Path):
        self.layout = Layout(root)

    def put(self, name: str, record: Any) -> None:
        """Append ``record`` (JSON-serialisable) to queue ``name``; raise StorageError when it cannot be written."""
        entry = f"{time.time_ns():020d}-{uuid.uuid4()}.json"
        write_atomic(self.layout.queue_entry(name, entry), json.dumps(record).encode())

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
