"""Hostile upstreams: bodies that trickle, redirects and token realms that point inward, JSON nested deep.

The upstreams are small loopback HTTP servers on threads, scripted per request; most tests run a real
``mirror serve`` in front of them (upstream ``hostile.example``, ``timeout: 2s``), the others the upstream
client in process. Nothing is sent to a non-loopback address: the policy refuses before connecting, and the
in-process tests fail any attempt to connect elsewhere (the ``connections`` fixture).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror import tls
from mirror.config import Upstream
from mirror.digest import Digest
from mirror.errors import UpstreamInvalid, UpstreamUnavailable
from mirror.manifest import OCI_MANIFEST
from mirror.upstream import UpstreamClient
from mirror.upstream.destinations import DestinationRefused, Destinations, address_kind
from mirror.upstream.transport import ADMIT, MIN_RATE, Deadlines, Urllib3Transport
from tests.images import canonical_json
from tests.peers import MirrorProcess
from tests.scripted import Answer, Script, ScriptedUpstream, http, manifest_answer

TIMEOUT = 2.0  # the upstreams' timeout: answers within 6 s, blob bodies at 16 KiB/s after 2 s
MANIFEST = canonical_json({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                                      "digest": str(Digest.of(b"{}"))}})
BLOB = Digest.of(b"never sent whole")
DEEP = b"[" * 100_000 + b"]" * 100_000
REALM_CHALLENGE = 'Bearer realm="http://169.254.169.254/latest/meta-data/token",service="hostile"'


def hostile_script(method: str, path: str, headers: dict[str, str]) -> Answer:
    """The ``hostile.example`` registry: each repository misbehaves in its own way (``fine`` does not)."""
    blob_head = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": str(BLOB)}
    answers = {
        "/v2/fine/manifests/1": Answer(manifest_answer(MANIFEST)),
        f"/v2/trickle/blobs/{BLOB}": Answer(http(200, headers=blob_head, length=64 << 20), b"x" * (1 << 20), 8192),
        "/v2/slow/manifests/1": Answer(http(200, headers={"Content-Type": OCI_MANIFEST}, length=len(MANIFEST)),
                                       MANIFEST, 2),
        "/v2/slowhead/manifests/1": Answer(b"", manifest_answer(MANIFEST), 2),
        "/v2/deep/manifests/1": Answer(manifest_answer(DEEP)),
        "/v2/deep/tags/list": Answer(http(200, DEEP, {"Content-Type": "application/json"})),
        "/v2/inward/manifests/1": Answer(http(302, headers={"Location": "http://10.255.255.1/internal"})),
        "/v2/metadata/manifests/1": Answer(http(302, headers={"Location": "http://169.254.169.254/latest/"})),
        "/v2/circle/manifests/1": Answer(http(302, headers={"Location": "/v2/circle/manifests/1"})),
    }
    answer = answers.get(path.partition("?")[0], Answer(http(404, b"{}", {"Content-Type": "application/json"})))
    if method == "HEAD":
        return Answer(answer.fast.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
    return answer


def realm_script(method: str, path: str, headers: dict[str, str]) -> Answer:
    """A registry whose bearer challenge sends its clients to the cloud metadata service for a token."""
    return Answer(http(401, b"{}", {"WWW-Authenticate": REALM_CHALLENGE, "Content-Type": "application/json"}))


def deep_token_answer(url: str, path: str) -> Answer:
    """The answer of a registry at ``url`` whose token service (on its origin) sends JSON nested 100000 deep."""
    if path.startswith("/token"):
        return Answer(http(200, DEEP, {"Content-Type": "application/json"}))
    return Answer(http(401, b"{}", {"WWW-Authenticate": f'Bearer realm="{url}/token"'}))


@pytest.fixture
def upstreams() -> Iterator[Callable[..., ScriptedUpstream]]:
    """Start hostile upstreams; all are closed after the test."""
    started: list[ScriptedUpstream] = []
    def start(script: Script, wrap: ssl.SSLContext | None = None) -> ScriptedUpstream:
        started.append(ScriptedUpstream(script, wrap))
        return started[-1]
    yield start
    for upstream in started:
        upstream.close()


@pytest.fixture
def mirror(upstreams, tmp_path: Path) -> Iterator[tuple[MirrorProcess, httpx.Client, ScriptedUpstream]]:
    """``mirror serve`` in front of ``hostile.example``, and a client of it."""
    upstream = upstreams(hostile_script)
    config = {"upstreams": [{"name": "hostile.example", "url": upstream.url, "timeout": "2s"}],
              "default_upstream": None}
    with MirrorProcess(tmp_path / "mirror", config) as server, \
            httpx.Client(base_url=f"{server.url}/v2/hostile.example", timeout=30) as client:
        yield server, client, upstream


@pytest.fixture
def connections(monkeypatch) -> list[str]:
    """The addresses sockets connect to during the test; an attempt to connect beyond loopback fails it."""
    seen: list[str] = []
    connect = socket.socket.connect
    def loopback_only(sock: socket.socket, address: Any) -> None:
        seen.append(address[0])
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"attempted to connect to {address}")
        connect(sock, address)
    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    return seen


def run_client(upstream: ScriptedUpstream, action: Callable[[UpstreamClient], Any], **extra: Any) -> Any:
    """Run ``action`` on an in-process client of ``upstream`` (``timeout`` 2 s) and close the client."""
    async def main() -> Any:
        client = UpstreamClient(Upstream("hostile.example", upstream.url, timeout=TIMEOUT, **extra))
        try:
            return await action(client)
        finally:
            await client.close()
    return asyncio.run(main())


def rss(pid: int) -> int:
    """The resident set size of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def error_message(response: httpx.Response) -> str:
    """The message of a registry error answer."""
    return response.json()["errors"][0]["message"]


