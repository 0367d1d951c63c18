"""Offline image signature verification: cosign simple signing and Sigstore bundles, against configured keys.

Signatures of an image digest are found in its repository two ways: a cosign ``sha256-<hex>.sig`` tag whose
layers are simple-signing payloads (the signature in the layer annotation), and OCI 1.1 referrers (the referrers
API, else the ``sha256-<hex>`` tag schema index) whose first layer is a Sigstore bundle v0.3. A bundle's
``dsseEnvelope`` must carry an in-toto statement naming the image digest; its ``messageSignature`` must sign the
image manifest itself (its message digest is the image digest). Nothing here contacts a transparency log.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from mirror.config import Config, Signatures
from mirror.digest import Digest
from mirror.errors import ConfigError, MirrorError, SignatureRequired
from mirror.metrics import Metrics
from mirror.reference import Reference
from mirror.registry import StoredManifest
from mirror.repository import Repository

BUNDLE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
# the bundle media types read: v0.3 and its legacy spelling, and v0.2 (sigstore-js's message signature bundles)
BUNDLE_MEDIA_TYPES = (BUNDLE_TYPE, "application/vnd.dev.sigstore.bundle+json;version=0.3",
                      "application/vnd.dev.sigstore.bundle+json;version=0.2")
COSIGN_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_TYPE = "cosign container image signature"
IN_TOTO_TYPE = "application/vnd.in-toto+json"
MAX_SIGNATURE_BYTES = 1 << 20  # a payload, bundle or signature manifest larger than this is not read
MAX_SIGNATURES = 100  # signatures of one image examined at most
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
# artifacts that sign or attest an image are served without a check: by artifactType, config or layer media type
SIGNATURE_ARTIFACT_TYPES = frozenset({*BUNDLE_MEDIA_TYPES, SIMPLE_SIGNING, IN_TOTO_TYPE,
                                      "application/vnd.dsse.envelope.v1+json"})
SIGNATURE_TAG = re.compile(r"sha256-[0-9a-f]{64}(\.(sig|att|sbom))?")  # cosign's tags and the referrers tag schema
DECISION_SECONDS = 60.0  # how long an image's allowed decision is reused
MAX_DECISIONS = 10_000  # decisions kept at most, the oldest dropped first
log = logging.getLogger("mirror.signatures")
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class Key:
    """A configured public key and its name."""

    name: str
    public_key: PublicKey

    def verifies(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` over ``data`` is this key's (ECDSA and RSA with SHA-256; RSA PKCS#1 v1.5 or PSS)."""
        key = self.public_key
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signature, data)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            else:
                return _verifies_rsa(key, signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signature:
    """One signature found: its format, where it was found, the key that verified it, or why none did."""

    format: str  # "cosign" or "sigstore bundle"
    source: str  # the tag or manifest digest it was found under
    key: str | None = None
    problem: str | None = None
    subject: Digest | None = None  # the image digest a verified signature signs


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one image: the rule that decided, the keys it missed and those that signed."""

    allowed: bool
    rule: str
    missing: list[str]
    by: list[str]


@dataclass(frozen=True)
class Verification:
    """What ``mirror verify`` found for one image."""

    image: str
    repository: str
    digest: Digest
    signatures: list[Signature]
    decision: Decision


def load_keys(signatures: Signatures) -> list[Key]:
    """The configured keys, read; raise ConfigError for a file that is not a supported PEM public key."""
    keys = []
    for index, configured in enumerate(signatures.keys):
        where = f"signatures.keys[{index}].public_key"
        try:
            public_key = serialization.load_pem_public_key(configured.public_key.read_bytes())
        except OSError as exc:
            raise ConfigError(where, f"cannot read {configured.public_key}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ConfigError(where, f"{configured.public_key} is not a PEM public key") from exc
        if isinstance(public_key, ec.EllipticCurvePublicKey) and not isinstance(public_key.curve, ec.SECP256R1):
            raise ConfigError(where, f"{configured.public_key}: ECDSA keys must be on P-256")
        if not isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
            raise ConfigError(where, f"{configured.public_key}: not an ECDSA P-256, Ed25519 or RSA key")
        keys.append(Key(configured.name, public_key))
    return keys


def decide(policy: Signatures, store_repository: str, image_digest: Digest, found: Sequence[Signature]) -> Decision:
    """The first rule matching ``store_repository`` decides: allowed when any key it requires verified a
    signature in ``found`` of ``image_digest``, or when it requires none."""
    signed = [signature.key for signature in found if signature.key is not None and signature.subject == image_digest]
    for rule in policy.rules:
        if fnmatch.fnmatchcase(store_repository, rule.repository):
            by = [name for name in rule.require if name in signed]
            allowed = not rule.require or bool(by)
            return Decision(allowed, rule.repository, [] if allowed else list(rule.require), by)
    return Decision(True, "", [], [])


async def find_signatures(repository: Repository, image_digest: Digest, manifest: bytes,
                          keys: Sequence[Key]) -> list[Signature]:
    """The signatures of the image ``image_digest`` (whose manifest is ``manifest``) in ``repository``, each
    verified with ``keys``."""
    found = await _cosign(repository, image_digest, keys)
    for digest in (await _referrer_digests(repository, image_digest))[:MAX_SIGNATURES]:
        found.append(await _bundle(repository, image_digest, manifest, digest, keys))
    return found[:MAX_SIGNATURES]


async def verify_image(resolve: Callable[[str], Repository], text: str, signatures: Signatures) -> Verification:
    """Find and check the signatures of image ``text`` (resolved as the server resolves names), and decide."""
    keys = load_keys(signatures)
    reference = Reference.parse(text, None)
    repository = resolve(reference.name)
    stored = await repository.manifest(reference.reference)
    found = await find_signatures(repository, stored.digest, stored.body, keys)
    store_name = stored.repository or repository.write_name
    return Verification(text, store_name, stored.digest, found, decide(signatures, store_name, stored.digest, found))


def run(config: Config, text: str) -> Verification:
    """Verify image ``text`` in the store (and upstreams) of ``config``."""
    from mirror.server import build  # the server's wiring, without its listening and signals

    async def verify() -> Verification:
        appliance = build(config)
        try:
            return await verify_image(appliance.repositories.resolve, text, config.signatures)
        finally:
            await appliance.close_when_idle()

    return asyncio.run(verify())


class Policy:
    """The signature policy applied to manifest GETs: its mode, keys, and recent allowed decisions.

    Only allowed decisions are reused (for DECISION_SECONDS): a refused image is checked again at its next GET, so
    a signature pushed after a refusal takes effect at once.
    """

    def __init__(self, signatures: Signatures, metrics: Metrics) -> None:
        self.signatures, self.metrics = signatures, metrics
        self.keys = load_keys(signatures) if signatures.mode != "off" else []
        self.allowed: dict[tuple[str, Digest], float] = {}  # (store repository, digest) -> when it expires

    def _remember(self, key: tuple[str, Digest]) -> None:
        """Keep an allowed decision for ``DECISION_SECONDS``, the oldest forgotten beyond ``MAX_DECISIONS``."""
        self.allowed.pop(key, None)
        while len(self.allowed) >= MAX_DECISIONS:
            del self.allowed[next(iter(self.allowed))]
        self.allowed[key] = time.monotonic() + DECISION_SECONDS

    async def check(self, repository: Repository, reference: str, stored: StoredManifest) -> dict[str, Any] | None:
        """Raise SignatureRequired (its detail: mode, rule and missing keys) when mode is enforce and a rule refuses
        the image ``stored`` (got from ``repository`` by ``reference``); in warn mode log, and return that detail
        to serve it with. None when allowed. Signature artifacts are not checked."""
        if self.signatures.mode == "off" or SIGNATURE_TAG.fullmatch(reference) or _is_signature_artifact(stored.body):
            return None
        store_name = stored.repository or repository.write_name
        key = (store_name, stored.digest)
        if self.allowed.get(key, 0.0) > time.monotonic():
            self.metrics.signature_decisions.labels("allowed").inc()
            return None
        found = await find_signatures(repository, stored.digest, stored.body, self.keys)
        decision = decide(self.signatures, store_name, stored.digest, found)
        if decision.allowed:
            # a signed index admits the manifests it lists: clients fetch the index, then its children by digest
            for digest in (stored.digest, *_children(stored.body)):
                self._remember((store_name, digest))
            self.metrics.signature_decisions.labels("allowed").inc()
            return None
        message = (f"{store_name}@{stored.digest} is refused by signature rule {decision.rule!r}: missing a valid "
                   f"signature by {' or '.join(decision.missing)}")
        detail = {"mode": self.signatures.mode, "rule": decision.rule, "missing": decision.missing}
        if self.signatures.mode == "warn":
            log.warning("signature policy (warn): %s", message)
            self.metrics.signature_decisions.labels("warned").inc()
            return detail
        log.warning("signature policy: %s", message)
        self.metrics.signature_decisions.labels("refused").inc()
        raise SignatureRequired(message, {"repository": store_name, "digest": str(stored.digest), **detail})


def _children(body: bytes) -> list[Digest]:
    """The digests of the manifests an index ``body`` lists (none for an image manifest)."""
    try:
        document = json.loads(body)
    except ValueError:
        return []
    entries = document.get("manifests") if isinstance(document, dict) else None
    return [Digest.parse(entry["digest"]) for entry in _list(entries)
            if isinstance(entry, dict) and Digest.is_digest(str(entry.get("digest", "")))]


def _is_signature_artifact(body: bytes) -> bool:
    """Whether the manifest ``body`` is a signature or attestation (by artifactType, config or layer types)."""
    try:
        manifest = json.loads(body)
    except ValueError:
        return False
    if not isinstance(manifest, dict):
        return False
    config = manifest.get("config")
    layers = [layer.get("mediaType") for layer in _list(manifest.get("layers")) if isinstance(layer, dict)]
    return (manifest.get("artifactType") in SIGNATURE_ARTIFACT_TYPES
            or (isinstance(config, dict) and config.get("mediaType") in SIGNATURE_ARTIFACT_TYPES)
            or (bool(layers) and all(media_type in SIGNATURE_ARTIFACT_TYPES for media_type in layers)))


def pae(payload_type: str, payload: bytes) -> bytes:
    """The DSSE pre-authentication encoding of ``payload`` of ``payload_type``."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _verifies_rsa(key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> bool:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
    for scheme in (padding.PKCS1v15(), pss):
        try:
            key.verify(signature, data, scheme, hashes.SHA256())
            return True
        except InvalidSignature:
            continue
    return False


async def _cosign(repository: Repository, image_digest: Digest, keys: Sequence[Key]) -> list[Signature]:
    tag = f"{image_digest.algorithm}-{image_digest.hex}.sig"
    manifest = await _json_manifest(repository, tag)
    if manifest is None:
        return []
    found = []
    for index, layer in enumerate(_list(manifest.get("layers"))[:MAX_SIGNATURES]):
        source = f"{tag} layer {index}"
        try:
            annotations = layer.get("annotations") or {}
            signature = base64.b64decode(annotations[COSIGN_ANNOTATION], validate=True)
            payload = await _blob(repository, layer["digest"])
        except (AttributeError, KeyError, TypeError, binascii.Error, MirrorError) as exc:
            found.append(Signature("cosign", source, problem=f"unreadable: {_reason(exc)}"))
            continue
        found.append(_check("cosign", source, keys, [(signature, payload)], functools.partial(_cosign_names, payload),
                            image_digest))
    return found


def _cosign_names(payload: bytes) -> str | None:
    critical = json.loads(payload)["critical"]
    if critical["type"] != COSIGN_TYPE:
        return None
    return critical["image"]["docker-manifest-digest"]


async def _referrer_digests(repository: Repository, image_digest: Digest) -> list[str]:
    digests: list[str] = []
    try:
        referrers = await repository.referrers(image_digest)
        last = None
        while len(digests) < MAX_SIGNATURES:
            page = referrers.page(BUNDLE_TYPE, last)
            digests += [json.loads(descriptor)["digest"] for descriptor in page.descriptors]
            if page.next_last is None:
                break
            last = page.next_last
    except MirrorError:
        pass
    index = await _json_manifest(repository, f"{image_digest.algorithm}-{image_digest.hex}")
    for descriptor in _list(index.get("manifests") if index else None):
        if isinstance(descriptor, dict) and descriptor.get("artifactType") == BUNDLE_TYPE:
            digests.append(str(descriptor.get("digest")))
    return list(dict.fromkeys(digests))


async def _bundle(repository: Repository, image_digest: Digest, image_manifest: bytes, digest: str,
                  keys: Sequence[Key]) -> Signature:
    try:
        manifest = await _json_manifest(repository, digest)
        if manifest is None:
            return Signature("sigstore bundle", digest, problem="its manifest is gone")
        bundle = json.loads(await _blob(repository, manifest["layers"][0]["digest"]))
        if bundle.get("mediaType") not in BUNDLE_MEDIA_TYPES:
            return Signature("sigstore bundle", digest, problem=f"not a {BUNDLE_TYPE} (or v0.2) bundle")
        hint = ((bundle.get("verificationMaterial") or {}).get("publicKey") or {}).get("hint")
        ordered = sorted(keys, key=lambda key: key.name != hint)
        if "dsseEnvelope" in bundle:
            envelope = bundle["dsseEnvelope"]
            payload = base64.b64decode(envelope["payload"], validate=True)
            signed = pae(envelope["payloadType"], payload)
            candidates = [(base64.b64decode(entry["sig"], validate=True), signed) for entry in envelope["signatures"]]
            return _check("sigstore bundle", digest, ordered, candidates,
                          lambda: _statement_names(envelope["payloadType"], payload, image_digest), image_digest)
        message = bundle["messageSignature"]
        recorded = message["messageDigest"]
        names = f"sha256:{base64.b64decode(recorded['digest'], validate=True).hex()}"
        if recorded["algorithm"] != "SHA2_256":
            return Signature("sigstore bundle", digest, problem=f"message digest {recorded['algorithm']!r:.40}")
        signature = base64.b64decode(message["signature"], validate=True)
        return _check("sigstore bundle", digest, ordered, [(signature, image_manifest)], lambda: names, image_digest)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, binascii.Error, MirrorError) as exc:
        return Signature("sigstore bundle", digest, problem=f"unreadable: {_reason(exc)}")


