"""Offline bundles on stores filled directly: export, verify, import, signatures, corruption, deltas, splits."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from mirror import cli, storage
from mirror.bundle import format
from mirror.bundle.progress import Progress
from mirror.digest import Digest
from mirror.reference import Reference
from mirror.registry import Registry
from tests.images import Blob, Image, Index, build_image, build_index
from tests.peers import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def fill(root: Path, reference: str, artifact: Image | Index, extra_tags: dict[str, Blob] | None = None) -> None:
    """Store ``artifact`` under ``reference`` as the cache or an import would (repository ``<host>/<path>``)."""
    registry = Registry(storage.open(root))
    ref = Reference.parse(reference)
    for blob in [*artifact.blobs, *(image.manifest for image in artifact.images), artifact.manifest]:
        writer = registry.blobs.writer()
        writer.write(blob.data)
        registry.finish_upload(ref.store_name, writer, Digest.parse(blob.digest))
    for image in artifact.images if isinstance(artifact, Index) else ():
        registry.put_manifest(ref.store_name, image.digest, image.manifest.data, image.manifest.media_type)
    registry.put_manifest(ref.store_name, ref.tag, artifact.manifest.data, artifact.manifest.media_type)
    for tag, manifest in (extra_tags or {}).items():
        registry.put_manifest(ref.store_name, tag, manifest.data, manifest.media_type)


def write_config(path: Path, root: Path, **extra: object) -> Path:
    """A config file with a store at ``root`` and no upstreams."""
    path.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "upstreams": [], **extra}))
    return path


def mirror(*argv: str | Path) -> int:
    """Run the ``mirror`` command in this process."""
    return cli.main([str(arg) for arg in argv])


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (except upload sessions) with its content."""
    if not root.exists():
        return {}
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and "uploads" not in path.parts}


def members(bundle: Path) -> list[str]:
    """The member names of a bundle tar, in order."""
    with tarfile.open(bundle) as tar:
        return tar.getnames()


@pytest.fixture
def source(tmp_path):
    """A store holding alpine:3.20 (one platform) and a two-platform app index sharing nothing with it."""
    root = tmp_path / "source-store"
    alpine = build_image("alpine", layers=2)
    app = build_index("app", layers=2)
    fill(root, "alpine:3.20", alpine)
    fill(root, "ghcr.io/org/app:1.0", app)
    return {"root": root, "config": write_config(tmp_path / "source.yaml", root), "alpine": alpine, "app": app}


@pytest.fixture
def target(tmp_path):
    """An empty second store."""
    root = tmp_path / "target-store"
    return {"root": root, "config": write_config(tmp_path / "target.yaml", root)}


@pytest.fixture
def keys(tmp_path):
    """A signing key pair and a second, unrelated one."""
    assert mirror("bundle", "keygen", tmp_path / "sign.key") == 0
    assert mirror("bundle", "keygen", tmp_path / "other.key") == 0
    return {"key": tmp_path / "sign.key", "pub": tmp_path / "sign.key.pub", "other": tmp_path / "other.key.pub"}


def export(source, out: Path, *args: str | Path, refs=("alpine:3.20", "ghcr.io/org/app:1.0")) -> Path:
    """Export ``refs`` from the source store; assert success."""
    assert mirror("bundle", "export", "--config", source["config"], "--output", out, *args, *refs) == 0
    return out


def test_keygen_writes_private_key_0600_and_public_key(keys):
    assert os.stat(keys["key"]).st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in keys["pub"].read_bytes()
    assert mirror("bundle", "keygen", keys["key"]) == 1  # never overwrites a key


