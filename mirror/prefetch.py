"""``mirror prefetch``: pull images through the same repositories the server resolves, to warm the cache."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from mirror.config import Config
from mirror.digest import Digest
from mirror.errors import MirrorError
from mirror.manifest import parse_lenient
from mirror.reference import Reference
from mirror.repository import Repository


@dataclass(frozen=True)
class Prefetched:
    """What prefetching one image came to: how many blobs, or why it failed."""

    text: str
    reference: Reference | None = None
    blobs: int = 0
    error: str | None = None


async def prefetch_images(resolve: Callable[[str], Repository], texts: list[str],
                          report: Callable[[Prefetched], None]) -> int:
    """Pull every image (all platforms of an index) through the repository ``resolve`` gives for its name;
    ``report`` each; return how many failed."""
    failures = 0
    for text in texts:
        try:
            reference = Reference.parse(text, None)
            count = await _prefetch_manifest(resolve(reference.name), reference.reference)
            report(Prefetched(text, reference, count))
        except MirrorError as exc:
            failures += 1
            report(Prefetched(text, error=exc.message))
    return failures


async def _prefetch_manifest(repository: Repository, reference: str) -> int:
    stored = await repository.manifest(reference)
    parsed = parse_lenient(stored.body, stored.media_type, stored.digest)
    count = 0
    for child in parsed.children:
        count += await _prefetch_manifest(repository, child["digest"])
    for descriptor in parsed.blobs:
        if descriptor.get("urls"):
            continue
        source = await repository.blob(Digest.parse(descriptor["digest"]))
        async for _ in source.chunks(0, source.size):
            pass
        count += 1
    return count


def run(config: Config, texts: list[str], report: Callable[[Prefetched], None]) -> int:
    """Prefetch ``texts`` into the store of ``config``; return how many failed."""
    from mirror.server import build  # the server's wiring, without its listening and signals

    async def prefetch() -> int:
        appliance = build(config)
        try:
            return await prefetch_images(appliance.repositories.resolve, texts, report)
        finally:
            await appliance.close_when_idle()

    return asyncio.run(prefetch())
