"""Where an export reads images from: the configured upstreams (with their credentials), then the local store.

Names resolve as the server resolves them (``reference.resolve_name``): ``team/app:1`` is the hosted
repository's image when the store holds it there, else the default upstream's (``docker.io/team/app``).
Tags are asked of the upstream first (it knows where a tag points now) and of the store when the upstream
fails or is not configured (``from_store`` says why); anything by digest and every blob is taken from the store
when it has it. An upstream that stops answering costs one timeout, not one per image: its client's breaker
(``upstream/health.py``) fails the requests after it at once.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mirror import storage
from mirror.config import Config
from mirror.digest import Digest
from mirror.errors import BlobUnknown, ManifestUnknown, MirrorError, UpstreamNotFound
from mirror.reference import DOCKER_HUB, Reference, resolve_name
from mirror.registry import Registry
from mirror.upstream import UpstreamClient

CHUNK = 1 << 20
# tags holding an image's signatures: cosign's, and (no suffix) the referrers tag schema's index of its referrers
SIGNATURE_TAG_SUFFIXES = ("", ".sig", ".att", ".sbom")


class Sources:
    """Manifests, blobs and referrers of images, from upstreams or the local store."""

    def __init__(self, config: Config):
        self._config = config
        self._clients: dict[str, UpstreamClient] = {}
        self._store_reasons: dict[tuple[str, str], str] = {}  # (name, tag) read from the store -> why
        self._store = Registry(storage.connect(config)) if storage.found(config) else None

    def resolve(self, text: str) -> Reference:
        """The image ``text`` names: a hosted repository's when the store holds it there, else a registry's
        (the default upstream's, or Docker Hub's as docker names images, for a name without a registry)."""
        ref = Reference.parse(text, None)
        if ref.registry is not None:
            return ref
        with contextlib.suppress(ManifestUnknown):
            if self._store is not None and self._store.get_manifest(ref.repository, ref.reference):
                return ref
        registries = frozenset(upstream.name for upstream in self._config.upstreams)
        request = resolve_name(ref.repository, None, registries, self._config.default_upstream or DOCKER_HUB)
        return Reference(request.registry, request.path, ref.tag, ref.digest)

    async def manifest(self, ref: Reference, reference: str) -> tuple[bytes, str, Digest]:
        """Body, media type and digest of ``reference`` (tag or digest) in the repository of ``ref``."""
        problems: list[str] = []
        order = (self._from_store, self._from_upstream)
        for source in order if Digest.is_digest(reference) else reversed(order):
            try:
                found = await source(ref, reference)
            except (MirrorError, OSError) as exc:
                problems.append(getattr(exc, "message", None) or str(exc))
                continue
            if found is not None:
                if source == self._from_store and not Digest.is_digest(reference):
                    self._store_reasons[(ref.name, reference)] = self._not_upstream(ref, problems)
                return found
        problems = problems or ["no upstream is configured for it and the store does not hold it"]
        separator = "@" if Digest.is_digest(reference) else ":"
        raise ManifestUnknown(f"cannot resolve {ref.name}{separator}{reference}: {'; '.join(problems)}")

    def from_store(self, ref: Reference) -> str | None:
        """Why the tag of image ``ref`` was read from the store rather than from its upstream; None if it was not."""
        return self._store_reasons.get((ref.name, ref.reference))

    async def blob(self, ref: Reference, digest: Digest) -> AsyncIterator[bytes]:
        """The bytes of blob ``digest`` of the image ``ref``, in chunks."""
        if self._store is not None and self._store.blobs.stat(digest) is not None:
            with self._store.blobs.open(digest) as file:
                while chunk := file.read(CHUNK):
                    yield chunk
            return
        client = self._client(ref)
        if client is None:
            raise BlobUnknown(f"blob {digest} of {ref.name} is not in the store and no upstream serves "
                              f"{ref.registry}")
        async with client.stream_blob(ref.repository, digest) as stream:
            async for chunk in stream.aiter(CHUNK):
                yield chunk

    async def referrers(self, ref: Reference, subject: Digest) -> list[tuple[str | None, Digest]]:
        """(tag or None, digest) of each manifest referring to ``subject``, once each: cosign-style tags and the
        referrers tag schema index, then the upstream's referrers (its API or that index) and the store's."""
        found: list[tuple[str | None, Digest]] = []
        for suffix in SIGNATURE_TAG_SUFFIXES:
            tag = f"{subject.algorithm}-{subject.hex}{suffix}"
            with contextlib.suppress(ManifestUnknown):
                found.append((tag, (await self.manifest(ref, tag))[2]))
        listed: list[dict] = []
        client = self._client(ref)
        if client is not None:
            with contextlib.suppress(MirrorError):
                listed += await client.referrers(ref.repository, subject)
        if self._store is not None:
            with contextlib.suppress(MirrorError):
                listed += self._store.referrers(ref.store_name, subject)
        known = {digest for _, digest in found}
        for digest in dict.fromkeys(Digest.parse(descriptor["digest"]) for descriptor in listed):
            if digest not in known:
                found.append((None, digest))
        return found

    async def close(self) -> None:
        """Close the upstream connections."""
        for client in self._clients.values():
            await client.close()

    async def _from_store(self, ref: Reference, reference: str) -> tuple[bytes, str, Digest] | None:
        if self._store is None:
            return None
        stored = self._store.get_manifest(ref.store_name, reference)
        return stored.body, stored.media_type, stored.digest

    async def _from_upstream(self, ref: Reference, reference: str) -> tuple[bytes, str, Digest] | None:
        client = self._client(ref)
        if client is None:
            return None
        try:
            return await client.get_manifest(ref.repository, reference)
        except UpstreamNotFound as exc:
            raise ManifestUnknown(exc.message) from exc

    def _not_upstream(self, ref: Reference, problems: list[str]) -> str:
        """Why a tag of ``ref`` did not come from its upstream, whose failures were ``problems``."""
        client = self._client(ref)
        if client is None:
            return f"no upstream is configured for {ref.registry}" if ref.registry else "a hosted repository"
        if not client.health.up:
            return f"upstream {client.upstream.name} is down: {client.health.reason}"
        return "; ".join(problems)

    def _client(self, ref: Reference) -> UpstreamClient | None:
        upstream = self._config.upstream(ref.registry) if ref.registry else None
        if upstream is None:
            return None
        if upstream.name not in self._clients:
            self._clients[upstream.name] = UpstreamClient(upstream)
        return self._clients[upstream.name]
