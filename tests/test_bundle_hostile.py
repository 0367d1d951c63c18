"""Hostile bundles (issue 12): each is refused with one line and exit 1, and leaves the store's visible content as
it was. The bundles are valid exports rewritten with tarfile, re-signed with the trusted key when the attack is
about what happens after the signature check."""
from __future__ import annotations

import io
import json
import os
import tarfile
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mirror import storage
from mirror.bundle import format, signing
from mirror.digest import Digest
from mirror.manifest import OCI_MANIFEST
from tests.consistency import assert_store_consistent
from tests.images import build_image, build_index, canonical_json
from tests.test_bundle import export, fill, mirror, snapshot, write_config

DEEP = 100_000
HUGE = 3 * 2**29  # 1.5 GiB, only ever claimed by a header over a hole in a sparse file


@pytest.fixture
def signed(tmp_path):
    """A signed bundle of alpine:3.20 then ghcr.io/org/app:1.0 (an index), its key, and an empty target store."""
    root = tmp_path / "source-store"
    alpine, app = build_image("alpine", layers=2), build_index("app", layers=2)
    fill(root, "alpine:3.20", alpine)
    fill(root, "ghcr.io/org/app:1.0", app)
    assert mirror("bundle", "keygen", tmp_path / "sign.key") == 0
    bundle = export({"config": write_config(tmp_path / "source.yaml", root)}, tmp_path / "out.tar",
                    "--sign-key", tmp_path / "sign.key")
    target = tmp_path / "target-store"
    storage.open(target).close()  # an empty store, as an import opens it
    return SimpleNamespace(path=bundle, key=tmp_path / "sign.key", pub=tmp_path / "sign.key.pub", alpine=alpine,
                           app=app, root=target, config=write_config(tmp_path / "target.yaml", target))


