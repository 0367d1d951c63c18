"""Repository metadata: which blobs and manifests each repository links, its tags and its referrers.

Kept apart from blob bytes, as small objects each written whole (``objects.py``; keys from ``paths.py``), so any
number of processes or instances sharing the store see a consistent view without a lock.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mirror.digest import Digest
from mirror.errors import DigestInvalid
from mirror.storage.objects import Objects, digests_under
from mirror.storage.paths import (
    NAME_PATTERN,
    TAG_PATTERN,
    blob_link_key,
    manifest_link_key,
    origin_key,
    referrer_key,
    referrers_key,
    repository_key,
    tag_key,
    tag_list_key,
)

MARKERS = ("_manifests", "_blobs", "_tags")


class Metadata:
    """Tags, links and referrers of every repository in one store."""

    def __init__(self, objects: Objects):
        self.objects = objects

    # blobs
    def link_blob(self, name: str, digest: Digest) -> None:
        """Let ``name`` serve blob ``digest``."""
        key = blob_link_key(name, digest)
        if not self.objects.exists(key):
            self.objects.put(key, b"", durable=False)

    def has_blob(self, name: str, digest: Digest) -> bool:
        """Whether ``name`` links blob ``digest``."""
        return self.objects.exists(blob_link_key(name, digest))

    def blobs(self, name: str) -> Iterator[Digest]:
        """Every blob digest linked in ``name``."""
        yield from digests_under(self.objects, f"{repository_key(name)}/_blobs")

    def blob_link_changed(self, name: str, digest: Digest) -> float:
        """When ``name`` linked blob ``digest`` (0 when it does not link it)."""
        return self.objects.changed(blob_link_key(name, digest))

    def unlink_blob(self, name: str, digest: Digest) -> bool:
        """Stop ``name`` serving blob ``digest``; return whether it did."""
        return self.objects.delete(blob_link_key(name, digest))

    # origins
    def note_origin(self, registry: str, digest: Digest) -> None:
        """Record that the bytes of blob ``digest`` came from upstream ``registry`` (store form)."""
        key = origin_key(registry, digest)
        if not self.objects.exists(key):
            self.objects.put(key, b"", durable=False)

    def has_origin(self, registry: str, digest: Digest) -> bool:
        """Whether the bytes of blob ``digest`` came from upstream ``registry``."""
        return self.objects.exists(origin_key(registry, digest))

    # manifests
    def link_manifest(self, name: str, digest: Digest, media_type: str) -> None:
        """Record manifest ``digest`` of ``media_type`` in ``name``."""
        self.objects.put(manifest_link_key(name, digest), media_type.encode())

    def manifest_media_type(self, name: str, digest: Digest) -> str | None:
        """The media type of manifest ``digest`` in ``name``, or None when it has no such manifest."""
        data = self.objects.get(manifest_link_key(name, digest))
        return None if data is None else data.decode(errors="replace")

    def manifest_link_changed(self, name: str, digest: Digest) -> float:
        """When manifest ``digest`` was last linked in ``name`` (0 when it is not there)."""
        return self.objects.changed(manifest_link_key(name, digest))

    def unlink_manifest(self, name: str, digest: Digest) -> bool:
        """Forget manifest ``digest`` in ``name`` and every tag pointing at it; return whether it was there."""
        for tag in self.tags(name):
            if self.resolve_tag(name, tag) == digest:
                self.untag(name, tag)
        return self.objects.delete(manifest_link_key(name, digest))

    def manifests(self, name: str) -> Iterator[Digest]:
        """Every manifest digest linked in ``name``."""
        yield from digests_under(self.objects, f"{repository_key(name)}/_manifests")

    # tags
    def tag(self, name: str, tag: str, digest: Digest) -> None:
        """Point ``tag`` of ``name`` at ``digest``."""
        self.objects.put(tag_key(name, tag), str(digest).encode())

    def resolve_tag(self, name: str, tag: str) -> Digest | None:
        """The digest ``tag`` of ``name`` points at, or None."""
        data = self.objects.get(tag_key(name, tag))
        try:
            return None if data is None else Digest.parse(data.decode())
        except (ValueError, UnicodeDecodeError):
            return None

    def tag_mtime(self, name: str, tag: str) -> float | None:
        """When ``tag`` of ``name`` was last written or confirmed, or None when absent."""
        return self.objects.changed(tag_key(name, tag)) or None

    def touch_tag(self, name: str, tag: str) -> None:
        """Mark ``tag`` of ``name`` as confirmed now without changing it."""
        self.objects.touch(tag_key(name, tag))

    def untag(self, name: str, tag: str) -> bool:
        """Remove ``tag`` of ``name``; return whether it existed."""
        return self.objects.delete(tag_key(name, tag))

    def tags(self, name: str) -> list[str]:
        """The tags of ``name`` in lexical order."""
        return sorted(tag for tag in self.objects.children(f"{repository_key(name)}/_tags")
                      if TAG_PATTERN.fullmatch(tag))

    # tag lists of mirrored repositories
    def cache_tag_list(self, name: str, tags: list[str]) -> None:
        """Keep ``tags``, the tag list the upstream of ``name`` gave just now."""
        self.objects.put(tag_list_key(name), json.dumps(tags).encode(), durable=False)

    def cached_tag_list(self, name: str) -> tuple[list[str], float] | None:
        """The tag list last kept for ``name`` and when it was kept (``time.time()``), or None."""
        key = tag_list_key(name)
        written, data = self.objects.changed(key), self.objects.get(key)
        try:
            tags = json.loads(data) if data is not None else None
        except ValueError:
            return None
        if not isinstance(tags, list):
            return None
        return [tag for tag in tags if isinstance(tag, str) and TAG_PATTERN.fullmatch(tag)], written

    # repositories
    def exists(self, name: str) -> bool:
        """Whether ``name`` was ever written: it has links, tags or referrers, or (on local disk) had them."""
        return bool(set(self.objects.children(repository_key(name))) & set(MARKERS))

    def holds_manifest(self, name: str) -> bool:
        """Whether ``name`` holds a manifest now."""
        return next(self.manifests(name), None) is not None

    def repositories(self) -> list[str]:
        """Every repository name with any links, tags or referrers, in lexical order."""
        found, folders = [], [""]
        while folders:
            folder = folders.pop()
            children = self.objects.children(f"repositories/{folder}".rstrip("/"))
            if folder and set(children) & set(MARKERS) and NAME_PATTERN.fullmatch(folder.rstrip("/")):
                found.append(folder.rstrip("/"))
            folders += [f"{folder}{child}/" for child in children if not child.startswith("_")]
        return sorted(found)

    def delete_repository(self, name: str) -> None:
        """Remove every link, tag, referrer and kept tag list of ``name`` (blob bytes stay for garbage collection)."""
        for marker in (*MARKERS, "_referrers"):
            self.objects.delete_folder(f"{repository_key(name)}/{marker}")
        self.objects.delete(tag_list_key(name))

    # referrers
    def add_referrer(self, name: str, subject: Digest, digest: Digest, descriptor: dict[str, Any]) -> None:
        """Record that manifest ``digest`` (described by ``descriptor``) refers to ``subject``."""
        self.objects.put(referrer_key(name, subject, digest), json.dumps(descriptor).encode())

    def remove_referrer(self, name: str, subject: Digest, digest: Digest) -> None:
        """Forget that ``digest`` refers to ``subject``."""
        self.objects.delete(referrer_key(name, subject, digest))

    def referrer_digests(self, name: str, subject: Digest) -> list[Digest]:
        """The digests of the manifests in ``name`` that refer to ``subject``, in order (no descriptor is read)."""
        found = []
        for entry in self.objects.children(referrers_key(name, subject)):
            algorithm, _, hex_digits = entry.partition("-")
            try:
                found.append(Digest.parse(f"{algorithm}:{hex_digits}"))
            except DigestInvalid:
                continue
        return sorted(found, key=str)

    def referrer(self, name: str, subject: Digest, digest: Digest) -> dict[str, Any] | None:
        """The descriptor of manifest ``digest`` referring to ``subject`` in ``name``; None when it is gone."""
        data = self.objects.get(referrer_key(name, subject, digest))
        try:
            descriptor = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return descriptor if isinstance(descriptor, dict) else None

    def referrers(self, name: str, subject: Digest) -> list[dict[str, Any]]:
        """Descriptors of the manifests in ``name`` that refer to ``subject``, every one read (the API reads only
        a page of them: ``referrer_digests``, then ``referrer``)."""
        return [descriptor for digest in self.referrer_digests(name, subject)
                if (descriptor := self.referrer(name, subject, digest)) is not None]
