"""How upstream requests leave the appliance: through a forward proxy (config or environment), trusting the
system's CA store plus an upstream's ``ca_file``, or (``tls_verify: false``) nothing.

Real peers on loopback: Debian's tinyproxy (CONNECT tunnels and absolute-form requests, Basic credentials)
in front of Distribution registries over HTTP and over HTTPS with a certificate of a private CA.
"""
from __future__ import annotations

import json
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mirror import tls
from mirror.config import Config, load
from mirror.errors import ConfigError
from mirror.upstream import destinations
from mirror.upstream.destinations import DestinationRefused, Destinations
from mirror.upstream.transport import ADMIT, EGRESS, Egress, Urllib3Transport
from tests.images import build_image, push
from tests.peers import (
    DistributionRegistry,
    MirrorProcess,
    PeerProcess,
    TokenServer,
    free_port,
    require,
    wait_until,
)

PROXY_USER, PROXY_PASSWORD = "egress", "pr0xy-s3cret"
REPOSITORY, TAG = "org/app", "v1"
IMAGE = build_image("egress")


class Tinyproxy(PeerProcess):
    """Debian's tinyproxy in the foreground on a free loopback port, asking for Basic credentials; its log
    file lists the requests it was sent."""

    name = "tinyproxy"

    def __init__(self, workdir: str | Path, username: str, password: str):
        super().__init__(workdir)
        self.port = free_port()
        self.username, self.password = username, password
        self.requests_log = self.workdir / "requests.log"

    def url(self, password: str | None = None) -> str:
        """The proxy URL with its credentials (or another ``password``)."""
        return f"http://{self.username}:{password or self.password}@127.0.0.1:{self.port}"

    def start(self) -> Tinyproxy:
        """Write its config, start ``tinyproxy -d`` and wait until its port takes connections."""
        program = require("tinyproxy")
        config = self.workdir / "tinyproxy.conf"
        config.write_text("\n".join([
            f"Port {self.port}", "Listen 127.0.0.1", "Allow 127.0.0.1", "Timeout 60",
            f'LogFile "{self.requests_log}"', "LogLevel Connect", f'PidFile "{self.workdir / "tinyproxy.pid"}"',
            f"BasicAuth {self.username} {self.password}", ""]))
        self._spawn([program, "-d", "-c", str(config)])
        self.wait_until(self._listening, f"127.0.0.1:{self.port} to take connections", timeout=15)
        return self

    def requests(self) -> list[str]:
        """Every request line it was sent so far: ``CONNECT host:port HTTP/1.1``, ``GET http://... HTTP/1.1``."""
        text = self.requests_log.read_text(errors="replace") if self.requests_log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): (.+)", text)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A private CA (``ca.crt``) and a server certificate it signed for 127.0.0.1 (``server.crt``, ``.key``)."""
    directory = tmp_path_factory.mktemp("pki")
    tls.init(directory, "localhost", ["127.0.0.1"])
    return directory


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """An upstream over plain HTTP."""
    with DistributionRegistry(tmp_path_factory.mktemp("plain")) as registry:
        push(registry.url, REPOSITORY, TAG, IMAGE)
        yield registry


@pytest.fixture(scope="module")
def secure(tmp_path_factory, pki):
    """An upstream over HTTPS, its certificate signed by the private CA of ``pki``."""
    with DistributionRegistry(tmp_path_factory.mktemp("secure"), tls=(pki / "server.crt", pki / "server.key")) \
            as registry, httpx.Client(timeout=60, verify=ssl.create_default_context(cafile=pki / "ca.crt")) as client:
        push(registry.url, REPOSITORY, TAG, IMAGE, client=client)
        yield registry


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """A forward proxy on loopback that wants ``PROXY_USER`` and ``PROXY_PASSWORD``."""
    with Tinyproxy(tmp_path_factory.mktemp("tinyproxy"), PROXY_USER, PROXY_PASSWORD) as server:
        yield server


def upstream(name: str, registry: DistributionRegistry, **options: Any) -> dict[str, Any]:
    """An ``upstreams`` entry for ``registry``."""
    return {"name": name, "url": registry.url, "timeout": 5, **options}


