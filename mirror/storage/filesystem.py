"""Blob store on a local file system: session file, streaming digest, fsync, verify, link into ``blobs/``.

A blob becomes visible only by the final link, so a crash never leaves a partial blob in ``blobs/``, and a
committed blob is never written again: committing bytes that are there already discards the session. Writers
live in ``uploads/<session>/`` and can be resumed by any process that shares the store, by one request at a
time: a writer holds the ``flock`` of ``uploads/<session>/lock`` from opening to close, commit or cancel, so
the bytes a commit verified are the bytes it publishes. The garbage collector's trash (``state/gc-trash/``) is
a second folder of blobs that readers do not see.

Also the file primitives the rest of the store is made of: atomic and create-once writes, digest folders,
change times and ``flock`` locks.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from queue import SimpleQueue
from typing import BinaryIO

from mirror.digest import HEX_LENGTHS, Digest, Hasher
from mirror.errors import BlobUnknown, BlobUploadInvalid, BlobUploadUnknown, DigestInvalid, StorageError, StoreFull
from mirror.storage.paths import Layout

CHUNK = 1 << 20
WRITE_BEHIND = 32 << 20  # bytes a background append may hold in memory before the disk has them


def storage_error(exc: OSError) -> StorageError:
    """The domain error for an OS error raised while writing the store."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull("no space left in the store")
    return StorageError(f"store write failed: {exc.strerror or exc}")


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "wb") as file:
            file.write(data)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise storage_error(exc) from exc


def write_once(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data``, durably and readable by this user only, unless it exists already: of
    processes racing to create it, the first link wins and the others leave it be."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
    finally:
        os.unlink(temporary)


def changed(path: Path) -> float:
    """When ``path`` was last written or renamed into place (0 when it does not exist)."""
    try:
        stat = os.stat(path)
    except OSError:
        return 0.0
    return max(stat.st_mtime, stat.st_ctime)


def publish(source: Path, target: Path) -> None:
    """Move the bytes of ``source`` to ``target`` unless ``target`` exists (content-addressed: it holds the same
    bytes), which is then only marked as just written, for the garbage collector's grace; never replace it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with contextlib.suppress(FileExistsError):
            os.link(source, target)
            break
        with contextlib.suppress(FileNotFoundError):  # else the garbage collector took it meanwhile: link it
            os.utime(target)
            break
    os.unlink(source)


class FileLock:
    """An exclusive ``flock`` on a file, held by this process until ``release`` (or its end)."""

    def __init__(self, fd: int):
        self._fd = fd

    @classmethod
    def take(cls, path: Path, removable: bool = False) -> FileLock | None:
        """The lock on ``path`` (created if need be), or None while another holder has it: another process, or
        another open file of it in this one.

        ``removable``: holders delete ``path`` and its folder while they hold it. Then the folder is not created,
        and FileNotFoundError is raised when it is missing or ``path`` was deleted before the lock was had.
        """
        if not removable:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if removable and not os.path.samestat(os.fstat(fd), os.stat(path)):
                raise FileNotFoundError(errno.ENOENT, "lock file deleted while it was being taken", str(path))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def release(self) -> None:
        """Let the lock go."""
        os.close(self._fd)


def digests_in(folder: Path) -> Iterator[Digest]:
    """The digests named by the files ``folder/<alg>/<hex>`` (links, pins, trash); none if it is missing."""
    for algorithm, length in HEX_LENGTHS.items():
        with contextlib.suppress(OSError):
            for entry in os.listdir(folder / algorithm):
                if len(entry) == length:
                    yield Digest(algorithm, entry)


def remove_session(folder: Path) -> None:
    """Delete an upload session's folder, by the holder of its lock; the lock file goes last, so a request that
    creates it anew meanwhile finds a session without data (see ``FilesystemBlobStore.writer``)."""
    lock = folder / "lock"
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            if path != lock:
                path.unlink()
    for remove in (lock.unlink, folder.rmdir):
        with contextlib.suppress(OSError):
            remove()


def hash_file(path: Path, algorithm: str = "sha256") -> Hasher:
    """A hasher fed with the whole content of ``path``."""
    hasher = Hasher(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            hasher.update(chunk)
    return hasher


class FileReader:
    """Random access to a file's bytes through its descriptor, owned until ``close``; the file holds the bytes
    from position ``base`` on."""

    def __init__(self, fd: int, base: int = 0):
        self.fd, self.base = fd, base

    async def read(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``position`` (a local read: done on the event loop)."""
        return os.pread(self.fd, size, position - self.base)

    def dup(self) -> FileReader:
        """Another reader of the same file, closed on its own."""
        return FileReader(os.dup(self.fd), self.base)

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)