def test_export_verify_import_round_trip(source, target, keys, tmp_path, capsys):
    bundle = export(source, tmp_path / "out.tar", "--sign-key", keys["key"])
    names = members(bundle)
    assert names[:5] == ["bundle.json", "bundle.json.sig", "oci-layout", "index.json", "manifest.json"]
    assert len(names) == len(set(names))
    assert mirror("bundle", "verify", "--trust", keys["pub"], bundle) == 0
    assert "verified" in capsys.readouterr().out

    assert mirror("bundle", "import", "--config", target["config"], "--trust", keys["pub"], bundle) == 0
    registry = Registry(storage.open(target["root"]))
    for reference, artifact in (("docker.io/library/alpine", source["alpine"]),
                                ("ghcr.io/org/app", source["app"])):
        tag = "3.20" if "alpine" in reference else "1.0"
        stored = registry.get_manifest(reference, tag)
        assert stored.body == artifact.manifest.data and stored.media_type == artifact.manifest.media_type
        for blob in artifact.blobs:
            with registry.open_blob(reference, Digest.parse(blob.digest)) as file:
                assert file.read() == blob.data
            assert storage.open(target["root"]).pins.is_pinned(Digest.parse(blob.digest))
    for image in source["app"].images:
        assert registry.get_manifest("ghcr.io/org/app", image.digest).body == image.manifest.data
    assert not list((target["root"] / "state").glob("imports/*"))

    before = snapshot(target["root"])
    assert mirror("bundle", "import", "--config", target["config"], bundle) == 0  # twice is harmless
    assert "0 blobs written" in capsys.readouterr().out
    assert set(snapshot(target["root"])) == set(before)


def test_bundle_json_lists_images_and_every_blob_once(source, tmp_path):
    shared = build_image("shared", layers=1)
    fill(source["root"], "example.com/one:1", shared)
    fill(source["root"], "example.com/two:1", shared)
    bundle = export(source, tmp_path / "out.tar", refs=("example.com/one:1", "example.com/two:1"))
    with tarfile.open(bundle) as tar:
        described = format.Bundle.from_json(tar.extractfile("bundle.json").read())
        index = json.loads(tar.extractfile("index.json").read())
        docker = json.loads(tar.extractfile("manifest.json").read())
    assert [image.reference for image in described.images] == ["example.com/one:1", "example.com/two:1"]
    layout_index = described.images[0].layout_index
    assert layout_index == described.images[1].layout_index and str(layout_index) == docker_layout_index(shared)
    assert {str(blob.digest) for blob in described.blobs} == {b.digest for b in (*shared.blobs, shared.manifest)} | {
        str(layout_index)}
    assert len([n for n in members(bundle) if n.startswith("blobs/")]) == len(described.blobs) == 4
    assert [m["annotations"][format.REF_NAME] for m in index["manifests"]] == ["example.com/one:1",
                                                                                "example.com/two:1"]
    assert index["manifests"][0]["digest"] == str(layout_index)
    assert docker[0]["RepoTags"] == ["example.com/one:1"]
    assert docker[0]["Config"] == "blobs/sha256/" + shared.config.digest.removeprefix("sha256:")


def docker_layout_index(image: Image) -> str:
    """The digest of the OCI index that stands for a Docker-typed single-platform ``image`` in index.json."""
    with_platform = image.manifest.descriptor(platform={"os": image.os, "architecture": image.architecture})
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [with_platform]}, indent=1).encode()
    return str(Digest.of(body))


def test_untrusted_and_unsigned_bundles_are_refused_before_writing(source, target, keys, tmp_path, capsys):
    signed = export(source, tmp_path / "signed.tar", "--sign-key", keys["key"])
    unsigned = export(source, tmp_path / "unsigned.tar")
    assert mirror("bundle", "verify", "--trust", keys["other"], signed) == 1
    assert "not trusted" in capsys.readouterr().err
    assert mirror("bundle", "import", "--config", target["config"], "--trust", keys["other"], signed) == 1
    assert "not trusted" in capsys.readouterr().err
    assert mirror("bundle", "import", "--config", target["config"], "--trust", keys["pub"], unsigned) == 1
    assert "unsigned" in capsys.readouterr().err
    configured = write_config(tmp_path / "trusting.yaml", target["root"], trusted_keys=[str(keys["pub"])])
    assert mirror("bundle", "import", "--config", configured, unsigned) == 1
    assert snapshot(target["root"]) == {}


def test_tampered_bundle_json_fails_the_signature(source, keys, tmp_path, capsys):
    bundle = export(source, tmp_path / "out.tar", "--sign-key", keys["key"])
    data = bytearray(bundle.read_bytes())
    position = data.index(b'"created": "') + len('"created": "')
    data[position] = ord("1") if data[position] != ord("1") else ord("2")
    bundle.write_bytes(bytes(data))
    assert mirror("bundle", "verify", "--trust", keys["pub"], bundle) == 1
    assert "does not match its signature" in capsys.readouterr().err


