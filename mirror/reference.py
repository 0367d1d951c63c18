"""Image references (``ghcr.io/org/app:1.0``, ``alpine``, ``repo@sha256:...``): parsing, normalisation.

References are normalised the way Docker does: a first path component that has no ``.`` or ``:`` and is not
``localhost`` is not a registry, so ``alpine`` means ``docker.io/library/alpine:latest``.

Content from an upstream registry lives in the store under the repository ``store_repository(host, path)``,
``<host>/<path>``, e.g. ``docker.io/library/alpine``. A host's port separator ``:`` is not allowed in a
repository name, so it becomes ``_`` (``127.0.0.1:5000/app`` is stored as ``127.0.0.1_5000/app``); host names
cannot contain ``_``, so the mapping is one to one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from mirror.digest import Digest
from mirror.errors import NameInvalid
from mirror.storage.paths import check_name, check_tag

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::\d{1,5})?|\[[0-9A-Fa-f:]+\](?::\d{1,5})?")


def normalise_registry(host: str) -> str:
    """The canonical name of registry ``host`` (lower case; Docker Hub's aliases become ``docker.io``)."""
    host = host.lower()
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def store_repository(registry_host: str, path: str) -> str:
    """The store repository holding ``path`` of upstream ``registry_host`` (``docker.io/library/x``)."""
    host = normalise_registry(registry_host)
    if not _HOST.fullmatch(host) or host.startswith("["):
        raise NameInvalid(f"invalid registry host {registry_host[:200]!r}")
    return check_name(f"{host.replace(':', '_')}/{path}")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: registry, repository path, and a tag, a digest or both."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, default_registry: str = DOCKER_HUB) -> Reference:
        """Parse ``text``; raise NameInvalid (or TagInvalid, DigestInvalid) when it is not a reference."""
        rest, _, digest_text = text.strip().partition("@")
        digest = Digest.parse(digest_text) if digest_text else None
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = normalise_registry(first), remainder
            if not _HOST.fullmatch(registry):
                raise NameInvalid(f"invalid registry in reference {text[:200]!r}")
        else:
            registry, path = normalise_registry(default_registry), rest
        path, colon, tag = path.rpartition(":") if ":" in path else (path, "", "")
        if registry == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        try:
            check_name(path)
        except NameInvalid:
            raise NameInvalid(f"invalid repository in reference {text[:200]!r}") from None
        if colon:
            check_tag(tag)
        elif digest is None:
            tag = "latest"
        return cls(registry, path, tag or None, digest)

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest, e.g. ``docker.io/library/alpine``."""
        return f"{self.registry}/{self.repository}"

    @property
    def store_name(self) -> str:
        """The store repository that holds this image."""
        return store_repository(self.registry, self.repository)

    @property
    def reference(self) -> str:
        """What to ask a registry's manifest endpoint for: the digest if there is one, else the tag."""
        return str(self.digest) if self.digest else str(self.tag)

    def with_digest(self, digest: Digest) -> Reference:
        """This reference pinned to ``digest`` (the tag is kept)."""
        return replace(self, digest=digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text
