"""Tar bytes of a bundle: streaming members out (optionally split into parts) and reading them back in.

Writing never holds a member in memory: a header is written from the size announced, then the bytes
stream through. The output appears under its final name only when complete. Reading trusts no size a header
announces: the headers of one member are read within ``CHUNK`` bytes, a member's bytes in reads of at most
``CHUNK``, and only the small JSON members are read whole, within their bounds (``format.MAX_JSON_MEMBER``,
``format.MAX_SIGNATURE``).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from mirror.bundle.format import BUNDLE_JSON, MAX_JSON_MEMBER, MAX_SIGNATURE, SIGNATURE
from mirror.errors import BundleInvalid, StorageError

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
CHUNK = 1 << 20
# What tarfile raises on a damaged archive: its own errors, and on crafted headers ValueError and IndexError (GNU
# sparse maps) and RecursionError (it reads a chain of pax headers recursively).
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, IndexError, RecursionError)


def part_name(output: Path, index: int) -> Path:
    """The path of part ``index`` of a split bundle: ``OUT.tar.000``, ``OUT.tar.001``, ..."""
    return output.with_name(f"{output.name}.{index:03d}")


class Output(io.RawIOBase):
    """The file(s) a bundle is written to: one ``OUT.tar``, or parts of at most ``split`` bytes each.

    Everything is written under temporary names and renamed into place by ``finish``; ``abort`` removes it.
    """

    def __init__(self, path: Path, split: int | None = None):
        super().__init__()
        if split is not None and split <= 0:
            raise StorageError("--split must be a positive size")
        self.path, self.split = Path(path), split
        self.paths: list[Path] = []
        self._temps: list[Path] = []
        self._file: BinaryIO | None = None
        self._room = 0

    def writable(self) -> bool:
        """Always true."""
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        """Append ``data``, starting a new part whenever the current one is full."""
        view = memoryview(data)
        while view:
            if self._file is None or (self.split is not None and self._room == 0):
                self._next_part()
            count = len(view) if self.split is None else min(len(view), self._room)
            self._file.write(view[:count])  # type: ignore[union-attr]
            self._room -= count
            view = view[count:]
        return len(data)

    def _next_part(self) -> None:
        self._close_part()
        final = self.path if self.split is None else part_name(self.path, len(self.paths))
        temp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")
        self._file = open(temp, "wb")  # noqa: SIM115 - closed by _close_part
        self.paths.append(final)
        self._temps.append(temp)
        self._room = self.split or 0

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> list[Path]:
        """Make every part durable and give it its final name; return the paths written."""
        if self._file is None and not self.paths:
            self._next_part()
        self._close_part()
        for temp, final in zip(self._temps, self.paths, strict=True):
            os.replace(temp, final)
        return self.paths

    def abort(self) -> None:
        """Remove whatever was written."""
        with contextlib.suppress(OSError):
            if self._file is not None:
                self._file.close()
        for temp in self._temps:
            with contextlib.suppress(OSError):
                temp.unlink()


class TarWriter:
    """Writes tar members to a stream: whole small members, or a header then streamed bytes."""

    def __init__(self, out: BinaryIO, mtime: int):
        self._out = out
        self._mtime = mtime
        self._pending = 0
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        """Write member ``name`` holding ``data``."""
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def begin(self, name: str, size: int) -> None:
        """Write the header of member ``name`` of ``size`` bytes; its bytes follow with ``write``."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, self._mtime, 0o644
        self._emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self._pending = size

    def write(self, data: bytes) -> None:
        """Write the next bytes of the current member."""
        if len(data) > self._pending:
            raise BundleInvalid("a member is longer than its header announced")
        self._pending -= len(data)
        self._emit(data)

    def end(self) -> None:
        """Finish the current member (padding it to a block)."""
        if self._pending:
            raise BundleInvalid(f"a member ended {self._pending} bytes short of its announced size")
        if self.offset % BLOCK:
            self._emit(b"\0" * (BLOCK - self.offset % BLOCK))

    def close(self) -> None:
        """Write the end-of-archive marker, padded to a whole record."""
        self._emit(b"\0" * (2 * BLOCK))
        if self.offset % RECORD:
            self._emit(b"\0" * (RECORD - self.offset % RECORD))

    def _emit(self, data: bytes) -> None:
        self._out.write(data)
        self.offset += len(data)


