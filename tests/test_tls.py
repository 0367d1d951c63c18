"""``mirror tls init`` makes a CA and a server certificate that TLS clients accept; the ``tls`` config key."""
from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from mirror import cli, config, tls
from mirror.errors import ConfigError
from tests.images import build_image, push
from tests.peers import MirrorProcess

HOSTNAME = "mirror.example"
IMAGE = build_image("tls", layers=1)


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory):
    """A directory after ``mirror tls init --hostname mirror.example --ip 10.1.2.3``."""
    folder = tmp_path_factory.mktemp("tls")
    assert cli.main(["tls", "init", "--dir", str(folder), "--hostname", HOSTNAME, "--ip", "10.1.2.3"]) == 0
    return folder


def load(path: Path) -> x509.Certificate:
    """The certificate in ``path``."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_writes_the_ca_and_server_files_keys_private(tls_dir):
    assert sorted(path.name for path in tls_dir.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert (tls_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (tls_dir / "server.key").stat().st_mode & 0o777 == 0o600


def test_init_prints_where_the_files_go(tmp_path, capsys):
    assert tls.init(tmp_path, HOSTNAME, []) == 0
    out = capsys.readouterr().out
    for expected in (f"/etc/docker/certs.d/{HOSTNAME}:5000/ca.crt",
                     f"/etc/containers/certs.d/{HOSTNAME}:5000/ca.crt",
                     f'ca = "/etc/containerd/certs.d/{HOSTNAME}:5000/ca.crt"', "tls:\n",
                     f"cert: {tmp_path / 'server.crt'}", f"key: {tmp_path / 'server.key'}"):
        assert expected in out


def test_server_certificate_names_the_host_the_ips_and_loopback(tls_dir):
    cert = load(tls_dir / "server.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [HOSTNAME, "localhost"]
    addresses = [ipaddress.ip_address(address) for address in ("10.1.2.3", "127.0.0.1", "::1")]
    assert sans.get_values_for_type(x509.IPAddress) == addresses
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize("name", [x509.DNSName(HOSTNAME), x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
                                  x509.DNSName("localhost")])
def test_server_certificate_chains_to_the_ca(tls_dir, name):
    verifier = PolicyBuilder().store(Store([load(tls_dir / "ca.crt")])).build_server_verifier(name)
    chain = verifier.verify(load(tls_dir / "server.crt"), [])
    assert chain[-1] == load(tls_dir / "ca.crt")


def test_another_host_name_is_refused(tls_dir):
    verifier = PolicyBuilder().store(Store([load(tls_dir / "ca.crt")])).build_server_verifier(
        x509.DNSName("other.example"))
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(load(tls_dir / "server.crt"), [])


def handshake(context: ssl.SSLContext, cafile: Path, server_hostname: str) -> bytes:
    """Connect a client trusting only ``cafile`` to a loopback server with ``context``; return its bytes."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            connection, _ = listener.accept()
            with context.wrap_socket(connection, server_side=True) as tls_connection:
                tls_connection.sendall(b"hello")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client = ssl.create_default_context(cafile=str(cafile))
        with socket.create_connection(listener.getsockname(), timeout=30) as raw, \
                client.wrap_socket(raw, server_hostname=server_hostname) as connection:
            data = connection.recv(5)
        thread.join(30)
    return data


@pytest.mark.parametrize("server_hostname", [HOSTNAME, "127.0.0.1", "localhost"])
def test_server_context_completes_a_handshake_with_a_client_trusting_only_the_ca(tls_dir, server_hostname):
    context = tls.server_ssl_context(tls_dir / "server.crt", tls_dir / "server.key")
    assert handshake(context, tls_dir / "ca.crt", server_hostname) == b"hello"


def test_rerun_keeps_the_ca_and_issues_a_new_server_certificate(tmp_path):
    tls.init(tmp_path, HOSTNAME, [])
    ca, server = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "server.crt").read_bytes()
    tls.init(tmp_path, "other.example", ["192.0.2.7"])
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert (tmp_path / "server.crt").read_bytes() != server
    verifier = PolicyBuilder().store(Store([load(tmp_path / "ca.crt")])).build_server_verifier(
        x509.DNSName("other.example"))
    verifier.verify(load(tmp_path / "server.crt"), [])


