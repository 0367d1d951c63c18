"""``mirror bundle export``: resolve images, then stream them into one bundle tar (see FORMAT.md)."""
from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from mirror import manifest as manifests
from mirror.bundle import format, signing
from mirror.bundle.archive import BundleArchive, Output, TarWriter, resolve_parts
from mirror.bundle.format import Base, BlobEntry, Bundle, ImageEntry, Inventory, Referrer
from mirror.bundle.progress import Progress
from mirror.bundle.sources import Sources
from mirror.config import Config
from mirror.digest import Digest, Hasher
from mirror.errors import BundleError, BundleInvalid, UpstreamInvalid
from mirror.reference import Reference

ATTESTATION = "attestation-manifest"


@dataclass
class Plan:
    """Everything one bundle will hold, resolved before a byte of a layer is written."""

    images: list[ImageEntry] = field(default_factory=list)
    manifests: dict[Digest, tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[Digest, tuple[int, str, Reference]] = field(default_factory=dict)
    docker: list[dict[str, Any]] = field(default_factory=list)

    def entries(self, base: set[Digest]) -> list[BlobEntry]:
        """Every blob (manifests first), marked ``in_base`` when the target already has it."""
        found = [BlobEntry(d, len(body), kind, d in base) for d, (body, kind) in self.manifests.items()]
        return found + [BlobEntry(d, size, kind, d in base)
                        for d, (size, kind, _) in self.blobs.items() if d not in self.manifests]


def run(config: Config, output: str, refs: Sequence[str] = (), images_file: str | None = None,
        sign_key: str | None = None, platforms: Sequence[str] = (), base: str | None = None,
        split: int | None = None) -> int:
    """Export ``refs`` (and those listed in ``images_file``) into ``output``; return the exit status."""
    texts = [*_listed(images_file), *refs]
    if not texts:
        print("mirror: nothing to export: give REF arguments or --images LIST.yaml", file=sys.stderr)
        return 2
    key = signing.load_private_key(sign_key) if sign_key else None
    base_info, known = read_base(base) if base else (None, set())
    wanted = [_platform(text) for text in platforms]
    return asyncio.run(_export(config, Path(output), texts, key, wanted, base_info, known, split))


async def _export(config: Config, output: Path, texts: list[str], key: Any,
                  platforms: list[tuple[str, ...]], base: Base | None, known: set[Digest],
                  split: int | None) -> int:
    sources = Sources(config)
    try:
        references = [sources.resolve(text) for text in texts]
        plan = Plan()
        for ref in references:
            await _resolve(sources, plan, ref, platforms)
        created = datetime.now(UTC)
        bundle = Bundle(format.timestamp(created), tuple(plan.images), tuple(plan.entries(known)), base)
        paths = await _write(sources, plan, bundle, key, Output(output, split), int(created.timestamp()))
    finally:
        await sources.close()
    included = bundle.included
    print(f"wrote {', '.join(map(str, paths))}: {len(bundle.images)} images, {len(included)} blobs "
          f"({sum(b.size for b in included)} bytes), {len(bundle.blobs) - len(included)} left to the base; "
          f"bundle id {Digest.of(bundle.to_json())}, {'signed' if key else 'unsigned'}")
    return 0


async def _resolve(sources: Sources, plan: Plan, ref: Reference, platforms: list[tuple[str, ...]]) -> None:
    """Add image ``ref`` (filtered to ``platforms``), its referrers and its layout index to the plan."""
    body, media_type, _ = await sources.manifest(ref, ref.reference)
    original = manifests.parse(body, media_type)
    top, dropped = _only(ref, original, platforms)
    images = await _add_manifest(sources, plan, ref, top)
    referrers = []
    for tag, referrer in await sources.referrers(ref, original.digest):
        body, media_type, _ = await sources.manifest(ref, str(referrer))
        await _add_manifest(sources, plan, ref, manifests.parse(body, media_type))
        referrers.append(Referrer(referrer, media_type, tag))
    source_digest = original.digest if dropped else None
    layout = await _layout_index(sources, ref, top)
    if layout is not None:
        plan.manifests.setdefault(layout.digest, (layout.body, layout.media_type))
    plan.images.append(ImageEntry(str(ref), top.digest, top.media_type, source_digest, dropped,
                                  tuple(referrers), layout.digest if layout else None))
    if len(images) == 1:
        plan.docker.append(_docker_entry(ref, images[0]))
    why = sources.from_store(ref)
    print(f"{ref}: {top.digest} ({len(images)} image{'s' * (len(images) != 1)}, {len(referrers)} referrers)"
          f"{f' from the store ({why})' if why else ''}")


def _only(ref: Reference, top: manifests.Manifest,
          platforms: list[tuple[str, ...]]) -> tuple[manifests.Manifest, tuple[str, ...]]:
    """``top`` with only the entries of ``platforms`` (rewritten when any was dropped), and what was dropped."""
    if not top.is_index or not platforms:
        return top, ()
    kept, dropped = _filter(top.children, platforms)
    if not kept:
        raise BundleError(f"{ref}: none of its platforms is one of {', '.join('/'.join(p) for p in platforms)}")
    if not dropped:
        return top, ()
    rewritten = manifests.parse(json.dumps(dict(top.data, manifests=kept), indent=1).encode(), top.media_type)
    print(f"{ref}: dropped platforms {', '.join(dropped)}; index rewritten {top.digest} -> {rewritten.digest} "
          f"(the original digest cannot be pulled from the importing mirror)")
    return rewritten, dropped


async def _add_manifest(sources: Sources, plan: Plan, ref: Reference,
                        manifest: manifests.Manifest) -> list[manifests.Manifest]:
    """Add ``manifest`` and everything below it to the plan; return the image manifests (no attestations)."""
    plan.manifests.setdefault(manifest.digest, (manifest.body, manifest.media_type))
    for blob in manifest.blobs:
        if not blob.get("urls"):  # foreign layers stay where they are
            media_type = str(blob.get("mediaType") or "application/octet-stream")
            plan.blobs.setdefault(Digest.parse(blob["digest"]), (blob["size"], media_type, ref))
    if not manifest.is_index:
        return [manifest]
    images = []
    for child in manifest.children:
        body, media_type, _ = await sources.manifest(ref, child["digest"])
        found = await _add_manifest(sources, plan, ref, manifests.parse(body, media_type))
        if _annotation(child, "vnd.docker.reference.type") != ATTESTATION:
            images += found
    return images


async def _layout_index(sources: Sources, ref: Reference, top: manifests.Manifest) -> manifests.Manifest | None:
    """An OCI index to stand for a Docker-typed image in index.json, or None for OCI-typed images.

    OCI layout readers (skopeo) skip index.json entries that are not of OCI media types; this index lists
    the manifest list's entries, or the single manifest with the platform its config names.
    """
    if top.media_type == manifests.DOCKER_MANIFEST_LIST:
        entries = top.children
    elif top.media_type == manifests.DOCKER_MANIFEST:
        config = bytearray()
        async for chunk in sources.blob(ref, Digest.parse(top.data["config"]["digest"])):
            config += chunk
        image = format.parse_json(bytes(config), f"config of {ref}")
        platform = {key: image[key] for key in ("os", "architecture", "variant") if image.get(key)}
        entries = [{"mediaType": top.media_type, "digest": str(top.digest), "size": len(top.body),
                    "platform": platform}]
    else:
        return None
    body = json.dumps({"schemaVersion": 2, "mediaType": manifests.OCI_INDEX, "manifests": entries}, indent=1)
    return manifests.parse(body.encode(), manifests.OCI_INDEX)


def _filter(children: list[Any], platforms: list[tuple[str, ...]]) -> tuple[list[Any], tuple[str, ...]]:
    """The index entries to keep (named platforms, attestations of kept images), and the dropped platforms."""
    kept = [child for child in children if any(_matches(child.get("platform") or {}, p) for p in platforms)]
    digests = {child["digest"] for child in kept}
    kept += [child for child in children if child not in kept
             and _annotation(child, "vnd.docker.reference.type") == ATTESTATION
             and _annotation(child, "vnd.docker.reference.digest") in digests]
    dropped = tuple(_platform_name(child.get("platform") or {}) for child in children if child not in kept
                    and _annotation(child, "vnd.docker.reference.type") != ATTESTATION)
    return [child for child in children if child in kept], dropped


def _matches(platform: dict[str, Any], wanted: tuple[str, ...]) -> bool:
    have = (platform.get("os"), platform.get("architecture"), platform.get("variant"))
    return all(want == got for want, got in zip(wanted, have, strict=False))


def _platform(text: str) -> tuple[str, ...]:
    parts = tuple(text.split("/"))
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise BundleError(f"--platform {text!r}: expected os/arch or os/arch/variant")
    return parts


def _platform_name(platform: dict[str, Any]) -> str:
    return "/".join(str(platform[k]) for k in ("os", "architecture", "variant") if platform.get(k))


def _annotation(descriptor: dict[str, Any], key: str) -> str | None:
    return (descriptor.get("annotations") or {}).get(key)


def _docker_entry(ref: Reference, image: manifests.Manifest) -> dict[str, Any]:
    """The ``docker load`` entry (manifest.json) of a single-platform image."""
    layers = image.data.get("layers") or []
    return {"Config": format.blob_member(Digest.parse(image.data["config"]["digest"])),
            "RepoTags": [f"{ref.name}:{ref.tag}"] if ref.tag else [],
            "Layers": [format.blob_member(Digest.parse(layer["digest"])) for layer in layers]}


async def _write(sources: Sources, plan: Plan, bundle: Bundle, key: Any, output: Output,
                 mtime: int) -> list[Path]:
    try:
        tar = TarWriter(output, mtime)
        bundle_json, layout = bundle.to_json(), _layout_members(plan, bundle)
        for name, data in [(format.BUNDLE_JSON, bundle_json), *layout]:
            if len(data) > format.MAX_JSON_MEMBER:
                raise BundleError(f"{name} would be {len(data)} bytes, over the {format.MAX_JSON_MEMBER} byte "
                                  f"limit of readers: export fewer images per bundle")
        tar.add(format.BUNDLE_JSON, bundle_json)
        if key is not None:
            tar.add(format.SIGNATURE, signing.sign(key, bundle_json))
        for name, data in layout:
            tar.add(name, data)
        with Progress("export", sum(blob.size for blob in bundle.included)) as progress:
            for blob in bundle.included:
                await _write_blob(sources, plan, tar, blob, progress)
        tar.close()
        return output.finish()
    except BaseException:
        output.abort()
        raise


def _layout_members(plan: Plan, bundle: Bundle) -> list[tuple[str, bytes]]:
    """``oci-layout``, ``index.json`` and ``manifest.json`` (docker load entries whose blobs are all here)."""
    included = {blob.digest for blob in bundle.included}
    index = {"schemaVersion": 2, "mediaType": manifests.OCI_INDEX, "manifests": [
        _layout_descriptor(plan, image) for image in bundle.images]}
    docker = [entry for entry in plan.docker
              if all(format.member_digest(name) in included for name in [entry["Config"], *entry["Layers"]])]
    return [(format.OCI_LAYOUT, json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
            (format.INDEX_JSON, json.dumps(index, indent=1).encode()),
            (format.DOCKER_MANIFEST, json.dumps(docker, indent=1).encode())]


def _layout_descriptor(plan: Plan, image: ImageEntry) -> dict[str, Any]:
    """The index.json entry of ``image``: its manifest, or the OCI index standing for it."""
    digest = image.layout_index or image.digest
    body, media_type = plan.manifests[digest]
    return {"mediaType": media_type, "digest": str(digest), "size": len(body),
            "annotations": {format.REF_NAME: image.reference, format.CONTAINERD_NAME: image.reference}}


async def _write_blob(sources: Sources, plan: Plan, tar: TarWriter, blob: BlobEntry,
                      progress: Progress) -> None:
    tar.begin(format.blob_member(blob.digest), blob.size)
    if blob.digest in plan.manifests:
        tar.write(plan.manifests[blob.digest][0])
        progress.update(blob.size)
    else:
        hasher = Hasher(blob.digest.algorithm)
        async for chunk in sources.blob(plan.blobs[blob.digest][2], blob.digest):
            if hasher.size + len(chunk) > blob.size:
                raise UpstreamInvalid(f"blob {blob.digest} is longer than its {blob.size} bytes")
            hasher.update(chunk)
            tar.write(chunk)
            progress.update(len(chunk))
        if hasher.digest() != blob.digest:
            raise UpstreamInvalid(f"blob {blob.digest}: its bytes hash to {hasher.digest()}")
    tar.end()


def read_base(path: str) -> tuple[Base, set[Digest]]:
    """What a delta's target already has, from an old bundle tar, its bundle.json or an inventory.json."""
    first = resolve_parts([path])[0]
    with open(first, "rb") as file:
        is_json = file.read(1) == b"{"
        file.seek(0)
        data = file.read(format.MAX_INVENTORY + 1) if is_json else b""
    if is_json:
        document = format.parse_json(data, path, format.MAX_INVENTORY)
        is_inventory = isinstance(document, dict) and document.get("format") == format.INVENTORY_FORMAT
        kind = "inventory" if is_inventory else "bundle"
    else:
        with BundleArchive([path]) as archive:
            data, kind = archive.bundle_json, "bundle"
    if kind == "inventory":
        inventory = Inventory.from_json(data)
        return Base(kind, Digest.of(data), inventory.created), set(inventory.blobs)
    old = Bundle.from_json(data)
    return Base(kind, Digest.of(data), old.created), {blob.digest for blob in old.blobs}


def _listed(images_file: str | None) -> list[str]:
    """The references in an images file: a YAML list of strings, or a mapping with an ``images`` list."""
    if not images_file:
        return []
    try:
        listed = yaml.safe_load(Path(images_file).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise BundleInvalid(f"{images_file}: cannot read the image list ({exc})") from exc
    if isinstance(listed, dict):
        listed = listed.get("images")
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        raise BundleInvalid(f"{images_file}: expected a list of image references (or images: [...])")
    return listed