def _statement_names(payload_type: str, payload: bytes, image_digest: Digest) -> str | None:
    """The image digest the in-toto statement names: ``image_digest`` if among its subjects, else the first."""
    if payload_type != IN_TOTO_TYPE:
        return None
    subjects = [f"{algorithm}:{value}" for subject in json.loads(payload)["subject"]
                for algorithm, value in subject["digest"].items()]
    return str(image_digest) if str(image_digest) in subjects else next(iter(subjects), None)


def _check(kind: str, source: str, keys: Sequence[Key], candidates: list[tuple[bytes, bytes]],
           names: Callable[[], str | None], image_digest: Digest) -> Signature:
    """The signature verified by the first key that verifies a candidate, if its payload names the image."""
    key = next((key for key in keys for signature, data in candidates if key.verifies(signature, data)), None)
    if key is None:
        return Signature(kind, source, problem="no configured key verifies it")
    try:
        named = names()
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        return Signature(kind, source, problem=f"signed by {key.name}, but its payload is unreadable: {_reason(exc)}")
    if named != str(image_digest):
        return Signature(kind, source, problem=f"signed by {key.name}, but it names {named!s:.80}, not this image")
    return Signature(kind, source, key=key.name, subject=image_digest)


async def _json_manifest(repository: Repository, reference: str) -> dict[str, Any] | None:
    try:
        stored = await repository.manifest(reference)
    except MirrorError:
        return None
    if len(stored.body) > MAX_SIGNATURE_BYTES:
        return None
    try:
        value = json.loads(stored.body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _blob(repository: Repository, digest: str) -> bytes:
    expected = Digest.parse(digest)
    source = await repository.blob(expected)
    if source.size is not None and source.size > MAX_SIGNATURE_BYTES:
        raise ValueError(f"blob {digest} is larger than {MAX_SIGNATURE_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in source.chunks(0, source.size):
        size += len(chunk)
        if size > MAX_SIGNATURE_BYTES:
            raise ValueError(f"blob {digest} is larger than {MAX_SIGNATURE_BYTES} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    if Digest.of(data, expected.algorithm) != expected:
        raise ValueError(f"blob {digest} does not match its digest")
    return data


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, MirrorError) else (f"missing {exc}" if isinstance(exc, KeyError)
                                                              else str(exc) or type(exc).__name__)
