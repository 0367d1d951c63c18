"""Registry authentication for one upstream: the ``WWW-Authenticate`` challenge flow as an ``httpx.Auth``.

A request goes out with what is already known to work: a cached bearer token for its scope (fetched
first if the upstream's realm is known), or Basic credentials once the upstream asked for Basic. A 401
from the upstream is then answered once:

- ``Bearer realm=...,service=...,scope=...``: a token is fetched with a GET from the realm, anonymously
  or with the upstream's username and password as Basic, and cached per scope until it expires:
  ``expires_in`` seconds (60 when absent) counted from ``issued_at`` (from its arrival when the clocks
  disagree), less a few seconds of margin. Concurrent requests for one scope share one fetch.
- ``Basic``: the username and password are sent directly (none configured: the 401 stands).

Where secrets go (the rule):

- The ``Authorization`` header (Basic or token) only ever goes to the upstream's own host: httpx drops it
  when a response redirects to another origin (blob storage, CDN) unless it is the same host's upgrade
  from http to https, and challenges coming from any origin but the upstream URL's are not answered.
- The username and password go to a token realm only when the realm is https, or on the upstream's own
  host (which the operator already trusts with them), or on a loopback address. Docker Hub's realm
  (https://auth.docker.io) qualifies; a plain-http realm elsewhere gets an anonymous request and a
  warning in the log.
- Token requests never follow redirects, and a realm outside the upstream's origin must pass the
  destination policy (``destinations.py``: public addresses, or of the upstream's own kind) before any
  connection is made to it, so no credentials or requests go to an internal service the upstream names.
  The token answer is a small answer (``client.py``: deadlines, size, JSON depth).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from mirror.config import Upstream
from mirror.errors import UpstreamInvalid, UpstreamUnavailable
from mirror.upstream.destinations import DestinationRefused, Destinations
from mirror.upstream.status import detail, parse_json, raise_for_status, read_small, translated
from mirror.upstream.transport import ADMIT, DEADLINES, Deadlines

log = logging.getLogger(__name__)

DEFAULT_EXPIRES_IN = 60.0
EXPIRY_MARGIN = 5.0
_PARAM = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_SCOPED_PATH = re.compile(r"/v2/(.+)/(?:manifests|blobs|tags)/")


@dataclass(frozen=True)
class Challenge:
    """One parsed ``WWW-Authenticate`` challenge: its scheme (lower case) and parameters."""

    scheme: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        """Parse ``header``; None if it names no scheme."""
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            return None
        params = {key.lower(): (quoted or bare).replace('\\"', '"')
                  for key, quoted, bare in _PARAM.findall(rest)}
        return cls(scheme.lower(), params)


@dataclass(frozen=True)
class Token:
    """A bearer token and the ``time.time()`` at which it should no longer be used."""

    value: str
    expires: float


class RegistryAuth(httpx.Auth):
    """Answers one upstream's auth challenges, caching bearer tokens per scope."""

    def __init__(self, upstream: Upstream, token_client: httpx.AsyncClient,
                 clock: Callable[[], float] = time.time):
        self._url = httpx.URL(upstream.url)
        self._credentials = (upstream.username, upstream.password or "") if upstream.username else None
        self._token_client = token_client
        self._clock = clock
        self._timeout = upstream.timeout
        self._destinations = Destinations(upstream.url)
        self._realm: tuple[str, str | None] | None = None
        self._use_basic = False
        self._tokens: dict[str, Token] = {}
        self._fetches: dict[str, asyncio.Task[Token]] = {}

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Authorize ``request`` with what is known, and answer one challenge if the upstream sends it."""
        sent = await self._authorize(request)
        response = yield request
        challenge = self._challenge(response)
        if challenge is None:
            return
        if challenge.scheme == "basic":
            if self._credentials is None or self._use_basic:
                return
            self._use_basic = True
            request.headers["Authorization"] = _basic(*self._credentials)
        else:
            realm, service = self._remember_realm(challenge)
            token = await self._token(realm, service, challenge.params.get("scope", _scope(request)), sent)
            if token == sent:
                return
            request.headers["Authorization"] = f"Bearer {token}"
        yield request

    async def _token(self, realm: str, service: str | None, scope: str, rejected: str | None = None) -> str:
        cached = self._tokens.get(scope)
        if cached and cached.value != rejected and cached.expires > self._clock():
            return cached.value
        task = self._fetches.get(scope)
        if task is None:
            task = asyncio.ensure_future(self._fetch(realm, service, scope))
            self._fetches[scope] = task
            task.add_done_callback(lambda done: self._fetch_done(scope, done))
        return (await asyncio.shield(task)).value

    async def _authorize(self, request: httpx.Request) -> str | None:
        if self._use_basic and self._credentials:
            request.headers["Authorization"] = _basic(*self._credentials)
        elif self._realm is not None:
            token = await self._token(*self._realm, _scope(request))
            request.headers["Authorization"] = f"Bearer {token}"
            return token
        return None

    def _challenge(self, response: httpx.Response) -> Challenge | None:
        if response.status_code != 401 or not _same_origin(response.request.url, self._url):
            return None
        challenges = [Challenge.parse(h) for h in response.headers.get_list("www-authenticate")]
        by_scheme = {c.scheme: c for c in challenges if c is not None}
        return by_scheme.get("bearer") or by_scheme.get("basic")

    def _remember_realm(self, challenge: Challenge) -> tuple[str, str | None]:
        realm = httpx.URL(challenge.params.get("realm", ""))
        if realm.scheme not in ("http", "https") or not realm.host:
            raise UpstreamUnavailable(f"upstream {self._url} sent a bearer challenge without a usable realm",
                                      detail(401))
        self._realm = (str(realm), challenge.params.get("service"))
        return self._realm

    async def _fetch(self, realm: str, service: str | None, scope: str) -> Token:
        params = {key: value for key, value in (("service", service), ("scope", scope)) if value}
        credentials = self._credentials if self._credentials and self._may_send_credentials(realm) else None
        what = f"token for {scope or 'the registry'} from {realm}"
        extensions = {ADMIT: self._destinations.admit, DEADLINES: Deadlines(self._timeout)}
        with translated(what):
            try:
                async with self._token_client.stream("GET", realm, params=params, auth=credentials,
                                                     follow_redirects=False, extensions=extensions) as response:
                    raise_for_status(response, what)
                    body = await read_small(response, what)
            except DestinationRefused as exc:
                raise UpstreamInvalid(f"{what}: refused the token realm: {exc.reason}", detail(None)) from None
        try:
            data = parse_json(body, what)
        except UpstreamInvalid as exc:  # a token service answering nonsense is as good as down
            raise UpstreamUnavailable(f"{exc.message}: no token in it", detail(200)) from exc
        value = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise UpstreamUnavailable(f"{what}: the answer holds no token", detail(200))
        return Token(value, self._expiry(data))

    def _expiry(self, data: dict[str, Any]) -> float:
        now = self._clock()
        lifetime = data.get("expires_in")
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_EXPIRES_IN
        issued = now
        with contextlib.suppress(TypeError, ValueError):
            issued = datetime.fromisoformat(data.get("issued_at")).timestamp()
        if not now - lifetime < issued <= now:  # the clocks disagree: count from arrival
            issued = now
        return issued + lifetime - min(EXPIRY_MARGIN, lifetime / 4)

    def _fetch_done(self, scope: str, task: asyncio.Task[Token]) -> None:
        self._fetches.pop(scope, None)
        if task.cancelled() or task.exception() is not None:
            return
        now = self._clock()
        self._tokens = {s: t for s, t in self._tokens.items() if t.expires > now}
        self._tokens[scope] = task.result()

    def _may_send_credentials(self, realm: str) -> bool:
        url = httpx.URL(realm)
        if url.scheme == "https" or url.host == self._url.host or _is_loopback(url.host):
            return True
        log.warning("not sending the credentials of %s to the plain-http token realm %s; asking anonymously",
                    self._url, realm)
        return False


def _basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _scope(request: httpx.Request) -> str:
    """The pull scope a request to a repository needs; empty for the API root."""
    match = _SCOPED_PATH.search(request.url.path)
    return f"repository:{match[1]}:pull" if match else ""


def _same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    return (a.scheme, a.host, a.port or _default_port(a)) == (b.scheme, b.host, b.port or _default_port(b))


def _default_port(url: httpx.URL) -> int:
    return 443 if url.scheme == "https" else 80


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
