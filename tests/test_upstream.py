"""The upstream client: faults injected with httpx.MockTransport, then the real Distribution registry.

Async code runs through ``asyncio.run`` in plain tests.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from mirror.config import Upstream
from mirror.digest import Digest
from mirror.errors import UpstreamDenied, UpstreamInvalid, UpstreamNotFound, UpstreamUnavailable
from mirror.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from mirror.upstream import UpstreamClient
from mirror.upstream.auth import Challenge
from mirror.upstream.status import retry_after
from mirror.upstream.transport import READ_AHEAD, ThreadedTransport
from tests.images import Image, basic_authorization, build_image, push
from tests.peers import DistributionRegistry, TokenServer, free_port

REGISTRY = "https://registry.test"
REALM = "https://auth.test/token"
CHALLENGE = f'Bearer realm="{REALM}",service="registry.test",scope="repository:library/alpine:pull"'
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": {}, "layers": []}).encode()
MANIFEST_DIGEST = Digest.of(MANIFEST)
BLOB = bytes(range(256)) * 64
BLOB_DIGEST = Digest.of(BLOB)


class Clock:
    """A settable clock for token expiry."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeRegistry:
    """A MockTransport handler: a bearer-token registry with one manifest and one blob, recording requests."""

    def __init__(self, username: str | None = None, password: str | None = None,
                 expires_in: int | None = 300):
        self.requests: list[httpx.Request] = []
        self.credentials = None if username is None else basic_authorization(username, password or "")
        self.expires_in = expires_in
        self.issued = 0
        self.fault: Callable[[httpx.Request], httpx.Response | None] = lambda request: None

    @property
    def token_requests(self) -> list[httpx.Request]:
        """Requests that went to the token realm."""
        return [r for r in self.requests if r.url.host == "auth.test"]

    @property
    def registry_requests(self) -> list[httpx.Request]:
        """Requests that went to the registry."""
        return [r for r in self.requests if r.url.host == "registry.test"]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(snapshot(request))
        fault = self.fault(request)
        if fault is not None:
            return fault
        if request.url.host == "auth.test":
            return self._token(request)
        valid = {f"Bearer token-{issued}" for issued in range(1, self.issued + 1)}
        if request.headers.get("authorization") not in valid:
            return httpx.Response(401, headers={"WWW-Authenticate": CHALLENGE})
        if request.url.path.endswith(("/manifests/latest", f"/manifests/{MANIFEST_DIGEST}")):
            return reply(200, MANIFEST if request.method == "GET" else b"", {
                "Content-Type": DOCKER_MANIFEST, "Docker-Content-Digest": str(MANIFEST_DIGEST),
                "Content-Length": str(len(MANIFEST))})
        if request.url.path.endswith(f"/blobs/{BLOB_DIGEST}"):
            return reply(200, BLOB)
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})

    def _token(self, request: httpx.Request) -> httpx.Response:
        if self.credentials and request.headers.get("authorization") != self.credentials:
            return httpx.Response(401, json={"details": "incorrect username or password"})
        self.issued += 1
        body: dict[str, Any] = {"token": f"token-{self.issued}"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return httpx.Response(200, json=body)


def reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> httpx.Response:
    """A response streamed as from the network (httpx reads a ``content=`` body at once, unlike a server)."""
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


def snapshot(request: httpx.Request) -> httpx.Request:
    """A copy of ``request`` as sent now (the auth flow re-sends the same object with other headers)."""
    return httpx.Request(request.method, request.url, headers=httpx.Headers(request.headers))


def run(handler: Callable[[httpx.Request], Any] | None, action: Callable[[UpstreamClient], Awaitable[Any]],
        upstream: Upstream | None = None, clock: Clock | None = None) -> Any:
    """Run ``action`` on a client of ``upstream`` (over ``handler`` if given, else the network), close it."""
    async def main() -> Any:
        transport = ThreadedTransport(httpx.MockTransport(handler), threads=4) if handler else None
        client = UpstreamClient(upstream or Upstream("registry.test", REGISTRY), transport,
                                clock=clock or time.time)
        try:
            return await action(client)
        finally:
            await client.close()
    return asyncio.run(main())


async def read_blob(client: UpstreamClient, offset: int = 0, chunk_size: int | None = None,
                    repo: str = "library/alpine", digest: Digest = BLOB_DIGEST) -> bytes:
    """The whole body of a blob (by default the fake registry's) from ``offset``."""
    async with client.stream_blob(repo, digest, offset) as stream:
        return b"".join([chunk async for chunk in stream.aiter(chunk_size)])


# --- manifests and blobs ------------------------------------------------------------------------------


def test_get_manifest_by_tag_asks_for_every_manifest_type():
    registry = FakeRegistry()
    body, media_type, digest = run(registry, lambda c: c.get_manifest("library/alpine", "latest"))
    assert (body, media_type, digest) == (MANIFEST, DOCKER_MANIFEST, MANIFEST_DIGEST)
    accept = registry.registry_requests[-1].headers["accept"]
    assert all(t in accept for t in (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX))


def test_head_manifest_reads_digest_and_size_from_headers():
    registry = FakeRegistry()
    assert run(registry, lambda c: c.head_manifest("library/alpine", "latest")) == (
        MANIFEST_DIGEST, DOCKER_MANIFEST, len(MANIFEST))
    assert {r.method for r in registry.registry_requests} == {"HEAD"}


def test_head_manifest_without_digest_header_falls_back_to_get():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, MANIFEST if request.method == "GET" else b"", {"Content-Type": DOCKER_MANIFEST})
    assert run(handler, lambda c: c.head_manifest("library/alpine", "latest")) == (
        MANIFEST_DIGEST, DOCKER_MANIFEST, len(MANIFEST))


