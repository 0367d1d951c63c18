"""Repository metadata: which blobs and manifests each repository links, its tags and its referrers.

Kept apart from blob bytes, as small files written atomically (see ``paths.py`` for the layout), so any
number of processes sharing the store see a consistent view without a lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mirror.digest import Digest
from mirror.errors import DigestInvalid
from mirror.storage.filesystem import changed, digests_in, write_atomic
from mirror.storage.paths import NAME_PATTERN, TAG_PATTERN, Layout

MARKERS = ("_manifests", "_blobs", "_tags")


class Metadata:
    """Tags, links and referrers of every repository in one store."""

    def __init__(self, root: Path):
        self.layout = Layout(root)

    # blobs
    def link_blob(self, name: str, digest: Digest) -> None:
        """Let ``name`` serve blob ``digest``."""
        path = self.layout.blob_link(name, digest)
        if not path.exists():
            write_atomic(path, b"", durable=False)

    def has_blob(self, name: str, digest: Digest) -> bool:
        """Whether ``name`` links blob ``digest``."""
        return self.layout.blob_link(name, digest).exists()

    def blobs(self, name: str) -> Iterator[Digest]:
        """Every blob digest linked in ``name``."""
        yield from digests_in(self.layout.repository(name) / "_blobs")

    def blob_link_changed(self, name: str, digest: Digest) -> float:
        """When ``name`` linked blob ``digest`` (0 when it does not link it)."""
        return changed(self.layout.blob_link(name, digest))

    def unlink_blob(self, name: str, digest: Digest) -> bool:
        """Stop ``name`` serving blob ``digest``; return whether it did."""
        try:
            self.layout.blob_link(name, digest).unlink()
            return True
        except FileNotFoundError:
            return False

    # origins
    def note_origin(self, registry: str, digest: Digest) -> None:
        """Record that the bytes of blob ``digest`` came from upstream ``registry`` (store form)."""
        path = self.layout.origin(registry, digest)
        if not path.exists():
            write_atomic(path, b"", durable=False)

    def has_origin(self, registry: str, digest: Digest) -> bool:
        """Whether the bytes of blob ``digest`` came from upstream ``registry``."""
        return self.layout.origin(registry, digest).exists()

    # manifests
    def link_manifest(self, name: str, digest: Digest, media_type: str) -> None:
        """Record manifest ``digest`` of ``media_type`` in ``name``."""
        write_atomic(self.layout.manifest_link(name, digest), media_type.encode())

    def manifest_media_type(self, name: str, digest: Digest) -> str | None:
        """The media type of manifest ``digest`` in ``name``, or None when it has no such manifest."""
        try:
            return self.layout.manifest_link(name, digest).read_text()
        except OSError:
            return None

    def manifest_link_changed(self, name: str, digest: Digest) -> float:
        """When manifest ``digest`` was last linked in ``name`` (0 when it is not there)."""
        return changed(self.layout.manifest_link(name, digest))

    def unlink_manifest(self, name: str, digest: Digest) -> bool:
        """Forget manifest ``digest`` in ``name`` and every tag pointing at it; return whether it was there."""
        for tag in self.tags(name):
            if self.resolve_tag(name, tag) == digest:
                self.untag(name, tag)
        try:
            self.layout.manifest_link(name, digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def manifests(self, name: str) -> Iterator[Digest]:
        """Every manifest digest linked in ``name``."""
        yield from digests_in(self.layout.manifests(name))

    # tags
    def tag(self, name: str, tag: str, digest: Digest) -> None:
        """Point ``tag`` of ``name`` at ``digest``."""
        write_atomic(self.layout.tag(name, tag), str(digest).encode())

    def resolve_tag(self, name: str, tag: str) -> Digest | None:
        """The digest ``tag`` of ``name`` points at, or None."""
        try:
            return Digest.parse(self.layout.tag(name, tag).read_text())
        except (OSError, ValueError):
            return None

    def tag_mtime(self, name: str, tag: str) -> float | None:
        """When ``tag`` of ``name`` was last written, or None when absent."""
        try:
            return os.stat(self.layout.tag(name, tag)).st_mtime
        except OSError:
            return None

    def touch_tag(self, name: str, tag: str) -> None:
        """Mark ``tag`` of ``name`` as confirmed now without changing it."""
        with contextlib.suppress(OSError):
            os.utime(self.layout.tag(name, tag))

    def untag(self, name: str, tag: str) -> bool:
        """Remove ``tag`` of ``name``; return whether it existed."""
        try:
            self.layout.tag(name, tag).unlink()
            return True
        except FileNotFoundError:
            return False

    def tags(self, name: str) -> list[str]:
        """The tags of ``name`` in lexical order."""
        try:
            entries = os.listdir(self.layout.tags(name))
        except OSError:
            return []
        return sorted(tag for tag in entries if TAG_PATTERN.fullmatch(tag))

    # tag lists of mirrored repositories
    def cache_tag_list(self, name: str, tags: list[str]) -> None:
        """Keep ``tags``, the tag list the upstream of ``name`` gave just now."""
        write_atomic(self.layout.tag_list(name), json.dumps(tags).encode(), durable=False)

    def cached_tag_list(self, name: str) -> tuple[list[str], float] | None:
        """The tag list last kept for ``name`` and when it was kept (``time.time()``), or None."""
        path = self.layout.tag_list(name)
        try:
            written = os.stat(path).st_mtime
            tags = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(tags, list):
            return None
        return [tag for tag in tags if isinstance(tag, str) and TAG_PATTERN.fullmatch(tag)], written

    # repositories
    def exists(self, name: str) -> bool:
        """Whether ``name`` was ever written: it has links, tags or referrers, or had them."""
        return any((self.layout.repository(name) / marker).is_dir() for marker in MARKERS)

    def holds_manifest(self, name: str) -> bool:
        """Whether ``name`` holds a manifest now."""
        return next(self.manifests(name), None) is not None

    def repositories(self) -> list[str]:
        """Every repository name with any links, tags or referrers, in lexical order."""
        found = []
        for folder, subfolders, _ in os.walk(self.layout.repositories):
            if any(marker in subfolders for marker in MARKERS):
                name = Path(folder).relative_to(self.layout.repositories).as_posix()
                if NAME_PATTERN.fullmatch(name):
                    found.append(name)
            subfolders[:] = [sub for sub in subfolders if not sub.startswith("_")]
        return sorted(found)

    def delete_repository(self, name: str) -> None:
        """Remove every link, tag, referrer and kept tag list of ``name`` (blob bytes stay for garbage collection)."""
        for marker in (*MARKERS, "_referrers"):
            shutil.rmtree(self.layout.repository(name) / marker, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.layout.tag_list(name).unlink()

    # referrers
    def add_referrer(self, name: str, subject: Digest, digest: Digest, descriptor: dict[str, Any]) -> None:
        """Record that manifest ``digest`` (described by ``descriptor``) refers to ``subject``."""
        write_atomic(self.layout.referrer(name, subject, digest), json.dumps(descriptor).encode())

    def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        """Forget that ``digest`` refers to ``subject``."""
        with contextlib.suppress(FileNotFoundError):
            self.layout.referrer(name, subject, digest).unlink()

    def referrer_digests(self, name: str, subject: Digest) -> list[Digest]:
        """The digests of the manifests in ``name`` that refer to ``subject``, in order (no descriptor is read)."""
        try:
            entries = os.listdir(self.layout.referrers(name, subject))
        except OSError:
            return []
        found = []
        for entry in entries:
            algorithm, _, hex_digits = entry.partition("-")
            with contextlib.suppress(DigestInvalid):  # a write's temporary file
                found.append(Digest.parse(f"{algorithm}:{hex_digits}"))
        return sorted(found, key=str)

    def referrer(self, name: str, subject: Digest, digest: Digest) -> dict[str, Any] | None:
        """The descriptor of manifest ``digest`` referring to ``subject`` in ``name``; None when it is gone."""
        try:
            descriptor = json.loads(self.layout.referrer(name, subject, digest).read_bytes())
        except (OSError, ValueError):
            return None
        return descriptor if isinstance(descriptor, dict) else None

    def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]:
        """Descriptors of the manifests in ``name`` that refer to ``subject``, every one read (the API reads only
        a page of them: ``referrer_digests``, then ``referrer``)."""
        return [descriptor for digest in self.referrer_digests(name, subject)
                if (descriptor := self.referrer(name, subject, digest)) is not None]