class FileAppender:
    """What every writer does with incoming bytes: append them to its raw file ``_file`` and feed them to its
    running hash ``_hasher`` (if it has one), the two possibly on two threads."""

    size: int
    _file: BinaryIO
    _hasher: Hasher | None

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        self.append(data)
        self.hash(data)

    def hash(self, data: bytes) -> None:
        """Feed the next ``data`` to the running hash (``append`` does not)."""
        if self._hasher is not None:
            self._hasher.update(data)

    def append(self, data: bytes) -> None:
        """Append ``data`` to the file without hashing it; ``hash`` it too, in the same order."""
        try:
            view = memoryview(data)
            while view:  # a raw file may take less than asked
                view = view[self._file.write(view):]
        except OSError as exc:
            raise storage_error(exc) from exc
        self.size += len(data)


class FileBlobWriter(FileAppender):
    """A resumable upload backed by ``uploads/<session>/data``, holding the session's ``lock`` until ``close``,
    ``commit`` or ``cancel``: the only writer of the session meanwhile."""

    def __init__(self, store: FilesystemBlobStore, session: str, lock: FileLock, hasher: Hasher | None):
        self.id = session
        self._store = store
        self._folder = store.layout.session(session)
        self.path = self._folder / "data"
        self._lock: FileLock | None = lock
        # unbuffered, so a pull-through fetch's followers can read every byte as soon as it is written
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - owned until close/commit/cancel
        self.size = self._file.tell()
        self._hasher = hasher if hasher is not None and hasher.size == self.size else None

    def flush(self) -> None:
        """Nothing: every appended byte is in the file already, where readers see it."""

    def reader(self) -> FileReader:
        """Random access to the session's bytes, for readers following the writes."""
        return FileReader(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC))

    def close(self) -> None:
        """Flush, let the session's lock go and keep the session for a later request (nothing once the writer is
        done: closed, committed or cancelled)."""
        if self._lock is None:
            return
        try:
            self._file.close()
            self._store.remember(self.id, self._hasher)
        except OSError as exc:
            raise storage_error(exc) from exc
        finally:
            self._end(remove=False)

    def digest(self, algorithm: str = "sha256") -> Digest | None:
        """The digest of the bytes written so far, when they were hashed with ``algorithm`` on the way in."""
        if self._hasher is not None and self._hasher.algorithm == algorithm:
            return self._hasher.digest()
        return None

    def commit(self, expected: Digest | None = None) -> Digest:
        """Fsync, verify and publish into ``blobs/``, all under the session's lock, so nothing is appended to the
        verified bytes; a blob already there is kept as it is and the session discarded. On a mismatch the session
        is kept, still held (``close`` or ``cancel`` it), and DigestInvalid raised."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        except OSError as exc:
            raise storage_error(exc) from exc
        algorithm = expected.algorithm if expected else "sha256"
        hasher = self._hasher if self._hasher and self._hasher.algorithm == algorithm else None
        actual = (hasher or hash_file(self.path, algorithm)).digest()
        if expected is not None and actual != expected:
            raise DigestInvalid(f"content digest {actual} does not match {expected}",
                                detail={"expected": str(expected), "actual": str(actual)})
        try:
            publish(self.path, self._store.layout.blob(actual))
        except OSError as exc:
            raise storage_error(exc) from exc
        self._end(remove=True)
        return actual

    def cancel(self) -> None:
        """Delete the session and its bytes (nothing once the writer is done: the session may be another's)."""
        with contextlib.suppress(OSError):
            self._file.close()
        self._end(remove=True)

    def _end(self, remove: bool) -> None:
        """Delete the session if ``remove``, and let its lock go: the writer is done."""
        if self._lock is None:
            return
        if remove:
            self._store.forget(self.id)
            remove_session(self._folder)
        self._lock.release()
        self._lock = None


class BackgroundAppend:
    """Appends a stream to a writer on two threads of its own, one writing the file and one hashing, so the
    event loop receiving the stream only hands chunks over, and the stream need not wait for a slow disk.

    At most ``WRITE_BEHIND`` bytes wait in memory for either thread; ``written(count)`` is called on the
    loop as bytes land in the file. A failed write is raised by the next ``append`` and by ``close``, and
    nothing after it is written.
    """

    def __init__(self, writer: FileBlobWriter, written: Callable[[int], None]):
        self._writer, self._written = writer, written
        self._queued = self._landed = self._hashed = 0  # bytes
        self._failure: BaseException | None = None
        self._advanced = asyncio.Event()
        self._writing = _ChunkThread("blob-write", writer.append, self._wrote)
        self._hashing = _ChunkThread("blob-hash", writer.hash, self._hashed_chunk)

    async def append(self, chunk: bytes) -> None:
        """Queue ``chunk``, first waiting while too many bytes are queued; raise a failed write's error."""
        while self._failure is None and self._queued - min(self._landed, self._hashed) > WRITE_BEHIND:
            self._advanced.clear()  # only reports set it, and they run on this loop: none is missed
            await self._advanced.wait()
        if self._failure is not None:
            raise self._failure
        self._queued += len(chunk)
        self._writing.put(chunk)
        self._hashing.put(chunk)

    async def digest(self, algorithm: str = "sha256") -> Digest | None:
        """Once every queued chunk is hashed, what ``FileBlobWriter.digest`` says (writes may still go on);
        nothing more may be appended."""
        await self._hashing.stop()
        return self._writer.digest(algorithm)

    async def close(self) -> None:
        """Wait until every queued chunk is written and hashed, and stop the threads; raise a write's error."""
        self._writing.finish()  # both before waiting: a close cancelled while waiting leaves no thread behind
        self._hashing.finish()
        await self._writing.stop()
        await self._hashing.stop()
        if self._failure is not None:
            raise self._failure

    def _wrote(self, size: int, failure: BaseException | None) -> None:
        self._landed += size
        if failure is None:
            self._written(size)
        else:
            self._failure = self._failure or failure
        self._advanced.set()

    def _hashed_chunk(self, size: int, failure: BaseException | None) -> None:
        self._hashed += size
        self._failure = self._failure or failure
        self._advanced.set()


class _ChunkThread:
    """A thread that applies ``work`` to each chunk put to it, in order, and reports each one on the event
    loop as ``report(size, failure)``; after a chunk failed, the rest are reported failed without work."""

    def __init__(self, name: str, work: Callable[[bytes], None],
                 report: Callable[[int, BaseException | None], None]):
        self._work, self._report = work, report
        self._loop = asyncio.get_running_loop()
        self._chunks: SimpleQueue[bytes | None] = SimpleQueue()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, chunk: bytes) -> None:
        """Queue ``chunk``."""
        self._chunks.put(chunk)

    def finish(self) -> None:
        """Let the thread end once it has done the chunks queued so far; nothing more may be put."""
        if not self._finished:
            self._finished = True
            self._chunks.put(None)

    async def stop(self) -> None:
        """``finish``, and wait until the thread has ended."""
        self.finish()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        failure: BaseException | None = None
        for chunk in iter(self._chunks.get, None):
            if failure is None:
                try:
                    self._work(chunk)
                except BaseException as exc:  # noqa: BLE001 - reported on the loop, raised there
                    failure = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is ending
                self._loop.call_soon_threadsafe(self._report, len(chunk), failure)


