"""Content digests: the ``Digest`` value type and a streaming ``Hasher``. Pure: no I/O."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from mirror.errors import DigestInvalid

HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated ``algorithm:hex`` content digest."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse and validate ``text``; raise DigestInvalid if it is not a supported digest."""
        algorithm, sep, hexpart = text.partition(":")
        if not sep or HEX_LENGTHS.get(algorithm) != len(hexpart) or not _HEX.fullmatch(hexpart):
            raise DigestInvalid(f"invalid digest {text[:200]!r}", detail={"digest": text[:200]})
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    @staticmethod
    def is_digest(text: str) -> bool:
        """Whether ``text`` looks like a digest (has an algorithm prefix) rather than a tag."""
        return ":" in text

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class Hasher:
    """Hashes a stream chunk by chunk and tells its digest and size."""

    def __init__(self, algorithm: str = "sha256"):
        self.algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def update(self, data: bytes) -> None:
        """Feed the next chunk."""
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        """The digest of everything fed so far."""
        return Digest(self.algorithm, self._hash.hexdigest())