class PartsReader(io.RawIOBase):
    """The concatenation of one or more files, readable and seekable as one."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._files = [open(path, "rb") for path in paths]  # noqa: SIM115 - closed by close()
        self._sizes = [os.fstat(file.fileno()).st_size for file in self._files]
        self.size = sum(self._sizes)
        self._position = 0

    def readable(self) -> bool:
        """Always true."""
        return True

    def seekable(self) -> bool:
        """Always true."""
        return True

    def tell(self) -> int:
        """The position in the concatenation."""
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset`` from the start, the current position or the end."""
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Read from the part that holds the current position."""
        start = 0
        for file, size in zip(self._files, self._sizes, strict=True):
            if self._position < start + size:
                file.seek(self._position - start)
                count = file.readinto(memoryview(buffer)[:start + size - self._position])
                self._position += count
                return count
            start += size
        return 0

    def close(self) -> None:
        """Close every part."""
        for file in self._files:
            file.close()
        super().close()


class _BoundedReader(io.BufferedReader):
    """The archive as tarfile reads it: no read over ``CHUNK`` bytes, nor over ``budget`` bytes in all while set.

    tarfile reads pax and GNU long-name data whole, and GNU sparse maps block after block, as headers announce.
    """

    def __init__(self, raw: io.RawIOBase):
        super().__init__(raw, CHUNK)
        self.budget: int | None = None

    def read(self, size: int | None = -1) -> bytes:
        """At most ``size`` bytes; raise BundleInvalid when ``size`` is unbounded or over the limits."""
        limit = CHUNK if self.budget is None else min(CHUNK, self.budget)
        if size is None or not 0 <= size <= limit:
            raise BundleInvalid(f"the tar headers of a member are over the {CHUNK} byte limit")
        if self.budget is not None:
            self.budget -= size
        return super().read(size)

    @contextlib.contextmanager
    def headers(self) -> Iterator[None]:
        """Within this, tarfile reads the headers of one member: ``CHUNK`` bytes in all."""
        self.budget = CHUNK
        try:
            yield
        finally:
            self.budget = None


def resolve_parts(paths: Sequence[str | Path]) -> list[Path]:
    """The files of a bundle: as given, or ``OUT.tar.000``... for ``OUT.tar``; BundleInvalid naming a missing part."""
    found = [Path(path) for path in paths]
    if len(found) == 1 and not found[0].exists() and part_name(found[0], 0).exists():
        base = found[0]
        parts = {index: path for path in base.parent.iterdir() if (index := _part_index(path, base)) is not None}
        found = [parts[index] for index in sorted(parts)]
    if len(found) > 1:
        base = found[0].parent / found[0].name.rpartition(".")[0]
        indexes = {_part_index(path, base) for path in found}
        if None not in indexes:  # parts of a split bundle: OUT.tar.000, OUT.tar.001, ...
            first = min(set(range(len(found) + 1)) - indexes)  # the first part not given (after all: the next)
            if part_name(base, first).exists():
                raise BundleInvalid(f"part {part_name(base, first)} is not given (give every part, in order)")
            if first < len(found):
                raise BundleInvalid(f"part {part_name(base, first)} is missing (give every part, in order)")
    for path in found:
        if not path.is_file():
            raise BundleInvalid(f"{path}: no such file")
    return found


def _part_index(path: Path, base: Path) -> int | None:
    """The index of ``path`` as a part of the split bundle ``base`` (``OUT.tar.001`` of ``OUT.tar``: 1), or None."""
    prefix, _, index = path.name.rpartition(".")
    number = int(index) if prefix == base.name and re.fullmatch(r"[0-9]+", index) else None
    return number if number is not None and path == part_name(base, number) else None


class BundleArchive:
    """A bundle opened for reading: ``bundle.json`` and its signature first, then the remaining members."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = resolve_parts(paths)
        self._reader = PartsReader(self.paths)
        self.size = self._reader.size
        try:
            self._open()
        except BaseException:
            self._reader.close()
            raise

    def _open(self) -> None:
        self._file = _BoundedReader(self._reader)
        try:
            with self._file.headers():
                self._tar = tarfile.open(fileobj=self._file, mode="r:")  # noqa: SIM115 - reads the first header
            first = self._tar.next()
        except TAR_ERRORS as exc:
            raise BundleInvalid(f"{self.paths[0]}: not a tar archive ({exc})") from exc
        if first is None or first.name != BUNDLE_JSON or not first.isfile():
            raise BundleInvalid(f"{self.paths[0]}: the first member is not {BUNDLE_JSON} (not a bundle?)")
        self.bundle_json = self.read(first.name, first.size, self._tar.extractfile(first), MAX_JSON_MEMBER)
        self.signature: bytes | None = None
        self._next = self._advance()
        if self._next is not None and self._next.name == SIGNATURE and self._next.isfile():
            member = self._next
            self.signature = self.read(member.name, member.size, self._tar.extractfile(member), MAX_SIGNATURE)
            self._next = self._advance()

    def members(self) -> Iterator[tuple[str, int, BinaryIO | None]]:
        """Each remaining member as (name, size, file); the file is None for anything but a regular file."""
        while self._next is not None:
            member = self._next
            yield member.name, member.size, self._tar.extractfile(member) if member.isfile() else None
            self._next = self._advance()

    def chunks(self, file: BinaryIO) -> Iterator[bytes]:
        """The bytes of a member's ``file`` in chunks; raise BundleInvalid when the archive ends early."""
        try:
            while chunk := file.read(CHUNK):
                yield chunk
        except (tarfile.TarError, OSError) as exc:
            raise BundleInvalid(f"the bundle is truncated (all parts given, in order?): {exc}") from exc

    def read(self, name: str, size: int, file: BinaryIO | None, limit: int) -> bytes:
        """Member ``name`` of ``size`` bytes, whole; BundleInvalid if it is truncated or (unread) over ``limit``."""
        if size > limit:
            raise BundleInvalid(f"{name} is {size} bytes, over the {limit} byte limit")
        data = b"".join(self.chunks(file)) if file is not None else b""
        if len(data) != size:
            raise BundleInvalid(f"{name}: truncated")
        return data

    def _advance(self) -> tarfile.TarInfo | None:
        try:
            with self._file.headers():
                member = self._tar.next()
        except TAR_ERRORS as exc:
            raise BundleInvalid(f"the bundle is truncated or damaged after byte {self._reader.tell()} "
                                f"(all parts given, in order?): {exc}") from exc
        self._tar.members.clear()  # tarfile keeps every header it read; how many there are is the sender's choice
        return member

    def close(self) -> None:
        """Close the files."""
        self._tar.close()
        self._reader.close()

    def __enter__(self) -> BundleArchive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