def test_manifest_by_digest_is_verified():
    wrong = Digest.of(b"something else")
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, MANIFEST, {"Content-Type": DOCKER_MANIFEST})
    with pytest.raises(UpstreamInvalid, match="digest"):
        run(handler, lambda c: c.get_manifest("library/alpine", str(wrong)))
    _, _, digest = run(handler, lambda c: c.get_manifest("library/alpine", str(MANIFEST_DIGEST)))
    assert digest == MANIFEST_DIGEST


def test_manifest_whose_body_contradicts_its_digest_header_is_invalid():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, MANIFEST + b" ", {"Content-Type": DOCKER_MANIFEST,
                                             "Docker-Content-Digest": str(MANIFEST_DIGEST)})
    with pytest.raises(UpstreamInvalid):
        run(handler, lambda c: c.get_manifest("library/alpine", "latest"))


@pytest.mark.parametrize("announced", [True, False])
def test_oversized_manifest_is_invalid(announced):
    big = b"{" + b" " * (4 * 1024 * 1024) + b"}"
    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]
    def handler(request: httpx.Request) -> httpx.Response:
        if announced:
            return reply(200, big, {"Content-Type": OCI_MANIFEST})
        return httpx.Response(200, content=chunks(), headers={"Content-Type": OCI_MANIFEST})
    with pytest.raises(UpstreamInvalid, match="limit"):
        run(handler, lambda c: c.get_manifest("library/alpine", "latest"))


def test_stream_blob_in_chunks():
    registry = FakeRegistry()
    async def action(client: UpstreamClient) -> tuple[int | None, int, list[int]]:
        async with client.stream_blob("library/alpine", BLOB_DIGEST) as stream:
            sizes = [len(chunk) async for chunk in stream.aiter(4096)]
            return stream.size, stream.status, sizes
    size, status, sizes = run(registry, action)
    assert (size, status, sum(sizes), max(sizes)) == (len(BLOB), 200, len(BLOB), 4096)


