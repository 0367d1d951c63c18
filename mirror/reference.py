"""Image references (``ghcr.io/org/app:1.0``, ``alpine``, ``repo@sha256:...``): parsing, normalisation.

References are normalised the way Docker does: a first path component that has no ``.`` or ``:`` and is not
``localhost`` is not a registry, so ``alpine`` means ``docker.io/library/alpine:latest``.

Content from an upstream registry lives in the store under the repository ``store_repository(host, path)``,
``<host>/<path>``, e.g. ``docker.io/library/alpine``. A host's port separator ``:`` is not allowed in a
repository name, so it becomes ``_`` (``127.0.0.1:5000/app`` is stored as ``127.0.0.1_5000/app``); host names
cannot contain ``_``, so the mapping is one to one.

A request names a repository in one of three forms (``resolve_name``): the docker daemon's
``/v2/library/alpine`` (the default upstream's, or hosted), the path prefix ``/v2/docker.io/library/alpine``,
and containerd's ``/v2/library/alpine?ns=docker.io``. Docker Hub's one-component names get ``library/``.
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


def registry_path(registry: str, path: str) -> str:
    """``path`` as ``registry`` names it: Docker Hub's official images live under ``library/``."""
    return f"library/{path}" if registry == DOCKER_HUB and "/" not in path else path


def store_prefix(registry: str) -> str:
    """The first component of the store repositories of ``registry`` (``127.0.0.1:5000`` -> ``127.0.0.1_5000``)."""
    return normalise_registry(registry).replace(":", "_")


def _prefix_registry(component: str) -> str | None:
    """The registry a name's first component names (store form ``host_port`` too), or None when it names none."""
    host, underscore, port = component.rpartition("_")
    candidate = f"{host}:{port}" if underscore and port.isdigit() else component
    if "." in candidate or ":" in candidate or candidate == "localhost":
        return normalise_registry(candidate) if _HOST.fullmatch(candidate) else None
    return None


@dataclass(frozen=True)
class RequestName:
    """What a request's repository name means: hosted content only (``registry`` None), or ``path`` of
    ``registry``, named explicitly (prefix or ``?ns=``) or through the default upstream (``hosted`` is then the
    hosted repository of the same name, consulted first)."""

    name: str
    registry: str | None
    path: str
    explicit: bool

    @property
    def store(self) -> str:
        """The store repository holding the content: the registry's, or the hosted name."""
        return store_repository(self.registry, self.path) if self.registry else self.name


def resolve_name(name: str, ns: str | None, registries: frozenset[str], default: str | None) -> RequestName:
    """Resolve request name ``name`` (with containerd's ``ns``) against the configured ``registries`` (canonical
    names) and the ``default`` registry; raise NameInvalid when it is not a repository name."""
    check_name(name)
    first, _, rest = name.partition("/")
    prefixed = _prefix_registry(first) if rest else None
    if prefixed is None and rest and first in {store_prefix(r) for r in registries}:
        prefixed = normalise_registry(first)
    if prefixed is not None:
        return RequestName(name, prefixed, registry_path(prefixed, rest), True)
    if ns:
        registry = normalise_registry(ns)
        if not _HOST.fullmatch(registry):
            raise NameInvalid(f"invalid registry {ns[:200]!r} in ns")
        return RequestName(name, registry, registry_path(registry, name), True)
    if default:
        return RequestName(name, normalise_registry(default), registry_path(normalise_registry(default), name), False)
    return RequestName(name, None, name, False)


def store_repository(registry_host: str, path: str) -> str:
    """The store repository holding ``path`` of upstream ``registry_host`` (``docker.io/library/x``)."""
    host = normalise_registry(registry_host)
    if not _HOST.fullmatch(host) or host.startswith("["):
        raise NameInvalid(f"invalid registry host {registry_host[:200]!r}")
    return check_name(f"{store_prefix(host)}/{path}")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: registry (None: a hosted repository of this appliance), repository path,
    and a tag, a digest or both."""

    registry: str | None
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str, default_registry: str | None = DOCKER_HUB) -> Reference:
        """Parse ``text``; raise NameInvalid (or TagInvalid, DigestInvalid) when it is not a reference. A name
        without a registry is of ``default_registry``, or with None a hosted repository's."""
        rest, _, digest_text = text.strip().partition("@")
        digest = Digest.parse(digest_text) if digest_text else None
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, path = normalise_registry(first), remainder
            if not _HOST.fullmatch(registry):
                raise NameInvalid(f"invalid registry in reference {text[:200]!r}")
        else:
            registry, path = default_registry and normalise_registry(default_registry), rest
        path, colon, tag = path.rpartition(":") if ":" in path else (path, "", "")
        path = registry_path(registry, path) if registry else path
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
        """``registry/repository`` without tag or digest, e.g. ``docker.io/library/alpine`` (a hosted one's:
        ``repository``)."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    @property
    def store_name(self) -> str:
        """The store repository that holds this image."""
        return store_repository(self.registry, self.repository) if self.registry else self.repository

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
