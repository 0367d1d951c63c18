"""Small named objects: the metadata, pins and records every kind of store keeps beside its blob bytes.

Keys are ``/``-separated (built by ``paths.py``); a key prefix ending in ``/`` is a folder. On local disk a key is
a file below the store root (``FileObjects``); in a bucket it is an object below the store's prefix
(``s3.S3Objects``). Both give the same answers, so ``Metadata`` and ``Pins`` are written once.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from mirror.digest import HEX_LENGTHS, Digest
from mirror.storage.filesystem import storage_error, write_atomic


class Objects(Protocol):
    """A flat namespace of small objects that any process sharing the store sees at once."""

    def get(self, key: str) -> bytes | None:
        """The content of ``key``, or None when absent."""

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """Write ``key`` whole: readers see the old or the new content, never a mix."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` is there."""

    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was there."""

    def changed(self, key: str) -> float:
        """When ``key`` was last written or touched (0 when absent)."""

    def touch(self, key: str) -> None:
        """Mark ``key`` as written now without changing it (nothing when absent)."""

    def children(self, folder: str) -> list[str]:
        """The names directly inside ``folder`` (objects and subfolders), in no particular order."""

    def delete_folder(self, folder: str) -> None:
        """Remove every key inside ``folder``."""


def digests_under(objects: Objects, folder: str) -> Iterator[Digest]:
    """The digests named by the keys ``<folder>/<alg>/<hex>``."""
    for algorithm, length in HEX_LENGTHS.items():
        for entry in objects.children(f"{folder}/{algorithm}"):
            if len(entry) == length:
                yield Digest(algorithm, entry)


class FileObjects:
    """Objects as files below a directory, written atomically; folders are directories."""

    def __init__(self, root: Path):
        self.root = str(root)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def get(self, key: str) -> bytes | None:
        """The file's content, or None when absent."""
        try:
            with open(self._path(key), "rb") as file:
                return file.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            raise storage_error(exc) from exc

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """Replace the file atomically (fsynced when ``durable``)."""
        write_atomic(Path(self._path(key)), data, durable)

    def exists(self, key: str) -> bool:
        """Whether the file is there."""
        return os.path.exists(self._path(key))

    def delete(self, key: str) -> bool:
        """Remove the file (its folder stays); return whether it was there."""
        try:
            os.unlink(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise storage_error(exc) from exc
        return True

    def changed(self, key: str) -> float:
        """The file's modification time (0 when absent): objects are written whole, so it is when it was written,
        or touched."""
        try:
            return os.stat(self._path(key)).st_mtime
        except OSError:
            return 0.0

    def touch(self, key: str) -> None:
        """Set the file's times to now."""
        with contextlib.suppress(OSError):
            os.utime(self._path(key))

    def children(self, folder: str) -> list[str]:
        """The directory's entries, but for files being written."""
        try:
            return [entry for entry in os.listdir(self._path(folder)) if not entry.startswith(".")]
        except OSError:
            return []

    def delete_folder(self, folder: str) -> None:
        """Remove the directory tree."""
        shutil.rmtree(self._path(folder), ignore_errors=True)
