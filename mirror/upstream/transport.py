"""The HTTP transport to upstreams: httpx's synchronous transport, driven from the event loop on threads.

Receiving a large blob costs the receiving thread a socket read, HTTP parsing and (over TLS) decryption
for every byte. On the event loop that work would compete with serving clients; on a thread of its own
most of it runs outside the GIL, on another core. Everything above the transport (auth, redirects,
metrics, the client) stays asynchronous and unchanged: a request is sent on a thread, and a response body
is read on one, a few chunks ahead of the loop.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import httpcore
import httpx

# httpcore reads a response 64 KiB at a time; blobs stream twice as fast from upstream in 1 MiB reads.
httpcore.HTTP11Connection.READ_NUM_BYTES = 1 << 20
READ_AHEAD = 8  # chunks of a response body received before the loop asks for them


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