def test_stream_blob_from_an_offset_with_range():
    def handler(request: httpx.Request) -> httpx.Response:
        start = int(request.headers["range"].removeprefix("bytes=").rstrip("-"))
        return reply(206, BLOB[start:], {"Content-Range": f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"})
    async def action(client: UpstreamClient) -> tuple[int | None, int, bytes]:
        async with client.stream_blob("library/alpine", BLOB_DIGEST, 1000) as stream:
            return stream.size, stream.status, b"".join([c async for c in stream.aiter()])
    assert run(handler, action) == (len(BLOB), 206, BLOB[1000:])


def test_stream_blob_from_an_offset_when_upstream_ignores_range():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, BLOB)
    assert run(handler, lambda c: read_blob(c, offset=5000, chunk_size=1024)) == BLOB[5000:]


def test_truncated_blob_is_unavailable():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, BLOB[:1000], {"Content-Length": str(len(BLOB))})
    with pytest.raises(UpstreamUnavailable, match="truncated"):
        run(handler, read_blob)


def test_blob_longer_than_announced_is_invalid():
    def handler(request: httpx.Request) -> httpx.Response:
        return reply(200, BLOB, {"Content-Length": "1000"})
    with pytest.raises(UpstreamInvalid):
        run(handler, read_blob)


def test_a_body_closed_early_stops_being_read_ahead():
    produced = []
    def body():
        for number in range(1000):
            produced.append(number)
            yield BLOB[:1000]
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"Content-Length": str(1000 * 1000)})
    async def action(client: UpstreamClient) -> bytes:
        async with client.stream_blob("library/alpine", BLOB_DIGEST) as stream:
            async for chunk in stream.aiter():
                return chunk
    assert run(handler, action) == BLOB[:1000]
    assert len(produced) <= READ_AHEAD + 2


# --- faults -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exception", [httpx.ConnectTimeout, httpx.ReadTimeout, httpx.ConnectError,
                                       httpx.RemoteProtocolError])
def test_transport_failures_are_unavailable(exception):
    def handler(request: httpx.Request) -> httpx.Response:
        raise exception("injected", request=request)
    with pytest.raises(UpstreamUnavailable) as caught:
        run(handler, lambda c: c.get_manifest("library/alpine", "latest"))
    assert caught.value.detail == {"status": None, "retry_after": None}


def test_timeout_while_streaming_a_blob_is_unavailable():
    def body():
        yield BLOB[:100]
        raise httpx.ReadTimeout("injected")
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body(), headers={"Content-Length": str(len(BLOB))})
    with pytest.raises(UpstreamUnavailable, match="timed out"):
        run(handler, read_blob)


@pytest.mark.parametrize(("status", "error"), [(500, UpstreamUnavailable), (502, UpstreamUnavailable),
                                               (503, UpstreamUnavailable), (404, UpstreamNotFound),
                                               (403, UpstreamDenied), (400, UpstreamUnavailable)])
def test_status_codes_map_to_errors(status, error):
    with pytest.raises(error) as caught:
        run(lambda request: httpx.Response(status), lambda c: c.head_manifest("library/alpine", "latest"))
    assert caught.value.detail["status"] == status


def test_429_carries_retry_after():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "17"})
    with pytest.raises(UpstreamUnavailable) as caught:
        run(handler, read_blob)
    assert caught.value.detail == {"status": 429, "retry_after": 17.0}


def test_retry_after_accepts_http_dates():
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after("soon") is None
    assert retry_after(None) is None


# --- auth ---------------------------------------------------------------------------------------------


def test_challenge_parsing_keeps_commas_inside_quotes():
    challenge = Challenge.parse('Bearer realm="https://a/token",service=reg,scope="repository:x:pull,push"')
    assert challenge == Challenge("bearer", {"realm": "https://a/token", "service": "reg",
                                             "scope": "repository:x:pull,push"})


