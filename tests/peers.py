"""Real peers for tests: registries, token server, dockerd, containerd, podman, skopeo, Ceph S3, Redis, the mirror.

Each server listens on a free 127.0.0.1 port (or its own unix socket), keeps its files and its log in a work
directory and is stopped by its own process id. A startup failure raises PeerError with the log's last lines.
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.images import Index, write_oci_layout

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKER_CLIENT = "/usr/bin/docker"  # the client matching dockerd 20.10; /usr/local/bin/docker may be newer
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


class PeerError(RuntimeError):
    """A peer did not start, or a command run against a peer failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(program: str, root: bool = False) -> str:
    """The path of ``program``; skip the test if it is missing (or needs root), or fail it when CI=true."""
    path = program if os.path.isabs(program) else shutil.which(
        program, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if not (path and os.access(path, os.X_OK)):
        reason = f"{program} is not installed (tools/test installs it)"
    elif root and os.geteuid() != 0:
        reason = f"{program} needs root here"
    else:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def wait_until(probe: Callable[[], bool], timeout: float, what: str,
               alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``probe`` until true; raise PeerError after ``timeout`` seconds or once ``alive`` is false."""
    deadline = time.monotonic() + timeout
    while not probe():
        if not alive():
            raise PeerError(f"exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise PeerError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def http_response(url: str, transport: httpx.HTTPTransport | None = None) -> httpx.Response | None:
    """The answer to ``GET url`` (TLS unverified), or None while nothing answers there."""
    try:
        with httpx.Client(verify=False, timeout=2, transport=transport) as client:
            return client.get(url)
    except httpx.TransportError:
        return None


def wait_for_http(url: str, timeout: float = 30.0,
                  alive: Callable[[], bool] = lambda: True) -> httpx.Response:
    """Wait until ``url`` answers with any HTTP status and return that response."""
    wait_until(lambda: http_response(url) is not None, timeout, f"{url} to answer", alive)
    response = http_response(url)
    assert response is not None
    return response


def peer_environ(extra: Mapping[str, str] | None = None, unset: Collection[str] = ()) -> dict[str, str]:
    """This environment without ``unset``, plus ``extra``, with every HTTP proxy set to a closed loopback port.

    Peers reach loopback directly, and anything else (docker's fallback to Docker Hub) fails at once.
    """
    environ = {key: value for key, value in os.environ.items()
               if key.lower() not in _PROXY_VARIABLES and key not in unset}
    sinkhole = f"http://127.0.0.1:{free_port()}"
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        environ[name] = environ[name.upper()] = sinkhole
    environ["no_proxy"] = environ["NO_PROXY"] = "127.0.0.1,localhost,::1,0.0.0.0"
    return {**environ, **(extra or {})}


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, check: bool = True,
        input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a peer command; raise PeerError with its output when it fails and ``check`` is set."""
    result = subprocess.run(list(argv), env=peer_environ(env), input=input, capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise PeerError(f"{' '.join(argv)} exited {result.returncode}\n{result.stderr}{result.stdout}")
    return result


def short_tempdir(prefix: str) -> Path:
    """A new directory with a short path under /tmp, for unix sockets (paths are limited to 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class PeerProcess:
    """A long-running peer program with its own log file in ``workdir``, stopped by its own pid."""

    name = "peer"
    stop_timeout = 15.0

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> Self:
        """Start the peer and wait until it serves; raise PeerError with its log tail if it does not."""
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """The process id of the running peer."""
        assert self._process is not None, f"{self.name} is not running"
        return self._process.pid

    def running(self) -> bool:
        """Whether the peer process is alive."""
        return self._process is not None and self._process.poll() is None

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the peer process."""
        assert self._process is not None, f"{self.name} is not running"
        self._process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the peer to exit by itself; return its exit status."""
        assert self._process is not None, f"{self.name} is not running"
        return self._process.wait(timeout)

    def stop(self) -> None:
        """Terminate the peer by its pid, killing it if it does not exit within ``stop_timeout``."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log(self) -> str:
        """Everything the peer wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log().splitlines()[-lines:])

    def error(self, message: str) -> PeerError:
        """A PeerError naming this peer, with the tail of its log."""
        return PeerError(f"{self.name}: {message}\n--- last lines of {self.log_path} ---\n{self.log_tail()}")

    def wait_until(self, probe: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Wait for ``probe`` while the peer lives; on failure stop it and raise with its log tail."""
        try:
            wait_until(probe, timeout, what, alive=self.running)
        except PeerError as exc:
            self.stop()
            raise self.error(str(exc)) from None

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
               cwd: str | Path | None = None, unset: Collection[str] = ()) -> None:
        if self.running():
            raise PeerError(f"{self.name} is already running")
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"--- {self.name}: {' '.join(map(str, argv))}\n".encode())
        self._log_file.flush()
        self._process = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=self._log_file,
                                         stderr=subprocess.STDOUT, env=peer_environ(env, unset), cwd=cwd,
                                         start_new_session=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered: who asked, for what, what it granted."""

    account: str | None
    scopes: tuple[str, ...]
    access: tuple[dict[str, Any], ...]
    status: int
    expires: int | None
    token: str | None


class TokenServer:
    """A Docker-Hub-like token endpoint: anonymous pull of public repositories, credentials for private."""

    issuer = "test-token-issuer"

    def __init__(self, workdir: str | Path, username: str = "alice", password: str = "secret",
                 ttl: int = 300, service: str = "test-registry"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.username, self.password, self.ttl, self.service = username, password, ttl, service
        self.requests: list[TokenRequest] = []
        self.cert_path = self.workdir / "token-signer.crt"
        self._key, self._certificate = _self_signed(self.issuer)
        self.cert_path.write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The base URL of the running server."""
        assert self._server is not None, "token server is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def realm(self) -> str:
        """The token endpoint registries send clients to."""
        return f"{self.url}/token"

    def start(self) -> TokenServer:
        """Listen on a free loopback port, serving from a background thread."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="token-server", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def grant(self, account: str | None, scope: str) -> dict[str, Any] | None:
        """The access entry a token for ``scope`` carries, or None for a scope it cannot name."""
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if not name:
            return None
        requested = [action for action in actions.split(",") if action]
        if account is not None:
            allowed = requested
        elif kind == "repository" and "private" not in name:
            allowed = [action for action in requested if action == "pull"]
        else:
            allowed = []
        return {"type": kind, "name": name, "actions": allowed}

    def issue(self, account: str | None, scopes: Sequence[str]) -> TokenRequest:
        """Sign a token for ``account`` (None: anonymous) and record it."""
        now = int(time.time())
        access = tuple(entry for entry in (self.grant(account, scope) for scope in scopes) if entry)
        claims = {"iss": self.issuer, "sub": account or "", "aud": self.service, "exp": now + self.ttl,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": list(access)}
        certificate = base64.b64encode(self._certificate.public_bytes(serialization.Encoding.DER)).decode()
        header = {"typ": "JWT", "alg": "ES256", "x5c": [certificate]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        token = f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
        record = TokenRequest(account, tuple(scopes), access, 200, claims["exp"], token)
        self.requests.append(record)
        return record

    def authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """Check a Basic ``Authorization`` header: (valid, account); no header is valid and anonymous."""
        if not authorization:
            return True, None
        scheme, _, encoded = authorization.partition(" ")
        try:
            username, _, password = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return False, None
        valid = scheme.lower() == "basic" and (username, password) == (self.username, self.password)
        return valid, username if valid else None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _token_handler(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
            url = urlsplit(self.path)
            if url.path != "/token":
                return self._reply(404, {"details": "not found"})
            scopes = [scope for value in parse_qs(url.query).get("scope", []) for scope in value.split(" ")]
            valid, account = server.authenticate(self.headers.get("Authorization"))
            if not valid:
                server.requests.append(TokenRequest(None, tuple(scopes), (), 401, None, None))
                return self._reply(401, {"details": "incorrect username or password"})
            record = server.issue(account, scopes)
            issued = datetime.datetime.fromtimestamp(record.expires - server.ttl, datetime.UTC)
            self._reply(200, {"token": record.token, "access_token": record.token, "expires_in": server.ttl,
                              "issued_at": issued.isoformat().replace("+00:00", "Z")})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            """Requests are recorded in ``TokenServer.requests`` instead."""

    return Handler


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_self_signed_certificate(directory: str | Path, name: str = "test") -> tuple[Path, Path]:
    """Write ``name.crt`` and ``name.key``: a self-signed CA certificate for localhost, 127.0.0.1, ::1, 0.0.0.0.

    Being its own CA, the certificate is also what a client is told to trust.
    """
    key, certificate = _self_signed(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _self_signed(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    names = [x509.DNSName("localhost"),
             *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1", "0.0.0.0"))]
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .sign(key, hashes.SHA256()))
    return key, certificate


@dataclass(frozen=True)
class AccessLogLine:
    """One request from the Distribution registry's access log."""

    method: str
    path: str
    status: int


_ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) ')


@dataclass(frozen=True)
class S3Storage:
    """An S3 bucket to keep data in: endpoint URL, bucket, credentials, region and an optional key prefix."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    root_directory: str | None = None


class DistributionRegistry(PeerProcess):
    """The reference Distribution registry (docker-registry 2.8) with filesystem storage in ``workdir``.

    Optionally behind a TokenServer (``auth``), serving TLS (``tls``: certificate and key files), as a
    pull-through cache of ``proxy_remote_url``, or keeping its data in an S3 bucket (``s3``) instead.
    """

    name = "docker-registry"

    def __init__(self, workdir: str | Path, auth: TokenServer | None = None,
                 proxy_remote_url: str | None = None, username: str | None = None,
                 password: str | None = None, tls: tuple[Path, Path] | None = None,
                 s3: S3Storage | None = None):
        super().__init__(workdir)
        self.auth, self.proxy_remote_url, self.tls, self.s3 = auth, proxy_remote_url, tls, s3
        self.username, self.password = username, password
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.config_path = self.workdir / "config.yml"
        self._secret = uuid.uuid4().hex

    def config(self) -> dict[str, Any]:
        """The registry's configuration as written to config.yml."""
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.workdir / "data")},
                        "delete": {"enabled": True}, "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.host, "secret": self._secret},
        }
        if self.s3 is not None:
            config["storage"].pop("filesystem")
            config["storage"]["s3"] = {
                "regionendpoint": self.s3.endpoint, "bucket": self.s3.bucket, "region": self.s3.region,
                "accesskey": self.s3.access_key, "secretkey": self.s3.secret_key,
                "secure": urlsplit(self.s3.endpoint).scheme == "https", "v4auth": True,
                **({"rootdirectory": self.s3.root_directory} if self.s3.root_directory else {})}
        if self.tls is not None:
            config["http"]["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        if self.auth is not None:
            config["auth"] = {"token": {"realm": self.auth.realm, "service": self.auth.service,
                                        "issuer": self.auth.issuer,
                                        "rootcertbundle": str(self.auth.cert_path)}}
        if self.proxy_remote_url is not None:
            config["proxy"] = {"remoteurl": self.proxy_remote_url}
            if self.username is not None:
                config["proxy"].update(username=self.username, password=self.password)
        return config

    def start(self) -> DistributionRegistry:
        """Write config.yml, start ``docker-registry serve`` and wait until ``/v2/`` answers."""
        program = require("/usr/bin/docker-registry")
        self.config_path.write_text(yaml.safe_dump(self.config()))
        # Only config.yml says where S3 is: the host's AWS_* variables (AWS_CA_BUNDLE...) stay out.
        self._spawn([program, "serve", str(self.config_path)], unset=[key for key in os.environ
                                                                     if key.startswith("AWS_")])
        self.wait_until(lambda: http_response(f"{self.url}/v2/") is not None, f"{self.url}/v2/", timeout=30)
        return self

    def access_log(self) -> list[AccessLogLine]:
        """Every request logged so far, in log order, once the requests made before this call are logged."""
        marker = uuid.uuid4().hex
        httpx.get(f"{self.url}/v2/", params={"sync": marker}, timeout=10, verify=False)
        self.wait_until(lambda: marker in self.log(), "the access log to catch up", timeout=10)
        return [AccessLogLine(match["method"], match["path"], int(match["status"]))
                for match in map(_ACCESS_LINE.search, self.log().splitlines())
                if match and "sync=" not in match["path"]]

    def count_requests(self, method: str, path_substring: str, status: int | None = None) -> int:
        """How many ``method`` requests with ``path_substring`` in their path (answered ``status``) it got."""
        return sum(1 for line in self.access_log() if line.method == method and path_substring in line.path
                   and status in (None, line.status))


_SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, the one python3-rados is built for
# Run by _SYSTEM_PYTHON: connect to the cluster of argv[1], run the monitor commands given as JSON on stdin,
# then wait (up to argv[2] seconds) until the OSD numbered "wait_osd_up" is up; print the outputs as JSON.
_RADOS_COMMANDS = """
import json, sys, time
import rados
conf, timeout = sys.argv[1], int(sys.argv[2])
request = json.load(sys.stdin)
cluster = rados.Rados(conffile=conf, conf={"client_mount_timeout": str(timeout)})
cluster.connect()
def mon(command, data=""):
    status, output, message = cluster.mon_command(json.dumps(command), data.encode(), timeout=timeout)
    if status != 0:
        sys.exit(f"{command['prefix']} failed ({status}): {message}")
    return output.decode()
outputs = [mon(item["command"], item.get("input", "")) for item in request.get("commands", [])]
osd, deadline = request.get("wait_osd_up"), time.monotonic() + timeout
while osd is not None and not any(entry["osd"] == osd and entry["up"]
                                  for entry in json.loads(mon({"prefix": "osd dump", "format": "json"}))["osds"]):
    if time.monotonic() > deadline:
        sys.exit(f"osd.{osd} is not up after {timeout}s")
    time.sleep(0.05)
cluster.shutdown()
print(json.dumps(outputs))
"""
_RGW_POOLS = (".rgw.root", "default.rgw.control", "default.rgw.meta", "default.rgw.log",
              "default.rgw.buckets.index", "default.rgw.buckets.data", "default.rgw.buckets.non-ec")


def _cephx_key() -> str:
    """A new random cephx secret, encoded as ``ceph-authtool --gen-print-key`` prints one."""
    # CryptoKey's encoding: type (1, AES), creation time (seconds, nanoseconds), length, the 16 secret bytes
    return base64.b64encode(struct.pack("<HIIH", 1, int(time.time()), 0, 16) + os.urandom(16)).decode()


class CephDaemon(PeerProcess):
    """One Ceph daemon run with ``-d`` (foreground, logging to its log file), stopped by its process group."""

    def __init__(self, workdir: str | Path, name: str, stop_timeout: float = 10.0):
        self.name, self.stop_timeout = name, stop_timeout
        super().__init__(workdir)

    def start(self) -> CephDaemon:
        """Ceph daemons are started by their cluster (CephRGW)."""
        raise NotImplementedError

    def stop(self) -> None:
        """SIGTERM to its process group (it was started in a session of its own), SIGKILL after ``stop_timeout``."""
        if self._process is not None and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        super().stop()

    def log(self) -> str:
        """Everything the daemon logged so far (without the empty line Ceph 16 adds after each on stderr)."""
        return "\n".join(line for line in super().log().splitlines() if line)


class CephRGW:
    """A single-node Ceph cluster from nothing: one monitor, one OSD on memstore and radosgw (beast) as S3.

    Everything listens on 127.0.0.1 (the gateway on a free port, the daemons' messengers on 30000-32000, off
    the ephemeral range that free_port draws from), every file is in ``workdir`` (the daemons' logs in
    ``ceph-mon.log``, ``ceph-osd.log``, ``radosgw.log``), and the daemons are stopped by their own pids.
    Ceph's tools find the cluster through ``CEPH_CONF``, given to them only (see ``environ``).
    """

    region = "us-east-1"
    timeout = 120

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.workdir / "ceph.conf"
        self.run_dir: Path | None = None  # for admin sockets, made at start (see short_tempdir)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = uuid.uuid4().hex[:20].upper()
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        self.mon = CephDaemon(self.workdir, "ceph-mon")
        self.osd = CephDaemon(self.workdir, "ceph-osd")
        # radosgw takes 5 s to shut down: the cluster is thrown away, so it gets 1 s before SIGKILL.
        self.rgw = CephDaemon(self.workdir, "radosgw", stop_timeout=1.0)
        self.start_seconds: float | None = None
        self._started: list[CephDaemon] = []

    @property
    def environ(self) -> dict[str, str]:
        """The environment variables Ceph's command-line tools need to find this cluster."""
        return {"CEPH_CONF": str(self.conf_path)}

    @property
    def daemons(self) -> tuple[CephDaemon, CephDaemon, CephDaemon]:
        """The monitor, the OSD and the gateway."""
        return self.mon, self.osd, self.rgw

    def start(self) -> CephRGW:
        """Create the cluster, start its three daemons and an S3 user; raise PeerError if it does not come up."""
        programs = {name: require(name, root=True) for name in ("radosgw", "ceph-mon", "ceph-osd")}
        programs.update((name, require(name)) for name in ("radosgw-admin", "monmaptool", _SYSTEM_PYTHON))
        started = time.monotonic()
        self.run_dir = short_tempdir("ceph-")
        try:
            self._bootstrap(programs)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Stop the gateway, the OSD and the monitor, each by its pid; remove the admin socket directory."""
        while self._started:
            self._started.pop().stop()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    def running(self) -> bool:
        """Whether all three daemons are alive."""
        return all(daemon.running() for daemon in self.daemons)

    def storage(self, bucket: str, root_directory: str | None = None) -> S3Storage:
        """Where ``bucket`` is on this gateway, with this cluster's S3 user (for DistributionRegistry's ``s3``)."""
        return S3Storage(self.endpoint, bucket, self.access_key, self.secret_key, self.region, root_directory)

    def client(self) -> Any:
        """A boto3 S3 client of this gateway's user: path-style addressing, SigV4."""
        import boto3  # here, not at the top: only the tests that use the gateway need boto3
        from botocore.config import Config

        config = Config(s3={"addressing_style": "path"}, signature_version="s3v4", connect_timeout=5,
                        read_timeout=60)
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region, config=config,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def bucket(self, name: str) -> str:
        """Create the bucket ``name`` (3 to 63 characters: the gateway refuses shorter names) and return it."""
        if not 3 <= len(name) <= 63:
            raise ValueError(f"bucket name {name!r}: S3 wants 3 to 63 characters")
        self.client().create_bucket(Bucket=name)
        return name

    def radosgw_admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``radosgw-admin ARGS`` against this cluster (``user list``, ``bucket stats``...)."""
        return run(["radosgw-admin", "-c", str(self.conf_path), *args], env=self.environ, check=check,
                   timeout=self.timeout)

    def mon_commands(self, *commands: Mapping[str, Any], wait_osd_up: int | None = None) -> list[str]:
        """Send monitor commands (``{"prefix": "osd pool ls"}``...) in order, their outputs in that order.

        They go through python3-rados in Debian's python, in one process: far faster than ``ceph`` per command.
        An ``input`` key is the command's input; ``wait_osd_up=N`` then waits until osd.N is up. Raise PeerError
        when one fails, or when a daemon of the cluster dies meanwhile.
        """
        request = json.dumps({"commands": [{"command": {key: value for key, value in command.items()
                                                        if key != "input"}, "input": command.get("input", "")}
                                           for command in commands], "wait_osd_up": wait_osd_up})
        helper = subprocess.Popen([_SYSTEM_PYTHON, "-I", "-c", _RADOS_COMMANDS, str(self.conf_path),
                                   str(self.timeout)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=peer_environ(self.environ))
        deadline, data = time.monotonic() + self.timeout + 30, request
        try:
            while True:
                try:
                    output, errors = helper.communicate(data, timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    data = None  # given once: communicate() goes on writing it
                    if time.monotonic() > deadline:
                        raise PeerError(f"ceph: {commands} took more than {self.timeout + 30}s") from None
                    self._check_daemons()
        finally:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
        if helper.returncode != 0:
            raise PeerError(f"ceph: monitor commands failed ({helper.returncode}): {errors.strip()}")
        return json.loads(output)

    def __enter__(self) -> CephRGW:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _check_daemons(self) -> None:
        for daemon in self._started:
            if not daemon.running():
                raise daemon.error("exited")

    def _bootstrap(self, programs: Mapping[str, str]) -> None:
        fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
        mon_addresses = f"[v2:127.0.0.1:{free_port()},v1:127.0.0.1:{free_port()}]"
        self.conf_path.write_text(self._conf(fsid, mon_addresses))
        keys = {name: _cephx_key() for name in ("mon.", "client.admin", "client.rgw.a", "osd.0")}
        caps = {"mon.": {"mon": "allow *"},
                "client.admin": {kind: "allow *" for kind in ("mon", "osd", "mgr", "mds")},
                "client.rgw.a": {"mon": "allow rw", "osd": "allow rwx"}}
        for name in ("client.admin", "client.rgw.a"):
            _write_keyring(self.workdir / f"{name}.keyring", {name: (keys[name], caps[name])})
        _write_keyring(self.workdir / "mon.keyring", {name: (keys[name], caps[name]) for name in caps})
        run([programs["monmaptool"], "--create", "--addv", "a", mon_addresses, "--fsid", fsid,
             str(self.workdir / "monmap")], env=self.environ)
        run([programs["ceph-mon"], "-c", str(self.conf_path), "--mkfs", "-i", "a", "--monmap",
             str(self.workdir / "monmap"), "--keyring", str(self.workdir / "mon.keyring")], env=self.environ)
        self._spawn(self.mon, [programs["ceph-mon"], "-c", str(self.conf_path), "-d", "-i", "a"])
        # Waits for the monitor; the OSD's key is the one written to its keyring next.
        [osd_id] = self.mon_commands({"prefix": "osd new", "uuid": osd_uuid,
                                      "input": json.dumps({"cephx_secret": keys["osd.0"]})})
        if int(osd_id) != 0:
            raise PeerError(f"ceph: the new cluster's first OSD is osd.{osd_id}, not osd.0")
        _write_keyring(self.workdir / "osd.0.keyring", {"osd.0": (keys["osd.0"], {})})
        for data in ("osd.0", "rgw.a"):
            (self.workdir / data).mkdir(exist_ok=True)
        run([programs["ceph-osd"], "-c", str(self.conf_path), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid],
            env=self.environ, timeout=self.timeout)
        self._spawn(self.osd, [programs["ceph-osd"], "-c", str(self.conf_path), "-d", "-i", "0"])
        # radosgw would create its pools one at a time at its first start: all at once here, while the OSD boots.
        self.mon_commands(*({"prefix": prefix, "pool": pool, **extra} for pool in _RGW_POOLS for prefix, extra in (
            ("osd pool create", {"pg_num": 8, "pgp_num": 8}), ("osd pool application enable", {"app": "rgw"}))),
            wait_osd_up=0)
        self._spawn(self.rgw, [programs["radosgw"], "-c", str(self.conf_path), "-d", "-n", "client.rgw.a"])
        self.rgw.wait_until(lambda: http_response(self.endpoint) is not None, f"{self.endpoint} to answer",
                            timeout=self.timeout)
        self.radosgw_admin("user", "create", "--uid", "mirror", "--display-name", "mirror tests",
                           "--access-key", self.access_key, "--secret-key", self.secret_key)

    def _spawn(self, daemon: CephDaemon, argv: Sequence[str]) -> None:
        daemon._spawn(argv, env=self.environ)
        self._started.append(daemon)

    def _conf(self, fsid: str, mon_addresses: str) -> str:
        workdir = self.workdir
        settings = {
            "global": {
                "fsid": fsid, "mon host": mon_addresses, "public addr": "127.0.0.1", "cluster addr": "127.0.0.1",
                "ms bind port min": 30000, "ms bind port max": 32000,
                "run dir": self.run_dir, "admin socket": f"{self.run_dir}/$name.asok",
                "log file": f"{workdir}/$name.log", "keyring": f"{workdir}/$name.keyring",
                "auth cluster required": "cephx", "auth service required": "cephx", "auth client required": "cephx",
                # One OSD: pools of one replica, placement across OSDs rather than hosts, no warnings about it.
                "osd pool default size": 1, "osd pool default min size": 1, "mon allow pool size one": "true",
                "mon warn on pool no redundancy": "false", "osd crush chooseleaf type": 0,
                "osd pool default pg num": 8, "osd pool default pgp num": 8,
                "osd pool default pg autoscale mode": "off",
            },
            "mon": {
                "mon data": f"{workdir}/mon.$id", "mon cluster log file": f"{workdir}/ceph-cluster.log",
                "mon data avail warn": 1, "mon data avail crit": 0,
                # Commit map changes at once: each pool, each OSD state change is a round of Paxos.
                "paxos propose interval": 0.01, "paxos min wait": 0.001,
            },
            "osd": {
                "osd data": f"{workdir}/osd.$id", "osd objectstore": "memstore",
                "memstore device bytes": 8 << 30, "osd memory target": 1 << 30,
            },
            # Without tcp_nodelay every response waits out the client's delayed ACK: 40 ms per S3 request.
            "client.rgw.a": {"rgw frontends": f"beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1",
                             "rgw data": f"{workdir}/rgw.a"},
        }
        return "".join(f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in values.items())
                       for section, values in settings.items())


def _write_keyring(path: Path, entries: Mapping[str, tuple[str, Mapping[str, str]]]) -> None:
    """Write a Ceph keyring: for each entity name, its key and capabilities (``{"mon": "allow *"}``)."""
    path.write_text("".join(f"[{name}]\n\tkey = {key}\n" + "".join(f'\tcaps {kind} = "{cap}"\n'
                                                                  for kind, cap in caps.items())
                            for name, (key, caps) in entries.items()))


class RedisServer(PeerProcess):
    """A private redis-server on a free 127.0.0.1 port, without persistence; it restarts on the same port."""

    name = "redis-server"

    def __init__(self, workdir: str | Path):
        super().__init__(workdir)
        self.port = free_port()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start redis-server (again, on the same port after ``stop``) and wait until it answers PING."""
        program = require("redis-server")
        self._spawn([program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", str(self.workdir), "--daemonize", "no", "--logfile", ""])
        self.wait_until(self.ping, f"PING on 127.0.0.1:{self.port}", timeout=30)
        return self

    def restart(self) -> RedisServer:
        """Stop it and start it again on the same port, empty."""
        self.stop()
        return self.start()

    def ping(self) -> bool:
        """Whether it answers PING right now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False


class Dockerd(PeerProcess):
    """A private dockerd: vfs storage, no bridge, no iptables, its own data-root, socket and containerd.

    It is given a Containerd of its own: one it started itself would create /opt/containerd (``opt`` plugin).
    """

    name = "dockerd"
    stop_timeout = 30.0
    base_config: Mapping[str, Any] = {"iptables": False, "bridge": "none", "storage-driver": "vfs"}

    def __init__(self, workdir: str | Path, daemon_json: Mapping[str, Any] | None = None):
        super().__init__(workdir)
        self.daemon_json = dict(daemon_json or {})
        self.runtime_dir = short_tempdir("dockerd-")
        self.socket = self.runtime_dir / "docker.sock"
        self.config_path = self.workdir / "daemon.json"
        self.client_config = self.workdir / "client"
        self.containerd = Containerd(self.workdir / "containerd")
        self._trusted: list[Path] = []

    def start(self) -> Dockerd:
        """Start its containerd, then dockerd, and wait until dockerd answers ``/_ping``."""
        program = require("/usr/sbin/dockerd", root=True)
        require(DOCKER_CLIENT)
        self._write_config()
        self.containerd.start()
        self._spawn([program, "--config-file", str(self.config_path), "--data-root", str(self.workdir / "d"),
                     "--exec-root", str(self.runtime_dir / "x"), "--pidfile", str(self.runtime_dir / "pid"),
                     "--containerd", str(self.containerd.socket), "-H", f"unix://{self.socket}"])
        self.wait_until(self._pings, "/_ping on its socket")
        return self

    def configure(self, daemon_json: Mapping[str, Any]) -> None:
        """Replace the extra daemon.json keys (e.g. ``registry-mirrors``) and reload them with SIGHUP."""
        self.daemon_json = dict(daemon_json)
        self._write_config()
        reloads = self.log().count("Reloaded configuration")
        self.send_signal(signal.SIGHUP)
        self.wait_until(lambda: self.log().count("Reloaded configuration") > reloads, "the reload")

    def docker(self, *args: str, check: bool = True, input: str | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the matching docker client against this daemon."""
        return run([DOCKER_CLIENT, "-H", f"unix://{self.socket}", *args], check=check, input=input,
                   env={"DOCKER_CONFIG": str(self.client_config)}, timeout=timeout)

    def remove_all_images(self) -> None:
        """Delete every image, so the next pull starts cold."""
        images = self.docker("images", "--all", "--quiet").stdout.split()
        if images:
            self.docker("rmi", "--force", *sorted(set(images)))

    def trust(self, host: str, ca_certificate: str | Path) -> None:
        """Trust ``ca_certificate`` for the registry at ``host`` (HOST:PORT) until reset or stop.

        dockerd reads CAs only from /etc/docker/certs.d/HOST:PORT/ca.crt; the port makes the entry ours.
        dockerd always treats 127.0.0.0/8 as insecure (TLS unverified, then plain HTTP), so to see a CA
        really checked name a loopback server ``0.0.0.0:PORT``: Linux connects that to 127.0.0.1.
        """
        directory = Path("/etc/docker/certs.d") / host
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca_certificate, directory / "ca.crt")
        self._trusted.append(directory)

    def reset(self) -> None:
        """Back to a fresh daemon: no extra daemon.json keys, images, logins or trusted CAs."""
        if self.daemon_json:
            self.configure({})
        self.remove_all_images()
        shutil.rmtree(self.client_config, ignore_errors=True)
        self._forget_trust()

    def stop(self) -> None:
        """Stop dockerd, then its containerd; remove its socket directory and the CAs it was told to trust."""
        super().stop()
        self.containerd.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        self._forget_trust()

    def _forget_trust(self) -> None:
        while self._trusted:
            directory = self._trusted.pop()
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(OSError):
                directory.parent.rmdir()

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps({**self.base_config, **self.daemon_json}, indent=2))

    def _pings(self) -> bool:
        response = http_response("http://docker/_ping", transport=httpx.HTTPTransport(uds=str(self.socket)))
        return response is not None and response.status_code == 200


