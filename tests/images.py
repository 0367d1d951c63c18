"""Test images built offline: random gzip layers, image configs, manifests, indexes, OCI layouts, pushes."""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from mirror.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
DEFAULT_PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))


def sha256(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: object) -> bytes:
    """``value`` as compact JSON bytes with sorted keys (stable digests)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    """Bytes with the media type they are referenced under."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        """The sha256 digest of the bytes."""
        return sha256(self.data)

    @property
    def size(self) -> int:
        """The length of the bytes."""
        return len(self.data)

    def descriptor(self, **extra: object) -> dict[str, object]:
        """An OCI descriptor of this blob, with ``extra`` fields added."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Image:
    """A single-platform image: its config, gzip layers and manifest."""

    config: Blob
    layers: tuple[Blob, ...]
    manifest: Blob
    os: str
    architecture: str

    @property
    def digest(self) -> str:
        """The manifest digest (what ``docker pull`` reports)."""
        return self.manifest.digest

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """The config and layers."""
        return (self.config, *self.layers)

    @property
    def images(self) -> tuple[Image, ...]:
        """Itself, so that images and indexes are walked alike."""
        return (self,)


@dataclass(frozen=True)
class Index:
    """A multi-platform image: a manifest list or OCI index over single-platform images."""

    images: tuple[Image, ...]
    manifest: Blob

    @property
    def digest(self) -> str:
        """The index digest."""
        return self.manifest.digest

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Every config and layer of every platform, each once."""
        return tuple({blob.digest: blob for image in self.images for blob in image.blobs}.values())


def random_layer(seed: object = 0, size: int = 64 * 1024, files: int = 2,
                 media_type: str = DOCKER_LAYER) -> tuple[Blob, str]:
    """A gzip tar of ``files`` random files totalling ``size`` bytes, and its uncompressed diff_id."""
    tar_bytes = io.BytesIO()
    rng = random.Random(str(seed))
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo(f"layer-{seed}")
        directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(directory)
        for index in range(files):
            data = rng.randbytes(size // files + (index < size % files))
            info = tarfile.TarInfo(f"layer-{seed}/file-{index}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    raw = tar_bytes.getvalue()
    return Blob(media_type, gzip.compress(raw, compresslevel=1, mtime=0)), sha256(raw)


def build_image(seed: object = 0, layers: int = 2, layer_size: int = 64 * 1024, oci: bool = False,
                os: str = "linux", architecture: str = "amd64",
                annotations: Mapping[str, str] | None = None) -> Image:
    """A valid Docker schema2 (or OCI) image of ``layers`` random layers, the same for the same seed."""
    built = [random_layer(f"{seed}-{os}-{architecture}-{index}", layer_size,
                          media_type=OCI_LAYER if oci else DOCKER_LAYER) for index in range(layers)]
    config = Blob(OCI_CONFIG if oci else DOCKER_CONFIG, canonical_json({
        "architecture": architecture,
        "os": os,
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": [f"TEST_IMAGE_SEED={seed}"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in built]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"test layer {index}"}
                    for index in range(layers)],
    }))
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer, _ in built],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return Image(config, tuple(layer for layer, _ in built), Blob(str(manifest["mediaType"]),
                 canonical_json(manifest)), os, architecture)


def build_index(seed: object = 0, platforms: Iterable[tuple[str, str]] = DEFAULT_PLATFORMS,
                oci: bool = False, **image_options: Any) -> Index:
    """A manifest list (or OCI index if ``oci``) with one image per ``(os, architecture)`` platform."""
    images = tuple(build_image(seed, oci=oci, os=os, architecture=arch, **image_options)
                   for os, arch in platforms)
    media_type = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
    index = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [image.manifest.descriptor(platform={"os": image.os, "architecture": image.architecture})
                      for image in images],
    }
    return Index(images, Blob(media_type, canonical_json(index)))


def write_oci_layout(directory: str | Path, images: Mapping[str, Image | Index]) -> Path:
    """Write ``{tag: image}`` as an OCI image layout at ``directory``.

    skopeo 1.9 (``oci:DIR:tag``) only finds entries of OCI media types: build those images with ``oci=True``.
    """
    root = Path(directory)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    for artifact in images.values():
        for blob in (*artifact.blobs, *(image.manifest for image in artifact.images), artifact.manifest):
            (blobs / blob.digest.removeprefix("sha256:")).write_bytes(blob.data)
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        artifact.manifest.descriptor(annotations={REF_NAME: tag}) for tag, artifact in images.items()]}
    (root / "index.json").write_bytes(canonical_json(index))
    return root


class BearerAuth(httpx.Auth):
    """The registry token flow: answers a ``Bearer`` challenge with a token fetched with Basic credentials."""

    def __init__(self, username: str | None = None, password: str | None = None):
        self._credentials = (username, password) if username is not None else None
        self._tokens: dict[str, str] = {}
        self._last: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send ``request`` with the last token; on a Bearer challenge get one for its scope and resend."""
        if self._last is not None:
            request.headers["Authorization"] = f"Bearer {self._last}"
        response = yield request
        challenge = response.headers.get("www-authenticate", "")
        if response.status_code != 401 or not challenge.lower().startswith("bearer "):
            return
        params = parse_challenge(challenge)
        scope = params.get("scope", "")
        if scope not in self._tokens or self._tokens[scope] == self._last:
            query = {key: params[key] for key in ("service", "scope") if key in params}
            token_response = yield httpx.Request("GET", params["realm"], params=query,
                                                 headers=self._basic_header())
            token_response.read()
            token_response.raise_for_status()
            body = token_response.json()
            self._tokens[scope] = body.get("token") or body["access_token"]
        self._last = self._tokens[scope]
        request.headers["Authorization"] = f"Bearer {self._last}"
        yield request

    def _basic_header(self) -> dict[str, str]:
        if self._credentials is None:
            return {}
        return {"Authorization": basic_authorization(*self._credentials)}


