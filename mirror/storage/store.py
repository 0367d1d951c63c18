"""One store, opened in one place: its layout version, blob bytes, repository metadata, pins, access index,
import staging stores, durable queues, secrets, and the fetch claims that its worker processes share.

Nothing outside ``mirror/storage/`` reaches the store's files; every other module asks a ``Store`` (or one
of its parts) for an operation.

``open(root)`` is how every command and the server get at a store. It creates a new store, or checks and
migrates an existing one to ``LAYOUT_VERSION`` (recorded in ``<root>/layout-version``):

- version 1 (no marker): before blobs were visible only where linked with a known origin. Its pull-through
  code linked any blob already in the store into whichever upstream repository a client asked through, so
  links in registry-named repositories (``docker.io/...``) may be unfounded. The migration keeps only the
  blob links that a manifest of the same repository lists, and writes the marker; what it drops costs an
  upstream confirmation (a HEAD) when next asked for.
- version 2: imported content was pinned by bare files (``state/pins/<alg>/<hex>``), forever. The migration makes
  each tag whose manifest was pinned the holder of the pinned digests that manifest reaches in its repository
  (``pins.py``), and each pinned manifest that no tag and no other pinned manifest there reaches (an image
  imported by digest, or whose tag was deleted) the holder of what it reaches, by its digest; deleting that tag
  or manifest releases them. What no manifest reaches any more (pinned blobs of manifests deleted meanwhile)
  keeps a ``legacy`` pin, which ``mirror gc --untagged`` releases when nothing live reaches it. The old files
  are removed last, and a migration cut short is redone from the old files and the pins it made.
- version 3: the current layout (``paths.py``).

A store of a newer version than this code knows is refused rather than misread.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mirror import manifest as manifests
from mirror.digest import Digest
from mirror.errors import MirrorError, StorageError
from mirror.storage.access import AccessIndex
from mirror.storage.base import BlobStore
from mirror.storage.fetching import FetchClaim, ForeignFetch
from mirror.storage.filesystem import FilesystemBlobStore, digests_in, storage_error, write_atomic, write_once
from mirror.storage.imports import Imports
from mirror.storage.metadata import Metadata
from mirror.storage.objects import FileObjects, Objects, digests_under
from mirror.storage.paths import ORIGINS, SECRET_PATTERN, Layout, blob_key
from mirror.storage.pins import Pins
from mirror.storage.queue import Queues

if TYPE_CHECKING:
    from mirror.config import Config
    from mirror.storage.coordination import Coordination
    from mirror.storage.s3 import Bucket

LAYOUT_VERSION = 3
COORDINATION_TIMEOUT = 0.25  # seconds a Redis call may take: callers wait on it, some on the event loop


@dataclass(frozen=True)
class StoreStats:
    """What the store holds, counted in one walk."""

    blobs: int = 0
    blob_bytes: int = 0
    pinned: int = 0
    pinned_bytes: int = 0


class Store:
    """Everything one store holds, each part behind its own small interface: on local disk under ``root``, or in
    ``bucket`` (``s3.py``) with ``root`` as local scratch space for import staging and event queues."""

    def __init__(self, root: Path, objects: Objects | None = None, blobs: BlobStore | None = None,
                 coordination: Coordination | None = None, secret: str | None = None, bucket: Bucket | None = None):
        self._layout = Layout(root)
        self.bucket = bucket
        self.objects = objects or FileObjects(root)
        self.blobs = blobs or FilesystemBlobStore(root)
        self.metadata = Metadata(self.objects)
        self.pins = Pins(self.objects)
        self.imports = Imports(root, self.blobs)
        self.queues = Queues(root)
        self.coordination = coordination
        self._shared_secret = secret
        self._access: AccessIndex | None = None

    @property
    def shared(self) -> bool:
        """Whether the store lives in a bucket that other instances may share."""
        return self.bucket is not None

    @property
    def access(self) -> AccessIndex:
        """The access index of pull-through blobs (opened on first use: most commands never need it): in Redis
        when instances coordinate, else on local disk."""
        if self._access is None:
            if self.coordination is not None:
                from mirror.storage.coordination import SharedAccessIndex
                self._access = SharedAccessIndex(self.coordination)  # type: ignore[assignment]
            else:
                self._access = AccessIndex(self._layout.cache_index)
        return self._access  # type: ignore[return-value]

    def claim_fetch(self, digest: Digest) -> FetchClaim | None:
        """This process's claim to fetch blob ``digest`` from upstream, or None while another process (or
        instance) holds one."""
        if self.shared:
            from mirror.storage.sharing import SharedFetchClaim
            return SharedFetchClaim.take(self, digest)  # type: ignore[return-value]
        return FetchClaim.take(self._layout, digest)

    async def join_fetch(self, digest: Digest) -> ForeignFetch | None:
        """Follow the fetch of ``digest`` that another process (or instance) claimed, once it named its upload
        session; None when that process let go first."""
        if self.shared:
            from mirror.storage.sharing import SharedForeignFetch
            return await SharedForeignFetch.join(self, digest)  # type: ignore[return-value]
        return await ForeignFetch.join(self._layout, digest)

    def blob_url(self, digest: Digest) -> str | None:
        """A presigned URL of blob ``digest`` in the bucket when ``storage.s3.redirect`` is on, else None."""
        if self.bucket is not None and self.bucket.settings.redirect:
            return self.bucket.presigned(blob_key(digest))
        return None

    def secret(self, name: str, generate: Callable[[], bytes]) -> bytes:
        """Secret ``name``: derived from the configured ``secret`` (the same on every instance), else made by
        ``generate()`` the first time it is asked for and kept in the store (readable by this user only); of
        processes asking at once, all get the one that was stored first."""
        if not SECRET_PATTERN.fullmatch(name):
            raise StorageError(f"invalid secret name {name[:100]!r}")
        if self._shared_secret is not None:
            return hmac.new(self._shared_secret.encode(), name.encode(), hashlib.sha256).digest()
        if self.bucket is not None:
            from mirror.storage.s3 import kept_secret
            return kept_secret(self.bucket, name, generate)
        path = self._layout.secret(name)
        try:
            with contextlib.suppress(FileNotFoundError):
                return path.read_bytes()
            write_once(path, generate())
            return path.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read or create the secret {path}: {exc.strerror or exc}") from exc

    def writable_problem(self) -> str | None:
        """Why the store cannot take writes now (naming no path), or None when a file could be made and removed."""
        if self.bucket is not None:
            from mirror.storage.s3 import probe
            return probe(self.bucket)
        probe = self._layout.probe(uuid.uuid4().hex)
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"store is not writable: {exc.strerror or type(exc).__name__}"
        return None

    def reach(self, name: str, roots: Iterable[Digest]) -> tuple[set[Digest], set[Digest]]:
        """The manifests of ``name`` that ``roots`` reach (themselves, children, referrers) and the blobs they list."""
        linked = set(self.metadata.manifests(name))
        reached: set[Digest] = set()
        blobs: set[Digest] = set()
        stack = list(roots)
        while stack:
            digest = stack.pop()
            if digest in reached or digest not in linked:
                continue
            reached.add(digest)
            with contextlib.suppress(MirrorError):  # a manifest that cannot be read reaches no further
                listed, children = manifests.references(self.blobs.read(digest))
                blobs |= listed
                stack += children
            stack += self.metadata.referrer_digests(name, digest)
        return reached, blobs

    def rebuild_access_index(self) -> int:
        """Refill the access index shared through Redis from the store when Redis lost it (after a restart
        without persistence): every fetched blob that is neither pinned nor linked in a hosted repository, last
        used when it was written. One instance does it; return how many blobs it indexed (0 when nothing was
        lost, or another instance is at it)."""
        coordination, index = self.coordination, self.access
        if coordination is None or not index.empty():  # type: ignore[attr-defined]
            return 0
        with coordination.exclusive("rebuild-access-index") as held:
            if not held or not index.empty():  # type: ignore[attr-defined]
                return 0
            hosted = {digest for name in self.metadata.repositories() if not _registry_named(name)
                      for digest in self.metadata.blobs(name)}
            fetched = {digest for registry in self.objects.children(ORIGINS)
                       for digest in digests_under(self.objects, f"{ORIGINS}/{registry}")}
            entries = [(digest, size, self.blobs.changed(digest)) for digest in fetched - hosted
                       if not self.pins.is_pinned(digest) and (size := self.blobs.stat(digest)) is not None]
            index.rebuild(entries)  # type: ignore[attr-defined]
            return len(entries)

    def stats(self) -> StoreStats:
        """Count the blobs and the pinned blobs and their bytes (walks the whole store)."""
        sizes = [size for size in map(self.blobs.stat, self.blobs.iter()) if size is not None]
        pinned = [size for size in map(self.blobs.stat, self.pins.all()) if size is not None]
        return StoreStats(len(sizes), sum(sizes), len(pinned), sum(pinned))

    def close(self) -> None:
        """Release the access index and the coordination."""
        if self._access is not None:
            self._access.close()
            self._access = None
        if self.coordination is not None:
            self.coordination.close()


def connect(config: Config) -> Store:
    """Open the store ``config`` names: in its bucket when ``storage.s3`` is set, else on local disk; with
    ``redis``, coordinated with the other instances."""
    coordination = None
    if config.redis is not None:
        from mirror.storage.coordination import Coordination
        coordination = Coordination(config.redis, timeout=COORDINATION_TIMEOUT)
    if config.storage.s3 is None:
        return open(config.storage.root, coordination, config.secret)
    from mirror.storage import s3
    bucket = s3.Bucket(config.storage.s3)
    version = s3.layout_version(bucket)
    if version is not None and (version > LAYOUT_VERSION or version < 0):
        raise StorageError(f"the bucket {bucket.name} has layout version {version}; this mirror knows up to "
                           f"{LAYOUT_VERSION}: upgrade the mirror")
    if version is None:
        bucket.put("layout-version", f"{LAYOUT_VERSION}\n".encode())
    root = Path(config.storage.root)
    # the blob store signs upload records with a secret of the store it belongs to, asked for on first use
    blobs = s3.S3BlobStore(bucket, Layout(root).uploads,
                           lambda: store.secret("upload.key", lambda: uuid.uuid4().bytes * 2))
    store = Store(root, s3.S3Objects(bucket), blobs, coordination, config.secret, bucket)
    return store


def location(config: Config) -> str:
    """Where the store ``config`` names is, for messages (never a credential)."""
    s3 = config.storage.s3
    return str(config.storage.root) if s3 is None else f"s3 bucket {s3.bucket}{'/' + s3.prefix if s3.prefix else ''} " \
        f"at {s3.endpoint}"


def found(config: Config) -> bool:
    """Whether the store ``config`` names was ever opened (a bucket store always counts as found)."""
    return config.storage.s3 is not None or exists(config.storage.root)


def open(root: Path | str, coordination: Coordination | None = None,  # noqa: A001 - the way to open a local store
         secret: str | None = None) -> Store:
    """Open (creating or migrating as needed) the store at ``root``."""
    layout = Layout(Path(root))
    fresh = not layout.blobs.is_dir()
    version = LAYOUT_VERSION if fresh else _version(layout)
    if version > LAYOUT_VERSION:
        raise StorageError(f"the store {layout.root} has layout version {version}; this mirror knows up to "
                           f"{LAYOUT_VERSION}: upgrade the mirror")
    store = Store(layout.root, coordination=coordination, secret=secret)
    if version < 2:
        _unlink_unfounded_blob_links(store)
    if version < 3:
        _hold_bare_pins(store, layout)
    if fresh or version < LAYOUT_VERSION:
        write_atomic(layout.version, f"{LAYOUT_VERSION}\n".encode())
    return store


def exists(root: Path | str) -> bool:
    """Whether a store was ever opened at ``root``."""
    return Layout(Path(root)).blobs.is_dir()


def _version(layout: Layout) -> int:
    try:
        text = layout.version.read_text().strip()
    except FileNotFoundError:
        return 1
    except OSError as exc:
        raise storage_error(exc) from exc
    if not text.isdigit():
        raise StorageError(f"the store's {layout.version} is not a layout version: {text[:40]!r}")
    return int(text)


def _unlink_unfounded_blob_links(store: Store) -> None:
    """Version 1 -> 2: in registry-named repositories keep only the blob links their manifests list."""
    metadata = store.metadata
    for name in metadata.repositories():
        if not _registry_named(name):
            continue  # a hosted name: its links came from pushes and imports
        listed: set[Digest] = set()
        for digest in metadata.manifests(name):
            with contextlib.suppress(MirrorError, OSError):
                parsed = manifests.parse(store.blobs.read(digest), metadata.manifest_media_type(name, digest))
                listed.update(Digest.parse(blob["digest"]) for blob in parsed.blobs)
        for digest in set(metadata.blobs(name)) - listed:
            metadata.unlink_blob(name, digest)


def _registry_named(name: str) -> bool:
    """Whether store repository ``name`` mirrors a registry (``docker.io/...``) rather than being hosted."""
    first = name.partition("/")[0]
    return "." in first or first == "localhost" or first.startswith("localhost_")


def _hold_bare_pins(store: Store, layout: Layout) -> None:
    """Version 2 -> 3: bare pins become pins held by the tags (or untagged manifests) that reach them; the rest
    become legacy pins."""
    pinned = set(digests_in(layout.pins_v2)) | set(store.pins.all())  # a second run finds what the first moved
    held: set[Digest] = set()

    def hold(name: str, reference: str, reach: tuple[set[Digest], set[Digest]]) -> None:
        digests = (reach[0] | reach[1]) & pinned
        store.pins.hold(name, reference, digests)
        held.update(digests)

    for name in store.metadata.repositories() if pinned else ():
        covered: set[Digest] = set()
        for tag in store.metadata.tags(name):
            if (digest := store.metadata.resolve_tag(name, tag)) in pinned:
                reach = store.reach(name, {digest})
                covered |= reach[0]
                hold(name, tag, reach)
        untagged = {digest: store.reach(name, {digest})
                    for digest in (set(store.metadata.manifests(name)) & pinned) - covered}
        below = {child for digest, (reached, _) in untagged.items() for child in reached - {digest}}
        for digest in untagged.keys() - below:
            hold(name, str(digest), untagged[digest])
    for digest in pinned - held:
        store.pins.pin(digest)
    shutil.rmtree(layout.pins_v2, ignore_errors=True)
