"""``mirror cache purge``: remove images from the pull-through cache, by name or because nobody used them lately.

Names resolve as the server resolves request names (``Repositories.resolve``): ``alpine:3.20`` names the default
upstream's cached image (``docker.io/library/alpine``; never the hosted repository of that name), and
``ghcr.io/org/app@sha256:...`` that upstream's. An image goes whole: its manifests (every platform of an index),
the tags pointing at it, its referrers and blob links (``Mirrored.purge``); the blob bytes nothing else
references go at the next ``mirror gc`` (or eviction).

Only cached content is purged. Imported images are pinned, hosted content: refused. So is every repository of
an upstream with ``allow_push``, whose pushed images cannot be told from cached ones, and of a registry with no
upstream configured; delete those through the API (``DELETE /v2/<name>/manifests/<reference>``).

A cached image is unused since its newest tag was written or revalidated with the upstream (a pull after
``manifest_ttl`` revalidates; while the upstream is unreachable pulls do not), or, untagged (pulled by digest),
since it was cached. Images an unused one shares with a used one (an index's platforms, referrers) stay.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mirror import storage
from mirror.config import Config
from mirror.digest import Digest
from mirror.errors import ConfigError, MirrorError, Unsupported
from mirror.reference import Reference
from mirror.repository import DefaultRoute, Hosted, Mirrored, Repositories


@dataclass(frozen=True)
class Purged:
    """What purging an image (``reference``), or a repository's unused images (None), came to, or why it failed."""

    reference: str | None
    repository: str = ""
    manifests: tuple[Digest, ...] = ()
    error: str | None = None


def _cache_of(repository: Hosted | Mirrored | DefaultRoute) -> Mirrored:
    """The cached repository behind ``repository``; raise Unsupported when it has none, or one that takes pushes."""
    inner = repository.mirrored if isinstance(repository, DefaultRoute) else repository
    if not isinstance(inner, Mirrored):
        raise Unsupported(f"{inner.name} is hosted: no upstream is configured for it")
    if inner.upstream.allow_push:
        raise Unsupported(f"{inner.name} takes pushes (allow_push): delete its images through the API")
    return inner


def purge_images(repositories: Repositories, texts: list[str]) -> list[Purged]:
    """Purge the cached images ``texts`` name; one result each."""
    results = []
    for text in texts:
        try:
            reference = Reference.parse(text, None)
            cache = _cache_of(repositories.resolve(reference.name))
            digest = cache.registry.resolve(cache.name, reference.reference)
            if digest is not None and cache.registry.store.pins.is_pinned(digest):
                raise Unsupported(f"{cache.name}@{digest} was imported, it is not cached: delete it through the API")
            results.append(Purged(text, cache.name, tuple(cache.purge([reference.reference]))))
        except MirrorError as exc:
            results.append(Purged(text, error=exc.message))
    return results


def purge_unused(repositories: Repositories, max_age: float, now: float) -> list[Purged]:
    """Purge the cached images unused for ``max_age`` seconds before ``now``; one result per repository losing any."""
    registry = repositories.registry
    metadata, pins = registry.metadata, registry.store.pins
    cutoff, results = now - max_age, []
    for name in metadata.repositories():
        try:
            cache = _cache_of(repositories.resolve(name))
        except MirrorError:
            continue
        if cache.name != name:
            continue  # a hosted name that the default route also looks up upstream
        used: dict[Digest, float] = {}
        for tag in metadata.tags(name):
            digest, written = metadata.resolve_tag(name, tag), metadata.tag_mtime(name, tag)
            if digest is not None and written is not None:
                used[digest] = max(used.get(digest, 0.0), written)
        linked = set(metadata.manifests(name))
        unused = {digest for digest in linked if not pins.is_pinned(digest)
                  and used.get(digest, metadata.manifest_link_changed(name, digest)) < cutoff}
        roots = unused - registry.store.reach(name, linked - unused)[0]
        if roots:
            results.append(Purged(None, name, tuple(cache.purge(sorted(map(str, roots))))))
    return results


def run(config: Config, texts: list[str], older_than: float | None = None) -> list[Purged]:
    """Purge ``texts`` (and with ``older_than`` seconds every image unused that long) from the store of ``config``."""
    from mirror.server import build  # the server's wiring, without its listening and signals

    if not storage.found(config):
        raise ConfigError("storage.root", f"there is no store at {config.storage.root}")

    async def purge() -> list[Purged]:
        appliance = build(config)
        try:
            results = purge_images(appliance.repositories, texts)
            if older_than is not None:
                results += purge_unused(appliance.repositories, older_than, time.time())
            return results
        finally:
            await appliance.close_when_idle()

    return asyncio.run(purge())