def basic_authorization(username: str, password: str) -> str:
    """The value of an ``Authorization: Basic`` header for these credentials."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def parse_challenge(header: str) -> dict[str, str]:
    """The key="value" parameters of a ``WWW-Authenticate: Bearer ...`` header."""
    params: dict[str, str] = {}
    rest = header.split(" ", 1)[1] if " " in header else ""
    while rest:
        key, _, rest = rest.strip().partition("=")
        if rest.startswith('"'):
            value, _, rest = rest[1:].partition('"')
        else:
            value, _, rest = rest.partition(",")
        params[key.strip()] = value
        rest = rest.lstrip(", ")
    return params


def push(registry_url: str, repository: str, reference: str, artifact: Image | Index,
         username: str | None = None, password: str | None = None,
         client: httpx.Client | None = None) -> str:
    """Push ``artifact`` as ``repository:reference`` over the v2 API; return its digest."""
    own_client = client is None
    client = client or httpx.Client(timeout=60, auth=BearerAuth(username, password))
    try:
        for blob in artifact.blobs:
            push_blob(client, registry_url, repository, blob)
        for image in artifact.images if isinstance(artifact, Index) else ():
            put_manifest(client, registry_url, repository, image.digest, image.manifest)
        put_manifest(client, registry_url, repository, reference, artifact.manifest)
    finally:
        if own_client:
            client.close()
    return artifact.digest


def push_blob(client: httpx.Client, registry_url: str, repository: str, blob: Blob) -> None:
    """Upload ``blob`` monolithically (POST then PUT) unless the repository already has it."""
    base = f"{registry_url}/v2/{repository}/blobs/"
    if client.head(base + blob.digest).status_code == 200:
        return
    started = client.post(base + "uploads/")
    _check(started, 202)
    location = httpx.URL(urljoin(base, started.headers["location"])).copy_add_param("digest", blob.digest)
    _check(client.put(location, content=blob.data, headers={"Content-Type": "application/octet-stream"}), 201)


def put_manifest(client: httpx.Client, registry_url: str, repository: str, reference: str,
                 manifest: Blob) -> None:
    """PUT ``manifest`` under ``reference`` (a tag or its digest)."""
    _check(client.put(f"{registry_url}/v2/{repository}/manifests/{reference}", content=manifest.data,
                      headers={"Content-Type": manifest.media_type}), 201)


def _check(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise httpx.HTTPStatusError(f"{response.request.method} {response.request.url} answered "
                                    f"{response.status_code}, expected {status}: {response.text[:500]}",
                                    request=response.request, response=response)
