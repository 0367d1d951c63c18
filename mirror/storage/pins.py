"""Pins: what eviction and the garbage collector must keep because an imported tag (or digest) holds it.

A bundle import makes each image's reference in its repository (``docker.io/library/alpine`` + ``3.20``, or + the
digest for an image imported by digest) a holder: a record naming the repository, the reference and every digest
of the image (its manifests, configs, layers and referrers), and one empty file per digest in that digest's pin
folder. A digest is pinned while any holder's file is in its folder, so a blob two imported tags share stays
pinned until both let go. Deleting the tag (or the manifest) releases its holder (``registry.py``); the garbage
collector then frees what nothing else references or pins.

A ``legacy`` pin is held by no tag: what layout version 2 pinned that no tag reaches (``store.py`` migrates the
rest to holders). Plain ``mirror gc`` keeps it; ``mirror gc --untagged`` releases it when nothing live reaches it.

File based so that every process sharing the store agrees without a lock. A holder's files are created after its
record lists them and removed before it stops listing them, so every pin file belongs to a record (or is legacy)
and a holder cut short is released whole by the next release.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from mirror.digest import Digest
from mirror.errors import MirrorError, StorageError
from mirror.storage.filesystem import digests_in, storage_error, write_atomic
from mirror.storage.paths import Layout, check_name

LEGACY = "legacy"


def _holder_key(repository: str, reference: str) -> str:
    """The holder name of ``reference`` (a tag or a digest) in ``repository``."""
    return hashlib.sha256(f"{check_name(repository)}:{reference}".encode()).hexdigest()[:32]


class Pins:
    """The pins of one store, by holder."""

    def __init__(self, root: Path):
        self.layout = Layout(root)

    def hold(self, repository: str, reference: str, digests: Iterable[Digest]) -> None:
        """Make ``reference`` of ``repository`` hold exactly ``digests``, releasing what it held before and not now."""
        key, wanted = _holder_key(repository, reference), set(digests)
        for digest in self._held(key) - wanted:
            self._unpin(digest, key)
        record = {"repository": repository, "reference": reference, "digests": sorted(map(str, wanted))}
        write_atomic(self.layout.pin_holder(key), json.dumps(record).encode())
        for digest in wanted:
            self._pin(digest, key)

    def release(self, repository: str, reference: str) -> None:
        """Let ``reference`` of ``repository`` hold nothing any more."""
        key = _holder_key(repository, reference)
        for digest in self._held(key):
            self._unpin(digest, key)
        with contextlib.suppress(FileNotFoundError):
            self.layout.pin_holder(key).unlink()

    def pin(self, digest: Digest) -> None:
        """Pin ``digest`` with a legacy pin, held by no tag."""
        self._pin(digest, LEGACY)

    def is_pinned(self, digest: Digest) -> bool:
        """Whether anything pins ``digest``."""
        try:
            return bool(os.listdir(self.layout.pins_of(digest)))
        except OSError:
            return False

    def all(self) -> Iterator[Digest]:
        """Every pinned digest."""
        return (digest for digest in digests_in(self.layout.pins) if self.is_pinned(digest))

    def legacy(self) -> Iterator[Digest]:
        """Every digest that only a legacy pin pins."""
        for digest in digests_in(self.layout.pins):
            with contextlib.suppress(OSError):
                if os.listdir(self.layout.pins_of(digest)) == [LEGACY]:
                    yield digest

    def release_legacy(self, digest: Digest) -> None:
        """Remove the legacy pin of ``digest`` (holders' pins stay)."""
        self._unpin(digest, LEGACY)

    def _held(self, key: str) -> set[Digest]:
        """The digests holder ``key`` pins (none without a record)."""
        path = self.layout.pin_holder(key)
        try:
            return {Digest.parse(text) for text in json.loads(path.read_bytes())["digests"]}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, LookupError, TypeError, MirrorError) as exc:
            raise StorageError(f"unreadable pin record {path}: {exc}") from exc

    def _pin(self, digest: Digest, key: str) -> None:
        path = self.layout.pin(digest, key)
        try:
            for _ in range(3):  # a release may remove the folder between its creation and the file's
                path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                    return
        except OSError as exc:
            raise storage_error(exc) from exc
        raise StorageError(f"cannot pin {digest}: its folder keeps being removed")

    def _unpin(self, digest: Digest, key: str) -> None:
        path = self.layout.pin(digest, key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(OSError):  # not empty: another holder pins it
            path.parent.rmdir()