class FilesystemBlobStore:
    """The BlobStore on a local directory tree laid out by ``Layout``."""

    def __init__(self, root: Path):
        self.layout = Layout(root)
        self._hashers: dict[str, Hasher] = {}
        for folder in (self.layout.blobs, self.layout.uploads, self.layout.repositories, self.layout.state):
            folder.mkdir(parents=True, exist_ok=True)

    def stat(self, digest: Digest) -> int | None:
        """The size of ``digest``, or None when absent."""
        try:
            return os.stat(self.layout.blob(digest)).st_size
        except OSError:
            return None

    def open(self, digest: Digest, offset: int = 0) -> BinaryIO:
        """The blob's file positioned at ``offset``."""
        try:
            file = open(self.layout.blob(digest), "rb")  # noqa: SIM115 - the caller closes it
        except OSError as exc:
            raise BlobUnknown(f"blob {digest} is not in the store", detail={"digest": str(digest)}) from exc
        if offset:
            file.seek(offset)
        return file

    def reader(self, digest: Digest) -> FileReader:
        """Random access to the blob's bytes (the caller closes it); raise BlobUnknown when absent."""
        try:
            return FileReader(os.open(self.layout.blob(digest), os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            raise BlobUnknown(f"blob {digest} is not in the store", detail={"digest": str(digest)}) from exc

    async def chunks(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of the blob, chunk by chunk (local reads: on the event loop)."""
        remaining = end - start
        with self.open(digest, start) as file:
            while remaining > 0 and (chunk := file.read(min(CHUNK, remaining))):
                remaining -= len(chunk)
                yield chunk

    def adopt(self, path: Path, digest: Digest) -> None:
        """Move the verified file ``path`` in as blob ``digest`` by a link, never over the blob already there."""
        try:
            publish(path, self.layout.blob(digest))
        except OSError as exc:
            raise storage_error(exc) from exc

    def read(self, digest: Digest) -> bytes:
        """The whole blob; for small blobs such as manifests and configs."""
        with self.open(digest) as file:
            return file.read()

    def changed(self, digest: Digest) -> float:
        """When blob ``digest`` was last written or renamed into place (0 when absent)."""
        return changed(self.layout.blob(digest))

    def writer(self, session: str | None = None, repository: str | None = None) -> FileBlobWriter:
        """A new writer (recording ``repository``), or the resumed writer of ``session``; raise BlobUploadInvalid
        while another writer, of any process sharing the store, holds the session."""
        resumed = session is not None
        session = session or uuid.uuid4().hex
        folder = self.layout.session(session)
        if not resumed:
            try:
                folder.mkdir(parents=True)
                if repository:
                    (folder / "repository").write_text(repository)
            except OSError as exc:
                raise storage_error(exc) from exc
        unknown = BlobUploadUnknown(f"upload {session} is unknown or expired", detail={"session": session})
        try:
            lock = FileLock.take(folder / "lock", removable=True)
        except FileNotFoundError:
            raise unknown from None
        except OSError as exc:
            raise storage_error(exc) from exc
        if lock is None:
            raise BlobUploadInvalid(f"another request is writing to upload {session}", detail={"session": session})
        if resumed and not (folder / "data").exists():  # the lock was made anew while its holder removed the session
            remove_session(folder)
            lock.release()
            raise unknown
        try:
            return FileBlobWriter(self, session, lock, self._hashers.pop(session, Hasher()))
        except OSError as exc:
            lock.release()
            raise (unknown if isinstance(exc, FileNotFoundError) else storage_error(exc)) from exc

    def session_repository(self, session: str) -> str | None:
        """The repository an upload session was opened for, or None when the session is unknown."""
        try:
            return (self.layout.session(session) / "repository").read_text()
        except OSError:
            return None

    def session_size(self, session: str) -> int:
        """How many bytes an upload session holds."""
        try:
            return os.stat(self.layout.session(session) / "data").st_size
        except FileNotFoundError:
            if self.layout.session(session).is_dir():
                return 0
            raise BlobUploadUnknown(f"upload {session} is unknown or expired") from None

    def sessions(self) -> Iterator[tuple[str, float]]:
        """Every upload session with the time it was last written."""
        for folder in self.layout.uploads.iterdir():
            with contextlib.suppress(OSError):
                data = folder / "data"
                yield folder.name, (data if data.exists() else folder).stat().st_mtime

    def expire_assemblies(self, cutoff: float, dry_run: bool = False) -> dict[str, int]:
        """Nothing: a commit publishes its blob with one rename, which leaves nothing halfway."""
        return {}

    def remember(self, session: str, hasher: Hasher | None) -> None:
        """Keep a session's running hash so the next chunk need not rehash the file."""
        if hasher is not None:
            self._hashers[session] = hasher

    def forget(self, session: str) -> None:
        """Drop a session's running hash."""
        self._hashers.pop(session, None)

    def delete(self, digest: Digest) -> None:
        """Remove the blob's bytes."""
        with contextlib.suppress(FileNotFoundError):
            self.layout.blob(digest).unlink()

    # the garbage collector's trash
    def trash(self, digest: Digest) -> float | None:
        """Move blob ``digest`` into the trash, where readers no longer find it; return when its bytes were last
        written, or None when it is not in the store."""
        target = self.layout.trashed(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(self.layout.blob(digest), target)
        except FileNotFoundError:
            return None
        return os.stat(target).st_mtime

    def restore(self, digest: Digest) -> None:
        """Put trashed blob ``digest`` back, unless the same bytes were committed again meanwhile."""
        with contextlib.suppress(FileNotFoundError):
            publish(self.layout.trashed(digest), self.layout.blob(digest))

    def purge(self, digest: Digest) -> None:
        """Delete trashed blob ``digest`` for good."""
        self.layout.trashed(digest).unlink(missing_ok=True)

    def trashed(self) -> Iterator[Digest]:
        """Every blob in the trash."""
        return digests_in(self.layout.trash)

    def read_any(self, digest: Digest) -> bytes:
        """The whole blob, also while it is in the trash; raise BlobUnknown when it is in neither."""
        for path in (self.layout.blob(digest), self.layout.trashed(digest)):
            with contextlib.suppress(OSError):
                return path.read_bytes()
        raise BlobUnknown(f"blob {digest} is not in the store", detail={"digest": str(digest)})

    def iter(self) -> Iterator[Digest]:
        """Every blob in the store."""
        for algorithm, length in HEX_LENGTHS.items():
            base = self.layout.blobs / algorithm
            if base.is_dir():
                for path in base.glob("??/*"):
                    if len(path.name) == length and not path.name.startswith("."):
                        yield Digest(algorithm, path.name)