def flip_byte_in(bundle: Path, digest: str) -> None:
    """Flip one byte in the middle of the member holding blob ``digest``."""
    with tarfile.open(bundle) as tar:
        member = tar.getmember("blobs/sha256/" + digest.removeprefix("sha256:"))
    with open(bundle, "r+b") as file:
        file.seek(member.offset_data + member.size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))


def test_one_flipped_byte_fails_verify_and_import_naming_the_blob(source, target, tmp_path, capsys):
    bundle = export(source, tmp_path / "out.tar")
    layer = source["app"].images[1].layers[1].digest
    flip_byte_in(bundle, layer)
    assert mirror("bundle", "verify", bundle) == 1
    err = capsys.readouterr().err
    assert f"blob {layer}: digest mismatch" in err and err.count("problem:") == 1
    storage.open(target["root"])  # an empty store, as the import opens it
    before = snapshot(target["root"])
    assert mirror("bundle", "import", "--config", target["config"], bundle) == 1
    assert f"blob {layer}: digest mismatch" in capsys.readouterr().err
    assert snapshot(target["root"]) == before
    assert not storage.open(target["root"]).metadata.repositories()


def test_truncated_bundle_and_missing_part_are_named(source, tmp_path, capsys):
    bundle = export(source, tmp_path / "out.tar")
    short = tmp_path / "short.tar"
    short.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    assert mirror("bundle", "verify", short) == 1
    assert "truncated" in capsys.readouterr().err


def test_delta_carries_only_new_blobs_and_needs_its_base(source, target, tmp_path, capsys):
    first = export(source, tmp_path / "first.tar", refs=("alpine:3.20",))
    newer = build_image_on(source["alpine"], "3.21")
    fill(source["root"], "alpine:3.21", newer)
    delta = export(source, tmp_path / "delta.tar", "--base", first, refs=("alpine:3.21",))
    carried = {n.removeprefix("blobs/sha256/") for n in members(delta) if n.startswith("blobs/")}
    old = {b.digest.removeprefix("sha256:") for b in (*source["alpine"].blobs, source["alpine"].manifest)}
    assert carried and not carried & old
    capsys.readouterr()

    assert mirror("bundle", "import", "--config", target["config"], delta) == 1
    err = capsys.readouterr().err
    assert "base" in err and source["alpine"].layers[0].digest in err
    assert not storage.open(target["root"]).metadata.repositories()

    assert mirror("bundle", "import", "--config", target["config"], first) == 0
    assert mirror("bundle", "verify", delta) == 0
    assert mirror("bundle", "import", "--config", target["config"], delta) == 0
    registry = Registry(storage.open(target["root"]))
    assert registry.get_manifest("docker.io/library/alpine", "3.21").body == newer.manifest.data
    for blob in newer.blobs:
        assert registry.blob_size("docker.io/library/alpine", Digest.parse(blob.digest)) == blob.size


def build_image_on(base: Image, seed: str) -> Image:
    """An image with ``base``'s layers plus one new layer."""
    extra = build_image(seed, layers=1)
    config = json.loads(base.config.data)
    config["rootfs"]["diff_ids"] += json.loads(extra.config.data)["rootfs"]["diff_ids"]
    config_blob = Blob(base.config.media_type, json.dumps(config).encode())
    layers = (*base.layers, *extra.layers)
    manifest = json.loads(base.manifest.data)
    manifest["config"] = config_blob.descriptor()
    manifest["layers"] = [layer.descriptor() for layer in layers]
    return Image(config_blob, layers, Blob(base.manifest.media_type, json.dumps(manifest).encode()),
                 base.os, base.architecture)


def test_split_parts_concatenate_to_the_bundle_and_import(source, target, tmp_path):
    whole = export(source, tmp_path / "whole.tar")
    split = export(source, tmp_path / "split.tar", "--split", "100KiB")
    parts = sorted(tmp_path.glob("split.tar.*"))
    assert len(parts) > 2 and not split.exists()
    assert all(part.stat().st_size == 100 * 1024 for part in parts[:-1])
    assert b"".join(p.read_bytes() for p in parts)[-4096:] == whole.read_bytes()[-4096:]
    assert mirror("bundle", "verify", *parts) == 0
    assert mirror("bundle", "verify", split) == 0  # OUT.tar finds OUT.tar.000, .001, ...
    assert mirror("bundle", "verify", *parts[:-1]) == 1
    assert mirror("bundle", "import", "--config", target["config"], *parts) == 0
    tagged = storage.open(target["root"]).metadata.resolve_tag("ghcr.io/org/app", "1.0")
    assert tagged == Digest.parse(source["app"].digest)


