"""Image signatures: cosign simple signing and Sigstore bundles pushed into a real ``mirror serve``, checked
offline by ``mirror verify`` against the config's ``signatures`` policy."""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from mirror.config import SignatureRule, Signatures, load
from mirror.digest import Digest
from mirror.errors import ConfigError
from mirror.signatures import (
    BUNDLE_MEDIA_TYPES,
    BUNDLE_TYPE,
    COSIGN_ANNOTATION,
    COSIGN_TYPE,
    IN_TOTO_TYPE,
    Decision,
    Signature,
    decide,
    pae,
)
from tests.images import OCI_CONFIG, Blob, Image, build_image, canonical_json, push, push_blob, put_manifest
from tests.peers import REPO_ROOT, MirrorProcess

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
EMPTY = Blob("application/vnd.oci.empty.v1+json", b"{}")
SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
PolicyKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def sign(key: PolicyKey, data: bytes) -> bytes:
    """``key``'s signature over ``data`` (ECDSA with SHA-256, Ed25519, RSA PKCS#1 v1.5 with SHA-256)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


def b64(data: bytes) -> str:
    """Standard base64 text."""
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    """The private keys: release (P-256), ops (Ed25519), legacy (RSA), and a stranger's P-256 key."""
    return {"release": ec.generate_private_key(ec.SECP256R1()), "ops": ed25519.Ed25519PrivateKey.generate(),
            "legacy": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "stranger": ec.generate_private_key(ec.SECP256R1())}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, keys):
    """A hosted-only mirror whose policy requires release for signed/*, ops for ed/*, legacy for rsa/*."""
    workdir = tmp_path_factory.mktemp("signatures")
    configured = []
    for name in ("release", "ops", "legacy"):
        path = workdir / f"{name}.pub"
        path.write_bytes(keys[name].public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
        configured.append({"name": name, "public_key": str(path)})
    rules = [{"repository": "signed/*", "require": ["release"]}, {"repository": "ed/*", "require": ["ops"]},
             {"repository": "rsa/*", "require": ["legacy", "release"]}, {"repository": "*", "require": []}]
    config = {"upstreams": [], "signatures": {"mode": "enforce", "keys": configured, "rules": rules}}
    with MirrorProcess(workdir / "mirror", config) as server:
        yield server


def verify(mirror: MirrorProcess, image: str) -> subprocess.CompletedProcess[str]:
    """``python -m mirror verify --config ... IMAGE``."""
    return subprocess.run([sys.executable, "-m", "mirror", "verify", "--config", str(mirror.config_path), image],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False)


def push_image(mirror: MirrorProcess, repository: str, seed: str) -> Image:
    """Push a small OCI image as ``repository:v1``."""
    image = build_image(seed, layers=1, layer_size=1024, oci=True)
    push(mirror.url, repository, "v1", image)
    return image


def push_cosign(mirror: MirrorProcess, repository: str, image: Image, key: PolicyKey,
                names: str | None = None) -> None:
    """Push a cosign ``sha256-<hex>.sig`` signature of ``image`` (its payload naming ``names``) by ``key``."""
    payload = canonical_json({"critical": {"identity": {"docker-reference": repository},
                                           "image": {"docker-manifest-digest": names or image.digest},
                                           "type": COSIGN_TYPE}, "optional": None})
    layer = Blob(SIMPLE_SIGNING, payload)
    config = Blob(OCI_CONFIG, canonical_json({"architecture": "", "os": "", "rootfs": {"type": "layers"}}))
    manifest = Blob(OCI_MANIFEST, canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(),
        "layers": [layer.descriptor(annotations={COSIGN_ANNOTATION: b64(sign(key, payload))})]}))
    with httpx.Client(timeout=30) as client:
        for blob in (layer, config):
            push_blob(client, mirror.url, repository, blob)
        put_manifest(client, mirror.url, repository, f"sha256-{image.digest.removeprefix('sha256:')}.sig", manifest)