def both(plain: DistributionRegistry, secure: DistributionRegistry, pki: Path) -> list[dict[str, Any]]:
    """``upstreams`` entries for both registries, trusting the private CA of ``pki`` for ``secure``."""
    return [upstream("plain.test", plain), upstream("secure.test", secure, ca_file=str(pki / "ca.crt"))]


def pull(mirror: MirrorProcess, name: str) -> None:
    """Pull ``IMAGE`` (manifest, config and layers) of upstream ``name`` through ``mirror``, checking the bytes."""
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        manifest = client.get(f"/v2/{name}/{REPOSITORY}/manifests/{TAG}")
        assert manifest.status_code == 200, f"{manifest.text}\n{mirror.log_tail()}"
        assert manifest.content == IMAGE.manifest.data
        for blob in IMAGE.blobs:
            assert client.get(f"/v2/{name}/{REPOSITORY}/blobs/{blob.digest}").content == blob.data


def failed_pull(mirror: MirrorProcess, name: str) -> httpx.Response:
    """The answer to a manifest GET of upstream ``name`` that must fail (503 or 502)."""
    response = httpx.get(f"{mirror.url}/v2/{name}/{REPOSITORY}/manifests/{TAG}", timeout=30)
    assert response.status_code in (502, 503), response.text
    return response


def records(mirror: MirrorProcess) -> list[dict[str, Any]]:
    """The mirror's log records (JSON lines)."""
    return [json.loads(line) for line in mirror.log().splitlines() if line.startswith("{")]


def new_requests(proxy: Tinyproxy, before: int, registry: DistributionRegistry) -> list[str]:
    """The request lines the proxy got for ``registry`` after its first ``before`` ones."""
    return [line for line in proxy.requests()[before:] if registry.host in line]


def tunnelled(proxy: Tinyproxy, before: int, registry: DistributionRegistry) -> bool:
    """Whether the proxy was asked to CONNECT to ``registry`` after its first ``before`` requests."""
    return any(line.startswith(f"CONNECT {registry.host} ") for line in new_requests(proxy, before, registry))


