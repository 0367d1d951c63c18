"""The HTTP transport to upstreams: urllib3's connection pools, driven from the event loop on threads.

Receiving a large blob costs the receiving thread a socket read, HTTP parsing and (over TLS) decryption
for every byte. On the event loop that work would compete with serving clients; on a thread of its own
most of it runs outside the GIL, on another core. Everything above the transport (auth, redirects,
metrics, the client) stays asynchronous and unchanged: a request is sent on a thread, and a response body
is read on one, a few chunks ahead of the loop.

The synchronous transport is urllib3 rather than httpx's own (httpcore): urllib3 reads a body through the
standard library's buffered socket reader, which copies each byte once, from the kernel straight into the
chunk handed on, where httpcore's parser (h11) copies it four more times while holding the GIL. For a cold
256 MiB blob that was most of the difference between being behind the Distribution registry and level with it.

Three request extensions, which the client sets on every request (``client.py``), are enforced here, where
connections are opened and bytes arrive, on the thread doing that work:

- ``EGRESS``: the upstream's ``Egress``, how its requests leave: directly or through its proxy (CONNECT
  tunnels to https destinations, absolute-form requests to http ones, proxy credentials sent as
  ``Proxy-Authorization``), trusting the system's CA store (OpenSSL's default paths: ``/etc/ssl/certs``, or
  ``SSL_CERT_FILE``/``SSL_CERT_DIR``) plus its ``ca_file``, or no certificate at all without ``tls_verify``.
  Each distinct ``Egress`` has its own connection pools and TLS context.
- ``ADMIT``: ``admit(scheme, host, port, addresses)``, which raises to refuse a destination
  (``destinations.py``). Directly, a new connection resolves its host, has every address judged, and connects
  only to those addresses, so the host cannot resolve elsewhere in between. Through a proxy, the proxy
  resolves and connects: every request's destination is judged (``addresses`` None: the policy resolves the
  host itself) before it is sent, and the connection to the proxy, trusted config, is not judged.
- ``DEADLINES``: the request's ``Deadlines``. Every read from the socket, of headers or body, is reported to
  them, and one that comes too late raises ``httpx.ReadTimeout`` there and then: a body read ``READ_SIZE``
  bytes at a time is checked while it arrives, and a trickling upstream holds neither a client nor a thread
  past its deadline.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import httpx
import urllib3
from urllib3 import connection as urllib3_connection
from urllib3 import exceptions as urllib3_errors
from urllib3.util import parse_url
from urllib3.util.connection import allowed_gai_family, create_connection

READ_SIZE = 1 << 20  # bytes of a response body read at a time
READ_AHEAD = 8  # chunks of a response body received before the loop asks for them
ANSWER_TIMEOUTS = 3  # an answer's headers, and a small answer's body, arrive within this many `timeout`s
MIN_RATE = 16 * 1024  # bytes a second a streamed body must average once its first `timeout` seconds are over
ADMIT = "mirror.admit"  # request extension: admit(scheme, host, port, addresses), raising to refuse
DEADLINES = "mirror.deadlines"  # request extension: the request's Deadlines
EGRESS = "mirror.egress"  # request extension: the upstream's Egress (none: direct, the system's CAs)

_Admit = Callable[[str, str, int, Sequence[str] | None], None]
_current = threading.local()  # admit and arrived of the request (or body) this thread is working for


class Deadlines:
    """The deadlines of one upstream request, its redirects and auth retries included, checked as bytes arrive.

    Its answer (the headers; a small answer's body too) must be complete within ``ANSWER_TIMEOUTS`` times
    ``timeout`` of the request's start. A ``streamed`` body (a blob) must arrive at ``MIN_RATE`` bytes a second
    on average, counted from its headers, after a grace of ``timeout`` seconds: ``n`` bytes by
    ``timeout + n / MIN_RATE`` seconds.
    """

    def __init__(self, timeout: float, *, streamed: bool = False, clock: Callable[[], float] = time.monotonic):
        self.timeout, self.streamed, self._clock = timeout, streamed, clock
        self._body_start, self._body_received = clock(), 0
        self.answer_by = self._body_start + ANSWER_TIMEOUTS * timeout

    def answer(self, received: int) -> None:
        """Raise httpx.ReadTimeout if the answer is late (called after every read of it, ``received`` bytes)."""
        if self._clock() > self.answer_by:
            raise httpx.ReadTimeout(f"no complete answer within {ANSWER_TIMEOUTS * self.timeout:g} s "
                                    f"({ANSWER_TIMEOUTS} times the upstream's timeout)")

    def started_body(self) -> None:
        """Note that the headers arrived: a streamed body keeps pace from now on."""
        self._body_start, self._body_received = self._clock(), 0

    def body(self, received: int) -> None:
        """Count ``received`` more bytes of the body; raise httpx.ReadTimeout if it is late."""
        if not self.streamed:
            self.answer(received)
            return
        self._body_received += received
        elapsed = self._clock() - self._body_start
        if elapsed > self.timeout + self._body_received / MIN_RATE:
            raise httpx.ReadTimeout(f"{self._body_received} bytes of the body in {elapsed:.1f} s, under the minimum "
                                    f"of {MIN_RATE} bytes/s after the first {self.timeout:g} s")


@dataclass(frozen=True)
class Egress:
    """How one upstream's requests leave: through ``proxy`` (an http:// or https:// URL, maybe with credentials)
    or directly; verifying TLS against the system's CA store plus ``ca_file``, or not at all (``tls_verify``)."""

    proxy: str | None = field(default=None, repr=False)  # its credentials are never shown
    ca_file: Path | None = None
    tls_verify: bool = True


class EgressTransport(httpx.AsyncBaseTransport):
    """Sends every request through ``inner`` with the ``EGRESS`` extension: one upstream's ``egress``."""

    def __init__(self, inner: httpx.AsyncBaseTransport, egress: Egress):
        self._inner, self._egress = inner, egress

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` the upstream's way."""
        request.extensions[EGRESS] = self._egress
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close ``inner``."""
        await self._inner.aclose()


class Urllib3Transport(httpx.BaseTransport):
    """A synchronous httpx transport over urllib3, keeping up to ``keepalive`` idle connections per host, with
    the connection pools of ``egresses`` ready before the first request (others' are made on first use).

    It sends each request as it is (redirects are the httpx client's to follow, retries nobody's), the way its
    ``EGRESS`` says (see the module docstring; proxy variables are the config's to read), and raises httpx's
    exceptions.
    """

    def __init__(self, keepalive: int, egresses: Iterable[Egress] = ()):
        self._keepalive = keepalive
        self._managers: dict[Egress, urllib3.PoolManager] = {}
        self._managers_lock = threading.Lock()
        for egress in egresses:  # made now, not on the first request: loading the CA store takes tens of ms
            self._manager(egress)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and return the response with its body still to be read."""
        timeout = request.extensions.get("timeout", {})
        deadlines: Deadlines | None = request.extensions.get(DEADLINES)
        egress: Egress = request.extensions.get(EGRESS, _DIRECT)
        admit: _Admit | None = request.extensions.get(ADMIT)
        if egress.proxy is not None and admit is not None:  # the destination is judged; the proxy is trusted
            url = request.url
            admit(url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme], None)
            admit = None
        with _httpx_errors(), _working_for(admit, deadlines and deadlines.answer):
            response = self._manager(egress).urlopen(
                request.method, str(request.url), body=request.read() or None,
                headers=urllib3.HTTPHeaderDict(request.headers.multi_items()),
                timeout=urllib3.Timeout(connect=timeout.get("connect"), read=timeout.get("read")),
                redirect=False, retries=False, preload_content=False, decode_content=False)
        if deadlines is not None:
            deadlines.started_body()
        return httpx.Response(response.status, headers=list(response.headers.items()),
                              stream=_Urllib3Body(response, deadlines and deadlines.body),
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason.encode()})

    def close(self) -> None:
        """Close every pooled connection."""
        with self._managers_lock:
            for manager in self._managers.values():
                manager.clear()

    def _manager(self, egress: Egress) -> urllib3.PoolManager:
        """The connection pools of ``egress``, made on first use."""
        with self._managers_lock:
            if egress not in self._managers:
                self._managers[egress] = _pool_manager(egress, self._keepalive)
            return self._managers[egress]


_DIRECT = Egress()
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _pool_manager(egress: Egress, keepalive: int) -> urllib3.PoolManager:
    """Pools for ``egress``: a ProxyManager through its proxy (whose certificate, if https, is checked like the
    upstream's), else a PoolManager."""
    context = ssl.create_default_context()  # the system's CA store, SSL_CERT_FILE and SSL_CERT_DIR honoured
    if egress.ca_file is not None:
        context.load_verify_locations(egress.ca_file)
    options = {"maxsize": keepalive, "ssl_context": context, "retries": False}
    if not egress.tls_verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        options.update(cert_reqs=ssl.CERT_NONE, assert_hostname=False)
    context.sslsocket_class = _CountingSSLSocket
    if egress.proxy is None:
        manager = urllib3.PoolManager(**options)
    else:
        proxy = parse_url(egress.proxy)
        headers = None
        if proxy.auth is not None:
            user, _, password = proxy.auth.partition(":")
            credentials = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
            headers = {"Proxy-Authorization": f"Basic {credentials}"}
        manager = _ProxyManager(proxy._replace(auth=None).url, proxy_headers=headers, proxy_ssl_context=context,
                                **options)
    manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return manager


class _Urllib3Body(httpx.SyncByteStream):
    """A response body read ``READ_SIZE`` bytes at a time; its connection goes back to the pool once read
    to the end, and is closed if the body is closed before that."""

    def __init__(self, response: urllib3.BaseHTTPResponse, arrived: Callable[[int], None] | None = None):
        self._response, self._arrived = response, arrived

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            while True:
                with _working_for(arrived=self._arrived):
                    chunk = self._response.read(READ_SIZE, decode_content=False)
                if not chunk:
                    return
                yield chunk

    def close(self) -> None:
        """Let the connection go: closed unless the body was read to its end (then it is pooled already)."""
        self._response.close()
        self._response.release_conn()


@contextlib.contextmanager
def _working_for(admit: _Admit | None = None, arrived: Callable[[int], None] | None = None) -> Iterator[None]:
    """Let the connections and sockets this thread uses inside the block apply ``admit`` and report reads to
    ``arrived``."""
    _current.admit, _current.arrived = admit, arrived
    try:
        yield
    finally:
        _current.admit = _current.arrived = None


def _arrived(received: int) -> None:
    """Report a read of ``received`` bytes to the deadlines of the request this thread works for."""
    arrived = getattr(_current, "arrived", None)
    if arrived is not None:
        arrived(received)


class _CountingSocket(socket.socket):
    """A plain socket whose reads are reported (``_arrived``)."""

    def recv_into(self, buffer, nbytes=0, flags=0):  # noqa: ANN001, ANN201 - socket.socket's signature
        received = super().recv_into(buffer, nbytes, flags)
        _arrived(received)
        return received


class _CountingSSLSocket(ssl.SSLSocket):
    """A TLS socket whose reads are reported (``_arrived``); the transport's SSL context makes these."""

    def recv_into(self, buffer, nbytes=None, flags=0):  # noqa: ANN001, ANN201 - ssl.SSLSocket's signature
        received = super().recv_into(buffer, nbytes, flags)
        _arrived(received)
        return received


def _counting(sock: socket.socket) -> _CountingSocket:
    """``sock`` as a _CountingSocket (the same connection)."""
    timeout = sock.gettimeout()
    counting = _CountingSocket(sock.family, sock.type, sock.proto, sock.detach())
    counting.settimeout(timeout)
    return counting


class _AdmittedConnection:
    """What urllib3's connections do differently here: with an ``admit``, resolve the host, have every
    address judged, and connect only to those; and make the socket report its reads."""

    _scheme: str

    def _new_conn(self) -> socket.socket:
        admit: _Admit | None = getattr(_current, "admit", None)
        if admit is None:
            return _counting(super()._new_conn())
        host, port = self.host, self.port
        try:
            found = socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise urllib3_errors.NameResolutionError(host, self, exc) from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
        admit(self._scheme, host, port, addresses)
        failure: OSError | None = None
        for address in addresses:
            try:
                return _counting(create_connection(
                    (address, port), self.timeout, source_address=self.source_address,
                    socket_options=self.socket_options))
            except OSError as exc:
                failure = exc
        if isinstance(failure, TimeoutError):
            raise urllib3_errors.ConnectTimeoutError(self, f"Connection to {host} timed out") from failure
        raise urllib3_errors.NewConnectionError(self, f"Failed to establish a new connection: {failure}") from failure


class _HTTPConnection(_AdmittedConnection, urllib3_connection.HTTPConnection):
    _scheme = "http"


class _HTTPSConnection(_AdmittedConnection, urllib3_connection.HTTPSConnection):
    _scheme = "https"


class _ProxyManager(urllib3.ProxyManager):
    """urllib3's ProxyManager sending a request's own headers (urllib3 adds ``Accept: */*`` and ``Host`` to an
    absolute-form request, a second one of each beside httpx's lower-case ``accept`` and ``host``)."""

    def _set_proxy_headers(self, url: str, headers: Mapping[str, str] | None = None) -> Mapping[str, str]:
        return headers or {}


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """Raise urllib3's failures as the httpx exceptions the layers above handle."""
    try:
        yield
    except (urllib3_errors.NewConnectionError, urllib3_errors.SSLError) as exc:  # before: a ConnectTimeoutError
        raise httpx.ConnectError(str(exc)) from exc
    except urllib3_errors.ConnectTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc)) from exc
    except urllib3_errors.ProxyError as exc:  # the proxy could not be reached, or refused the CONNECT
        raise httpx.ProxyError(f"proxy: {exc.original_error}") from exc
    except urllib3_errors.ReadTimeoutError as exc:
        raise httpx.ReadTimeout(str(exc)) from exc
    except urllib3_errors.ProtocolError as exc:  # the connection broke: reset, or closed mid-answer
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except urllib3_errors.HTTPError as exc:
        raise httpx.ReadError(str(exc)) from exc


class ThreadedTransport(httpx.AsyncBaseTransport):
    """An asynchronous transport that runs the synchronous ``inner`` on up to ``threads`` threads (each body
    being received holds one)."""

    def __init__(self, inner: httpx.BaseTransport, threads: int):
        self._inner = inner
        self._threads = ThreadPoolExecutor(threads, "upstream")
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a thread; the response's body is read on threads too."""
        sync_request = httpx.Request(request.method, request.url, headers=request.headers,
                                     content=await request.aread(), extensions=request.extensions)
        response = await self._run(self._inner.handle_request, sync_request)
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=_ThreadedBody(self, response.stream))

    async def aclose(self) -> None:
        """Close the connections, then let the threads go (a second call does nothing)."""
        if not self._closed:
            self._closed = True
            await self._run(self._inner.close)
            self._threads.shutdown(wait=False)

    async def _run(self, function, *args):  # noqa: ANN001, ANN202 - a thin run_in_executor
        return await asyncio.get_running_loop().run_in_executor(self._threads, function, *args)


class _ThreadedBody(httpx.AsyncByteStream):
    """A synchronous response body read on one of the transport's threads, up to ``READ_AHEAD`` chunks
    ahead of the loop, so the connection keeps flowing while the loop handles the last chunk."""

    def __init__(self, transport: ThreadedTransport, stream: httpx.SyncByteStream):
        self._transport, self._stream = transport, stream
        self._room = threading.Semaphore(READ_AHEAD)
        self._stopping = False
        self._reading: asyncio.Future[None] | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        received: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._reading = asyncio.ensure_future(self._transport._run(self._read, loop, received))
        while (item := await received.get()) is not None:
            self._room.release()
            if isinstance(item, BaseException):
                raise item
            yield item

    def _read(self, loop: asyncio.AbstractEventLoop, received: asyncio.Queue[bytes | BaseException | None]) -> None:
        try:
            for chunk in self._stream:
                self._room.acquire()
                if self._stopping:
                    return
                loop.call_soon_threadsafe(received.put_nowait, chunk)
        except Exception as exc:  # noqa: BLE001 - handed to the loop, raised there
            loop.call_soon_threadsafe(received.put_nowait, exc)
        else:
            loop.call_soon_threadsafe(received.put_nowait, None)

    async def aclose(self) -> None:
        """Stop reading ahead and close the body, releasing its connection."""
        self._stopping = True
        self._room.release()  # wakes the reader if it waits for room
        if self._reading is not None:
            await self._reading
        await self._transport._run(self._stream.close)
