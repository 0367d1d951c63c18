"""The store-consistency check every attack test ends with: the store is as a registry must keep it."""
from __future__ import annotations

from pathlib import Path

from mirror import storage
from mirror.digest import Hasher


def store_problems(root: str | Path) -> list[str]:
    """What is wrong with the store at ``root``: a blob whose bytes do not hash to its name, a tag that does not
    resolve to a manifest its repository holds, a manifest whose bytes are missing; empty when consistent."""
    store = storage.open(root)
    problems = []
    for digest in store.blobs.iter():
        hasher = Hasher(digest.algorithm)
        with store.blobs.open(digest) as file:
            while chunk := file.read(1 << 20):
                hasher.update(chunk)
        if (actual := hasher.digest()) != digest:
            problems.append(f"blob {digest} holds bytes of {actual}")
    for name in store.metadata.repositories():
        for tag in store.metadata.tags(name):
            target = store.metadata.resolve_tag(name, tag)
            if target is None or store.metadata.manifest_media_type(name, target) is None:
                problems.append(f"tag {name}:{tag} points at {target}, which {name} does not hold")
        for digest in store.metadata.manifests(name):
            if store.blobs.stat(digest) is None:
                problems.append(f"manifest {name}@{digest} has no bytes")
    store.close()
    return problems


def assert_store_consistent(root: str | Path) -> None:
    """Fail naming every inconsistency of the store at ``root``."""
    problems = store_problems(root)
    assert not problems, "store inconsistent:\n" + "\n".join(problems)