def test_anonymous_bearer_flow_caches_the_token_per_scope():
    registry = FakeRegistry()
    async def action(client: UpstreamClient) -> None:
        await client.get_manifest("library/alpine", "latest")
        await client.head_manifest("library/alpine", "latest")
        await read_blob(client)
    run(registry, action)
    [token_request] = registry.token_requests
    assert "authorization" not in token_request.headers
    assert token_request.url.params["scope"] == "repository:library/alpine:pull"
    assert token_request.url.params["service"] == "registry.test"
    assert [r.headers.get("authorization") for r in registry.registry_requests] == [
        None, "Bearer token-1", "Bearer token-1", "Bearer token-1"]


def test_token_is_refetched_after_it_expires():
    registry, clock = FakeRegistry(expires_in=None), Clock()  # the default lifetime: 60 s
    async def action(client: UpstreamClient) -> None:
        await client.get_manifest("library/alpine", "latest")
        clock.now += 30
        await client.get_manifest("library/alpine", "latest")
        clock.now += 31
        await client.get_manifest("library/alpine", "latest")
    run(registry, action, clock=clock)
    assert len(registry.token_requests) == 2
    assert registry.registry_requests[-1].headers["authorization"] == "Bearer token-2"


def test_token_expiry_counts_from_issued_at():
    registry, clock = FakeRegistry(), Clock()
    def issued_long_ago(request: httpx.Request) -> httpx.Response | None:
        if request.url.host != "auth.test":
            return None
        registry.issued += 1
        issued = "1970-01-12T13:46:10Z"  # 30 s before Clock's start
        return httpx.Response(200, json={"token": f"token-{registry.issued}", "expires_in": 60,
                                         "issued_at": issued})
    registry.fault = issued_long_ago
    async def action(client: UpstreamClient) -> None:
        await client.get_manifest("library/alpine", "latest")
        clock.now += 20
        await client.get_manifest("library/alpine", "latest")
        clock.now += 10
        await client.get_manifest("library/alpine", "latest")
    run(registry, action, clock=clock)
    assert len(registry.token_requests) == 2


def test_concurrent_requests_share_one_token_fetch():
    registry = FakeRegistry()
    async def action(client: UpstreamClient) -> None:
        await asyncio.gather(*(client.get_manifest("library/alpine", "latest") for _ in range(8)))
    run(registry, action)
    assert len(registry.token_requests) == 1


def test_credentials_go_to_an_https_realm():
    registry = FakeRegistry("alice", "s3cret")
    upstream = Upstream("registry.test", REGISTRY, username="alice", password="s3cret")
    run(registry, lambda c: c.get_manifest("library/alpine", "latest"), upstream)
    assert registry.token_requests[0].headers["authorization"] == basic_authorization("alice", "s3cret")


