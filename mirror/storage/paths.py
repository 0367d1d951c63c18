"""The layout of the store, on local disk and in a bucket alike; the only code that builds paths and keys in it.

    <root>/
      blobs/<alg>/<hex[:2]>/<hex>                       blob bytes (layers, configs and manifests),
                                                        immutable, shared by every repository
      uploads/<session>/data                            bytes of an upload or a pull-through fetch
      uploads/<session>/repository                      repository the upload belongs to
      uploads/<session>/lock                            the session's one writer holds an flock on it
      uploads/<session>/<offset>                        in a bucket, instead of data and lock: the part of the
                                                        upload's bytes from <offset> (16 digits), created only if
                                                        absent (``s3.py``); its repository record is signed
      repositories/<name>/_blobs/<alg>/<hex>            empty file: the repository may serve this blob
      repositories/<name>/_manifests/<alg>/<hex>        the manifest's media type: the repository has it
      repositories/<name>/_tags/<tag>                   the digest the tag points at
      repositories/<name>/_referrers/<alg>/<hex>/<alg>-<hex>
                                                        descriptor JSON of a manifest whose subject is <hex>
      repositories/<name>/_tag-list.json                a mirrored repository's tags as its upstream last listed
                                                        them (a JSON list; when: the file's mtime)
      layout-version                                    the layout's version (``store.py`` migrates older ones)
      state/                                            indexes and queues of other modules (cache, events)
      state/origins/<registry>/<alg>/<hex>              empty file: the blob's bytes came from that upstream
                                                        (``<registry>`` in store form, ``host_port``)
      state/pinned/<alg>/<hex>/<holder>                 empty file: ``<holder>`` pins the blob or manifest against
                                                        eviction and gc; pinned while any holder is there
      state/pin-holders/<holder>                        JSON naming what holds pins: an imported tag or digest
                                                        (repository, reference) and the digests it pins;
                                                        ``<holder>`` is sha256("<repository>:<reference>")[:32],
                                                        or ``legacy`` (no record) for a pin no tag holds
      state/pins/<alg>/<hex>                            layout version 2's pins, bare (``store.py`` migrates them)
      state/imports/<key>/                              a bundle import's staging store (blobs verified, not
                                                        yet moved into blobs/); kept so a rerun resumes
      state/gc-trash/<alg>/<hex>                        a blob the garbage collector is deleting; moved back
                                                        if a manifest took it meanwhile (see ``gc.py``)
      state/cache-index/                                diskcache of pull-through blobs: size and last use,
                                                        for least-recently-used eviction (``cache.py``)
      state/auth/<name>                                 a secret made once and kept, mode 0600 (``store.py``):
                                                        token.key, the key that signs bearer tokens (``auth.py``)
      state/events/<queue>/<time>-<id>.json             a record of a durable queue (``queue.py``): notification
                                                        events not yet delivered to one endpoint (``events.py``);
                                                        ``<queue>`` is sha256(endpoint url)[:16]
      state/events/.sender.lock                         the queues' one consumer holds an flock on it
      state/.ready-<hex>                                a moment's probe of whether the store takes writes
      state/fetching/<alg>-<hex>.lock, .json            the worker process fetching a blob from upstream holds
                                                        the lock and names its upload session in the JSON, so
                                                        other workers follow it instead of fetching again

In a bucket, every key below the configured prefix is the same as the path below the root here, but for what
stays on the instance's local scratch space (``storage.root``): the import staging stores, the event queues and
the access index (in Redis when instances coordinate; fetch claims too).

Repository name components never start with ``_``, so ``_blobs`` and its siblings cannot collide with a
nested repository. Every argument is validated here: no caller can make a path leave the root.
"""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from mirror.digest import Digest
from mirror.errors import BlobUploadUnknown, NameInvalid, StorageError, TagInvalid

