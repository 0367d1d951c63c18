"""Pins: what eviction and the garbage collector must keep because an imported tag (or digest) holds it.

A bundle import makes each image's reference in its repository (``docker.io/library/alpine`` + ``3.20``, or + the
digest for an image imported by digest) a holder: a record naming the repository, the reference and every digest
of the image (its manifests, configs, layers and referrers), and one empty object per digest in that digest's pin
folder. A digest is pinned while any holder's object is in its folder, so a blob two imported tags share stays
pinned until both let go. Deleting the tag (or the manifest) releases its holder (``registry.py``); the garbage
collector then frees what nothing else references or pins.

A ``legacy`` pin is held by no tag: what layout version 2 pinned that no tag reaches (``store.py`` migrates the
rest to holders). Plain ``mirror gc`` keeps it; ``mirror gc --untagged`` releases it when nothing live reaches it.

Made of objects (``objects.py``) so that every process and instance sharing the store agrees without a lock. A
holder's pin objects are created after its record lists them and removed before it stops listing them, so every pin
belongs to a record (or is legacy) and a holder cut short is released whole by the next release.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

from mirror.digest import Digest
from mirror.errors import MirrorError, StorageError
from mirror.storage.objects import Objects, digests_under
from mirror.storage.paths import PINS, check_name, pin_holder_key, pin_key, pins_key

LEGACY = "legacy"


def _holder_key(repository: str, reference: str) -> str:
    """The holder name of ``reference`` (a tag or a digest) in ``repository``."""
    return hashlib.sha256(f"{check_name(repository)}:{reference}".encode()).hexdigest()[:32]


class Pins:
    """The pins of one store, by holder."""

    def __init__(self, objects: Objects):
        self.objects = objects

    def hold(self, repository: str, reference: str, digests: Iterable[Digest]) -> None:
        """Make ``reference`` of ``repository`` hold exactly ``digests``, releasing what it held before and not now."""
        key, wanted = _holder_key(repository, reference), set(digests)
        for digest in self._held(key) - wanted:
            self.objects.delete(pin_key(digest, key))
        record = {"repository": repository, "reference": reference, "digests": sorted(map(str, wanted))}
        self.objects.put(pin_holder_key(key), json.dumps(record).encode())
        for digest in wanted:
            self.objects.put(pin_key(digest, key), b"", durable=False)

    def release(self, repository: str, reference: str) -> None:
        """Let ``reference`` of ``repository`` hold nothing any more."""
        key = _holder_key(repository, reference)
        for digest in self._held(key):
            self.objects.delete(pin_key(digest, key))
        self.objects.delete(pin_holder_key(key))

    def pin(self, digest: Digest) -> None:
        """Pin ``digest`` with a legacy pin, held by no tag."""
        self.objects.put(pin_key(digest, LEGACY), b"", durable=False)

    def is_pinned(self, digest: Digest) -> bool:
        """Whether anything pins ``digest``."""
        return bool(self.objects.children(pins_key(digest)))

    def all(self) -> Iterator[Digest]:
        """Every pinned digest."""
        return (digest for digest in digests_under(self.objects, PINS) if self.is_pinned(digest))

    def legacy(self) -> Iterator[Digest]:
        """Every digest that only a legacy pin pins."""
        return (digest for digest in digests_under(self.objects, PINS)
                if self.objects.children(pins_key(digest)) == [LEGACY])

    def release_legacy(self, digest: Digest) -> None:
        """Remove the legacy pin of ``digest`` (holders' pins stay)."""
        self.objects.delete(pin_key(digest, LEGACY))

    def _held(self, key: str) -> set[Digest]:
        """The digests holder ``key`` pins (none without a record)."""
        data = self.objects.get(pin_holder_key(key))
        if data is None:
            return set()
        try:
            return {Digest.parse(text) for text in json.loads(data)["digests"]}
        except (ValueError, LookupError, TypeError, MirrorError) as exc:
            raise StorageError(f"unreadable pin record of holder {key}: {exc}") from exc