def test_platform_filter_rewrites_the_index_and_says_what_it_dropped(source, target, tmp_path, capsys):
    bundle = export(source, tmp_path / "out.tar", "--platform", "linux/arm64", refs=("ghcr.io/org/app:1.0",))
    out = capsys.readouterr().out
    assert "dropped platforms linux/amd64" in out
    with tarfile.open(bundle) as tar:
        described = format.Bundle.from_json(tar.extractfile("bundle.json").read())
        docker = json.loads(tar.extractfile("manifest.json").read())
    image = described.images[0]
    assert image.source_digest == Digest.parse(source["app"].digest) and image.dropped_platforms == ("linux/amd64",)
    amd64, arm64 = source["app"].images
    listed = {str(blob.digest) for blob in described.blobs}
    assert arm64.layers[0].digest in listed and amd64.layers[0].digest not in listed
    assert docker[0]["Config"].endswith(arm64.config.digest.removeprefix("sha256:"))
    assert mirror("bundle", "import", "--config", target["config"], bundle) == 0
    registry = Registry(storage.open(target["root"]))
    index = json.loads(registry.get_manifest("ghcr.io/org/app", "1.0").body)
    assert [m["digest"] for m in index["manifests"]] == [arm64.digest]


def test_cosign_signature_and_oci_referrers_come_along(source, target, tmp_path):
    alpine = source["alpine"]
    signature_layer = Blob("application/vnd.dev.cosign.simplesigning.v1+json", b'{"critical": {}}')
    config = Blob("application/vnd.oci.image.config.v1+json", b"{}")
    cosign = Blob("application/vnd.oci.image.manifest.v1+json", json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.descriptor(), "layers": [signature_layer.descriptor()]}).encode())
    sbom = Blob("application/vnd.oci.image.manifest.v1+json", json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/spdx+json", "config": config.descriptor(),
        "layers": [signature_layer.descriptor()], "subject": alpine.manifest.descriptor()}).encode())
    registry = Registry(storage.open(source["root"]))
    for blob in (signature_layer, config):
        writer = registry.blobs.writer()
        writer.write(blob.data)
        registry.finish_upload("docker.io/library/alpine", writer, Digest.parse(blob.digest))
    tag = alpine.digest.replace(":", "-") + ".sig"
    registry.put_manifest("docker.io/library/alpine", tag, cosign.data, cosign.media_type)
    registry.put_manifest("docker.io/library/alpine", sbom.digest, sbom.data, sbom.media_type)

    bundle = export(source, tmp_path / "out.tar", refs=("alpine:3.20",))
    assert mirror("bundle", "import", "--config", target["config"], bundle) == 0
    imported = Registry(storage.open(target["root"]))
    assert imported.get_manifest("docker.io/library/alpine", tag).body == cosign.data
    referrers = imported.referrers("docker.io/library/alpine", Digest.parse(alpine.digest))
    assert [m["digest"] for m in referrers] == [sbom.digest]


def test_inventory_is_a_base_for_a_delta(source, target, tmp_path):
    first = export(source, tmp_path / "first.tar", refs=("alpine:3.20",))
    assert mirror("bundle", "import", "--config", target["config"], first) == 0
    inventory = tmp_path / "inventory.json"
    assert mirror("inventory", "--config", target["config"], "--output", inventory) == 0
    delta = export(source, tmp_path / "delta.tar", "--base", inventory)
    carried = [n for n in members(delta) if n.startswith("blobs/")]
    assert "blobs/sha256/" + source["alpine"].layers[0].digest.removeprefix("sha256:") not in carried
    # the app's blobs, its manifests and index, and the two small layout indexes the target never imports
    assert len(carried) == len(source["app"].blobs) + len(source["app"].images) + 1 + 2
    with tarfile.open(delta) as tar:
        described = format.Bundle.from_json(tar.extractfile("bundle.json").read())
    assert described.base.kind == "inventory" and described.base.digest == Digest.of(inventory.read_bytes())
    assert mirror("bundle", "import", "--config", target["config"], delta) == 0


