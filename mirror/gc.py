"""Garbage collection: mark what the manifests of every repository reference, sweep the rest of the blobs.

Mark: every manifest linked in a repository is live, and marks its own bytes, its config and layers, the
manifests an index lists and the manifests that refer to it. With ``untagged``, only manifests a tag reaches
are roots (plus pinned ones and ones linked within the grace period); live indexes keep their children and
live manifests their referrers, and every other manifest is removed from its repository. Pins are held by
imported tags (``storage/pins.py``): deleting the tag releases them, so what the image alone used goes like any
other garbage. ``legacy`` pins (held by no tag: a layout version 2 store's) that nothing live reaches are
released by an untagged collection.

Sweep: a blob that is unmarked, not pinned (imported) and not recent is deleted, with the repository links to
it and its entry in the access index of cached blobs (so it no longer counts against the cache's bound); upload
sessions idle longer than ``storage.upload_expiry`` go too, and so do the staging stores of bundle
imports nobody reran for that long. It is safe while ``mirror serve`` runs:

- uploads and pull-through fetches live in ``uploads/<session>/`` until they commit: out of the sweep's reach;
- "recent" means renamed into place or written, or linked into a repository (a cross-repository mount),
  within ``storage.gc_grace`` (default 1h): a pushed blob waits that long for the manifest that references it;
- blobs are first moved to ``state/gc-trash``; a manifest PUT that references one now fails cleanly with
  MANIFEST_BLOB_UNKNOWN instead of being accepted. Then every manifest linked since the mark is read, and the
  blobs it needs are moved back. Only the rest is deleted. A run that dies halfway moves its trash back first
  thing the next time;
- a manifest whose bytes cannot be read as JSON leaves what it needs unknown: then no blob is deleted, and
  the problem is reported. Manifests are read leniently (``manifest.references``): every ``config``,
  ``layers`` and ``manifests`` descriptor counts, whatever the declared type.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from mirror import manifest as manifests
from mirror import storage
from mirror.config import Config
from mirror.digest import Digest
from mirror.errors import BlobUnknown, ConfigError, MirrorError
from mirror.registry import Registry
from mirror.storage.pins import Pins


def run(config: Config, dry_run: bool = False, untagged: bool = False) -> int:
    """``mirror gc``: collect the store of ``config``; print what was (or would be) freed."""
    if not storage.found(config):
        raise ConfigError("storage.root", f"there is no store at {config.storage.root}")
    store = storage.connect(config)
    collector = Collector(Registry(store), store.pins, config.storage.gc_grace, config.storage.upload_expiry)
    coordination = store.coordination
    with coordination.exclusive("gc") if coordination else contextlib.nullcontext(True) as held:
        if not held:  # one collector at a time over a store that instances share
            raise MirrorError("another mirror gc is collecting this store now; try again when it is done")
        report = collector.collect(dry_run=dry_run, untagged=untagged)
    store.close()
    for line in report.lines():
        print(line)
    return 0


@dataclass
class Report:
    """What one collection removed, or would remove in a dry run."""

    dry_run: bool
    blobs: dict[Digest, int] = field(default_factory=dict)
    manifests: list[tuple[str, Digest]] = field(default_factory=list)
    released: list[Digest] = field(default_factory=list)  # legacy pins released (untagged collections)
    uploads: dict[str, int] = field(default_factory=dict)
    imports: dict[str, int] = field(default_factory=dict)
    kept: int = 0
    problems: list[str] = field(default_factory=list)
    unreadable: bool = False  # a manifest could not be read: what it needs is unknown, so nothing is deleted

    @property
    def freed(self) -> int:
        """Bytes of the removed blobs, uploads and abandoned imports."""
        return sum(self.blobs.values()) + sum(self.uploads.values()) + sum(self.imports.values())

    def lines(self) -> list[str]:
        """One line per removed item and problem, then the summary."""
        verb = "would remove" if self.dry_run else "removed"
        return [
            *(f"gc: {problem}" for problem in self.problems),
            *(f"gc: {verb} untagged manifest {name}@{digest}" for name, digest in self.manifests),
            *(f"gc: {'would release' if self.dry_run else 'released'} legacy pin {digest}" for digest in self.released),
            *(f"gc: {verb} blob {digest} ({size} bytes)" for digest, size in self.blobs.items()),
            *(f"gc: {verb} expired upload {session} ({size} bytes)" for session, size in self.uploads.items()),
            *(f"gc: {verb} abandoned import staging {key} ({size} bytes)" for key, size in self.imports.items()),
            f"gc: {'would free' if self.dry_run else 'freed'} {human(self.freed)}: {len(self.blobs)} blobs "
            f"({human(sum(self.blobs.values()))}), {len(self.manifests)} untagged manifests, "
            f"{len(self.uploads)} expired uploads ({human(sum(self.uploads.values()))}); "
            f"kept {self.kept} blobs",
        ]


def human(size: int) -> str:
    """``size`` bytes in binary units, e.g. ``12.5 MiB``."""
    value, unit = float(size), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


class Collector:
    """Mark and sweep over one store; see the module docstring for why it is safe while serving."""

    def __init__(self, registry: Registry, pins: Pins, grace: float, upload_expiry: float):
        self.registry = registry
        self.metadata = registry.metadata
        self.blobs = registry.blobs
        self.imports = registry.store.imports
        self.pins = pins
        self.grace = grace
        self.upload_expiry = upload_expiry

    def collect(self, dry_run: bool = False, untagged: bool = False) -> Report:
        """Remove (or with ``dry_run`` only report) garbage; return what it was."""
        report = Report(dry_run)
        started = time.time()
        if not dry_run:
            self._restore_all_trash()
        seen, marked = self._mark(untagged, dry_run, report)
        if untagged and not report.unreadable:
            report.released = sorted(set(self.pins.legacy()) - marked, key=str)
            for digest in [] if dry_run else report.released:
                self.pins.release_legacy(digest)
        total = sum(1 for _ in self.blobs.iter())
        candidates = {} if report.unreadable else self._candidates(marked, started - self.grace, report.released)
        if report.unreadable:
            report.problems.append("no blob removed: a manifest that cannot be read may need any of them")
        if dry_run:
            report.blobs = candidates
        else:
            trashed = self._trash(candidates, started - self.grace)
            needed = self._mark_new(seen, report)
            report.blobs = self._delete(trashed, set(trashed) if report.unreadable else needed)
        report.kept = total - len(report.blobs)
        report.uploads = self.registry.expire_uploads(self.upload_expiry, dry_run)
        report.imports = self.imports.expire(self.upload_expiry, dry_run)  # imports nobody reran for that long
        return report

    # mark
    def _mark(self, untagged: bool, dry_run: bool, report: Report) -> tuple[set[tuple[str, Digest]], set[Digest]]:
        """The live (repository, manifest) pairs and every digest they mark; removes untagged manifests."""
        seen: set[tuple[str, Digest]] = set()
        marked: set[Digest] = set()
        for name in self.metadata.repositories():
            linked = set(self.metadata.manifests(name))
            roots = self._roots(name, linked) if untagged else linked
            live = self._walk(name, roots, linked, marked, report)
            seen.update((name, digest) for digest in live)
            for digest in sorted(linked - live, key=str):
                report.manifests.append((name, digest))
                if not dry_run:
                    with contextlib.suppress(MirrorError):  # already gone: someone deleted it meanwhile
                        self.registry.delete_manifest(name, str(digest))
        return seen, marked

    def _roots(self, name: str, linked: set[Digest]) -> set[Digest]:
        """The manifests of ``name`` an untagged collection keeps: tagged, pinned or linked within the grace."""
        tagged = {self.metadata.resolve_tag(name, tag) for tag in self.metadata.tags(name)}
        cutoff = time.time() - self.grace
        return {digest for digest in linked if digest in tagged or self.pins.is_pinned(digest)
                or self.metadata.manifest_link_changed(name, digest) > cutoff}

    def _walk(self, name: str, roots: set[Digest], linked: set[Digest], marked: set[Digest],
              report: Report) -> set[Digest]:
        """Mark everything ``roots`` reach in ``name``; return the manifests reached."""
        live: set[Digest] = set()
        stack = list(roots)
        while stack:
            digest = stack.pop()
            marked.add(digest)
            if digest in live or digest not in linked:
                continue
            live.add(digest)
            references = self._read(name, digest, report)
            if references is not None:
                blobs, children = references
                marked.update(blobs)
                stack.extend(children)
            stack.extend(Digest.parse(referrer["digest"]) for referrer in self.metadata.referrers(name, digest))
        return live

    def _read(self, name: str, digest: Digest, report: Report) -> tuple[set[Digest], set[Digest]] | None:
        """What manifest ``digest`` of ``name`` references (blobs, manifests), also while it sits in the trash;
        None and a problem when it cannot be read (then the sweep deletes nothing: it cannot know what is
        needed)."""
        try:
            body = self.blobs.read_any(digest)
        except BlobUnknown:
            report.problems.append(f"manifest {name}@{digest} has no bytes in the store")
            return None
        try:
            return manifests.references(body)
        except MirrorError as exc:
            report.problems.append(f"cannot read manifest {name}@{digest}: {exc.message}")
            report.unreadable = True
            return None

    def _mark_new(self, seen: set[tuple[str, Digest]], report: Report) -> set[Digest]:
        """Everything the manifests linked since the mark need (a push that went on during the collection)."""
        marked: set[Digest] = set()
        for name in self.metadata.repositories():
            linked = set(self.metadata.manifests(name))
            new = {digest for digest in linked if (name, digest) not in seen}
            self._walk(name, new, linked, marked, report)
        return marked

    # sweep
    def _candidates(self, marked: set[Digest], cutoff: float, released: list[Digest]) -> dict[Digest, int]:
        """Unmarked, unpinned blobs that nothing wrote or linked after ``cutoff``, with their sizes (``released``:
        legacy pins this collection releases, still there in a dry run)."""
        pinned = set(self.pins.all()) - set(released)
        found: dict[Digest, int] = {}
        for digest in self.blobs.iter():
            if digest in marked or digest in pinned or self.blobs.changed(digest) > cutoff:
                continue
            size = self.blobs.stat(digest)
            if size is not None:
                found[digest] = size
        for name in self.metadata.repositories():
            for digest in [d for d in found if self.metadata.blob_link_changed(name, d) > cutoff]:
                del found[digest]
        return found

    def _trash(self, candidates: dict[Digest, int], cutoff: float) -> dict[Digest, int]:
        """Move the candidates out of ``blobs/``; put back any that a push wrote again meanwhile."""
        trashed: dict[Digest, int] = {}
        for digest, size in candidates.items():
            written = self.blobs.trash(digest)
            if written is None:
                continue
            if written > cutoff:
                self.blobs.restore(digest)
            else:
                trashed[digest] = size
        return trashed

    def _delete(self, trashed: dict[Digest, int], needed: set[Digest]) -> dict[Digest, int]:
        """Delete the trashed blobs nothing needs (and the links to them); restore the others."""
        deleted: dict[Digest, int] = {}
        for digest, size in trashed.items():
            if digest in needed:
                self.blobs.restore(digest)
            else:
                self.blobs.purge(digest)
                deleted[digest] = size
        for name in self.metadata.repositories():
            for digest in deleted:
                self.metadata.unlink_blob(name, digest)
        for digest in deleted:
            self.registry.store.access.forget(digest)
        return deleted

    def _restore_all_trash(self) -> None:
        """Undo what a collection that died halfway left in the trash."""
        for digest in list(self.blobs.trashed()):
            self.blobs.restore(digest)