# --- the destination policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "kind"), [
    ("93.184.216.34", "public"), ("2606:4700::1111", "public"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fc00::1", "private"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("224.0.0.1", "multicast"),
    ("::ffff:10.0.0.1", "private"), ("100.64.0.1", "reserved"),
])
def test_addresses_are_told_apart_by_kind(address, kind):
    assert address_kind(address) == kind


@pytest.mark.parametrize("address", ["10.255.255.1", "172.16.0.1", "192.168.0.1", "127.0.0.1", "169.254.169.254",
                                     "::1", "fc00::1", "fe80::1", "0.0.0.0", "224.0.0.1", "::ffff:127.0.0.1"])
def test_a_public_upstream_may_not_send_the_mirror_to_internal_addresses(address):
    policy = Destinations("https://93.184.216.34")
    with pytest.raises(DestinationRefused, match=f"{address} is a"):
        policy.admit("https", "cdn.example", 443, [address])


def test_a_public_upstream_may_send_the_mirror_to_public_addresses_and_its_own_origin():
    policy = Destinations("https://93.184.216.34")
    policy.admit("https", "cdn.example", 443, ["93.184.216.34", "2606:4700::1111"])
    policy.admit("https", "93.184.216.34", 443, ["93.184.216.34"])
    # its own origin is the operator's choice, whatever it resolves to (and the name is not resolved here)
    Destinations("https://registry.example").admit("https", "registry.example", 443, ["10.0.0.1"])
    with pytest.raises(DestinationRefused, match="10.0.0.1 is a private address"):
        Destinations("https://93.184.216.34").admit("http", "93.184.216.34", 80, ["10.0.0.1"])  # not its origin


def test_every_address_a_destination_resolves_to_must_be_allowed():
    with pytest.raises(DestinationRefused, match="192.168.1.1 is a private address"):
        Destinations("https://93.184.216.34").admit("https", "cdn.example", 443, ["93.184.216.34", "192.168.1.1"])
    with pytest.raises(DestinationRefused, match="no address"):
        Destinations("https://93.184.216.34").admit("https", "cdn.example", 443, [])


def test_an_upstream_may_send_the_mirror_to_addresses_of_its_own_kind():
    Destinations("http://127.0.0.1:5000").admit("http", "127.0.0.2", 8080, ["127.0.0.2"])
    Destinations("https://10.1.2.3").admit("https", "minio.internal", 9000, ["10.9.9.9"])
    Destinations("http://localhost:5000").admit("http", "localhost", 6000, ["127.0.0.1"])  # localhost resolved
    with pytest.raises(DestinationRefused, match="10.255.255.1 is a private address"):
        Destinations("http://localhost:5000").admit("http", "10.255.255.1", 80, ["10.255.255.1"])
    with pytest.raises(DestinationRefused, match="169.254.169.254 is a link-local address"):
        Destinations("https://10.1.2.3").admit("http", "169.254.169.254", 80, ["169.254.169.254"])


