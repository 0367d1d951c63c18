"""Image references: Docker's normalisation and the store repository names of upstream content."""
from __future__ import annotations

import pytest

from mirror.digest import Digest
from mirror.errors import DigestInvalid, NameInvalid, TagInvalid
from mirror.reference import Reference, store_repository

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest", "full"), [
    ("alpine", "docker.io", "library/alpine", "latest", None, "docker.io/library/alpine:latest"),
    ("alpine:3.20", "docker.io", "library/alpine", "3.20", None, "docker.io/library/alpine:3.20"),
    ("bitnami/redis", "docker.io", "bitnami/redis", "latest", None, "docker.io/bitnami/redis:latest"),
    ("index.docker.io/library/alpine:3", "docker.io", "library/alpine", "3", None, "docker.io/library/alpine:3"),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None, "docker.io/library/alpine:latest"),
    ("ghcr.io/org/app@" + DIGEST, "ghcr.io", "org/app", None, DIGEST, "ghcr.io/org/app@" + DIGEST),
    ("ghcr.io/org/app:1.0@" + DIGEST, "ghcr.io", "org/app", "1.0", DIGEST, "ghcr.io/org/app:1.0@" + DIGEST),
    ("localhost/app", "localhost", "app", "latest", None, "localhost/app:latest"),
    ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000", "team/app", "v1", None, "127.0.0.1:5000/team/app:v1"),
    ("Quay.IO/org/app", "quay.io", "org/app", "latest", None, "quay.io/org/app:latest"),
])
def test_parse_normalises_like_docker(text, registry, repository, tag, digest, full):
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert ref.digest == (Digest.parse(digest) if digest else None)
    assert str(ref) == full
    assert Reference.parse(full) == ref
    assert ref.reference == (digest or tag)


@pytest.mark.parametrize(("text", "error"), [
    ("Alpine", NameInvalid), ("ghcr.io/Org/app", NameInvalid), ("ghcr.io/org/app:bad tag", TagInvalid),
    ("alpine@sha256:abc", DigestInvalid), ("ghcr.io/../etc", NameInvalid), ("", NameInvalid),
])
def test_parse_refuses_what_is_not_a_reference(text, error):
    with pytest.raises(error):
        Reference.parse(text)


def test_store_repository_is_host_slash_path_with_port_colon_as_underscore():
    assert store_repository("docker.io", "library/alpine") == "docker.io/library/alpine"
    assert store_repository("registry-1.docker.io", "library/alpine") == "docker.io/library/alpine"
    assert store_repository("127.0.0.1:5000", "team/app") == "127.0.0.1_5000/team/app"
    assert Reference.parse("ghcr.io/org/app:1").store_name == "ghcr.io/org/app"
    with pytest.raises(NameInvalid):
        store_repository("bad host", "app")
    with pytest.raises(NameInvalid):
        store_repository("ghcr.io", "Upper/case")


def test_with_digest_keeps_the_tag():
    ref = Reference.parse("alpine:3.20").with_digest(Digest.parse(DIGEST))
    assert str(ref) == f"docker.io/library/alpine:3.20@{DIGEST}" and ref.reference == DIGEST
