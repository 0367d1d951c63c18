"""The HTTP client of one upstream registry: ping, manifests, streamed blobs; failures as typed errors.

One pooled ``httpx.AsyncClient`` per upstream (plus one for its token realm), sharing a transport that
does the network I/O on threads (``transport.py``). Repository names are the upstream's own
(``library/alpine``); callers validate names and references, the client does not route.
Bodies are asked for without content coding (``Accept-Encoding: identity``) and the bytes received are
checked against ``Content-Length``: a short body is UpstreamUnavailable, a longer one UpstreamInvalid.
Manifests are checked against their digest here; blob digests are the caller's to verify (the store's
writer does). Redirects (blob storage) are followed without the registry's ``Authorization`` (see
``auth.py``); descriptor ``urls`` are never followed. Errors and their ``detail``: see ``status.py``.

What an upstream, hostile or broken, may cost (enforced as bytes arrive, see ``transport.py``):

- Time. Besides ``timeout`` for connecting and for each read, a request's answer (its headers; a manifest,
  tag list, referrers or token answer whole) must arrive within ``ANSWER_TIMEOUTS`` (3) times ``timeout``,
  redirects and token fetches included; a blob body must average ``MIN_RATE`` (16 KiB/s) once its first
  ``timeout`` seconds are over (``n`` bytes by ``timeout + n / MIN_RATE`` seconds after its headers). A
  request that misses either fails with UpstreamUnavailable (a blob already streaming to clients is cut).
  An upstream that leaves a request unanswered (or answers 5xx) is down for a backoff, during which requests
  fail at once with UpstreamDown (``health.py``, the client's ``health``): a hung upstream costs one wait.
- Size. A small answer (manifest, tag list page, referrers, token answer, a redirect's body) is at most
  ``MAX_ANSWER_SIZE`` (4 MiB), and its JSON nests at most ``MAX_JSON_DEPTH`` (64) arrays and objects deep,
  checked once here (``status.parse_json``) before anything else parses it: else UpstreamInvalid.
- Destinations. At most ``MAX_REDIRECTS`` (5) redirects are followed, each, like a token realm, only to the
  upstream's own origin or to addresses the policy of ``destinations.py`` admits (public ones, or of the
  upstream's own kind): a refusal is UpstreamInvalid naming the redirect or realm, before any connection to it.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from mirror.config import Upstream
from mirror.digest import Digest
from mirror.errors import DigestInvalid, UpstreamInvalid, UpstreamNotFound, UpstreamUnavailable
from mirror.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from mirror.upstream.auth import RegistryAuth
from mirror.upstream.destinations import MAX_REDIRECTS, DestinationRefused, Destinations
from mirror.upstream.health import UpstreamHealth
from mirror.upstream.status import (
    checked_body,
    content_length,
    detail,
    parse_json,
    raise_for_status,
    read_small,
    translated,
)
from mirror.upstream.transport import (
    ADMIT,
    DEADLINES,
    Deadlines,
    Egress,
    EgressTransport,
    ThreadedTransport,
    Urllib3Transport,
)

log = logging.getLogger(__name__)
MAX_REQUESTS = 64  # in flight to one upstream at once
KEEPALIVE = 16  # idle connections kept per host
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
USER_AGENT = "mirror-appliance/0.1"
_ACCEPT = {"Accept": MANIFEST_ACCEPT}
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
TAG_PAGE = 1000
MAX_TAG_PAGES = 100
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


class BlobStream:
    """An upstream blob being received: its status, total size and bytes from the requested offset on."""

    def __init__(self, response: httpx.Response, offset: int, what: str):
        self.status = response.status_code
        self.offset = offset
        self._response = response
        self._what = what
        self._skip = 0
        if self.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if not match or int(match[1]) != offset:
                raise UpstreamInvalid(f"{what}: asked for bytes from {offset}, got "
                                      f"{response.headers.get('content-range')!r}", detail(206))
            self.size = None if match[2] == "*" else int(match[2])
        else:
            self._skip = offset  # the upstream ignored the Range header and sends everything
            self.size = content_length(response)

    async def aiter(self, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        """The bytes from ``offset`` to the end, in chunks of ``chunk_size`` (default: as they arrive)."""
        skip = self._skip
        async for chunk in checked_body(self._response, self._what, chunk_size):
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            yield chunk


def upstream_egress(upstream: Upstream) -> Egress:
    """How ``upstream``'s requests leave: its proxy and TLS settings (see ``transport.py``)."""
    return Egress(upstream.proxy, upstream.ca_file, upstream.tls_verify)