def proxy_environ(url: str, no_proxy: str = "") -> dict[str, str]:
    """Every proxy variable, lower and upper case, set to ``url``, and ``no_proxy`` (overriding the test's)."""
    variables = {name: url for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")}
    return {**variables, "no_proxy": no_proxy, "NO_PROXY": no_proxy}


# --- through a forward proxy ----------------------------------------------------------------------------


def test_pulls_through_the_configured_proxy_both_ways_with_its_credentials(tmp_path, plain, secure, proxy, pki):
    before = len(proxy.requests())
    config = {"proxy": proxy.url(), "upstreams": both(plain, secure, pki)}
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        pull(mirror, "plain.test")
        pull(mirror, "secure.test")
    absolute = [f"GET {plain.url}/v2/{REPOSITORY}/{path} HTTP/1.1"
                for path in (f"manifests/{TAG}", *(f"blobs/{blob.digest}" for blob in IMAGE.blobs))]
    wait_until(lambda: set(absolute) <= set(new_requests(proxy, before, plain)), 10, "absolute-form requests")
    assert tunnelled(proxy, before, secure)
    assert secure.count_requests("GET", f"/v2/{REPOSITORY}/manifests/{TAG}", status=200) >= 1
    assert PROXY_PASSWORD not in mirror.log()


def test_the_token_realm_is_asked_through_the_proxy_too(tmp_path, proxy):
    with TokenServer(tmp_path / "tokens") as tokens, DistributionRegistry(tmp_path / "hub", auth=tokens) as hub:
        push(hub.url, REPOSITORY, TAG, IMAGE, tokens.username, tokens.password)
        before = len(proxy.requests())
        config = {"proxy": proxy.url(), "upstreams": [upstream("hub.test", hub)]}
        with MirrorProcess(tmp_path / "mirror", config) as mirror:
            pull(mirror, "hub.test")
        asked = proxy.requests()[before:]
        assert any(line.startswith(f"GET {tokens.realm}?") for line in asked), asked
        assert any(line.startswith(f"GET {hub.url}/v2/{REPOSITORY}/manifests/{TAG} ") for line in asked), asked


def test_wrong_proxy_credentials_are_503_without_the_password_in_the_log(tmp_path, secure, proxy, pki):
    config = {"upstreams": [upstream("secure.test", secure, ca_file=str(pki / "ca.crt"),
                                     proxy=proxy.url("not-the-password"))]}
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        assert "ProxyError: proxy: Tunnel connection failed: 401" in failed_pull(mirror, "secure.test").text
    assert "Tunnel connection failed: 401" in mirror.log() and "not-the-password" not in mirror.log()


def test_an_upstream_with_proxy_null_goes_direct_past_the_top_level_proxy(tmp_path, plain, proxy):
    before = len(proxy.requests())
    config = {"proxy": proxy.url(), "upstreams": [upstream("plain.test", plain, proxy=None)]}
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        pull(mirror, "plain.test")
    assert new_requests(proxy, before, plain) == []


def test_the_environment_proxy_is_used_without_a_proxy_key(tmp_path, plain, secure, proxy, pki):
    before = len(proxy.requests())
    config = {"upstreams": both(plain, secure, pki)}
    with MirrorProcess(tmp_path / "mirror", config, env=proxy_environ(proxy.url())) as mirror:
        pull(mirror, "plain.test")
        pull(mirror, "secure.test")
    wait_until(lambda: any(line.startswith("GET http://") for line in new_requests(proxy, before, plain)), 10,
               "an absolute-form request")
    assert tunnelled(proxy, before, secure)
    assert PROXY_PASSWORD not in mirror.log()


def test_no_proxy_naming_the_upstream_goes_direct(tmp_path, plain, secure, proxy, pki):
    before = len(proxy.requests())
    config = {"upstreams": both(plain, secure, pki)}
    with MirrorProcess(tmp_path / "mirror", config, env=proxy_environ(proxy.url(), "localhost, 127.0.0.1")) as mirror:
        pull(mirror, "plain.test")
        pull(mirror, "secure.test")
    assert new_requests(proxy, before, plain) == new_requests(proxy, before, secure) == []


def test_through_a_proxy_the_destination_is_judged_and_the_proxy_is_not(plain, proxy):
    transport, judged = Urllib3Transport(keepalive=2), []
    def admit(scheme: str, host: str, port: int, addresses: Any) -> None:
        judged.append((scheme, host, port, addresses))
    try:
        request = httpx.Request("GET", f"{plain.url}/v2/", extensions={ADMIT: admit, EGRESS: Egress(proxy.url())})
        response = transport.handle_request(request)
        assert response.status_code == 200
        response.close()
        assert judged == [("http", "127.0.0.1", plain.port, None)]  # never the proxy's port
        before = len(proxy.requests())
        for url in (f"{plain.url}/v2/", "http://169.254.169.254/latest/meta-data/"):
            request = httpx.Request("GET", url, extensions={ADMIT: Destinations("https://93.184.216.34").admit,
                                                            EGRESS: Egress(proxy.url())})
            with pytest.raises(DestinationRefused, match=r"is a (loopback|link-local) address"):
                transport.handle_request(request)
        assert proxy.requests()[before:] == []
    finally:
        transport.close()


def test_through_a_proxy_a_name_is_judged_where_it_resolves_and_left_to_the_proxy_where_not(monkeypatch):
    answers = {"cdn.example": ["93.184.216.34"], "internal.example": ["10.0.0.7"]}
    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple]:
        if host not in answers and not re.fullmatch(r"[0-9.]+", host):  # an IPv4 address resolves to itself
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in answers.get(host, [host])]
    monkeypatch.setattr(destinations.socket, "getaddrinfo", getaddrinfo)
    policy = Destinations("https://registry.example")
    policy.admit("https", "registry.example", 443, None)  # the origin: not resolved
    policy.admit("https", "cdn.example", 443, None)
    policy.admit("https", "only-the-proxy-knows.example", 443, None)
    with pytest.raises(DestinationRefused, match="10.0.0.7 is a private address"):
        policy.admit("https", "internal.example", 443, None)
    with pytest.raises(DestinationRefused, match="169.254.169.254 is a link-local address"):
        Destinations("https://93.184.216.34").admit("http", "169.254.169.254", 80, None)


