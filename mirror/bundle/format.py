"""The bundle format, version 1 (``offline-bundle/FORMAT.md``): ``bundle.json``'s model, tar member names.

Readers refuse any other ``format`` or ``version``: a bundle is never half understood.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mirror.digest import Digest
from mirror.errors import BundleInvalid, MirrorError
from mirror.manifest import load_json
from mirror.reference import Reference
from mirror.storage.paths import check_tag

FORMAT = "mirror-bundle"
INVENTORY_FORMAT = "mirror-inventory"
VERSION = 1

BUNDLE_JSON = "bundle.json"
SIGNATURE = "bundle.json.sig"
OCI_LAYOUT = "oci-layout"
INDEX_JSON = "index.json"
DOCKER_MANIFEST = "manifest.json"
BLOBS_PREFIX = "blobs/"

MAX_JSON_MEMBER = 16 * 2**20  # bundle.json, oci-layout, index.json, manifest.json
MAX_SIGNATURE = 64 * 2**10
MAX_INVENTORY = 64 * 2**20

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


def blob_member(digest: Digest) -> str:
    """The tar member name of blob ``digest``: ``blobs/<alg>/<hex>``."""
    return f"{BLOBS_PREFIX}{digest.algorithm}/{digest.hex}"


def member_digest(name: str) -> Digest | None:
    """The digest a ``blobs/<alg>/<hex>`` member name stands for, or None for any other name."""
    if not name.startswith(BLOBS_PREFIX):
        return None
    algorithm, _, hexpart = name[len(BLOBS_PREFIX):].partition("/")
    try:
        return Digest.parse(f"{algorithm}:{hexpart}")
    except MirrorError:
        return None


@dataclass(frozen=True)
class BlobEntry:
    """One blob the bundle's images need; ``in_base`` when it is left out because the target has it."""

    digest: Digest
    size: int
    media_type: str
    in_base: bool = False


@dataclass(frozen=True)
class Referrer:
    """A manifest that refers to an image (signature, SBOM, attestation), with its cosign-style tag if any."""

    digest: Digest
    media_type: str
    tag: str | None = None


@dataclass(frozen=True)
class ImageEntry:
    """One exported image: its full reference and the manifest (or index) digest it resolved to."""

    reference: str
    digest: Digest
    media_type: str
    source_digest: Digest | None = None
    dropped_platforms: tuple[str, ...] = ()
    referrers: tuple[Referrer, ...] = ()
    layout_index: Digest | None = None


@dataclass(frozen=True)
class Base:
    """What a delta bundle was made against: a bundle or an inventory, by the digest of its JSON."""

    kind: str
    digest: Digest
    created: str | None = None