def rebuild(bundle: Path, edit: Callable[[dict[str, Any]], None] | None = None, *, key: Path | None = None,
            blobs: Sequence[bytes] = (), bundle_json: bytes | None = None,
            members: dict[str, bytes] | None = None) -> Path:
    """``bundle`` rewritten: bundle.json edited (or replaced) and signed, members added, unlisted blobs left out."""
    with tarfile.open(bundle) as tar:
        found = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
    document = json.loads(found.pop(format.BUNDLE_JSON))
    found.pop(format.SIGNATURE, None)
    if edit is not None:
        edit(document)
    data = json.dumps(document, indent=1).encode() if bundle_json is None else bundle_json
    listed = {Digest.parse(blob["digest"]) for blob in document["blobs"]}
    found |= {format.blob_member(Digest.of(blob)): blob for blob in blobs} | (members or {})
    if key is not None:
        found.setdefault(format.SIGNATURE, signing.sign(signing.load_private_key(key), data))
    signature = found.pop(format.SIGNATURE, None)
    out = [(format.BUNDLE_JSON, data), *([(format.SIGNATURE, signature)] if signature is not None else [])]
    out += [(name, body) for name, body in found.items() if format.member_digest(name) in (None, *listed)]
    with tarfile.open(bundle, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in out:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return bundle


def manifest_of(bundle: Path, digest: str) -> dict[str, Any]:
    """The parsed manifest ``digest`` of ``bundle``."""
    with tarfile.open(bundle) as tar:
        return json.loads(tar.extractfile(format.blob_member(Digest.parse(digest))).read())


def swap(document: dict[str, Any], old: str, body: bytes, media_type: str | None = None) -> None:
    """Make bundle.json list ``body`` (as ``media_type``, or as before) where it listed manifest ``old``."""
    new = str(Digest.of(body))
    for entry in [*document["blobs"], *document["images"]]:
        if entry["digest"] == old:
            entry["digest"] = new
    for blob in document["blobs"]:
        if blob["digest"] == new:
            blob.update(size=len(body), mediaType=media_type or blob["mediaType"])


def changed(bundle: SimpleNamespace, digest: str, change: Callable[[dict[str, Any]], None]) -> Path:
    """The signed bundle with manifest ``digest`` (an image's own) replaced by a copy ``change`` altered."""
    manifest = manifest_of(bundle.path, digest)
    change(manifest)
    body = canonical_json(manifest)
    return rebuild(bundle.path, lambda document: swap(document, digest, body), key=bundle.key, blobs=[body])


def refused(bundle: SimpleNamespace, capsys, *extra: str | Path, command: str = "import") -> str:
    """Import (or verify) ``bundle``: assert a one-line refusal, exit 1, an untouched store; return stderr."""
    arguments = ("--config", bundle.config) if command == "import" else ()
    assert mirror("bundle", command, *arguments, "--trust", bundle.pub, *extra, bundle.path) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if command == "import":
        lines = [line for line in err.splitlines() if line.startswith("mirror:")]
        assert len(lines) == 1 and lines[0].startswith("mirror: import refused: ") and err.endswith(lines[0] + "\n")
    else:
        assert f"{bundle.path}: INVALID" in err
    store = storage.open(bundle.root)
    assert not store.metadata.repositories() and not list(store.blobs.iter())
    assert not list((bundle.root / "state" / "imports").glob("*"))
    store.close()
    assert_store_consistent(bundle.root)
    return err


def peak_memory(run: Callable[[], str]) -> tuple[str, int]:
    """What ``run`` returned, and the most memory Python held while it ran."""
    tracemalloc.start()
    try:
        return run(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# 1. bundle.json is bounded and read with the bound, before its signature is checked


def sparse_member(path: Path, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> Path:
    """A tar whose first header announces a member ``name`` of ``size`` bytes over a hole (nothing written)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    header = info.tobuf(tarfile.USTAR_FORMAT)
    with open(path, "wb") as file:
        file.write(header)
        file.truncate(len(header) + size + 2 * tarfile.BLOCKSIZE)
    return path


@pytest.mark.parametrize("command", ["import", "verify"])
def test_bundle_json_over_the_bound_is_refused_without_being_read(signed, capsys, command):
    limit = format.MAX_JSON_MEMBER
    with tarfile.open(signed.path) as tar:
        data = tar.extractfile(format.BUNDLE_JSON).read()
    rebuild(signed.path, bundle_json=data + b" " * (limit + 2**20 - len(data)), key=signed.key)  # validly signed
    err, peak = peak_memory(lambda: refused(signed, capsys, command=command))
    assert peak < limit // 2
    assert f"bundle.json is {limit + 2**20} bytes, over the {limit} byte limit" in err


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
@pytest.mark.parametrize("command", ["import", "verify"])
def test_a_huge_header_over_a_hole_is_refused_in_bounded_memory(signed, capsys, command, kind):
    sparse_member(signed.path, format.BUNDLE_JSON, HUGE, kind)
    assert os.stat(signed.path).st_blocks * 512 < 2**20  # the file system holds a hole, not 1.5 GiB
    _, peak = peak_memory(lambda: refused(signed, capsys, command=command))
    assert peak < 8 * 2**20


def sparse_map_chain(path: Path, blocks: int) -> Path:
    """A tar whose first header is a GNU sparse member whose map runs on for ``blocks`` extension blocks."""
    info = tarfile.TarInfo(format.BUNDLE_JSON)
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[482] = 1  # "isextended": a block of the sparse map follows
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    entries = b"".join(b"%011o\0%011o\0" % (index + 1, 1) for index in range(21))
    path.write_bytes(bytes(header) + (entries + b"\1".ljust(8, b"\0")) * blocks)
    return path


@pytest.mark.parametrize("command", ["import", "verify"])
def test_a_sparse_map_running_on_is_refused_in_bounded_memory(signed, capsys, command):
    sparse_map_chain(signed.path, 16 * 2**11)  # 16 MiB of map, some 50 MiB of Python objects if read whole
    err, peak = peak_memory(lambda: refused(signed, capsys, command=command))
    assert peak < 8 * 2**20 and "over the 1048576 byte limit" in err
    sparse_map_chain(signed.path, 1)  # and a map cut short
    assert "not a tar archive" in refused(signed, capsys, command=command)


def test_signature_member_over_its_bound_is_refused(signed, capsys):
    with tarfile.open(signed.path) as tar:
        signature = tar.extractfile(format.SIGNATURE).read()
    rebuild(signed.path, members={format.SIGNATURE: signature + b" " * format.MAX_SIGNATURE})
    with tarfile.open(signed.path) as tar:
        assert tar.getnames()[1] == format.SIGNATURE
    assert "bundle.json.sig is" in refused(signed, capsys)


# 2. verify checks everything import relies on; import checks it before moving anything into the store


def without(field: str, index: int = 0, key: str = "manifests") -> Callable[[dict[str, Any]], None]:
    """Delete ``field`` from descriptor ``index`` of list ``key`` of a manifest."""
    return lambda manifest: manifest[key][index].pop(field)


def setting(field: str, value: object, index: int = 0, key: str = "manifests") -> Callable[[dict[str, Any]], None]:
    """Set ``field`` of descriptor ``index`` of list ``key`` of a manifest to ``value``."""
    return lambda manifest: manifest[key][index].update({field: value})


@pytest.mark.parametrize(("image", "change", "problem"), [
    ("app", without("mediaType"), "has no mediaType"),
    ("app", setting("mediaType", "application/vnd.oci.image.layer.v1.tar+gzip"), "is not a manifest type"),
    ("app", setting("mediaType", OCI_MANIFEST), "bundle.json lists it as"),
    ("app", setting("size", 7), "bundle.json says"),
    ("app", setting("digest", "sha256:" + "0" * 64), "which bundle.json does not list"),
    ("alpine", without("mediaType", 1, "layers"), "has no mediaType"),
    ("alpine", setting("size", 1, 0, "layers"), "bundle.json says"),
    ("alpine", setting("mediaType", 7, 0, "layers"), "has no mediaType"),
    ("alpine", lambda manifest: manifest.update(manifests=[]), "must not have manifests"),
])
def test_what_import_relies_on_is_checked_by_verify_and_before_import_moves_anything(signed, capsys, image,
                                                                                    change, problem):
    changed(signed, getattr(signed, image).digest, change)
    assert problem in refused(signed, capsys, command="verify")
    assert problem in refused(signed, capsys)


# 3. an import is all or nothing across images


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda document: document["images"][1].update(mediaType=OCI_MANIFEST), "bundle.json lists it as"),
    (lambda document: document["images"][1].update(reference="ghcr.io/Org/app:1.0"), "invalid repository"),
    (lambda document: document["images"][1].update(referrers=[{
        "digest": document["images"][1]["digest"], "mediaType": document["images"][1]["mediaType"],
        "tag": "../../../escape"}]), "invalid tag"),
    (lambda document: document["images"][1].update(digest="sha256:" + "1" * 64), "does not list"),
])
def test_a_bad_later_image_publishes_no_image(signed, capsys, edit, problem):
    rebuild(signed.path, edit, key=signed.key)
    assert problem in refused(signed, capsys, command="verify")
    before = snapshot(signed.root)
    assert problem in refused(signed, capsys)
    assert snapshot(signed.root) == before


def test_a_failed_import_leaves_earlier_imports_as_they_were(signed, capsys, tmp_path):
    good = export({"config": write_config(tmp_path / "again.yaml", tmp_path / "source-store")},
                  tmp_path / "alpine.tar", "--sign-key", signed.key, refs=("alpine:3.20",))
    assert mirror("bundle", "import", "--config", signed.config, good) == 0
    before = snapshot(signed.root)
    rebuild(signed.path, lambda document: document["images"][1].update(mediaType=OCI_MANIFEST), key=signed.key)
    assert mirror("bundle", "import", "--config", signed.config, "--trust", signed.pub, signed.path) == 1
    assert "import refused" in capsys.readouterr().err
    assert snapshot(signed.root) == before
    assert storage.open(signed.root).metadata.repositories() == ["docker.io/library/alpine"]
    assert_store_consistent(signed.root)


# 4. deeply nested JSON members are refused naming the member; no staging store is left behind


def nested(depth: int = DEEP) -> bytes:
    """JSON arrays nested ``depth`` deep."""
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize("listed_as", [OCI_MANIFEST, "application/octet-stream"])  # the latter was never parsed
def test_a_deeply_nested_manifest_is_refused_naming_it(signed, capsys, listed_as):
    body = b'{"schemaVersion": 2, "mediaType": "%s", "config": %s}' % (OCI_MANIFEST.encode(), nested())

    def edit(document: dict[str, Any]) -> None:
        swap(document, document["images"][0]["digest"], body, listed_as)
        document["images"][0]["mediaType"] = OCI_MANIFEST

    rebuild(signed.path, edit, key=signed.key, blobs=[body])
    assert str(Digest.of(body)) in refused(signed, capsys, command="verify")
    assert str(Digest.of(body)) in refused(signed, capsys)


@pytest.mark.parametrize("member", [format.BUNDLE_JSON, format.SIGNATURE, format.INDEX_JSON,
                                    format.DOCKER_MANIFEST])
def test_a_deeply_nested_member_is_refused_naming_it(signed, capsys, member):
    if member == format.BUNDLE_JSON:
        rebuild(signed.path, bundle_json=b'{"format": "mirror-bundle", "x": ' + nested() + b"}", key=signed.key)
    else:
        depth = DEEP if member != format.SIGNATURE else 10_000  # within the signature's size bound
        rebuild(signed.path, key=signed.key if member != format.SIGNATURE else None, members={member: nested(depth)})
    assert member in refused(signed, capsys, command="verify")
    if member in (format.BUNDLE_JSON, format.SIGNATURE):  # import reads no other member as JSON
        assert member in refused(signed, capsys)


# 5. every refusal is one line, exit 1


def test_a_tar_of_nested_pax_headers_is_refused_in_one_line(signed, capsys):
    info = tarfile.TarInfo(format.BUNDLE_JSON)
    info.pax_headers = {"comment": "x"}
    header = info.tobuf(tarfile.PAX_FORMAT)  # a pax header (two blocks), then the member's own header
    assert len(header) == 3 * tarfile.BLOCKSIZE
    chain = header[:2 * tarfile.BLOCKSIZE] * 5000 + header[2 * tarfile.BLOCKSIZE:]
    signed.path.write_bytes(chain + b"\0" * 2 * tarfile.BLOCKSIZE)
    refused(signed, capsys, command="verify")
    refused(signed, capsys)


def test_an_unreadable_trusted_key_is_refused_in_one_line(signed, capsys, tmp_path):
    signed.pub = tmp_path / "missing.pub"
    assert "missing.pub" in refused(signed, capsys)


def test_export_and_inventory_refuse_to_write_what_readers_would_refuse(signed, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(format, "MAX_JSON_MEMBER", 1000)
    out = tmp_path / "big.tar"
    assert mirror("bundle", "export", "--config", tmp_path / "source.yaml", "--output", out, "alpine:3.20") == 1
    assert "bundle.json would be" in capsys.readouterr().err and not list(tmp_path.glob("*big.tar*"))
    monkeypatch.setattr("mirror.bundle.inventory.MAX_INVENTORY", 100)
    inventory = tmp_path / "inventory.json"
    assert mirror("inventory", "--config", tmp_path / "source.yaml", "--output", inventory) == 1
    assert "over the 100 byte limit" in capsys.readouterr().err and not inventory.exists()