# OCI distribution-spec grammar for repository names and tags.
NAME_PATTERN = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*")
TAG_PATTERN = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
SESSION_PATTERN = re.compile(r"[a-f0-9]{32}")
SECRET_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
QUEUE_ENTRY_PATTERN = re.compile(r"[0-9]{20}-[0-9a-f-]{36}\.json")
REGISTRY_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
HOLDER_PATTERN = re.compile(r"[a-f0-9]{32}|legacy")
MAX_NAME_LENGTH = 255
PINS, PIN_HOLDERS, ORIGINS = "state/pinned", "state/pin-holders", "state/origins"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid repository name, else raise NameInvalid."""
    if len(name) > MAX_NAME_LENGTH or not NAME_PATTERN.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:300]!r}", detail={"name": name[:300]})
    return name


def check_tag(tag: str) -> str:
    """Return ``tag`` if it is a valid tag, else raise TagInvalid."""
    if not TAG_PATTERN.fullmatch(tag):
        raise TagInvalid(f"invalid tag {tag[:200]!r}", detail={"tag": tag[:200]})
    return tag


def check_holder(holder: str) -> str:
    """Return ``holder`` if it names a pin holder (32 hex digits, or ``legacy``), else raise StorageError."""
    if not HOLDER_PATTERN.fullmatch(holder):
        raise StorageError(f"invalid pin holder {holder[:100]!r}")
    return holder


class Layout:
    """Paths of everything under one store root."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.uploads = self.root / "uploads"
        self.repositories = self.root / "repositories"
        self.state = self.root / "state"
        self.pins_v2 = self.state / "pins"
        self.trash = self.state / "gc-trash"
        self.cache_index = self.state / "cache-index"
        self.secrets = self.state / "auth"
        self.queues = self.state / "events"
        self.queue_lock = self.queues / ".sender.lock"
        self.fetching = self.state / "fetching"
        self.imports = self.state / "imports"
        self.version = self.root / "layout-version"

    def blob(self, digest: Digest) -> Path:
        """Where the bytes of ``digest`` live."""
        return Path(f"{self.blobs}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}")

    def session(self, session: str) -> Path:
        """The folder of an upload or fetch session."""
        return self.root / upload_key(session)

    def fetch_claim(self, digest: Digest) -> tuple[Path, Path]:
        """The lock file and the session note of a pull-through fetch of ``digest``."""
        stem = self.fetching / f"{digest.algorithm}-{digest.hex}"
        return stem.with_suffix(".lock"), stem.with_suffix(".json")

    def trashed(self, digest: Digest) -> Path:
        """Where the garbage collector keeps blob ``digest`` between unpublishing and deleting it."""
        return self.trash / digest.algorithm / digest.hex

    def import_staging(self, key: str) -> Path:
        """The staging store root of the bundle import identified by ``key`` (hex)."""
        if not SESSION_PATTERN.fullmatch(key):
            raise StorageError(f"invalid import key {key[:100]!r}")
        return self.imports / key

    def secret(self, name: str) -> Path:
        """The file of secret ``name``."""
        if not SECRET_PATTERN.fullmatch(name):
            raise StorageError(f"invalid secret name {name[:100]!r}")
        return self.secrets / name

    def queue(self, name: str) -> Path:
        """The folder of the durable queue ``name`` (any string: an endpoint's URL)."""
        return self.queues / hashlib.sha256(name.encode()).hexdigest()[:16]

    def queue_entry(self, name: str, entry: str) -> Path:
        """The file of record ``entry`` (``<time ns>-<uuid>.json``) of queue ``name``."""
        if not QUEUE_ENTRY_PATTERN.fullmatch(entry):
            raise StorageError(f"invalid queue entry {entry[:100]!r}")
        return self.queue(name) / entry

    def probe(self, token: str) -> Path:
        """A file that ``Store.writable_problem`` creates and removes at once (``token``: hex, unique)."""
        if not SESSION_PATTERN.fullmatch(token):
            raise StorageError(f"invalid probe token {token[:100]!r}")
        return self.state / f".ready-{token}"


# Keys of the objects every kind of store holds (``objects.py``): paths relative to the store root on local disk,
# object keys below the prefix in a bucket.
@functools.lru_cache(maxsize=4096)
def repository_key(name: str) -> str:
    """The folder of repository ``name``'s metadata."""
    return f"repositories/{check_name(name)}"


def blob_key(digest: Digest) -> str:
    """Where the bytes of blob ``digest`` live."""
    return f"blobs/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"


def blob_link_key(name: str, digest: Digest) -> str:
    """The object whose presence lets ``name`` serve blob ``digest``."""
    return f"{repository_key(name)}/_blobs/{digest.algorithm}/{digest.hex}"


def manifest_link_key(name: str, digest: Digest) -> str:
    """The object that records manifest ``digest`` in ``name`` with its media type."""
    return f"{repository_key(name)}/_manifests/{digest.algorithm}/{digest.hex}"


def tag_key(name: str, tag: str) -> str:
    """The object that holds the digest tag ``tag`` of ``name`` points at."""
    return f"{repository_key(name)}/_tags/{check_tag(tag)}"


def tag_list_key(name: str) -> str:
    """The object that keeps the tag list the upstream of mirrored repository ``name`` last gave."""
    return f"{repository_key(name)}/_tag-list.json"


def referrers_key(name: str, subject: Digest) -> str:
    """The folder of referrer descriptors of ``subject`` in ``name``."""
    return f"{repository_key(name)}/_referrers/{subject.algorithm}/{subject.hex}"


def referrer_key(name: str, subject: Digest, digest: Digest) -> str:
    """The descriptor of referrer ``digest`` of ``subject`` in ``name``."""
    return f"{referrers_key(name, subject)}/{digest.algorithm}-{digest.hex}"


def pins_key(digest: Digest) -> str:
    """The folder of the holders pinning ``digest``."""
    return f"{PINS}/{digest.algorithm}/{digest.hex}"


def pin_key(digest: Digest, holder: str) -> str:
    """The object whose presence says ``holder`` pins ``digest`` against eviction and gc."""
    return f"{pins_key(digest)}/{check_holder(holder)}"


def pin_holder_key(holder: str) -> str:
    """The record of ``holder``: what holds its pins and which digests it pins."""
    return f"{PIN_HOLDERS}/{check_holder(holder)}"


def origin_key(registry: str, digest: Digest) -> str:
    """The object whose presence says blob ``digest`` was fetched from ``registry`` (store form)."""
    if not REGISTRY_PATTERN.fullmatch(registry):
        raise StorageError(f"invalid registry {registry[:100]!r}")
    return f"{ORIGINS}/{registry}/{digest.algorithm}/{digest.hex}"


def upload_part_key(session: str, offset: int) -> str:
    """The object holding the bytes of upload ``session`` from ``offset`` on object storage."""
    return f"{upload_key(session)}/{offset:016d}"


def upload_key(session: str) -> str:
    """The folder of upload ``session`` (its repository record and its parts on object storage)."""
    if not SESSION_PATTERN.fullmatch(session):
        raise BlobUploadUnknown(f"unknown upload {session[:100]!r}")
    return f"uploads/{session}"