def test_the_transport_resolves_a_name_and_refuses_before_connecting(upstreams, connections):
    server = upstreams(hostile_script)
    url = server.url.replace("127.0.0.1", "localhost") + "/v2/fine/manifests/1"
    transport = Urllib3Transport(keepalive=4)
    try:
        request = httpx.Request("GET", url, extensions={ADMIT: Destinations("https://93.184.216.34").admit})
        with pytest.raises(DestinationRefused, match="127.0.0.1 is a loopback address"):
            transport.handle_request(request)
        assert connections == [] and server.requests == []
        request = httpx.Request("GET", url, extensions={ADMIT: Destinations("http://127.0.0.1:1").admit})
        response = transport.handle_request(request)
        assert response.status_code == 200 and b"".join(response.stream) == MANIFEST
        assert connections == ["127.0.0.1"]
    finally:
        transport.close()


# --- deadlines ----------------------------------------------------------------------------------------


def test_a_streamed_body_must_keep_the_minimum_rate_after_its_grace():
    now = [0.0]
    deadlines = Deadlines(TIMEOUT, streamed=True, clock=lambda: now[0])
    deadlines.started_body()
    now[0] = TIMEOUT + 1.0
    deadlines.body(MIN_RATE)  # one second's worth after the grace: in time
    now[0] = TIMEOUT + 2.5
    with pytest.raises(httpx.ReadTimeout, match="under the minimum"):
        deadlines.body(MIN_RATE // 4)


def test_a_small_answer_must_be_complete_within_three_timeouts():
    now = [0.0]
    deadlines = Deadlines(TIMEOUT, clock=lambda: now[0])
    now[0] = 3 * TIMEOUT
    deadlines.answer(1)
    deadlines.started_body()
    now[0] += 0.01
    with pytest.raises(httpx.ReadTimeout, match="no complete answer within 6 s"):
        deadlines.body(1)


def test_a_trickling_blob_is_cut_within_seconds_and_the_mirror_serves_on(mirror):
    server, client, _ = mirror
    assert client.get("/fine/manifests/1").status_code == 200
    baseline, peak, done = rss(server.pid), [0], threading.Event()
    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss(server.pid))
    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    try:
        with client.stream("GET", f"/trickle/blobs/{BLOB}") as response:
            if response.status_code == 200:
                with pytest.raises(httpx.HTTPError):  # cut short: never a clean 200
                    response.read()
            else:
                assert response.status_code == 503
    finally:
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
    assert elapsed < 10, f"the client waited {elapsed:.1f} s"
    assert peak[0] - baseline < 64 << 20, f"RSS grew by {(peak[0] - baseline) >> 20} MiB"
    assert client.get("/fine/manifests/1").content == MANIFEST
    assert server.running()


def test_a_trickling_blob_is_cut_over_tls_too(upstreams, connections, tmp_path):
    tls.init(tmp_path, "localhost", ["127.0.0.1"])
    server = upstreams(hostile_script, tls.server_ssl_context(tmp_path / "server.crt", tmp_path / "server.key"))
    async def read(client: UpstreamClient) -> None:
        async with client.stream_blob("trickle", BLOB) as stream:
            async for _ in stream.aiter():
                pass
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match=f"under the minimum of {MIN_RATE} bytes/s after the first 2 s"):
        run_client(server, read, ca_file=tmp_path / "ca.crt")
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("repository", ["slow", "slowhead"])  # the body at 2 B/s, or the whole answer
def test_a_manifest_sent_at_two_bytes_a_second_is_503_within_a_bound(mirror, repository):
    _, client, _ = mirror
    started = time.monotonic()
    response = client.get(f"/{repository}/manifests/1")
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert 3 * TIMEOUT - 0.5 < elapsed < 3 * TIMEOUT + 3, f"answered after {elapsed:.1f} s"
    assert client.get("/fine/manifests/1").status_code == 200


# --- redirects and token realms -----------------------------------------------------------------------


@pytest.mark.parametrize(("repository", "target"), [("inward", "http://10.255.255.1/internal"),
                                                    ("metadata", "http://169.254.169.254/latest/")])
def test_a_redirect_to_an_internal_address_is_refused_before_connecting(upstreams, connections, repository, target):
    server = upstreams(hostile_script)
    with pytest.raises(UpstreamInvalid, match=f"refused to follow the redirect to {target}: "):
        run_client(server, lambda client: client.get_manifest(repository, "1"))
    assert set(connections) == {"127.0.0.1"}