def test_credentials_never_go_to_a_plain_http_realm_elsewhere():
    registry = FakeRegistry()
    def plain_realm(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "registry.test" and "authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.test/token"'})
        return None
    registry.fault = plain_realm
    upstream = Upstream("registry.test", REGISTRY, username="alice", password="s3cret")
    run(registry, lambda c: c.get_manifest("library/alpine", "latest"), upstream)
    [token_request] = registry.token_requests
    assert token_request.url.scheme == "http" and "authorization" not in token_request.headers


def test_wrong_credentials_are_denied():
    registry = FakeRegistry("alice", "s3cret")
    upstream = Upstream("registry.test", REGISTRY, username="alice", password="wrong")
    with pytest.raises(UpstreamDenied):
        run(registry, lambda c: c.get_manifest("library/alpine", "latest"), upstream)


def test_token_refused_by_the_registry_is_denied():
    registry = FakeRegistry()
    def refuse(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "registry.test":
            challenge = CHALLENGE + ',error="insufficient_scope"'
            return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return None
    registry.fault = refuse
    with pytest.raises(UpstreamDenied):
        run(registry, lambda c: c.get_manifest("library/alpine", "latest"))
    assert len(registry.registry_requests) <= 3  # one challenge, then bounded retries: no loop


@pytest.mark.parametrize("failure", ["connect", "500", "garbage", "redirect"])
def test_token_endpoint_down_is_unavailable(failure):
    registry = FakeRegistry()
    def broken(request: httpx.Request) -> httpx.Response | None:
        if request.url.host != "auth.test":
            return None
        if failure == "connect":
            raise httpx.ConnectError("injected", request=request)
        return {"500": httpx.Response(500), "garbage": httpx.Response(200, content=b"<html>"),
                "redirect": httpx.Response(302, headers={"Location": "https://evil.test/token"})}[failure]
    registry.fault = broken
    with pytest.raises(UpstreamUnavailable):
        run(registry, lambda c: c.get_manifest("library/alpine", "latest"))
    assert all(r.url.host != "evil.test" for r in registry.requests)


def test_basic_upstream_gets_basic_credentials_directly():
    requests: list[httpx.Request] = []
    expected = basic_authorization("alice", "s3cret")
    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(snapshot(request))
        if request.headers.get("authorization") != expected:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="registry"'})
        return reply(200, MANIFEST, {"Content-Type": DOCKER_MANIFEST})
    upstream = Upstream("registry.test", REGISTRY, username="alice", password="s3cret")
    async def action(client: UpstreamClient) -> None:
        await client.get_manifest("library/alpine", "latest")
        await client.get_manifest("library/alpine", "latest")
    run(handler, action, upstream)
    assert [r.headers.get("authorization") for r in requests] == [None, expected, expected]


def test_blob_redirect_to_another_host_carries_no_authorization():
    registry = FakeRegistry()
    cdn = "https://cdn.test/blob?signature=abc"
    def redirect(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "cdn.test":
            return reply(200, BLOB)
        if "/blobs/" in request.url.path and request.headers.get("authorization") == "Bearer token-1":
            return httpx.Response(307, headers={"Location": cdn})
        return None
    registry.fault = redirect
    assert run(registry, read_blob) == BLOB
    [cdn_request] = [r for r in registry.requests if r.url.host == "cdn.test"]
    assert "authorization" not in cdn_request.headers


def test_challenge_from_a_redirect_target_is_not_answered():
    registry = FakeRegistry()
    def evil_cdn(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "cdn.test":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://evil.test/token"'})
        if "/blobs/" in request.url.path and "authorization" in request.headers:
            return httpx.Response(307, headers={"Location": "https://cdn.test/blob"})
        return None
    registry.fault = evil_cdn
    upstream = Upstream("registry.test", REGISTRY, username="alice", password="s3cret")
    with pytest.raises(UpstreamDenied):
        run(registry, read_blob, upstream)
    assert all(r.url.host != "evil.test" for r in registry.requests)


# --- against the real Distribution registry behind a Docker-Hub-like token server ----------------------


class TokenRegistry:
    """A token server and the Distribution registry it guards, holding a public, a private and a big image."""

    def __init__(self, workdir):
        self.tokens = TokenServer(workdir / "token").start()
        self.registry = DistributionRegistry(workdir / "registry", auth=self.tokens).start()
        credentials = {"username": self.tokens.username, "password": self.tokens.password}
        self.public, self.private = build_image("public"), build_image("private")
        self.big = build_image("big", layers=1, layer_size=12 * 1024 * 1024)
        push(self.registry.url, "library/alpine", "3.20", self.public, **credentials)
        push(self.registry.url, "team/private-app", "1.0", self.private, **credentials)
        push(self.registry.url, "library/big", "latest", self.big, **credentials)

    def upstream(self, username: str | None = None, password: str | None = None) -> Upstream:
        """The registry as an upstream, with these credentials."""
        return Upstream("registry.test", self.registry.url, username=username, password=password)

    def stop(self) -> None:
        """Stop the registry and the token server."""
        self.registry.stop()
        self.tokens.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    """One token-auth registry with test images, shared by this module's integration tests."""
    peers = TokenRegistry(tmp_path_factory.mktemp("token-registry"))
    yield peers
    peers.stop()


def test_anonymous_pull_of_a_public_repository(token_registry):
    image: Image = token_registry.public
    async def action(client: UpstreamClient) -> tuple[Any, ...]:
        await client.ping()
        head = await client.head_manifest("library/alpine", "3.20")
        got = await client.get_manifest("library/alpine", "3.20")
        by_digest = await client.get_manifest("library/alpine", image.digest)
        layer = image.layers[0]
        blob = await read_blob(client, repo="library/alpine", digest=Digest.parse(layer.digest))
        return head, got, by_digest, blob
    head, got, by_digest, blob = run(None, action, token_registry.upstream())
    digest = Digest.parse(image.digest)
    assert head == (digest, image.manifest.media_type, image.manifest.size)
    assert got == by_digest == (image.manifest.data, image.manifest.media_type, digest)
    assert blob == image.layers[0].data


def test_tokens_are_cached_per_scope_against_the_real_token_server(token_registry):
    tokens = token_registry.tokens
    before = len(tokens.requests)
    async def action(client: UpstreamClient) -> None:
        await asyncio.gather(*(client.get_manifest("library/alpine", "3.20") for _ in range(4)))
        await client.head_manifest("library/alpine", "3.20")
        config = Digest.parse(token_registry.public.config.digest)
        await read_blob(client, repo="library/alpine", digest=config)
    run(None, action, token_registry.upstream())
    issued = tokens.requests[before:]
    assert [r.scopes for r in issued] == [("repository:library/alpine:pull",)]


def test_private_repository_needs_the_credentials(token_registry):
    image: Image = token_registry.private
    upstream = token_registry.upstream(token_registry.tokens.username, token_registry.tokens.password)
    body, media_type, digest = run(None, lambda c: c.get_manifest("team/private-app", "1.0"), upstream)
    assert (body, media_type, str(digest)) == (image.manifest.data, image.manifest.media_type, image.digest)
    assert token_registry.tokens.requests[-1].account == token_registry.tokens.username
    with pytest.raises(UpstreamDenied):
        run(None, lambda c: c.get_manifest("team/private-app", "1.0"), token_registry.upstream())


def test_wrong_credentials_are_denied_by_the_real_token_server(token_registry):
    upstream = token_registry.upstream(token_registry.tokens.username, "wrong")
    with pytest.raises(UpstreamDenied):
        run(None, lambda c: c.get_manifest("library/alpine", "3.20"), upstream)
    assert token_registry.tokens.requests[-1].status == 401


def test_unknown_manifest_is_not_found(token_registry):
    with pytest.raises(UpstreamNotFound):
        run(None, lambda c: c.head_manifest("library/alpine", "no-such-tag"), token_registry.upstream())


def test_streaming_a_multi_mib_blob_whole_and_from_an_offset(token_registry):
    layer = token_registry.big.layers[0]
    digest, offset = Digest.parse(layer.digest), len(layer.data) // 3
    async def action(client: UpstreamClient) -> tuple[Any, ...]:
        async with client.stream_blob("library/big", digest) as stream:
            whole = bytearray()
            async for chunk in stream.aiter(1024 * 1024):
                whole += chunk
            first = (stream.status, stream.size)
        async with client.stream_blob("library/big", digest, offset) as stream:
            rest = b"".join([chunk async for chunk in stream.aiter()])
            second = (stream.status, stream.size)
        return first, bytes(whole), second, rest
    first, whole, second, rest = run(None, action, token_registry.upstream())
    assert len(layer.data) > 8 * 1024 * 1024
    assert first == (200, len(layer.data)) and Digest.of(whole) == digest
    assert second == (206, len(layer.data)) and rest == layer.data[offset:]


def test_unreachable_upstream_is_unavailable():
    upstream = Upstream("registry.test", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamUnavailable):
        run(None, lambda c: c.get_manifest("library/alpine", "3.20"), upstream)
