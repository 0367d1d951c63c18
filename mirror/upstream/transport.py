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
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import urllib3
from urllib3 import exceptions as urllib3_errors

READ_SIZE = 1 << 20  # bytes of a response body read at a time
READ_AHEAD = 8  # chunks of a response body received before the loop asks for them


class Urllib3Transport(httpx.BaseTransport):
    """A synchronous httpx transport over urllib3, keeping up to ``keepalive`` idle connections per host.

    It sends each request as it is (redirects are the httpx client's to follow, retries nobody's), verifies
    TLS like httpx does, ignores proxy variables, and raises httpx's exceptions.
    """

    def __init__(self, keepalive: int):
        self._pools = urllib3.PoolManager(maxsize=keepalive, ssl_context=httpx.create_ssl_context(trust_env=False),
                                          retries=False)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and return the response with its body still to be read."""
        timeout = request.extensions.get("timeout", {})
        with _httpx_errors():
            response = self._pools.urlopen(
                request.method, str(request.url), body=request.read() or None,
                headers=urllib3.HTTPHeaderDict(request.headers.multi_items()),
                timeout=urllib3.Timeout(connect=timeout.get("connect"), read=timeout.get("read")),
                redirect=False, retries=False, preload_content=False, decode_content=False)
        return httpx.Response(response.status, headers=list(response.headers.items()),
                              stream=_Urllib3Body(response),
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason.encode()})

    def close(self) -> None:
        """Close every pooled connection."""
        self._pools.clear()


class _Urllib3Body(httpx.SyncByteStream):
    """A response body read ``READ_SIZE`` bytes at a time; its connection goes back to the pool once read
    to the end, and is closed if the body is closed before that."""

    def __init__(self, response: urllib3.BaseHTTPResponse):
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            while chunk := self._response.read(READ_SIZE, decode_content=False):
                yield chunk

    def close(self) -> None:
        """Let the connection go: closed unless the body was read to its end (then it is pooled already)."""
        self._response.close()
        self._response.release_conn()


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """Raise urllib3's failures as the httpx exceptions the layers above handle."""
    try:
        yield
    except (urllib3_errors.NewConnectionError, urllib3_errors.SSLError) as exc:  # before: a ConnectTimeoutError
        raise httpx.ConnectError(str(exc)) from exc
    except urllib3_errors.ConnectTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc)) from exc
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