# --- TLS trust --------------------------------------------------------------------------------------------


def test_an_upstream_signed_by_a_private_ca_is_trusted_with_its_ca_file(tmp_path, secure, pki):
    config = {"upstreams": [upstream("secure.test", secure, ca_file=str(pki / "ca.crt"))]}
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        pull(mirror, "secure.test")


def test_without_its_ca_the_upstream_fails_with_a_certificate_error(tmp_path, secure):
    with MirrorProcess(tmp_path / "mirror", {"upstreams": [upstream("secure.test", secure)]}) as mirror:
        assert "CERTIFICATE_VERIFY_FAILED" in failed_pull(mirror, "secure.test").text
    assert any("CERTIFICATE_VERIFY_FAILED" in (record.get("error") or "") for record in records(mirror))


@pytest.mark.parametrize("other_ca_file", [False, True])
def test_the_system_store_is_trusted_ssl_cert_file_too_and_ca_file_adds_to_it(tmp_path, secure, pki, other_ca_file):
    options = {}
    if other_ca_file:  # a CA that did not sign the upstream's certificate: the system store still counts
        tls.init(tmp_path / "other", "other.example", [])
        options["ca_file"] = str(tmp_path / "other" / "ca.crt")
    config = {"upstreams": [upstream("secure.test", secure, **options)]}
    with MirrorProcess(tmp_path / "mirror", config, env={"SSL_CERT_FILE": str(pki / "ca.crt")}) as mirror:
        pull(mirror, "secure.test")


def test_tls_verify_false_works_and_is_warned_about_at_start(tmp_path, secure):
    config = {"upstreams": [upstream("secure.test", secure, tls_verify=False)]}
    with MirrorProcess(tmp_path / "mirror", config) as mirror:
        warnings = [record["message"] for record in records(mirror) if record["level"] == "warning"]
        assert any("secure.test" in message and "tls_verify: false" in message for message in warnings), warnings
        pull(mirror, "secure.test")


# --- config ---------------------------------------------------------------------------------------------