def push_bundle(mirror: MirrorProcess, repository: str, image: Image, bundle: dict[str, Any],
                tag_schema: bool = False) -> None:
    """Push a Sigstore bundle as an OCI 1.1 referrer of ``image`` (or, with ``tag_schema``, listed only in the
    referrers tag schema's ``sha256-<hex>`` index, as registries without the referrers API hold them)."""
    layer = Blob(BUNDLE_TYPE, json.dumps(bundle).encode())
    subject = {} if tag_schema else {"subject": image.manifest.descriptor()}
    manifest = Blob(OCI_MANIFEST, canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": BUNDLE_TYPE, "config": EMPTY.descriptor(),
        "layers": [layer.descriptor()], **subject}))
    with httpx.Client(timeout=30) as client:
        for blob in (layer, EMPTY):
            push_blob(client, mirror.url, repository, blob)
        put_manifest(client, mirror.url, repository, manifest.digest, manifest)
        if tag_schema:
            index = Blob(OCI_INDEX, canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                manifest.descriptor(artifactType=BUNDLE_TYPE)]}))
            put_manifest(client, mirror.url, repository, image.digest.replace(":", "-"), index)


def dsse_bundle(image_digest: str, key: PolicyKey, hint: str = "") -> dict[str, Any]:
    """A Sigstore bundle v0.3 with a DSSE envelope of an in-toto statement about ``image_digest``."""
    statement = canonical_json({"_type": "https://in-toto.io/Statement/v1",
                                "subject": [{"name": "image", "digest": {"sha256": image_digest.split(":")[1]}}],
                                "predicateType": "https://example.test/attested", "predicate": {}})
    return {"mediaType": BUNDLE_TYPE, "verificationMaterial": {"publicKey": {"hint": hint}},
            "dsseEnvelope": {"payload": b64(statement), "payloadType": IN_TOTO_TYPE,
                             "signatures": [{"sig": b64(sign(key, pae(IN_TOTO_TYPE, statement))), "keyid": ""}]}}


def message_bundle(image: Image, key: PolicyKey) -> dict[str, Any]:
    """A Sigstore bundle v0.3 with a message signature over the image manifest."""
    return {"mediaType": BUNDLE_TYPE, "verificationMaterial": {"publicKey": {"hint": ""}},
            "messageSignature": {"messageDigest": {"algorithm": "SHA2_256",
                                                   "digest": b64(hashlib.sha256(image.manifest.data).digest())},
                                 "signature": b64(sign(key, image.manifest.data))}}