def san(path: Path) -> list[str]:
    """The names the certificate at ``path`` is valid for, in order."""
    names = load(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names]


def test_hostname_and_ip_are_repeatable(tmp_path):
    argv = ["tls", "init", "--dir", str(tmp_path), "--hostname", "a.example", "--hostname", "b.example",
            "--ip", "10.0.0.5", "--ip", "10.0.0.6"]
    assert cli.main(argv) == 0
    assert san(tmp_path / "server.crt") == ["a.example", "b.example", "10.0.0.5", "10.0.0.6", "localhost",
                                            "127.0.0.1", "::1"]


def test_a_rerun_keeps_the_earlier_names_and_the_ca_unless_told_to_replace_them(tmp_path, capsys):
    assert cli.main(["tls", "init", "--dir", str(tmp_path), "--hostname", "a.example", "--ip", "10.0.0.5"]) == 0
    ca = (tmp_path / "ca.crt").read_bytes()
    assert cli.main(["tls", "init", "--dir", str(tmp_path), "--hostname", "b.example"]) == 0
    assert san(tmp_path / "server.crt") == ["b.example", "a.example", "10.0.0.5", "localhost", "127.0.0.1", "::1"]
    assert "kept the earlier certificate's names" in capsys.readouterr().out
    assert cli.main(["tls", "init", "--dir", str(tmp_path), "--ip", "10.0.0.6"]) == 0  # names come from before
    assert san(tmp_path / "server.crt")[:4] == ["b.example", "a.example", "10.0.0.5", "10.0.0.6"]
    assert cli.main(["tls", "init", "--dir", str(tmp_path), "--hostname", "c.example", "--replace-names"]) == 0
    assert san(tmp_path / "server.crt") == ["c.example", "localhost", "127.0.0.1", "::1"]
    assert (tmp_path / "ca.crt").read_bytes() == ca
    for name in ("c.example", "localhost"):
        verifier = PolicyBuilder().store(Store([load(tmp_path / "ca.crt")])).build_server_verifier(x509.DNSName(name))
        verifier.verify(load(tmp_path / "server.crt"), [])


def test_a_new_certificate_needs_a_name(tmp_path, capsys):
    assert cli.main(["tls", "init", "--dir", str(tmp_path)]) == 2
    assert "--hostname" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # not even a CA


def test_bad_arguments_are_named(tmp_path, capsys):
    assert cli.main(["tls", "init", "--dir", str(tmp_path), "--hostname", HOSTNAME, "--ip", "not-an-ip"]) == 2
    assert "--ip" in capsys.readouterr().err
    assert cli.main(["tls", "init", "--dir", str(tmp_path), "--hostname", "bad name/x"]) == 2
    assert "--hostname" in capsys.readouterr().err


def test_server_context_refuses_a_key_of_another_certificate(tls_dir, tmp_path):
    tls.init(tmp_path, HOSTNAME, [])
    with pytest.raises(ConfigError) as raised:
        tls.server_ssl_context(tls_dir / "server.crt", tmp_path / "server.key")
    assert raised.value.key == "tls"


def write_config(path: Path, text: str) -> Path:
    """Write a config file and return its path."""
    path.write_text(text)
    return path


def test_config_tls_key(tls_dir, tmp_path):
    loaded = config.load(write_config(tmp_path / "c.yaml", f"tls:\n  cert: {tls_dir}/server.crt\n"
                                                            f"  key: {tls_dir}/server.key\n"), {})
    assert loaded.tls == config.Tls(tls_dir / "server.crt", tls_dir / "server.key")
    assert config.load(None, {}).tls is None
    from_environ = config.load(None, {"MIRROR_TLS_CERT": f"{tls_dir}/server.crt",
                                      "MIRROR_TLS_KEY": f"{tls_dir}/server.key"})
    assert from_environ.tls == loaded.tls