def test_a_redirect_to_an_internal_address_is_a_502_naming_it(mirror):
    _, client, upstream = mirror
    started = time.monotonic()
    response = client.get("/inward/manifests/1")
    assert response.status_code == 502
    assert "refused to follow the redirect to http://10.255.255.1/internal" in error_message(response)
    assert "10.255.255.1 is a private address" in error_message(response)
    assert time.monotonic() - started < 1.5
    assert [path for _, path, _ in upstream.requests] == ["/v2/inward/manifests/1"]


def test_redirects_are_followed_five_times_at_most(upstreams, connections):
    server = upstreams(hostile_script)
    with pytest.raises(UpstreamInvalid, match="more than 5 redirects"):
        run_client(server, lambda client: client.get_manifest("circle", "1"))
    assert len(server.requests) == 6


def test_a_blob_redirected_to_another_loopback_origin_is_fetched_there_without_credentials(upstreams, tmp_path):
    cdn = upstreams(lambda method, path, headers: Answer(http(200, b"blob!")))
    def registry(method: str, path: str, headers: dict[str, str]) -> Answer:
        if "authorization" not in headers:
            return Answer(http(401, b"{}", {"WWW-Authenticate": 'Basic realm="hostile"'}))
        return Answer(http(307, headers={"Location": f"{cdn.url}/storage/blob?signature=1"}))
    upstream = upstreams(registry)
    config = {"upstreams": [{"name": "hostile.example", "url": upstream.url, "timeout": "2s",
                             "username": "alice", "password": "s3cret"}], "default_upstream": None}
    with MirrorProcess(tmp_path / "mirror", config) as server, httpx.Client(base_url=server.url) as client:
        response = client.get(f"/v2/hostile.example/app/blobs/{Digest.of(b'blob!')}")
    assert response.status_code == 200 and response.content == b"blob!"
    assert "authorization" in upstream.requests[-1][2]
    [(_, path, headers)] = cdn.requests
    assert path == "/storage/blob?signature=1" and "authorization" not in headers


def test_a_token_realm_at_the_metadata_service_is_refused_before_any_request(upstreams, connections):
    server = upstreams(realm_script)
    with pytest.raises(UpstreamInvalid, match="refused the token realm: 169.254.169.254 is a link-local"):
        run_client(server, lambda client: client.get_manifest("app", "1"), username="alice", password="s3cret")
    assert set(connections) == {"127.0.0.1"}


def test_a_token_realm_at_the_metadata_service_is_a_502_naming_it(upstreams, tmp_path):
    upstream = upstreams(realm_script)
    config = {"upstreams": [{"name": "hostile.example", "url": upstream.url, "timeout": "2s"}],
              "default_upstream": None}
    with MirrorProcess(tmp_path / "mirror", config) as server, httpx.Client(base_url=server.url) as client:
        response = client.get("/v2/hostile.example/app/manifests/1")
    assert response.status_code == 502
    assert "token for repository:app:pull from http://169.254.169.254/latest/meta-data/token: refused the token " \
           "realm" in error_message(response)


# --- JSON nested deep ---------------------------------------------------------------------------------


def test_a_manifest_nested_100000_deep_is_refused_and_the_mirror_serves_on(mirror):
    server, client, _ = mirror
    response = client.get("/deep/manifests/1")
    assert response.status_code in (502, 503), response.text
    assert "deeper than 64 levels" in error_message(response)
    assert client.get("/deep/tags/list").status_code < 500  # listed from the cache alone
    assert client.get("/fine/manifests/1").status_code == 200
    assert server.running()


def test_upstream_json_is_parsed_with_a_bound_on_its_depth(upstreams, connections):
    server = upstreams(hostile_script)
    with pytest.raises(UpstreamInvalid, match="deeper than 64 levels"):
        run_client(server, lambda client: client.tags("deep"))
    with pytest.raises(UpstreamInvalid, match="deeper than 64 levels"):
        run_client(server, lambda client: client.get_manifest("deep", "1"))
    token = upstreams(lambda method, path, headers: deep_token_answer(token.url, path))
    with pytest.raises(UpstreamUnavailable, match="deeper than 64 levels"):
        run_client(token, lambda client: client.get_manifest("app", "1"))
    assert json.loads(run_client(server, lambda client: client.get_manifest("fine", "1"))[0]) == \
        json.loads(MANIFEST)