class Containerd(PeerProcess):
    """A private containerd with its own root, state and gRPC socket, driven with ``ctr``.

    It starts in a tenth of a second: start one per test, since content is shared across namespaces.
    """

    name = "containerd"
    disabled_plugins = ("io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                        "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                        "io.containerd.snapshotter.v1.devmapper")

    def __init__(self, workdir: str | Path):
        super().__init__(workdir)
        self.runtime_dir = short_tempdir("containerd-")
        self.socket = self.runtime_dir / "containerd.sock"
        self.config_path = self.workdir / "config.toml"

    def start(self) -> Containerd:
        """Write its config, start containerd and wait until ``ctr version`` answers."""
        program = require("/usr/bin/containerd", root=True)
        require("/usr/bin/ctr")
        self.config_path.write_text(self._config())
        self._spawn([program, "--config", str(self.config_path)])
        self.wait_until(lambda: self.ctr("version", check=False, timeout=5).returncode == 0, "ctr version")
        return self

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this containerd."""
        return run(["/usr/bin/ctr", "--address", str(self.socket), *args], check=check, timeout=timeout)

    def pull(self, reference: str, hosts_dir: str | Path, *args: str) -> subprocess.CompletedProcess[str]:
        """``ctr images pull --hosts-dir DIR REFERENCE``: hosts resolved through DIR/<host>/hosts.toml."""
        return self.ctr("images", "pull", "--hosts-dir", str(hosts_dir), *args, reference)

    def stop(self) -> None:
        """Stop containerd and remove its socket directory."""
        super().stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _config(self) -> str:
        quoted = ", ".join(f'"{plugin}"' for plugin in self.disabled_plugins)
        return "\n".join([
            "version = 2",
            f'root = "{self.workdir / "root"}"',
            f'state = "{self.runtime_dir / "state"}"',
            f"disabled_plugins = [{quoted}]",
            "[grpc]", f'  address = "{self.socket}"',
            "[ttrpc]", f'  address = "{self.socket}.ttrpc"',
            "[debug]", '  address = ""',
            "[metrics]", '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]', f'  path = "{self.workdir / "opt"}"',
            "",
        ])


def write_hosts_toml(hosts_dir: str | Path, registry: str, mirror_url: str) -> Path:
    """Write ``hosts_dir/<registry>/hosts.toml`` sending pulls of ``registry`` to ``mirror_url`` only.

    The fallback ``server`` is a closed loopback port, so nothing ever leaves the machine.
    """
    path = Path(hosts_dir) / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'server = "http://127.0.0.1:{free_port()}"\n\n'
                    f'[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n')
    return path


class Podman:
    """The podman CLI with its own storage, run root, registries.conf and auth file (no service needed)."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_dir = short_tempdir("podman-")
        self.registries_conf = self.workdir / "registries.conf"
        self.containers_conf = self.workdir / "containers.conf"
        self.auth_file = self.workdir / "auth.json"
        self.auth_file.write_text('{"auths": {}}')
        self.write_registries_conf("unqualified-search-registries = []\n")
        self.containers_conf.write_text('[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                                        f'events_logfile_path = "{self.workdir / "events.log"}"\n')

    def write_registries_conf(self, text: str) -> None:
        """Replace the registries.conf podman reads (mirrors, prefixes, insecure registries)."""
        self.registries_conf.write_text(text)

    def podman(self, *args: str, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``podman`` with this instance's storage and configuration."""
        program = require("podman", root=True)
        return run([program, "--root", str(self.workdir / "root"), "--runroot", str(self.runtime_dir),
                    "--storage-driver", "vfs", *args], check=check, timeout=timeout,
                   env={"CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
                        "CONTAINERS_CONF": str(self.containers_conf),
                        "REGISTRY_AUTH_FILE": str(self.auth_file)})

    def pull(self, reference: str, *args: str, tls_verify: bool = False) -> subprocess.CompletedProcess[str]:
        """``podman pull`` (plain HTTP by default)."""
        return self.podman("pull", f"--tls-verify={str(tls_verify).lower()}", *args, reference)

    def close(self) -> None:
        """Remove the run root directory."""
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Skopeo:
    """The skopeo CLI with an insecure (accept-all) policy and its own auth file and registries.conf."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.registries_conf = self.workdir / "skopeo-registries.conf"
        self.registries_conf.write_text("unqualified-search-registries = []\n")
        self.auth_file = self.workdir / "skopeo-auth.json"
        self.auth_file.write_text('{"auths": {}}')

    def skopeo(self, *args: str, check: bool = True,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``skopeo --insecure-policy ARGS``."""
        return run([require("skopeo"), "--insecure-policy", *args], check=check, timeout=timeout,
                   env={"CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
                        "REGISTRY_AUTH_FILE": str(self.auth_file)})

    def copy(self, source: str, destination: str, *args: str, all: bool = True,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """``skopeo copy`` over plain HTTP, every platform of an index unless ``all`` is false."""
        return self.skopeo("copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                           *(["--all"] if all else []), *args, source, destination, check=check)

    def inspect(self, reference: str, *args: str, raw: bool = False) -> Any:
        """``skopeo inspect`` over plain HTTP: the parsed JSON (the manifest itself if ``raw``)."""
        result = self.skopeo("inspect", "--tls-verify=false", *(["--raw"] if raw else []), *args, reference)
        return json.loads(result.stdout)

    def round_trip(self, index: Index, reference: str, workdir: Path) -> Path:
        """Push ``index`` from an OCI layout to ``reference`` and copy it back into a layout, checking that
        the registry serves the manifest as pushed and the copy keeps its digest; return that layout."""
        layout, back = write_oci_layout(workdir / "layout", {"v1": index}), workdir / "back"
        self.copy(f"oci:{layout}:v1", reference)
        assert self.inspect(reference, raw=True) == json.loads(index.manifest.data)
        self.copy(reference, f"oci:{back}:v1")
        assert json.loads((back / "index.json").read_text())["manifests"][0]["digest"] == index.digest
        return back


class MirrorProcess(PeerProcess):
    """The appliance itself: ``python -m mirror serve --config FILE`` on a free loopback port."""

    name = "mirror"

    def __init__(self, workdir: str | Path, config: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None):
        super().__init__(workdir)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.config_path = self.workdir / "config.yaml"
        self.env = dict(env or {})
        self.config: dict[str, Any] = {}
        self.write_config(config or {})

    @property
    def url(self) -> str:
        """The base URL (https when the config has ``tls``)."""
        return f"{'https' if self.config.get('tls') else 'http'}://{self.host}"

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write config.yaml: ``config`` over the defaults (our port, storage in ``workdir/store``)."""
        storage = {"root": str(self.workdir / "store"), **config.get("storage", {})}
        self.config = {"listen": self.host, **config, "storage": storage}
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self) -> MirrorProcess:
        """Start ``mirror serve`` and wait until ``GET /v2/`` answers (any status)."""
        self._spawn([sys.executable, "-m", "mirror", "serve", "--config", str(self.config_path)],
                    env=self._environ(), cwd=REPO_ROOT)
        self.wait_until(lambda: http_response(f"{self.url}/v2/") is not None, f"{self.url}/v2/", timeout=30)
        return self

    def run_cli(self, *args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``python -m mirror ARGS --config <this mirror's config>`` (e.g. prefetch, gc, inventory)."""
        return run([sys.executable, "-m", "mirror", *args[:1], "--config", str(self.config_path), *args[1:]],
                   env=self._environ(), check=check, timeout=timeout)

    def _environ(self) -> dict[str, str]:
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        return {"PYTHONPATH": python_path, **self.env}