@pytest.mark.parametrize(("text", "key"), [
    ("tls:\n  cert: /nonexistent/server.crt\n  key: {dir}/server.key\n", "tls.cert"),
    ("tls:\n  cert: {dir}/server.crt\n  key: {dir}/missing.key\n", "tls.key"),
    ("tls:\n  cert: {dir}/server.crt\n", "tls"),
    ("tls: {dir}/server.crt\n", "tls"),
    ("tls:\n  cert: {dir}/server.crt\n  key: {dir}/server.key\n  ca: x\n", "tls"),
])
def test_config_tls_errors_name_the_key(tls_dir, tmp_path, text, key):
    with pytest.raises(ConfigError) as raised:
        config.load(write_config(tmp_path / "c.yaml", text.format(dir=tls_dir)), {})
    assert raised.value.key == key


@pytest.fixture(scope="module")
def tls_mirror(tmp_path_factory):
    """A hosted ``mirror serve`` over HTTPS with a certificate from ``mirror tls init`` (IP SAN 0.0.0.0).

    dockerd takes any 127.0.0.0/8 registry as insecure, so dockerd reaches it as ``0.0.0.0:PORT``.
    """
    workdir = tmp_path_factory.mktemp("tls-mirror")
    certs = workdir / "tls"
    assert cli.main(["tls", "init", "--dir", str(certs), "--hostname", "mirror.test", "--ip", "0.0.0.0"]) == 0
    server = MirrorProcess(workdir, {"upstreams": [], "default_upstream": None,
                                     "tls": {"cert": str(certs / "server.crt"), "key": str(certs / "server.key")}})
    with server:
        with httpx.Client(verify=ssl.create_default_context(cafile=certs / "ca.crt"), timeout=60) as client:
            for repository in ("tls/app", "library/tlshub"):
                push(server.url, repository, "v1", IMAGE, client=client)
        yield server, certs / "ca.crt"


def test_the_mirror_serves_https_with_the_generated_certificate(tls_mirror):
    server, ca = tls_mirror
    assert server.url.startswith("https://127.0.0.1:")
    with httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=30) as client:
        assert client.get(f"{server.url}/v2/").status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"), httpx.Client(timeout=30) as client:
        client.get(f"{server.url}/v2/")


def test_dockerd_pulls_over_https_trusting_only_the_generated_ca(tls_mirror, dockerd):
    server, ca = tls_mirror
    host = f"0.0.0.0:{server.port}"
    assert "insecure-registries" not in dockerd.daemon_json
    refused = dockerd.docker("pull", f"{host}/tls/app:v1", check=False)
    assert refused.returncode != 0 and "certificate signed by unknown authority" in refused.stderr
    dockerd.trust(host, ca)  # /etc/docker/certs.d/0.0.0.0:PORT/ca.crt, as `mirror tls init` says
    pulled = dockerd.docker("pull", f"{host}/tls/app:v1")
    assert IMAGE.digest in pulled.stdout
    dockerd.configure({"registry-mirrors": [f"https://{host}"]})
    assert IMAGE.digest in dockerd.docker("pull", "tlshub:v1").stdout  # docker.io/library/tlshub via the mirror


def test_podman_pulls_over_https_with_the_ca_in_its_cert_dir(tls_mirror, podman, tmp_path):
    server, ca = tls_mirror
    cert_dir = tmp_path / "certs.d" / server.host  # the layout of /etc/containers/certs.d/HOST:PORT/
    cert_dir.mkdir(parents=True)
    shutil.copy(ca, cert_dir / "ca.crt")
    pulled = podman.pull(f"{server.host}/tls/app:v1", "--cert-dir", str(cert_dir), tls_verify=True)
    assert pulled.returncode == 0
    assert IMAGE.digest in podman.podman("image", "inspect", "--format", "{{.Digest}}",
                                         f"{server.host}/tls/app:v1").stdout
