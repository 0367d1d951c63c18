"""Staging stores of bundle imports: blobs verified but not yet in the store, kept until the import publishes
them so that a rerun after a kill resumes, and expired when nobody reran an import for long."""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from mirror.digest import Digest
from mirror.storage.base import BlobStore
from mirror.storage.filesystem import FilesystemBlobStore
from mirror.storage.paths import Layout


class Imports:
    """The staging stores of one store's bundle imports, each named by a key (32 hex digits)."""

    def __init__(self, root: Path, blobs: BlobStore):
        self.layout, self.blobs = Layout(root), blobs

    def staging(self, key: str) -> FilesystemBlobStore:
        """The staging blob store of the import ``key`` (created, or as an earlier run left it)."""
        return FilesystemBlobStore(self.layout.import_staging(key))

    def promote(self, staging: FilesystemBlobStore, digest: Digest) -> None:
        """Move verified blob ``digest`` from ``staging`` into the store (never over a blob the store has: on local
        disk by a link, atomic and without a copy); nothing when ``staging`` does not hold it."""
        source = staging.layout.blob(digest)
        if source.exists():
            self.blobs.adopt(source, digest)

    def discard(self, key: str) -> None:
        """Delete the staging store of the import ``key``."""
        shutil.rmtree(self.layout.import_staging(key), ignore_errors=True)

    def expire(self, max_age: float, dry_run: bool = False) -> dict[str, int]:
        """Delete (unless ``dry_run``) the staging stores nothing wrote for ``max_age`` seconds; return their
        sizes by key."""
        cutoff, expired = time.time() - max_age, {}
        with contextlib.suppress(FileNotFoundError):
            for folder in self.layout.imports.iterdir():
                files = [path for path in folder.rglob("*") if path.is_file()]
                if max(path.stat().st_mtime for path in [folder, *files]) < cutoff:
                    expired[folder.name] = sum(path.stat().st_size for path in files)
                    if not dry_run:
                        shutil.rmtree(folder, ignore_errors=True)
        return expired
