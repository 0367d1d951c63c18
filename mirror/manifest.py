"""Manifests of the Docker and OCI formats: media types, parsing, validation and what they reference. Pure."""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from mirror.digest import Digest
from mirror.errors import DigestInvalid, ManifestInvalid, MirrorError, UpstreamInvalid

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
IMAGE_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
MANIFEST_TYPES = INDEX_TYPES | IMAGE_TYPES
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_JSON_DEPTH = 64
# Content-Types that say nothing about the kind of manifest: the body alone types it.
UNTYPED = frozenset({"", "application/json", "application/octet-stream"})
INDEX_ONLY, IMAGE_ONLY = ("manifests",), ("config", "layers")

_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: its bytes, media type and what it points at."""

    body: bytes
    media_type: str
    digest: Digest
    data: dict[str, Any]

    @property
    def is_index(self) -> bool:
        """Whether this is a manifest list or image index."""
        return self.media_type in INDEX_TYPES

    @property
    def blobs(self) -> list[dict[str, Any]]:
        """Descriptors of the config and layers (empty for an index)."""
        if self.is_index:
            return []
        config = self.data.get("config")
        return ([config] if config else []) + list(self.data.get("layers") or [])

    @property
    def children(self) -> list[dict[str, Any]]:
        """Descriptors of the manifests an index lists (empty for an image manifest)."""
        return list(self.data.get("manifests") or []) if self.is_index else []

    @property
    def subject(self) -> Digest | None:
        """The digest of the manifest this one refers to, if any."""
        subject = self.data.get("subject")
        return Digest.parse(subject["digest"]) if subject else None

    @property
    def artifact_type(self) -> str | None:
        """The artifact type as the referrers API reports it."""
        if self.data.get("artifactType"):
            return self.data["artifactType"]
        config = self.data.get("config") or {}
        return None if self.is_index else config.get("mediaType")

    def descriptor(self) -> dict[str, Any]:
        """An OCI descriptor of this manifest, with artifactType and annotations for referrer listings."""
        descriptor: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest),
                                      "size": len(self.body)}
        if self.artifact_type:
            descriptor["artifactType"] = self.artifact_type
        if self.data.get("annotations"):
            descriptor["annotations"] = self.data["annotations"]
        return descriptor


def _json_depth(data: bytes) -> int:
    """How deeply the arrays and objects of UTF-8 JSON ``data`` nest, from its brackets outside strings."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")  # an escaped quote never ends a string
    outside = b"".join(unescaped.split(b'"')[::2])  # every other piece between quotes is a string's content
    steps = outside.translate(None, _NOT_BRACKET).translate(_BRACKET_STEPS)  # +1 for [ and {, -1 for ] and }
    return max(accumulate(memoryview(steps).cast("b")), default=0)


def load_json(data: bytes, what: str, *, max_size: int = MAX_MANIFEST_SIZE,
              error: type[MirrorError] = ManifestInvalid) -> Any:
    """Parse untrusted UTF-8 JSON ``data`` (named ``what`` in errors), bounded in size and nesting; raise ``error``."""
    if len(data) > max_size:
        raise error(f"{what} is over the {max_size} byte limit")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from exc
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise error(f"{what} nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from exc


def parse(body: bytes, content_type: str | None, algorithm: str = "sha256") -> Manifest:
    """Parse and validate a manifest as pushed with ``content_type``; raise ManifestInvalid on any flaw."""
    data = load_json(body, "manifest")
    if not isinstance(data, dict):
        raise ManifestInvalid("manifest must be a JSON object")
    media_type = _media_type(data, content_type)
    if data.get("schemaVersion") != 2:
        raise ManifestInvalid("schemaVersion must be 2")
    manifest = Manifest(body, media_type, Digest.of(body, algorithm), data)
    _check_unambiguous(manifest)
    _check_descriptors(manifest)
    return manifest


def references(body: bytes) -> tuple[set[Digest], set[Digest]]:
    """Every digest a stored manifest may reference, whatever its type says: (blobs: config and layers,
    manifests: what an index lists). For the garbage collector, which must never miss one; raise
    ManifestInvalid when the bytes are not a JSON object."""
    data = load_json(body, "stored manifest")
    if not isinstance(data, dict):
        raise ManifestInvalid("a stored manifest is not a JSON object")

    def digests(value: Any) -> set[Digest]:
        found = set()
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and Digest.is_digest(str(item.get("digest", ""))):
                found.add(Digest.parse(item["digest"]))
        return found

    return digests(data.get("config")) | digests(data.get("layers")), digests(data.get("manifests"))


def parse_lenient(body: bytes, media_type: str, digest: Digest) -> Manifest:
    """Parse an upstream's manifest; types this registry does not validate are kept as they are."""
    try:
        return parse(body, media_type, digest.algorithm)
    except ManifestInvalid:
        if media_type in MANIFEST_TYPES:
            raise UpstreamInvalid(f"upstream sent an invalid {media_type} manifest") from None
        return Manifest(body, media_type, digest, {})


def _media_type(data: dict[str, Any], content_type: str | None) -> str:
    """The manifest type of ``data`` pushed with ``content_type``: the two, when both say one, must agree."""
    declared = data.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    content_type = (content_type or "").split(";")[0].strip()
    if content_type in UNTYPED:
        if declared is None and "manifests" in data and not data.keys().isdisjoint(IMAGE_ONLY):
            raise ManifestInvalid("manifest has both manifests and config or layers, and neither a mediaType nor "
                                  "the Content-Type says whether it is an index or an image manifest")
        content_type = declared or (OCI_INDEX if "manifests" in data else OCI_MANIFEST)
    if declared is not None and declared != content_type:
        raise ManifestInvalid(f"mediaType {declared[:100]!r} does not match Content-Type {content_type[:100]!r}",
                              detail={"mediaType": declared[:100], "contentType": content_type[:100]})
    if content_type not in MANIFEST_TYPES:
        raise ManifestInvalid(f"unsupported manifest media type {content_type[:100]!r}")
    return content_type


def _check_unambiguous(manifest: Manifest) -> None:
    """Refuse an index with image manifest fields or an image manifest with index fields (CVE-2021-41190)."""
    kind, foreign = ("an index", IMAGE_ONLY) if manifest.is_index else ("an image manifest", INDEX_ONLY)
    present = [name for name in foreign if name in manifest.data]
    if present:
        raise ManifestInvalid(f"{kind} ({manifest.media_type}) must not have {' or '.join(present)}: with the "
                              "fields of both an index and an image manifest a document is ambiguous",
                              detail={"mediaType": manifest.media_type, "fields": present})


def _check_descriptors(manifest: Manifest) -> None:
    data = manifest.data
    if manifest.is_index:
        if not isinstance(data.get("manifests"), list):
            raise ManifestInvalid("an index must have a manifests list")
        descriptors = data["manifests"]
    else:
        if not isinstance(data.get("config"), dict) or not isinstance(data.get("layers", []), list):
            raise ManifestInvalid("an image manifest must have a config descriptor and a layers list")
        descriptors = manifest.blobs
    if data.get("subject") is not None:
        descriptors = [*descriptors, data["subject"]]
    for descriptor in descriptors:
        if not isinstance(descriptor, dict) or not isinstance(descriptor.get("digest"), str):
            raise ManifestInvalid("every descriptor needs a digest")
        size = descriptor.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestInvalid(f"descriptor {descriptor['digest'][:80]} needs a non-negative size")
        try:
            Digest.parse(descriptor["digest"])
        except DigestInvalid as exc:
            raise ManifestInvalid(f"descriptor has an invalid digest: {exc.message}") from exc