def upstream_transport(upstream: Upstream) -> ThreadedTransport:
    """The transport of ``upstream``'s requests: urllib3, its connection pools made now, its network I/O on
    threads (see ``transport.py``)."""
    return ThreadedTransport(Urllib3Transport(KEEPALIVE, [upstream_egress(upstream)]),
                             threads=2 * MAX_REQUESTS)  # requests, and bodies read


class UpstreamClient:
    """Talks to one upstream registry; raises only UpstreamError subclasses (and DigestInvalid)."""

    def __init__(self, upstream: Upstream, transport: httpx.AsyncBaseTransport | None = None, *,
                 timeout: httpx.Timeout | None = None, clock: Callable[[], float] = time.time):
        self.upstream = upstream
        timeout = timeout or httpx.Timeout(upstream.timeout, connect=min(upstream.timeout, 5.0))
        if not upstream.tls_verify:
            log.warning("upstream %s (%s) has tls_verify: false: its TLS certificates, and those of its token realm "
                        "and blob storage, are NOT verified, so anyone on the network path can impersonate them",
                        upstream.name, upstream.url)
        egress = upstream_egress(upstream)
        options = {"transport": EgressTransport(transport or upstream_transport(upstream), egress), "timeout": timeout,
                   "trust_env": False, "headers": {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}}
        self._token_http = httpx.AsyncClient(**options)
        self._http = httpx.AsyncClient(base_url=upstream.url, auth=RegistryAuth(upstream, self._token_http, clock),
                                       **options)
        self._destinations = Destinations(upstream.url)
        self.health = UpstreamHealth(upstream.name)

    async def ping(self) -> None:
        """Check that the upstream answers ``/v2/`` (authenticating if it asks to)."""
        async with self._send("GET", "/v2/", f"ping {self.upstream.url}"):
            pass

    async def head_manifest(self, repo: str, reference: str) -> tuple[Digest, str, int]:
        """Digest, media type and size of a manifest, by tag or digest, without fetching it."""
        what = _manifest_what(repo, reference)
        async with self._send("HEAD", f"/v2/{repo}/manifests/{reference}", what, _ACCEPT) as response:
            claimed = _claimed_digest(response, what)
            size = content_length(response)
            media_type = _media_type(response, what)
        if claimed is None or size is None:  # not every registry says on HEAD: ask with a GET
            body, media_type, digest = await self.get_manifest(repo, reference)
            return digest, media_type, len(body)
        expected = _reference_digest(reference)
        if expected is not None and claimed != expected:
            raise UpstreamInvalid(f"{what}: upstream says its digest is {claimed}", detail(200))
        return claimed, media_type, size

    async def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, Digest]:
        """Body, media type and digest of a manifest by tag or digest, verified, at most 4 MiB."""
        what = _manifest_what(repo, reference)
        async with self._send("GET", f"/v2/{repo}/manifests/{reference}", what, _ACCEPT) as response:
            media_type = _media_type(response, what)
            expected = _reference_digest(reference) or _claimed_digest(response, what)
            body = await read_small(response, what)
        digest = Digest.of(body, expected.algorithm if expected else "sha256")
        if expected is not None and digest != expected:
            raise UpstreamInvalid(f"{what}: body has digest {digest}, expected {expected}", detail(200))
        parse_json(body, what)  # bounded in depth before anything else parses it
        return body, media_type, digest

    async def head_blob(self, repo: str, digest: Digest) -> int | None:
        """The size of blob ``digest`` in ``repo`` (None when not said); UpstreamNotFound when it lacks it."""
        async with self._send("HEAD", f"/v2/{repo}/blobs/{digest}", f"blob {repo}@{digest}") as response:
            return content_length(response)

    async def tags(self, repo: str) -> list[str]:
        """Every tag of ``repo``, following the ``Link`` pages (at most ``MAX_TAG_PAGES`` of them)."""
        what, path, found = f"tags of {repo}", f"/v2/{repo}/tags/list?n={TAG_PAGE}", []
        for _ in range(MAX_TAG_PAGES):
            document, path = await self._json("GET", path, what)
            tags = document.get("tags") if isinstance(document, dict) else None
            if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
                raise UpstreamInvalid(f"{what}: malformed tag list", detail(200))
            found += tags or []
            if path is None:
                break
        return found

    async def referrers(self, repo: str, subject: Digest) -> list[dict]:
        """Descriptors of the manifests referring to ``subject``: the referrers API, or on registries without
        it the referrers tag schema (an index tagged ``<alg>-<hex>``); none when neither has any."""
        what = f"referrers of {repo}@{subject}"
        try:
            index, _ = await self._json("GET", f"/v2/{repo}/referrers/{subject}", what, {"Accept": OCI_INDEX})
        except UpstreamNotFound:
            try:
                body, _, _ = await self.get_manifest(repo, f"{subject.algorithm}-{subject.hex}")
            except UpstreamNotFound:
                return []
            index = parse_json(body, what)
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise UpstreamInvalid(f"{what}: not an image index", detail(200))
        return [m for m in manifests if isinstance(m, dict) and Digest.is_digest(str(m.get("digest", "")))]

    @asynccontextmanager
    async def stream_blob(self, repo: str, digest: Digest, offset: int = 0) -> AsyncIterator[BlobStream]:
        """Open a blob for streaming from ``offset`` on; the connection is released on leaving the block."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        what = f"blob {repo}@{digest}"
        async with self._send("GET", f"/v2/{repo}/blobs/{digest}", what, headers, streamed=True) as response:
            yield BlobStream(response, offset, what)

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()
        await self._token_http.aclose()

    async def _json(self, method: str, path: str, what: str,
                    headers: dict[str, str] | None = None) -> tuple[object, str | None]:
        """A small JSON answer (``status.read_small``, ``parse_json``) and the path of its ``Link`` next page."""
        async with self._send(method, path, what, headers) as response:
            body = await read_small(response, what)
            link = _NEXT_LINK.search(response.headers.get("link", ""))
        return parse_json(body, what), link[1] if link and link[1].startswith("/v2/") else None

    @asynccontextmanager
    async def _send(self, method: str, path: str, what: str, headers: dict[str, str] | None = None, *,
                    streamed: bool = False) -> AsyncIterator[httpx.Response]:
        """The answer to a request, redirects followed; a small answer unless ``streamed`` (see ``Deadlines``).
        While the upstream is down, UpstreamDown at once (``health.py``, told here how each request went)."""
        deadlines = Deadlines(self.upstream.timeout, streamed=streamed)
        extensions = {ADMIT: self._destinations.admit, DEADLINES: deadlines}
        with self.health.attempt() as attempt:
            try:
                with translated(what):
                    response = await self._exchange(self._http.build_request(method, path, headers=headers,
                                                                             extensions=extensions), what)
            except UpstreamUnavailable as exc:
                if time.monotonic() < deadlines.answer_by:  # unanswered, not answered too slowly
                    attempt.failed(exc.message)
                raise
            if response.status_code >= 500 and response.status_code != 501:
                attempt.failed(f"{what}: upstream answered {response.status_code}")
            else:
                attempt.answered()
        try:
            raise_for_status(response, what)
            yield response
        finally:
            await response.aclose()

    async def _exchange(self, request: httpx.Request, what: str) -> httpx.Response:
        """Send ``request``, then follow at most ``MAX_REDIRECTS`` redirects, to where ``Destinations`` admits."""
        response = await self._http.send(request, stream=True)
        hops = 0
        while (hop := response.next_request) is not None:
            try:
                await read_small(response, what)  # read, so that its connection can serve again
            finally:
                await response.aclose()
            hops += 1
            if hops > MAX_REDIRECTS:
                raise UpstreamInvalid(f"{what}: more than {MAX_REDIRECTS} redirects", detail(response.status_code))
            if hop.url.scheme not in ("http", "https"):
                raise UpstreamInvalid(f"{what}: refused to follow the redirect to {hop.url}: not http or https",
                                      detail(response.status_code))
            try:  # without auth: the upstream's credentials are for its own requests (auth.py)
                response = await self._http.send(hop, stream=True, auth=None)
            except DestinationRefused as exc:
                raise UpstreamInvalid(f"{what}: refused to follow the redirect to {hop.url}: {exc.reason}",
                                      detail(response.status_code)) from None
        return response


def _media_type(response: httpx.Response, what: str) -> str:
    media_type = response.headers.get("content-type", "").partition(";")[0].strip()
    if not media_type:
        raise UpstreamInvalid(f"{what}: upstream sent no Content-Type", detail(response.status_code))
    return media_type


def _claimed_digest(response: httpx.Response, what: str) -> Digest | None:
    value = response.headers.get("docker-content-digest")
    if value is None:
        return None
    try:
        return Digest.parse(value.strip())
    except DigestInvalid as exc:
        raise UpstreamInvalid(f"{what}: malformed digest {value[:100]!r}", detail(200)) from exc


def _reference_digest(reference: str) -> Digest | None:
    return Digest.parse(reference) if Digest.is_digest(reference) else None


def _manifest_what(repo: str, reference: str) -> str:
    return f"manifest {repo}{'@' if Digest.is_digest(reference) else ':'}{reference}"