@dataclass(frozen=True)
class Bundle:
    """The content of ``bundle.json``."""

    created: str
    images: tuple[ImageEntry, ...]
    blobs: tuple[BlobEntry, ...]
    base: Base | None = None
    tool: str = "mirror"
    version: int = field(default=VERSION)

    @property
    def included(self) -> list[BlobEntry]:
        """The blobs whose bytes are in the tar."""
        return [blob for blob in self.blobs if not blob.in_base]

    def to_json(self) -> bytes:
        """The ``bundle.json`` bytes (what the signature covers)."""
        document: dict[str, Any] = {
            "format": FORMAT, "version": self.version, "created": self.created, "tool": self.tool,
            "base": None if self.base is None else _drop_none({
                "kind": self.base.kind, "digest": str(self.base.digest), "created": self.base.created}),
            "images": [_image_json(image) for image in self.images],
            "blobs": [_drop_none({"digest": str(blob.digest), "size": blob.size, "mediaType": blob.media_type,
                                  "inBase": True if blob.in_base else None}) for blob in self.blobs],
        }
        return json.dumps(document, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Bundle:
        """Parse ``bundle.json`` (bounded in size and nesting); BundleInvalid if it is not a bundle this reads."""
        document = _object(data, BUNDLE_JSON, MAX_JSON_MEMBER)
        if document.get("format") != FORMAT:
            raise BundleInvalid(f"{BUNDLE_JSON}: format is {document.get('format')!r}, not {FORMAT!r}")
        if document.get("version") != VERSION:
            raise BundleInvalid(f"{BUNDLE_JSON}: version {document.get('version')!r} is not supported "
                                f"(this mirror reads version {VERSION})")
        try:
            base = document.get("base")
            bundle = cls(
                created=str(document["created"]),
                images=tuple(_image(image) for image in document["images"]),
                blobs=tuple(_blob(blob) for blob in document["blobs"]),
                base=None if base is None else Base(str(base["kind"]), Digest.parse(base["digest"]),
                                                    base.get("created")),
                tool=str(document.get("tool", "")),
            )
        except (KeyError, TypeError, AttributeError, MirrorError) as exc:
            raise BundleInvalid(f"{BUNDLE_JSON}: malformed ({_why(exc)})") from exc
        listed: set[Digest] = set()
        for blob in bundle.blobs:
            if blob.digest in listed:
                raise BundleInvalid(f"{BUNDLE_JSON}: malformed (blob {blob.digest} is listed twice)")
            listed.add(blob.digest)
        return bundle


@dataclass(frozen=True)
class Inventory:
    """What a store holds (``mirror inventory``): the base of a delta export."""

    created: str
    blobs: tuple[Digest, ...]

    def to_json(self) -> bytes:
        """The ``inventory.json`` bytes."""
        return json.dumps({"format": INVENTORY_FORMAT, "version": VERSION, "created": self.created,
                           "blobs": [str(digest) for digest in self.blobs]}, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Inventory:
        """Parse ``inventory.json`` (bounded in size and nesting); raise BundleInvalid when it is not one."""
        document = _object(data, "inventory", MAX_INVENTORY)
        if document.get("format") != INVENTORY_FORMAT or document.get("version") != VERSION:
            raise BundleInvalid(f"not a version {VERSION} {INVENTORY_FORMAT} file")
        try:
            return cls(str(document["created"]), tuple(Digest.parse(d) for d in document["blobs"]))
        except (KeyError, TypeError, MirrorError) as exc:
            raise BundleInvalid(f"inventory: malformed ({_why(exc)})") from exc


def timestamp(when: datetime | None = None) -> str:
    """``when`` (default: now) as the UTC timestamp bundle files carry, e.g. ``2024-05-01T12:00:00Z``."""
    when = (when or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    return when.isoformat().replace("+00:00", "Z")


def parse_json(data: bytes, what: str, max_size: int = MAX_JSON_MEMBER) -> Any:
    """JSON from ``data``, bounded in size and nesting (``manifest.load_json``); else BundleInvalid naming ``what``."""
    return load_json(data, what, max_size=max_size, error=BundleInvalid)


def _object(data: bytes, what: str, max_size: int) -> dict[str, Any]:
    document = parse_json(data, what, max_size)
    if not isinstance(document, dict):
        raise BundleInvalid(f"{what}: not a JSON object")
    return document


def _image_json(image: ImageEntry) -> dict[str, Any]:
    return _drop_none({
        "reference": image.reference, "digest": str(image.digest), "mediaType": image.media_type,
        "sourceDigest": str(image.source_digest) if image.source_digest else None,
        "droppedPlatforms": list(image.dropped_platforms) or None,
        "referrers": [_drop_none({"digest": str(r.digest), "mediaType": r.media_type, "tag": r.tag})
                      for r in image.referrers],
        "layoutIndex": str(image.layout_index) if image.layout_index else None,
    })


def _image(raw: dict[str, Any]) -> ImageEntry:
    source, layout, reference = raw.get("sourceDigest"), raw.get("layoutIndex"), raw["reference"]
    Reference.parse(reference, None)  # the importer publishes under it
    return ImageEntry(
        reference=reference, digest=Digest.parse(raw["digest"]), media_type=str(raw["mediaType"]),
        source_digest=Digest.parse(source) if source else None,
        dropped_platforms=tuple(str(p) for p in raw.get("droppedPlatforms", [])),
        referrers=tuple(_referrer(r) for r in raw.get("referrers", [])),
        layout_index=Digest.parse(layout) if layout else None,
    )


def _referrer(raw: dict[str, Any]) -> Referrer:
    tag = raw.get("tag")
    return Referrer(Digest.parse(raw["digest"]), str(raw["mediaType"]), None if tag is None else check_tag(tag))


def _blob(raw: dict[str, Any]) -> BlobEntry:
    return BlobEntry(Digest.parse(raw["digest"]), _size(raw["size"]), str(raw["mediaType"]),
                     bool(raw.get("inBase", False)))


def _size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"size {value!r} is not a non-negative integer")
    return value


def _drop_none(mapping: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value is not None}


def _why(exc: Exception) -> str:
    return f"missing {exc}" if isinstance(exc, KeyError) else getattr(exc, "message", None) or str(exc)