def test_unknown_format_version_is_refused(source, tmp_path, capsys):
    bundle = export(source, tmp_path / "out.tar", refs=("alpine:3.20",))
    data = bundle.read_bytes().replace(b'"version": 1', b'"version": 9', 1)
    bundle.write_bytes(data)
    assert mirror("bundle", "verify", bundle) == 1
    assert "version 9 is not supported" in capsys.readouterr().err


def test_import_killed_halfway_resumes_without_rewriting_verified_blobs(tmp_path):
    root = tmp_path / "source-store"
    big = build_image("big", layers=6, layer_size=12 * 1024 * 1024)
    fill(root, "example.com/big:1", big)
    config = write_config(tmp_path / "source.yaml", root)
    bundle = export({"config": config}, tmp_path / "big.tar", refs=("example.com/big:1",))
    target = tmp_path / "target-store"
    target_config = write_config(tmp_path / "target.yaml", target)
    command = [sys.executable, "-m", "mirror", "bundle", "import", "--config", str(target_config), str(bundle)]
    environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    staged = target / "state" / "imports"
    deadline = time.monotonic() + 60
    while len(list(staged.glob("*/blobs/sha256/*/*"))) < 3 and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"the import ended before the kill: {process.stderr.read()!r}"
    assert not storage.open(target).metadata.repositories()  # nothing was published, so nothing partial could be served
    assert not list((target / "blobs").glob("sha256/*/*"))

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=environ, capture_output=True, text=True, check=True)
    written, skipped = (int(rerun.stdout.split(f" {word}")[0].split()[-1]) for word in ("blobs written", "already"))
    assert skipped >= 3 and written + skipped == len(big.blobs) + 1
    store = storage.open(target).blobs
    for blob in (*big.blobs, big.manifest):
        assert store.read(Digest.parse(blob.digest)) == blob.data
    assert storage.open(target).metadata.resolve_tag("example.com/big", "1") == Digest.parse(big.digest)


def test_bundle_json_matches_the_published_schema(source, tmp_path):
    schema = json.loads((REPO_ROOT / "offline-bundle" / "bundle.schema.json").read_text())
    first = export(source, tmp_path / "first.tar", refs=("alpine:3.20",))
    bundle = export(source, tmp_path / "out.tar", "--base", first, "--platform", "linux/amd64")
    with tarfile.open(bundle) as tar:
        document = json.loads(tar.extractfile("bundle.json").read())
    jsonschema.validate(document, schema)
    assert document["base"]["kind"] == "bundle" and any(blob.get("inBase") for blob in document["blobs"])


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    plain, terminal = io.StringIO(), Terminal()
    for stream in (plain, terminal):
        with Progress("import", 8 * 2**20, stream=stream, interval=0) as progress:
            for _ in range(8):
                progress.update(2**20)
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and len(lines) == 9
    assert lines[-1].startswith("import: 100%") and "8.00M/8.00M" in lines[-1] and "/s]" in lines[-1]
    assert "\r" in terminal.getvalue() and "100%" in terminal.getvalue()


def test_images_file_and_fallback_to_the_store_when_the_upstream_is_down(source, target, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path / "offline.yaml", source["root"], default_upstream="docker.io", upstreams=[
        {"name": "docker.io", "url": nowhere}, {"name": "ghcr.io", "url": nowhere}])
    listed = tmp_path / "images.yaml"
    listed.write_text(yaml.safe_dump({"images": ["alpine:3.20", "ghcr.io/org/app:1.0"]}))
    bundle = tmp_path / "out.tar"
    assert mirror("bundle", "export", "--config", config, "--output", bundle, "--images", listed) == 0
    assert mirror("bundle", "import", "--config", target["config"], bundle) == 0
    assert storage.open(target["root"]).metadata.resolve_tag("docker.io/library/alpine", "3.20") == Digest.parse(
        source["alpine"].digest)


def test_export_of_an_unknown_image_fails_and_writes_nothing(source, tmp_path, capsys):
    assert mirror("bundle", "export", "--config", source["config"], "--output", tmp_path / "out.tar",
                  "alpine:3.20", "example.com/missing:1") != 0
    assert "cannot resolve example.com/missing:1" in capsys.readouterr().err
    assert list(tmp_path.glob("out.tar*")) == [] and list(tmp_path.glob(".out.tar*")) == []
