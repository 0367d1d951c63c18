"""Ed25519 keys and the detached signature over the exact ``bundle.json`` bytes (``bundle.json.sig``).

The signature member is JSON: ``{"algorithm": "ed25519", "keyid": "sha256:<hex>", "signature": "<base64>"}``,
where the key id is the sha256 of the raw 32-byte public key.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mirror.bundle.format import MAX_SIGNATURE, SIGNATURE
from mirror.errors import BundleError, SignatureInvalid
from mirror.manifest import load_json

ALGORITHM = "ed25519"


def keygen(keyfile: str | Path) -> int:
    """Write a new private key to ``keyfile`` (mode 0600) and its public key to ``keyfile.pub``."""
    path, public_path = Path(keyfile), Path(f"{keyfile}.pub")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"mirror: {path} exists; not overwriting a key", file=sys.stderr)
        return 1
    with os.fdopen(descriptor, "wb") as file:
        file.write(private_pem)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    print(f"wrote private key {path} and public key {public_path} (key id {key_id(key.public_key())})")
    return 0


def key_id(key: Ed25519PublicKey) -> str:
    """The id of a public key: the sha256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path``."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: cannot read an Ed25519 private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file ``path``."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: cannot read an Ed25519 public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    return key


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The ``bundle.json.sig`` member for ``data``."""
    document = {"algorithm": ALGORITHM, "keyid": key_id(key.public_key()),
                "signature": base64.b64encode(key.sign(data)).decode()}
    return json.dumps(document).encode() + b"\n"


def check(data: bytes, signature: bytes | None, trusted: Sequence[Ed25519PublicKey]) -> str:
    """Check ``signature`` over ``data`` against ``trusted`` keys; say what was found.

    With no trusted key any bundle passes (its signature is reported, not checked); with trusted keys an
    unsigned bundle, one signed by another key or a wrong signature raise SignatureInvalid.
    """
    if signature is None:
        if trusted:
            raise SignatureInvalid("bad signature: the bundle is unsigned but trusted keys are configured")
        return "unsigned"
    try:
        document = load_json(signature, SIGNATURE, max_size=MAX_SIGNATURE, error=SignatureInvalid)
        keyid, raw = str(document["keyid"]), base64.b64decode(document["signature"], validate=True)
        if document.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {document.get('algorithm')!r}")
    except (SignatureInvalid, ValueError, KeyError, TypeError) as exc:
        raise SignatureInvalid(f"bad signature: {SIGNATURE} is malformed ({exc})") from exc
    if not trusted:
        return f"signed by key {keyid} (not checked: no trusted key given)"
    key = next((key for key in trusted if key_id(key) == keyid), None)
    if key is None:
        raise SignatureInvalid(f"bad signature: signed by key {keyid}, which is not trusted")
    try:
        key.verify(raw, data)
    except InvalidSignature:
        raise SignatureInvalid(f"bad signature: bundle.json does not match its signature ({keyid})") from None
    return f"signature by trusted key {keyid} verified"
