"""The store on S3-compatible object storage (Ceph RGW, AWS S3, MinIO...), shared by any number of instances.

Every key of the local layout (``paths.py``) becomes an object below ``storage.s3.prefix`` in the bucket. Blob
bytes are served with GET, HEAD and Range (or, with ``redirect``, by presigned URLs). An upload, pushed or
fetched from an upstream, is a sequence of part objects ``uploads/<session>/<offset>``, each readable as soon as
it is written: any instance can resume a push where another stopped, and clients of other instances stream a
pull-through fetch's bytes as they arrive. A part is created only if no part sits at its offset yet (a
conditional PUT), so two writers of one session never overwrite each other's bytes: the second gets
``BlobUploadInvalid``. Committing hashes the parts (or uses the running hash when one process wrote them all),
verifies the digest, and assembles them into ``blobs/<alg>/<hex[:2]>/<hex>`` inside the object storage
(multipart copy: no byte travels through the instance again), then deletes the parts.

Errors of the object storage become ``StorageUnavailable`` (503 to clients), never a traceback. Storage that
stops answering (a call, or a read of an object's body, times out after ``storage.s3.timeout``) costs one wait,
not one per request: from then on every call fails at once, while a thread of the bucket asks the storage every
``STALL_PROBE`` seconds whether it answers again.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import io
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions

from mirror.config import S3Storage
from mirror.digest import HEX_LENGTHS, Digest, Hasher
from mirror.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    StorageUnavailable,
)
from mirror.storage.filesystem import FileAppender, FileReader, storage_error
from mirror.storage.paths import blob_key, upload_key, upload_part_key

log = logging.getLogger("mirror.storage.s3")
PART = 8 << 20  # bytes of a part object
# Every writer's part uploads, so many at once (each holds its part in memory while it runs); the others wait
# in line, their bytes in the spool file.
UPLOADS = futures.ThreadPoolExecutor(8, thread_name_prefix="s3-part")
MIN_COPY_PART = 5 << 20  # S3's smallest multipart part (but the last)
CHUNK = 1 << 20
STREAM_CHUNK = 2 << 20  # bytes of a blob read from the bucket at a time while one more goes out to the client
TRASH = "state/gc-trash"
_ABSENT = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}
STALL_PROBE = 1.0  # seconds between the questions to object storage that stopped answering


def _absent(exc: botocore.exceptions.ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _ABSENT


class Bucket:
    """The bucket and key prefix of one store, and the one client every thread shares."""

    def __init__(self, settings: S3Storage):
        self.name, self.prefix = settings.bucket, settings.prefix
        self.settings = settings
        self.client = self._client(settings.timeout, attempts=2, connections=64)
        self._stalled = False  # a call timed out, and the storage has not answered since
        self._stalled_lock = threading.Lock()

    def _client(self, timeout: float, attempts: int, connections: int) -> Any:
        """A client of the storage waiting ``timeout`` seconds for an answer (3 at most for a connection)."""
        settings = self.settings
        return boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region,
            aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, signature_version="s3v4", max_pool_connections=connections,
                connect_timeout=min(timeout, 3.0), read_timeout=timeout,
                retries={"max_attempts": attempts, "mode": "standard"},
                request_checksum_calculation="when_required", response_checksum_validation="when_required"))

    def key(self, key: str) -> str:
        """The object key of store key ``key``."""
        return f"{self.prefix}{key}"

    def call(self, operation: str, **arguments: Any) -> Any:
        """Run one S3 ``operation`` on this bucket; raise StorageUnavailable for anything but an answer, at once
        while the storage is not answering."""
        if self._stalled:
            raise StorageUnavailable("object storage is not answering (a request to it timed out); requests fail "
                                     "at once until it answers again")
        try:
            return getattr(self.client, operation)(Bucket=self.name, **arguments)
        except (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError) as exc:
            self._stall()
            raise StorageUnavailable(f"object storage did not answer {operation} within "
                                     f"{self.settings.timeout:g} s") from exc
        except botocore.exceptions.ClientError as exc:
            if _absent(exc):
                raise
            error = exc.response.get("Error", {})
            raise StorageUnavailable(f"object storage refused {operation}: {error.get('Code')} "
                                     f"{error.get('Message') or ''}".strip()) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StorageUnavailable(f"object storage unreachable: {exc}") from exc

    def _stall(self) -> None:
        """Fail every call at once from now on, until the storage answers ``_watch``'s questions again."""
        with self._stalled_lock:
            if self._stalled:
                return
            self._stalled = True
        log.warning("object storage %s did not answer within %g s: requests to it fail at once until it answers",
                    self.settings.endpoint, self.settings.timeout)
        threading.Thread(target=self._watch, name="s3-stalled", daemon=True).start()

    def _watch(self) -> None:
        """Ask the storage for the bucket every ``STALL_PROBE`` seconds; let calls through once it answers."""
        client = self._client(2 * STALL_PROBE, attempts=1, connections=1)
        while True:
            time.sleep(STALL_PROBE)
            try:
                client.head_bucket(Bucket=self.name)
            except botocore.exceptions.ClientError:
                pass  # an answer, if not the one hoped for: the calls will tell
            except (botocore.exceptions.BotoCoreError, OSError):
                continue
            self._stalled = False
            log.info("object storage %s answers again", self.settings.endpoint)
            return

    def get(self, key: str, **arguments: Any) -> dict[str, Any] | None:
        """GetObject of store key ``key``, or None when absent; a read of its body that times out counts like a
        call that did."""
        try:
            answer = self.call("get_object", Key=self.key(key), **arguments)
        except botocore.exceptions.ClientError:
            return None
        answer["Body"] = _WatchedBody(answer["Body"], self._stall)
        return answer

    def head(self, key: str) -> dict[str, Any] | None:
        """HeadObject of store key ``key``, or None when absent."""
        try:
            return self.call("head_object", Key=self.key(key))
        except botocore.exceptions.ClientError:
            return None

    def put(self, key: str, data: bytes, create: bool = False) -> bool:
        """PutObject ``data`` at store key ``key``; with ``create``, only if absent: return whether it was written."""
        condition = {"IfNoneMatch": "*"} if create else {}
        try:
            self.call("put_object", Key=self.key(key), Body=data, **condition)
        except StorageUnavailable as exc:
            if create and "PreconditionFailed" in exc.message:
                return False
            raise
        return True

    def delete(self, *keys: str) -> None:
        """Delete store keys ``keys`` (absent ones too)."""
        for start in range(0, len(keys), 1000):
            objects = [{"Key": self.key(key)} for key in keys[start:start + 1000]]
            self.call("delete_objects", Delete={"Objects": objects, "Quiet": True})

    def list(self, folder: str, delimiter: bool = True) -> Iterator[tuple[str, int, float]]:
        """(name relative to ``folder``, size, modified) of what is inside ``folder``: direct children with
        ``delimiter`` (subfolders with size -1), else every key below it."""
        prefix = self.key(f"{folder.rstrip('/')}/")
        arguments: dict[str, Any] = {"Prefix": prefix, **({"Delimiter": "/"} if delimiter else {})}
        while True:
            page = self.call("list_objects_v2", **arguments)
            for folder_entry in page.get("CommonPrefixes", ()):
                yield folder_entry["Prefix"][len(prefix):].rstrip("/"), -1, 0.0
            for entry in page.get("Contents", ()):
                yield entry["Key"][len(prefix):], entry["Size"], entry["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            arguments["ContinuationToken"] = page["NextContinuationToken"]

    def upload(self, path: Path, key: str) -> None:
        """Upload the local file ``path`` as store key ``key`` (in parts when it is large)."""
        try:
            self.call("upload_file", Filename=str(path), Key=self.key(key))
        except boto3.exceptions.S3UploadFailedError as exc:  # what upload_file makes of the storage's refusal
            raise StorageUnavailable(f"object storage refused the upload: {exc}") from exc

    def presigned(self, key: str, seconds: int = 1200) -> str:
        """A URL that lets its bearer GET store key ``key`` straight from the object storage for ``seconds``."""
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.name, "Key": self.key(key)},
                                                  ExpiresIn=seconds)

    def copy(self, source: str, target: str) -> None:
        """Copy store key ``source`` to ``target`` inside the bucket (a fresh modification time)."""
        self.call("copy_object", Key=self.key(target), CopySource={"Bucket": self.name, "Key": self.key(source)},
                  MetadataDirective="REPLACE")


