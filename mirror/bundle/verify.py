"""``mirror bundle verify``: the signature, then every member's digest and size, then everything the importer
relies on (``Closure``), naming each problem."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO

from mirror import manifest as manifests
from mirror.bundle import format, signing
from mirror.bundle.archive import BundleArchive
from mirror.bundle.format import BlobEntry, Bundle, ImageEntry
from mirror.bundle.progress import Progress
from mirror.digest import Digest, Hasher
from mirror.errors import BundleError, BundleInvalid, MirrorError

LAYOUT_MEMBERS = (format.OCI_LAYOUT, format.INDEX_JSON, format.DOCKER_MANIFEST)


def run(paths: Sequence[str], trust: Sequence[str] = ()) -> int:
    """Verify the bundle made of ``paths``; print every problem; return 1 if there is any, else 0."""
    keys = [signing.load_public_key(path) for path in trust]
    bundle = None
    problems: list[str] = []
    try:
        with BundleArchive(paths) as archive:
            try:
                print(signing.check(archive.bundle_json, archive.signature, keys))
            except BundleError as exc:
                problems.append(exc.message)
            bundle = Bundle.from_json(archive.bundle_json)
            found: dict[Digest, bytes] = {}
            problems += check_members(archive, bundle, found)
            problems += Closure(bundle, found.get, layouts=True).problems
    except BundleError as exc:
        problems.append(exc.message)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems or bundle is None:
        print(f"{paths[0]}: INVALID ({len(problems)} problem{'s' * (len(problems) != 1)})", file=sys.stderr)
        return 1
    print(f"{paths[0]}: OK: {len(bundle.images)} images, {len(bundle.included)} blobs verified"
          + (f", {len(bundle.blobs) - len(bundle.included)} expected in the base" if bundle.base else ""))
    return 0


def check_members(archive: BundleArchive, bundle: Bundle, found: dict[Digest, bytes]) -> list[str]:
    """Hash every member against ``bundle.json``; put verified manifest bytes into ``found``; the problems."""
    expected = {blob.digest: blob for blob in bundle.blobs}
    problems: list[str] = []
    seen: set[str] = set()
    with Progress("verify", sum(blob.size for blob in bundle.included)) as progress:
        for name, size, file in archive.members():
            digest = format.member_digest(name)
            if name in seen:
                problems.append(f"duplicate member {name}")
            elif digest is None and name in LAYOUT_MEMBERS:
                problems += _check_json(archive, name, size, file)
            elif digest is None or digest not in expected or file is None:
                problems.append(f"unexpected member {name} (not listed in bundle.json)")
            else:
                problems += _check_blob(archive, expected[digest], file, found, progress)
            seen.add(name)
    problems += [f"missing member {format.blob_member(blob.digest)} (blob {blob.digest}, {blob.size} bytes)"
                 for blob in bundle.included if format.blob_member(blob.digest) not in seen]
    problems += [f"missing member {name}" for name in LAYOUT_MEMBERS if name not in seen]
    return problems


def _check_blob(archive: BundleArchive, blob: format.BlobEntry, file: BinaryIO, found: dict[Digest, bytes],
                progress: Progress) -> list[str]:
    hasher = Hasher(blob.digest.algorithm)
    keep = blob.media_type in manifests.MANIFEST_TYPES and blob.size <= manifests.MAX_MANIFEST_SIZE
    kept = bytearray()
    for chunk in archive.chunks(file):
        hasher.update(chunk)
        progress.update(len(chunk))
        if keep and len(kept) <= manifests.MAX_MANIFEST_SIZE:
            kept += chunk
    problems = blob_problems(blob, hasher.size, hasher.digest())
    if keep and not problems:
        found[blob.digest] = bytes(kept)
    return problems


def blob_problems(blob: format.BlobEntry, size: int, actual: Digest | None) -> list[str]:
    """What is wrong with a blob of ``size`` bytes hashing to ``actual`` (None: not hashed), named by its digest."""
    if size != blob.size:
        return [f"blob {blob.digest}: size mismatch: {size} bytes in the bundle, bundle.json says {blob.size}"]
    if actual is not None and actual != blob.digest:
        return [f"blob {blob.digest}: digest mismatch: its bytes hash to {actual}"]
    return []


def _check_json(archive: BundleArchive, name: str, size: int, file: BinaryIO | None) -> list[str]:
    try:
        format.parse_json(archive.read(name, size, file, format.MAX_JSON_MEMBER), name)
    except BundleInvalid as exc:
        return [exc.message]
    return []


# Every manifest an image, a referrer or an index names must be listed in bundle.json under the media type it is
# named with, that of a manifest, and parse as such; every descriptor needs a digest, a size and a media type and
# (foreign layers aside) must name a listed blob of that size. ``read`` gives a manifest's verified bytes, or None
# when they cannot be checked here (a delta's base, a member already found bad); it may raise.
class Closure:
    """Each image's manifests, checked as the importer relies on them, in the order it publishes them."""

    def __init__(self, bundle: Bundle, read: Callable[[Digest], bytes | None], layouts: bool = False):
        self.problems: list[str] = []
        self._listed = {blob.digest: blob for blob in bundle.blobs}
        self._read = read
        self._parsed: dict[Digest, manifests.Manifest | None] = {}
        self.published = [self._image(image) for image in bundle.images]
        if layouts:  # the OCI layout view's indexes, which the importer leaves out
            for image in bundle.images:
                if image.layout_index is not None:
                    self._walk([(image.layout_index, manifests.OCI_INDEX)], f"image {image.reference}: layout index")

    def _image(self, image: ImageEntry) -> list[manifests.Manifest]:
        roots = [*((referrer.digest, referrer.media_type) for referrer in image.referrers),
                 (image.digest, image.media_type)]
        return self._walk(roots, f"image {image.reference}")

    def _walk(self, roots: list[tuple[Digest, str]], where: str) -> list[manifests.Manifest]:
        """The manifests ``roots`` name and those below them, children first, each once (no recursion)."""
        order: list[manifests.Manifest] = []
        seen: set[Digest] = set()
        stack: list[tuple[Digest, str, str, int | None] | manifests.Manifest] = [
            (digest, media_type, where, None) for digest, media_type in reversed(roots)]
        while stack:
            item = stack.pop()
            if isinstance(item, manifests.Manifest):
                order.append(item)
                continue
            manifest = self._manifest(*item)
            if manifest is None or manifest.digest in seen:
                continue
            seen.add(manifest.digest)
            stack.append(manifest)
            stack += [(Digest.parse(child["digest"]), child["mediaType"], f"manifest {manifest.digest}", child["size"])
                      for child in reversed(manifest.children) if isinstance(child.get("mediaType"), str)]
        return order

    def _manifest(self, digest: Digest, media_type: str, where: str, size: int | None) -> manifests.Manifest | None:
        """Manifest ``digest`` as ``where`` names it (as ``media_type``, of ``size`` bytes), parsed; None if wrong."""
        blob = self._listed.get(digest)
        if blob is None:
            return self._problem(f"{where} references {digest}, which bundle.json does not list")
        if media_type not in manifests.MANIFEST_TYPES:
            return self._problem(f"{where} references {digest} as {media_type[:100]!r}, which is not a manifest type")
        if blob.media_type != media_type:
            return self._problem(f"{where} references {digest} as {media_type}, but bundle.json lists it as "
                                 f"{blob.media_type[:100]!r}")
        if size is not None and size != blob.size:
            return self._problem(f"{where} gives {digest} a size of {size} bytes, but bundle.json says {blob.size}")
        if digest not in self._parsed:
            self._parsed[digest] = self._parse(blob)
        return self._parsed[digest]

    def _parse(self, blob: BlobEntry) -> manifests.Manifest | None:
        if blob.size > manifests.MAX_MANIFEST_SIZE:
            return self._problem(f"manifest {blob.digest} is {blob.size} bytes, over the "
                                 f"{manifests.MAX_MANIFEST_SIZE} byte limit")
        data = self._read(blob.digest)
        if data is None:
            return None
        try:
            manifest = manifests.parse(data, blob.media_type, blob.digest.algorithm)
        except MirrorError as exc:
            return self._problem(f"manifest {blob.digest}: {exc.message}")
        where = f"manifest {blob.digest}"
        for descriptor in [*manifest.children, *manifest.blobs]:
            if not isinstance(descriptor.get("mediaType"), str):
                self._problem(f"{where}: the descriptor of {descriptor['digest']} has no mediaType")
        for descriptor in manifest.blobs:
            if descriptor.get("urls"):
                continue  # a foreign layer stays where it is
            digest = Digest.parse(descriptor["digest"])
            listed = self._listed.get(digest)
            if listed is None:
                self._problem(f"{where} references {digest}, which bundle.json does not list")
            elif listed.size != descriptor["size"]:
                self._problem(f"{where} gives {digest} a size of {descriptor['size']} bytes, but bundle.json says "
                              f"{listed.size}")
        return manifest

    def _problem(self, problem: str) -> None:
        self.problems.append(problem)
