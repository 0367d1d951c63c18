"""``mirror bundle verify``: the signature, then every member's digest and size, naming each problem."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO

from mirror import manifest as manifests
from mirror.bundle import format, signing
from mirror.bundle.archive import BundleArchive
from mirror.bundle.format import Bundle
from mirror.bundle.progress import Progress
from mirror.digest import Digest, Hasher
from mirror.errors import BundleError, MirrorError

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
            problems += check_closure(bundle, found.get)
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
        for name, _, file in archive.members():
            digest = format.member_digest(name)
            if name in seen:
                problems.append(f"duplicate member {name}")
            elif digest is None and name in LAYOUT_MEMBERS:
                problems += _check_json(name, file.read() if file else b"")
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


def _check_json(name: str, data: bytes) -> list[str]:
    try:
        json.loads(data)
    except ValueError as exc:
        return [f"{name}: not valid JSON ({exc})"]
    return []


def check_closure(bundle: Bundle, read: Callable[[Digest], bytes | None]) -> list[str]:
    """Problems with what the manifests ``read`` can return reference but ``bundle.json`` does not list."""
    listed = {blob.digest: blob for blob in bundle.blobs}
    problems = [f"image {image.reference}: manifest {image.digest} is not listed in bundle.json"
                for image in bundle.images if image.digest not in listed]
    for blob in bundle.blobs:
        data = read(blob.digest) if blob.media_type in manifests.MANIFEST_TYPES else None
        if data is None:
            continue
        try:
            manifest = manifests.parse(data, blob.media_type)
        except MirrorError as exc:
            problems.append(f"manifest {blob.digest}: {exc.message}")
            continue
        for descriptor in [*manifest.children, *(b for b in manifest.blobs if not b.get("urls"))]:
            if Digest.parse(descriptor["digest"]) not in listed:
                problems.append(f"manifest {blob.digest} references {descriptor['digest']}, which the bundle "
                                f"does not list")
    return problems