class S3Objects:
    """``objects.Objects`` in a bucket: one object per key."""

    def __init__(self, bucket: Bucket):
        self.bucket = bucket

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when absent."""
        answer = self.bucket.get(key)
        return None if answer is None else _read_body(answer)

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """Write the object (S3 PUTs are atomic and durable)."""
        self.bucket.put(key, data)

    def exists(self, key: str) -> bool:
        """Whether the object is there."""
        return self.bucket.head(key) is not None

    def delete(self, key: str) -> bool:
        """Delete the object; return whether it was there."""
        if self.bucket.head(key) is None:
            return False
        self.bucket.delete(key)
        return True

    def changed(self, key: str) -> float:
        """The object's last modification (0 when absent)."""
        answer = self.bucket.head(key)
        return 0.0 if answer is None else answer["LastModified"].timestamp()

    def touch(self, key: str) -> None:
        """Copy the object onto itself, which renews its modification time."""
        with contextlib.suppress(botocore.exceptions.ClientError):
            self.bucket.copy(key, key)

    def children(self, folder: str) -> list[str]:
        """Names of the objects and folders directly inside ``folder``."""
        return [name for name, _, _ in self.bucket.list(folder)]

    def delete_folder(self, folder: str) -> None:
        """Delete every object below ``folder``."""
        self.bucket.delete(*(f"{folder}/{name}" for name, _, _ in self.bucket.list(folder, delimiter=False)))


