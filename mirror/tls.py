"""TLS for isolated networks: ``mirror tls init`` makes a private CA and a server certificate; the server's
SSL context.

    DIR/ca.crt       the CA certificate clients trust (docker, containerd and podman certs.d)
    DIR/ca.key       the CA's private key (mode 0600); only needed to issue another server certificate
    DIR/server.crt   the server certificate for the host name and addresses clients use
    DIR/server.key   the server's private key (mode 0600); ``tls.key`` in the config

The server certificate names every host name and address given (one or several) and the loopback names.
Running ``init`` again keeps an existing CA (clients keep trusting it) and issues a new server certificate for
the names of the old one plus those given (only those given with ``replace_names``).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import uuid
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mirror.errors import ConfigError

CA_DAYS = 20 * 365
SERVER_DAYS = 5 * 365
EXAMPLE_PORT = 5000
LOOPBACK = ("localhost", "127.0.0.1", "::1")
# A private key and the certificate of its public key.
KeyPair = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]+")


def init(directory: str | Path, hostnames: str | Sequence[str], ips: Sequence[str],
         replace_names: bool = False) -> int:
    """Write a CA (or reuse the one there) and a server certificate (see the module); print how to use them."""
    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    given = [hostnames] if isinstance(hostnames, str) else list(hostnames)
    kept = [] if replace_names else _earlier_names(folder / "server.crt")
    names = _subject_names(given, ips, kept)
    hostname = str(names[0].value)
    if (folder / "ca.key").exists() and (folder / "ca.crt").exists():
        ca_key, ca_cert = load_ca(folder)
        made = "kept the existing CA"
    else:
        ca_key, ca_cert = make_ca(f"mirror CA for {hostname}")
        write_private(folder / "ca.key", _pem_key(ca_key))
        (folder / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        made = "made a new CA"
    if kept:
        made += "; kept the earlier certificate's names (--replace-names drops them)"
    key, cert = make_server_certificate(ca_key, ca_cert, names)
    write_private(folder / "server.key", _pem_key(key))
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    print(instructions(folder, hostname, names, made, cert.not_valid_after_utc.date()))
    return 0


def _subject_names(hostnames: Sequence[str], ips: Sequence[str],
                   kept: Sequence[x509.GeneralName]) -> list[x509.GeneralName]:
    """The SAN entries, each once: the host names (or addresses), the ``kept`` names, each ``--ip``, and the
    loopback names; the first is the one clients are told to use."""
    names = []
    for hostname in hostnames:
        if not _HOSTNAME.fullmatch(hostname):
            raise ConfigError("--hostname", f"{hostname!r} is not a host name or IP address")
        names.append(_general_name(hostname))
    names += kept
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ConfigError("--ip", f"{ip!r} is not an IP address") from None
    if not names:
        raise ConfigError("--hostname", "give the host name (or --ip the address) clients reach the mirror by")
    names += [_general_name(name) for name in LOOPBACK]
    return list(dict.fromkeys(names))


def _earlier_names(path: Path) -> list[x509.GeneralName]:
    """The names (but the loopback ones) of the server certificate at ``path``, if there is one."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except FileNotFoundError:
        return []
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise ConfigError(str(path), f"cannot read its names ({exc}): give --replace-names to issue a certificate "
                                     "for the names given only") from exc
    loopback = {_general_name(name) for name in LOOPBACK}
    return [name for name in names if isinstance(name, x509.DNSName | x509.IPAddress) and name not in loopback]


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value.lower())


def make_ca(common_name: str) -> KeyPair:
    """A new self-signed CA key and certificate that may sign server certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, uuid.uuid4().hex)])
    public = key.public_key()
    cert = (_builder(name, name, public, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                            names: list[x509.GeneralName]) -> KeyPair:
    """A new server key and its certificate for ``names``, signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))])
    public = key.public_key()
    ca_identifier = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (_builder(subject, ca_cert.subject, public, SERVER_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_identifier),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _builder(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clocks a little behind
            .not_valid_after(now + datetime.timedelta(days=days)))


def load_ca(folder: Path) -> KeyPair:
    """The CA key and certificate in ``folder``."""
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(str(folder / "ca.key"), "is not the EC key mirror tls init writes")
    return key, x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``, readable by its owner only from the first byte on."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(temp, path)


def instructions(folder: Path, hostname: str, names: list[x509.GeneralName], made: str,
                 expires: datetime.date) -> str:
    """What ``init`` wrote and where each file goes, for the operator."""
    host = f"{hostname}:{EXAMPLE_PORT}"
    sans = ", ".join(str(name.value) for name in names)
    return f"""\
mirror tls init: {made}; issued a server certificate for {sans} (valid until {expires}).
  {folder / "ca.crt"}      the CA certificate: install it on every client (below)
  {folder / "ca.key"}      the CA key: keep it safe, or offline; needed only to issue new certificates
  {folder / "server.crt"}  {folder / "server.key"}  the server's certificate and key

Serve HTTPS: add to /etc/mirror/config.yaml (the service user must be able to read both files,
e.g. chgrp mirror {folder / "server.key"} && chmod 0640 {folder / "server.key"}), then restart:
  tls:
    cert: {folder / "server.crt"}
    key: {folder / "server.key"}

Trust the CA on clients (HOST:PORT as clients reach the mirror; {EXAMPLE_PORT} is the default listen port):
  docker:      /etc/docker/certs.d/{host}/ca.crt
               then "registry-mirrors": ["https://{host}"] in /etc/docker/daemon.json
  podman:      /etc/containers/certs.d/{host}/ca.crt
  containerd:  /etc/containerd/certs.d/{host}/ca.crt, and in /etc/containerd/certs.d/docker.io/hosts.toml:
                 [host."https://{host}"]
                   capabilities = ["pull", "resolve"]
                   ca = "/etc/containerd/certs.d/{host}/ca.crt"
"""


def server_ssl_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server-side TLS context with ``cert`` (chain) and ``key``; ConfigError naming the key if unusable.

    Build a new one on SIGHUP: connections already open keep the context they started with.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls", f"cannot use certificate {cert} with key {key}: {exc}") from exc
    return context