def loaded(tmp_path: Path, raw: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    """Load ``raw`` from a config file with ``environ`` as the environment."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load(path, environ or {})


def proxies(config: Config) -> dict[str, str | None]:
    """Each upstream's effective proxy, by name."""
    return {upstream.name: upstream.proxy for upstream in config.upstreams}


UPSTREAMS = [{"name": "registry.example.com", "url": "https://registry.example.com"},
             {"name": "insecure.example", "url": "http://insecure.example:5000"}]


@pytest.mark.parametrize("value", ["ftp://proxy.example:21", "socks5://proxy.example:1080", "proxy.example:3128",
                                   "http://", "http://:3128", "http://proxy.example:99999", "http://proxy.example:0",
                                   "http://proxy.example:3128/path", "http://proxy.example:3128?x=1",
                                   "http://user:s3cret@[::1:3128", 3128, True, ["http://proxy.example"]])
@pytest.mark.parametrize("where", ["top", "upstream"])
def test_a_proxy_must_be_an_http_or_https_url_with_a_host(tmp_path, value, where):
    raw = {"upstreams": [dict(UPSTREAMS[0])]}
    (raw if where == "top" else raw["upstreams"][0])["proxy"] = value
    with pytest.raises(ConfigError) as refused:
        loaded(tmp_path, raw)
    assert refused.value.key == ("proxy" if where == "top" else "upstreams[0].proxy")
    assert "s3cret" not in refused.value.message


@pytest.mark.parametrize("value", ["http://proxy.example:3128", "https://proxy.example", "http://[::1]:3128/",
                                   "http://user:p%40ss@proxy.example:3128"])
def test_proxy_urls_that_are_accepted(tmp_path, value):
    config = loaded(tmp_path, {"proxy": value, "upstreams": UPSTREAMS})
    assert set(proxies(config).values()) == {value}
    assert "p%40ss" not in repr(config)


def test_an_upstream_proxy_beats_the_top_level_one_which_beats_the_environment(tmp_path):
    raw = {"proxy": "http://top.example:3128", "upstreams": [
        {**UPSTREAMS[0], "proxy": "http://own.example:3128"}, {**UPSTREAMS[1], "proxy": None},
        {"name": "quay.io", "url": "https://quay.io", "proxy": ""}, {"name": "ghcr.io", "url": "https://ghcr.io"}]}
    config = loaded(tmp_path, raw, {"HTTPS_PROXY": "http://environment.example:3128"})
    assert proxies(config) == {"registry.example.com": "http://own.example:3128", "insecure.example": None,
                               "quay.io": None, "ghcr.io": "http://top.example:3128"}
    raw["proxy"] = None  # a top-level proxy: null is direct, whatever the environment says
    assert proxies(loaded(tmp_path, raw, {"HTTPS_PROXY": "http://environment.example:3128"}))["ghcr.io"] is None


def test_the_environment_proxy_follows_the_upstream_scheme_lower_case_first(tmp_path):
    environ = {"HTTPS_PROXY": "http://upper.example:3128", "https_proxy": "http://lower.example:3128",
               "HTTP_PROXY": "plain.example:8080"}
    assert proxies(loaded(tmp_path, {"upstreams": UPSTREAMS}, environ)) == {
        "registry.example.com": "http://lower.example:3128", "insecure.example": "http://plain.example:8080"}
    assert proxies(loaded(tmp_path, {"upstreams": UPSTREAMS}, {"https_proxy": ""})) == {
        "registry.example.com": None, "insecure.example": None}
    assert load(None, {"HTTPS_PROXY": "http://proxy.example:3128"}).upstreams[0].proxy == "http://proxy.example:3128"


@pytest.mark.parametrize(("no_proxy", "bypassed"), [
    ("registry.example.com", {"registry.example.com"}),
    ("other.example,insecure.example", {"insecure.example"}),
    (".example.com", {"registry.example.com"}),
    ("example.com", {"registry.example.com"}),
    (" insecure.example:5000 , .nothing.example", {"insecure.example"}),
    ("notexample.com,istry.example.com,secure.example", set()),
    ("*", {"registry.example.com", "insecure.example"}),
    ("", set()),
])
def test_no_proxy_names_hosts_domains_or_everything(tmp_path, no_proxy, bypassed):
    environ = {"HTTPS_PROXY": "http://proxy.example:3128", "HTTP_PROXY": "http://proxy.example:3128",
               "NO_PROXY": no_proxy}
    config = loaded(tmp_path, {"upstreams": UPSTREAMS}, environ)
    assert {name for name, proxy in proxies(config).items() if proxy is None} == bypassed


def test_an_unusable_environment_proxy_is_a_config_error_naming_the_variable(tmp_path):
    with pytest.raises(ConfigError, match=r"\$https_proxy") as refused:
        loaded(tmp_path, {"upstreams": UPSTREAMS}, {"https_proxy": "socks5://user:s3cret@proxy.example:1080"})
    assert "s3cret" not in refused.value.message


def test_ca_file_must_be_an_existing_pem_bundle_and_tls_verify_a_boolean(tmp_path, pki):
    config = loaded(tmp_path, {"upstreams": [{**UPSTREAMS[0], "ca_file": str(pki / "ca.crt")}]})
    assert config.upstreams[0].ca_file == pki / "ca.crt" and config.upstreams[0].tls_verify
    (tmp_path / "empty.pem").write_text("no certificate here\n")
    for value in (str(tmp_path / "missing.pem"), str(tmp_path / "empty.pem"), str(tmp_path), 1):
        with pytest.raises(ConfigError) as refused:
            loaded(tmp_path, {"upstreams": [{**UPSTREAMS[0], "ca_file": value}]})
        assert refused.value.key == "upstreams[0].ca_file"
    assert not loaded(tmp_path, {"upstreams": [{**UPSTREAMS[0], "tls_verify": False}]}).upstreams[0].tls_verify
    with pytest.raises(ConfigError) as refused:
        loaded(tmp_path, {"upstreams": [{**UPSTREAMS[0], "tls_verify": "false"}]})
    assert refused.value.key == "upstreams[0].tls_verify"