class _WatchedBody:
    """A GetObject body whose reads that time out call ``stalled()`` before they raise."""

    def __init__(self, body: Any, stalled: Callable[[], None]):
        self._body, self._stalled = body, stalled

    def read(self, size: int | None = None) -> bytes:
        """The next ``size`` bytes (all when None)."""
        try:
            return self._body.read(size)
        except botocore.exceptions.ReadTimeoutError:
            self._stalled()
            raise

    def close(self) -> None:
        """Let the connection go."""
        self._body.close()


def _read(body: Any, size: int | None = None) -> bytes:
    """The next ``size`` bytes (fewer at the end; all when None) of a GetObject body; a transfer cut short is
    StorageUnavailable."""
    try:
        return body.read(size)
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise StorageUnavailable(f"object storage transfer failed: {exc}") from exc


def _read_body(answer: dict[str, Any]) -> bytes:
    """Read a GetObject answer's body whole."""
    with contextlib.closing(answer["Body"]) as body:
        return _read(body)


class _Body(io.RawIOBase):
    """A GetObject body as a readable binary file (for callers that read a blob like a file)."""

    def __init__(self, answer: dict[str, Any]):
        self._body = answer["Body"]

    def readable(self) -> bool:
        """Yes."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the body."""
        data = _read(self._body, len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        """Let the connection go."""
        self._body.close()
        super().close()


class ThreadReader:
    """Random access to bytes in the object storage, each read on a worker thread."""

    def __init__(self, read: Callable[[int, int], bytes]):
        self._read = read

    async def read(self, position: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``position``."""
        return await asyncio.to_thread(self._read, position, size)

    def dup(self) -> ThreadReader:
        """Itself: it holds nothing to close."""
        return self

    def close(self) -> None:
        """Nothing to release."""


class S3BlobStore:
    """The BlobStore in a bucket; uploads are part objects (see the module docstring)."""

    def __init__(self, bucket: Bucket, spool: Path, signing_key: Callable[[], bytes]):
        self.bucket, self.spool = bucket, spool
        spool.mkdir(parents=True, exist_ok=True)
        self._signing_key = signing_key
        self._hashers: dict[str, Hasher] = {}  # running hashes of sessions this process wrote last
        self._lock = threading.Lock()

    # reading
    def stat(self, digest: Digest) -> int | None:
        """The blob's size, or None when absent."""
        answer = self.bucket.head(blob_key(digest))
        return None if answer is None else answer["ContentLength"]

    def open(self, digest: Digest, offset: int = 0) -> BinaryIO:
        """A readable file of the blob from ``offset``; raise BlobUnknown when absent."""
        answer = self.bucket.get(blob_key(digest), **({"Range": f"bytes={offset}-"} if offset else {}))
        if answer is None:
            raise BlobUnknown(f"blob {digest} is not in the store", detail={"digest": str(digest)})
        return io.BufferedReader(_Body(answer), CHUNK)  # type: ignore[return-value]

    def read(self, digest: Digest) -> bytes:
        """The whole blob (small ones: manifests, configs)."""
        answer = self.bucket.get(blob_key(digest))
        if answer is None:
            raise BlobUnknown(f"blob {digest} is not in the store", detail={"digest": str(digest)})
        return _read_body(answer)

    def reader(self, digest: Digest) -> ThreadReader:
        """Random access to the blob's bytes by ranged GETs; raise BlobUnknown when absent."""
        if self.stat(digest) is None:
            raise BlobUnknown(f"blob {digest} is not in the store", detail={"digest": str(digest)})
        return ThreadReader(functools.partial(self.read_range, digest))

    def read_range(self, digest: Digest, position: int, size: int) -> bytes:
        """Up to ``size`` bytes of the blob from ``position`` (empty past its end or when it is gone)."""
        answer = self.bucket.get(blob_key(digest), Range=f"bytes={position}-{position + size - 1}")
        return b"" if answer is None else _read_body(answer)

    async def chunks(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """The bytes ``[start, end)`` of the blob, read on a thread chunk by chunk."""
        if start >= end:
            return
        answer = await asyncio.to_thread(self.bucket.get, blob_key(digest), Range=f"bytes={start}-{end - 1}")
        if answer is None:
            raise BlobUnknown(f"blob {digest} is not in the store", detail={"digest": str(digest)})
        body = answer["Body"]
        reading = asyncio.ensure_future(asyncio.to_thread(_read, body, STREAM_CHUNK))
        try:
            while chunk := await reading:  # read the next chunk while this one goes out
                reading = asyncio.ensure_future(asyncio.to_thread(_read, body, STREAM_CHUNK))
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await reading  # a thread cannot be stopped: let it finish before the body goes
            body.close()

    def changed(self, digest: Digest) -> float:
        """When the blob was last written (0 when absent)."""
        answer = self.bucket.head(blob_key(digest))
        return 0.0 if answer is None else answer["LastModified"].timestamp()

    def iter(self) -> Iterator[Digest]:
        """Every blob in the store."""
        for algorithm, length in HEX_LENGTHS.items():
            for name, _, _ in self.bucket.list(f"blobs/{algorithm}", delimiter=False):
                hex_digits = name.rpartition("/")[2]
                if len(hex_digits) == length:
                    yield Digest(algorithm, hex_digits)

    def delete(self, digest: Digest) -> None:
        """Remove the blob's bytes."""
        self.bucket.delete(blob_key(digest))

    def adopt(self, path: Path, digest: Digest) -> None:
        """Upload the verified file ``path`` as blob ``digest`` unless the store has it, then delete the file."""
        if self.stat(digest) is None:
            self.bucket.upload(path, blob_key(digest))
        path.unlink()

    # uploads
    def writer(self, session: str | None = None, repository: str | None = None) -> S3BlobWriter:
        """A new writer (recording ``repository``), or the resumed writer of ``session``."""
        if session is None:
            session = uuid.uuid4().hex
            record = f"{repository or ''}\n".encode()
            self.bucket.put(f"{upload_key(session)}/repository", record + self._sign(session, record))
            return S3BlobWriter(self, session, [], None)
        parts = self._parts(session)
        size = sum(part_size for _, part_size in parts)
        with self._lock:
            hasher = self._hashers.pop(session, None)
        return S3BlobWriter(self, session, parts, hasher if hasher is not None and hasher.size == size else None)

    @functools.cached_property
    def _secret(self) -> bytes:
        """The key that signs upload records, asked for the first time one is signed or checked."""
        return self._signing_key()

    def _sign(self, session: str, record: bytes) -> bytes:
        return hmac.new(self._secret, session.encode() + record, hashlib.sha256).hexdigest().encode()

    def _parts(self, session: str) -> list[tuple[int, int]]:
        """(offset, size) of the session's parts in order; raise BlobUploadUnknown for an unknown session."""
        parts, known = [], False
        for name, size, _ in self.bucket.list(upload_key(session)):
            if name == "repository":
                known = True
            elif name.isdigit():
                parts.append((int(name), size))
        if not known:
            raise BlobUploadUnknown(f"upload {session} is unknown or expired", detail={"session": session})
        return sorted(parts)

    def session_repository(self, session: str) -> str | None:
        """The repository an upload was opened for, or None when the session is unknown (or its record forged)."""
        data = self.bucket.get(f"{upload_key(session)}/repository")
        if data is None:
            return None
        record, _, signature = _read_body(data).partition(b"\n")
        if not hmac.compare_digest(signature, self._sign(session, record + b"\n")):
            log.warning("upload %s has a record not signed with this store's secret", session)
            return None
        return record.decode(errors="replace")

    def session_size(self, session: str) -> int:
        """How many bytes an upload holds."""
        return sum(size for _, size in self._parts(session))

    def sessions(self) -> Iterator[tuple[str, float]]:
        """Every upload session with the time it was last written."""
        latest: dict[str, float] = {}
        for name, _, modified in self.bucket.list("uploads", delimiter=False):
            session = name.partition("/")[0]
            latest[session] = max(latest.get(session, 0.0), modified)
        yield from latest.items()

    def expire_assemblies(self, cutoff: float, dry_run: bool = False) -> dict[str, int]:
        """Abort (unless ``dry_run``) the multipart uploads of blobs begun before ``cutoff``: what a commit that
        died halfway left, its parts hidden in the bucket; return them as ``assembly of <key>`` with their size."""
        bucket, expired = self.bucket, {}
        arguments: dict[str, Any] = {"Prefix": bucket.key("blobs/")}
        while True:
            page = bucket.call("list_multipart_uploads", **arguments)
            for upload in page.get("Uploads", ()):
                if upload["Initiated"].timestamp() >= cutoff:
                    continue
                key, upload_id = upload["Key"], upload["UploadId"]
                with contextlib.suppress(botocore.exceptions.ClientError):  # completed or aborted meanwhile
                    parts = bucket.call("list_parts", Key=key, UploadId=upload_id).get("Parts", ())
                    if not dry_run:
                        bucket.call("abort_multipart_upload", Key=key, UploadId=upload_id)
                    expired[f"assembly of {key[len(bucket.prefix):]}"] = sum(part["Size"] for part in parts)
            if not page.get("IsTruncated"):
                return expired
            arguments.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])

    def remember(self, session: str, hasher: Hasher | None) -> None:
        """Keep a session's running hash for the next request this process serves."""
        if hasher is not None:
            with self._lock:
                self._hashers[session] = hasher

    def forget(self, session: str) -> None:
        """Drop a session's running hash."""
        with self._lock:
            self._hashers.pop(session, None)

    def hash_parts(self, session: str, parts: list[tuple[int, int]], algorithm: str) -> Hasher:
        """A hasher fed with the bytes of ``parts`` read back from the object storage."""
        hasher = Hasher(algorithm)
        for offset, _ in parts:
            body = _Body(_part(self.bucket, session, offset))
            try:
                while chunk := body.read(CHUNK):
                    hasher.update(chunk)
            finally:
                body.close()
        return hasher

    # the garbage collector's trash
    def trash(self, digest: Digest) -> float | None:
        """Move the blob into the trash (copy, then delete); return when it was last written, or None if absent."""
        answer = self.bucket.head(blob_key(digest))
        if answer is None:
            return None
        self.bucket.copy(blob_key(digest), _trash_key(digest))
        self.bucket.delete(blob_key(digest))
        return answer["LastModified"].timestamp()

    def restore(self, digest: Digest) -> None:
        """Put a trashed blob back unless the same bytes were committed again meanwhile."""
        trashed = _trash_key(digest)
        if self.bucket.head(trashed) is None:
            return
        if self.bucket.head(blob_key(digest)) is None:
            self.bucket.copy(trashed, blob_key(digest))
        self.bucket.delete(trashed)

    def purge(self, digest: Digest) -> None:
        """Delete a trashed blob for good."""
        self.bucket.delete(_trash_key(digest))

    def trashed(self) -> Iterator[Digest]:
        """Every blob in the trash."""
        for algorithm, length in HEX_LENGTHS.items():
            for name, _, _ in self.bucket.list(f"{TRASH}/{algorithm}"):
                if len(name) == length:
                    yield Digest(algorithm, name)

    def read_any(self, digest: Digest) -> bytes:
        """The whole blob, also while it is in the trash."""
        for key in (blob_key(digest), _trash_key(digest)):
            if (answer := self.bucket.get(key)) is not None:
                return _read_body(answer)
        raise BlobUnknown(f"blob {digest} is not in the store", detail={"digest": str(digest)})


class S3BlobWriter(FileAppender):
    """An upload in part objects. Bytes land in a spool file on local scratch space at once (where this process's
    readers follow them), and every ``PART`` of them is queued for upload as the next part object (``UPLOADS``),
    so neither the upstream nor the clients wait for the bucket; ``flush`` waits for it. While ``eager`` is off
    the parts are uploaded only by ``flush``: a pull-through fetch nobody on another instance follows leaves the
    bucket alone until its clients have every byte.

    Nothing after the writer's first part is queued until that part is in place. Two writers that opened the
    session at the same offset race for that first part, and the loser gives up before any other part of its
    own can land between the winner's."""

    def __init__(self, store: S3BlobStore, session: str, parts: list[tuple[int, int]], hasher: Hasher | None):
        self.id = session
        self._store, self._bucket = store, store.bucket
        self.parts = parts  # (offset, size) in part objects, in order
        self.flushed = sum(size for _, size in parts)  # bytes from 0 that are in part objects
        self.size = self._queued = self._base = self.flushed  # the spool holds the bytes from _base on
        try:
            self._file = tempfile.TemporaryFile(dir=store.spool, buffering=0)  # noqa: SIM115 - owned until done
        except OSError as exc:
            raise storage_error(exc) from exc
        self._pending: dict[int, Future[int]] = {}  # offset -> upload of the part from there
        self._hasher = hasher if hasher is not None else (Hasher() if not parts else None)
        self._done = False
        self._lost = False  # another writer of the session wrote first: this one leaves the session alone
        self.eager = True

    def append(self, data: bytes) -> None:
        """Append ``data`` to the spool without hashing it; a full part is queued for upload."""
        super().append(data)
        self._settle(wait=False)
        if self.eager:
            self._queue(final=False)

    def _queue(self, final: bool) -> None:
        """Queue the spooled bytes for upload in parts of ``PART`` bytes (with ``final``, the rest as a shorter
        last one), each read from the spool when its upload starts; only the first part until it is in place."""
        while self.size - self._queued >= (1 if final else PART) and (self.flushed > self._base or not self._pending):
            offset, length = self._queued, min(PART, self.size - self._queued)
            self._pending[offset] = UPLOADS.submit(self._put_part, offset, length)
            self._queued += length

    def _put_part(self, offset: int, length: int) -> int:
        data = os.pread(self._file.fileno(), length, offset - self._base)
        if not self._bucket.put(upload_part_key(self.id, offset), data, create=True):
            raise BlobUploadInvalid(f"another request is writing to upload {self.id}", detail={"session": self.id})
        return length

    def _settle(self, wait: bool) -> None:
        """Count the uploads done, in order (waiting for them with ``wait``); raise the first that failed."""
        for offset in sorted(self._pending):
            upload = self._pending[offset]
            if not wait and not upload.done():
                return
            try:
                length = upload.result()
            except BlobUploadInvalid:
                self._done = self._lost = True
                raise
            del self._pending[offset]
            self.parts.append((offset, length))
            self.flushed = offset + length

    def flush(self) -> None:
        """Write every spooled byte as part objects (readable by other instances) and wait until they are; raise
        BlobUploadInvalid if another writer put a part at one of their offsets first."""
        self._queue(final=True)
        while self._queued < self.size:  # held back until the first part was in place
            self._settle(wait=True)
            self._queue(final=True)
        self._settle(wait=True)

    def reader(self) -> FileReader:
        """Random access to the bytes written so far, for readers following the writes (from the spool: it
        stays readable through this descriptor after the writer is done)."""
        return FileReader(os.dup(self._file.fileno()), self._base)

    def close(self) -> None:
        """Write what is spooled and keep the session for a later request."""
        if self._done:
            return
        self._done = True
        try:
            self.flush()
            self._store.remember(self.id, self._hasher)
        finally:
            self._file.close()

    def digest(self, algorithm: str = "sha256") -> Digest | None:
        """The digest of the bytes written so far, when they were hashed on the way in."""
        if self._hasher is not None and self._hasher.algorithm == algorithm:
            return self._hasher.digest()
        return None

    def commit(self, expected: Digest | None = None) -> Digest:
        """Write the last part, verify, assemble the parts into the blob and delete them; on a mismatch the
        session is kept and DigestInvalid raised."""
        self.flush()
        algorithm = expected.algorithm if expected else "sha256"
        hasher = self._hasher if self._hasher is not None and self._hasher.algorithm == algorithm else None
        actual = (hasher or self._store.hash_parts(self.id, self.parts, algorithm)).digest()
        if expected is not None and actual != expected:
            raise DigestInvalid(f"content digest {actual} does not match {expected}",
                                detail={"expected": str(expected), "actual": str(actual)})
        if self._store.stat(actual) is None:
            self._assemble(blob_key(actual))
        self.cancel()
        return actual

    def _assemble(self, target: str) -> None:
        """Make object ``target`` the concatenation of the parts, inside the object storage where possible."""
        bucket, parts = self._bucket, self.parts
        if not parts:
            bucket.put(target, b"")
            return
        if len(parts) == 1:
            bucket.copy(upload_part_key(self.id, parts[0][0]), target)
            return
        upload = bucket.call("create_multipart_upload", Key=bucket.key(target))["UploadId"]
        try:
            done = []
            if all(size >= MIN_COPY_PART for _, size in parts[:-1]):
                for number, (offset, _) in enumerate(parts, 1):
                    source = {"Bucket": bucket.name, "Key": bucket.key(upload_part_key(self.id, offset))}
                    answer = bucket.call("upload_part_copy", Key=bucket.key(target), UploadId=upload,
                                         PartNumber=number, CopySource=source)
                    done.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
            else:  # small chunks pushed one by one: regroup them into parts S3 accepts
                for number, data in enumerate(_regrouped(bucket, self.id, parts), 1):
                    answer = bucket.call("upload_part", Key=bucket.key(target), UploadId=upload,
                                         PartNumber=number, Body=data)
                    done.append({"PartNumber": number, "ETag": answer["ETag"]})
            bucket.call("complete_multipart_upload", Key=bucket.key(target), UploadId=upload,
                        MultipartUpload={"Parts": done})
        except BaseException:
            with contextlib.suppress(Exception):
                bucket.call("abort_multipart_upload", Key=bucket.key(target), UploadId=upload)
            raise

    def cancel(self) -> None:
        """Delete the session and its parts (nothing once another writer took the session over)."""
        for upload in self._pending.values():
            upload.cancel()
        futures.wait(self._pending.values())
        self._pending.clear()
        self._done = True
        self._file.close()
        if self._lost:
            return
        self._store.forget(self.id)
        keys = [f"{upload_key(self.id)}/{name}" for name, _, _ in self._bucket.list(upload_key(self.id))]
        self._bucket.delete(*keys)


def _trash_key(digest: Digest) -> str:
    """Where the garbage collector keeps blob ``digest`` while it is in the trash."""
    return f"{TRASH}/{digest.algorithm}/{digest.hex}"


def _part(bucket: Bucket, session: str, offset: int) -> dict[str, Any]:
    """The GetObject answer of the part of ``session`` at ``offset``; raise BlobUploadUnknown when it is gone."""
    answer = bucket.get(upload_part_key(session, offset))
    if answer is None:
        raise BlobUploadUnknown(f"upload {session} lost a part meanwhile", detail={"session": session})
    return answer


def _regrouped(bucket: Bucket, session: str, parts: list[tuple[int, int]]) -> Iterator[bytes]:
    """The bytes of ``parts`` in pieces of at least ``PART`` (but the last)."""
    pending = bytearray()
    for offset, _ in parts:
        pending += _read_body(_part(bucket, session, offset))
        if len(pending) >= PART:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


def read_parts(bucket: Bucket, session: str, parts: list[tuple[int, int]], position: int, size: int) -> bytes:
    """Up to ``size`` bytes from ``position`` out of the part holding it; empty when that part is gone."""
    for offset, part_size in parts:
        if offset <= position < offset + part_size:
            last = min(offset + part_size, position + size) - 1
            answer = bucket.get(upload_part_key(session, offset), Range=f"bytes={position - offset}-{last - offset}")
            return b"" if answer is None else _read_body(answer)
    return b""


def list_parts(bucket: Bucket, session: str) -> list[tuple[int, int]]:
    """(offset, size) of the parts of ``session`` written so far."""
    return sorted((int(name), size) for name, size, _ in bucket.list(upload_key(session)) if name.isdigit())


def kept_secret(bucket: Bucket, name: str, generate: Callable[[], bytes]) -> bytes:
    """Secret ``name`` kept in the bucket, made by ``generate()`` by whichever instance asks first."""
    key = f"state/auth/{name}"
    if (answer := bucket.get(key)) is None:
        bucket.put(key, generate(), create=True)
        answer = bucket.get(key)
    return b"" if answer is None else _read_body(answer)


def layout_version(bucket: Bucket) -> int | None:
    """The layout version recorded in the bucket, or None for a new store."""
    answer = bucket.get("layout-version")
    if answer is None:
        return None
    text = _read_body(answer).decode(errors="replace").strip()
    return int(text) if text.isdigit() else -1


def probe(bucket: Bucket) -> str | None:
    """Why the bucket cannot take writes now, or None when an object could be written and deleted."""
    key = f"state/.ready-{uuid.uuid4().hex}"
    try:
        bucket.put(key, b"")
        bucket.delete(key)
    except StorageUnavailable as exc:
        return f"object storage is not writable: {exc.message}"
    return None