def test_cosign_signature_by_the_required_key_is_allowed(mirror, keys):
    image = push_image(mirror, "signed/app", "cosign-good")
    push_cosign(mirror, "signed/app", image, keys["release"])
    result = verify(mirror, "signed/app:v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cosign signature" in result.stdout and "signed by release" in result.stdout
    assert "allowed by rule 'signed/*'" in result.stdout


def test_dsse_bundle_referrer_by_ed25519_is_allowed(mirror, keys):
    image = push_image(mirror, "ed/app", "dsse-good")
    push_bundle(mirror, "ed/app", image, dsse_bundle(image.digest, keys["ops"], hint="ops"))
    result = verify(mirror, f"ed/app@{image.digest}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sigstore bundle signature" in result.stdout and "signed by ops" in result.stdout


def test_message_signature_bundle_by_rsa_is_allowed(mirror, keys):
    image = push_image(mirror, "rsa/app", "message-good")
    push_bundle(mirror, "rsa/app", image, message_bundle(image, keys["legacy"]))
    result = verify(mirror, "rsa/app:v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "allowed by rule 'rsa/*': signed by legacy" in result.stdout


def test_bundle_in_the_referrers_tag_schema_is_found(mirror, keys):
    image = push_image(mirror, "ed/tagged", "tag-schema")
    push_bundle(mirror, "ed/tagged", image, dsse_bundle(image.digest, keys["ops"]), tag_schema=True)
    result = verify(mirror, "ed/tagged:v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "signed by ops" in result.stdout


def test_rsa_pss_signature_is_allowed(mirror, keys):
    image = push_image(mirror, "rsa/pss", "pss")
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
    bundle = message_bundle(image, keys["legacy"])
    bundle["messageSignature"]["signature"] = b64(keys["legacy"].sign(image.manifest.data, pss, hashes.SHA256()))
    push_bundle(mirror, "rsa/pss", image, bundle)
    result = verify(mirror, "rsa/pss:v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "signed by legacy" in result.stdout


def test_unsigned_image_is_refused_naming_the_rule_and_the_missing_key(mirror):
    push_image(mirror, "signed/unsigned", "unsigned")
    result = verify(mirror, "signed/unsigned:v1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no signatures found" in result.stdout
    assert "refused by rule 'signed/*': missing a valid signature by release" in result.stdout


def test_signature_by_another_key_is_refused(mirror, keys):
    image = push_image(mirror, "signed/stranger", "stranger")
    push_cosign(mirror, "signed/stranger", image, keys["stranger"])
    push_bundle(mirror, "signed/stranger", image, dsse_bundle(image.digest, keys["stranger"]))
    result = verify(mirror, "signed/stranger:v1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count("no configured key verifies it") == 2


def test_signature_by_a_key_the_rule_does_not_require_is_refused(mirror, keys):
    image = push_image(mirror, "signed/ops", "ops-only")
    push_cosign(mirror, "signed/ops", image, keys["ops"])
    result = verify(mirror, "signed/ops:v1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "signed by ops" in result.stdout and "missing a valid signature by release" in result.stdout


def test_payload_naming_another_digest_is_refused(mirror, keys):
    image = push_image(mirror, "signed/moved", "moved")
    other = build_image("elsewhere", layers=1, layer_size=1024, oci=True)
    push_cosign(mirror, "signed/moved", image, keys["release"], names=other.digest)
    push_bundle(mirror, "signed/moved", image, dsse_bundle(other.digest, keys["release"]))
    result = verify(mirror, "signed/moved:v1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.count(f"signed by release, but it names {other.digest}, not this image") == 2


def test_rule_requiring_nothing_allows_unsigned_images(mirror):
    push_image(mirror, "free/app", "free")
    result = verify(mirror, "free/app:v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "allowed by rule '*'" in result.stdout


def test_unknown_image_is_an_error(mirror):
    result = verify(mirror, "signed/absent:v1")
    assert result.returncode == 1 and "mirror:" in result.stderr


def test_a_key_that_is_not_pem_is_a_config_error(mirror, tmp_path):
    (tmp_path / "broken.pub").write_text("not a key")
    config = {**mirror.config, "signatures": {"keys": [{"name": "broken", "public_key": str(tmp_path / "broken.pub")}]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "mirror", "verify", "--config", str(path), "free/app:v1"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False)
    assert result.returncode == 2 and "signatures.keys[0].public_key" in result.stderr


def write_config(tmp_path: Path, signatures: Any) -> Path:
    """A config file with ``signatures`` as its signatures section."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"upstreams": [], "signatures": signatures}))
    return path


def test_config_reads_the_policy(tmp_path):
    (tmp_path / "release.pub").write_text("")
    config = load(write_config(tmp_path, {"mode": "warn", "keys": [{"name": "release", "public_key": str(
        tmp_path / "release.pub")}], "rules": [{"repository": "docker.io/*", "require": ["release"]}]}), {})
    assert config.signatures.mode == "warn"
    assert [key.name for key in config.signatures.keys] == ["release"]
    assert config.signatures.rules[0].require == ("release",)
    assert load(write_config(tmp_path, None), {}).signatures.mode == "off"


@pytest.mark.parametrize(("signatures", "key"), [
    ({"mode": "strict"}, "signatures.mode"),
    ({"mode": True}, "signatures.mode"),
    ({"keys": [{"name": "release", "public_key": "/nonexistent.pub"}]}, "signatures.keys[0].public_key"),
    ({"keys": [{"name": 1, "public_key": "/nonexistent.pub"}]}, "signatures.keys[0].name"),
    ({"rules": [{"repository": "*", "require": ["release"]}]}, "signatures.rules[0].require"),
    ({"rules": [{"repository": "*", "require": "release"}]}, "signatures.rules[0].require"),
    ({"rules": [{"require": []}]}, "signatures.rules[0]"),
    ({"rules": [{"repository": "*", "allow": []}]}, "signatures.rules[0].allow"),
    ({"enforce": True}, "signatures.enforce"),
    ("enforce", "signatures"),
])
def test_config_errors_name_the_key(tmp_path, signatures, key):
    with pytest.raises(ConfigError) as raised:
        load(write_config(tmp_path, signatures), {})
    assert raised.value.key == key


SIGSTORE_JS = """
const crypto = require('crypto');
const { DSSEBundleBuilder, MessageSignatureBundleBuilder } = require('@sigstore/sign');
const { bundleToJSON } = require('@sigstore/bundle');
const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const key = crypto.createPrivateKey(input.key);
const publicKey = crypto.createPublicKey(key).export({ format: 'pem', type: 'spki' });
const signer = { sign: async (data) => ({ signature: crypto.sign('sha256', data, key),
                                           key: { $case: 'publicKey', publicKey, hint: 'release' } }) };
const Builder = input.dsse ? DSSEBundleBuilder : MessageSignatureBundleBuilder;
new Builder({ signer, witnesses: [] })
  .create({ data: Buffer.from(input.data, 'base64'), type: input.dsse ? 'application/vnd.in-toto+json' : undefined })
  .then((bundle) => process.stdout.write(JSON.stringify(bundleToJSON(bundle))));
"""


@pytest.fixture(scope="module")
def sigstore_js(tmp_path_factory) -> Path:
    """A directory with sigstore-js (@sigstore/sign) installed from npm; skip when npm cannot install it."""
    prefix = tmp_path_factory.mktemp("sigstore-js")
    try:
        installed = subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                                    "@sigstore/sign", "@sigstore/bundle"], capture_output=True, text=True,
                                   timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"sigstore-js is not installable here (npm: {exc})")
    if installed.returncode != 0:
        pytest.skip(f"sigstore-js is not installable here (npm install failed: {installed.stderr[-300:]})")
    (prefix / "sign.js").write_text(SIGSTORE_JS)
    return prefix


def sigstore_js_bundle(prefix: Path, key: PolicyKey, data: bytes, dsse: bool) -> dict[str, Any]:
    """The bundle sigstore-js builds signing ``data`` (DSSE with an in-toto payload, or a message) with ``key``."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    signed = subprocess.run(["node", str(prefix / "sign.js")], input=json.dumps({"key": pem, "data": b64(data),
                            "dsse": dsse}), capture_output=True, text=True, timeout=60, cwd=prefix, check=True)
    return json.loads(signed.stdout)


@pytest.mark.parametrize("dsse", [True, False], ids=["dsse", "message"])
def test_bundle_signed_by_sigstore_js_is_allowed(mirror, keys, sigstore_js, dsse):
    repository = f"signed/sigstore-js-{'dsse' if dsse else 'message'}"
    image = push_image(mirror, repository, repository)
    statement = canonical_json({"_type": "https://in-toto.io/Statement/v1",
                                "subject": [{"name": repository, "digest": {"sha256": image.digest[7:]}}],
                                "predicateType": "https://example.test/attested", "predicate": {}})
    bundle = sigstore_js_bundle(sigstore_js, keys["release"], statement if dsse else image.manifest.data, dsse)
    assert bundle["mediaType"] in BUNDLE_MEDIA_TYPES
    push_bundle(mirror, repository, image, bundle)
    result = verify(mirror, f"{repository}:v1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sigstore bundle signature" in result.stdout and "signed by release" in result.stdout


def test_decide_takes_the_first_matching_rule():
    image, other = Digest.of(b"image"), Digest.of(b"other")
    policy = Signatures("enforce", (), (SignatureRule("docker.io/library/*", ("release", "ops")),
                                        SignatureRule("docker.io/*", ("release",)), SignatureRule("*", ())))
    by_ops = [Signature("cosign", "tag", key="ops", subject=image)]
    assert decide(policy, "docker.io/library/alpine", image, by_ops) == Decision(True, "docker.io/library/*", [],
                                                                                 ["ops"])
    assert decide(policy, "docker.io/org/app", image, by_ops) == Decision(False, "docker.io/*", ["release"], [])
    assert decide(policy, "team/app", image, []) == Decision(True, "*", [], [])
    assert not decide(policy, "docker.io/library/alpine", other, by_ops).allowed
    assert decide(Signatures(), "team/app", image, []) == Decision(True, "", [], [])
