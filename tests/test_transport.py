"""The urllib3 transport on a real socket: a scripted loopback server injects the faults that
``httpx.MockTransport`` cannot (cut connections, stalls, connection reuse, TLS). The transport against the
Distribution registry and its token server is in ``test_upstream.py`` and ``test_pullthrough.py``.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from mirror import tls
from mirror.config import Upstream
from mirror.errors import UpstreamUnavailable
from mirror.upstream import UpstreamClient
from mirror.upstream.transport import READ_SIZE, Urllib3Transport
from tests.peers import free_port

Script = Callable[[socket.socket], None]
TIMEOUT = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}
BIG = bytes(range(256)) * (3 * READ_SIZE // 256) + b"tail!"


class ScriptedServer:
    """A loopback server that hands each connection it accepts to the next script, on a thread."""

    def __init__(self, *scripts: Script, wrap: ssl.SSLContext | None = None):
        self.connections = 0
        self._scripts, self._wrap = list(scripts), wrap
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if wrap else 'http'}://127.0.0.1:{self._listener.getsockname()[1]}"
        self.released = threading.Event()  # set at the end of the test: stalled scripts may go
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for script in self._scripts:
            connection, _ = self._listener.accept()
            self.connections += 1
            if self._wrap is not None:
                with contextlib.suppress(OSError):
                    connection = self._wrap.wrap_socket(connection, server_side=True)
            threading.Thread(target=self._run, args=(script, connection), daemon=True).start()

    @staticmethod
    def _run(script: Script, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            script(connection)

    def close(self) -> None:
        """Stop listening and let stalled scripts end."""
        self.released.set()
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    """Start scripted servers; all are closed after the test."""
    servers: list[ScriptedServer] = []
    def start(*scripts: Script, wrap: ssl.SSLContext | None = None) -> ScriptedServer:
        servers.append(ScriptedServer(*scripts, wrap=wrap))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def read_request(connection: socket.socket) -> bytes:
    """The head of the next request on ``connection``."""
    head = b""
    while b"\r\n\r\n" not in head:
        received = connection.recv(65536)
        if not received:
            raise ConnectionError("the client went away")
        head += received
    return head


def answer(body: bytes, sent: int | None = None, headers: tuple[str, ...] = ()) -> bytes:
    """A 200 response announcing ``body`` and carrying its first ``sent`` bytes (all by default)."""
    head = "".join(f"{header}\r\n" for header in (f"Content-Length: {len(body)}", *headers))
    return f"HTTP/1.1 200 OK\r\n{head}\r\n".encode() + body[:sent]


def send(transport: Urllib3Transport, url: str, timeout: dict[str, float] = TIMEOUT) -> httpx.Response:
    """GET ``url`` through ``transport``; the body is left to read."""
    return transport.handle_request(httpx.Request("GET", url, extensions={"timeout": timeout}))


def test_a_body_arrives_in_chunks_and_its_connection_serves_the_next_request(serve):
    def two_answers(connection: socket.socket) -> None:
        for _ in range(2):
            read_request(connection)
            connection.sendall(answer(BIG))
    server = serve(two_answers)
    transport = Urllib3Transport(keepalive=4)
    for _ in range(2):
        response = send(transport, f"{server.url}/v2/blob")
        chunks = list(response.stream)
        response.close()
        assert b"".join(chunks) == BIG
        assert [len(chunk) for chunk in chunks] == [READ_SIZE] * 3 + [len(b"tail!")]
    assert server.connections == 1
    transport.close()


def test_a_body_closed_early_closes_its_connection(serve):
    def cut_off_reader(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(answer(BIG))
    def small_answer(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(answer(b"fresh"))
    server = serve(cut_off_reader, small_answer)
    transport = Urllib3Transport(keepalive=4)
    response = send(transport, f"{server.url}/v2/blob")
    assert len(next(iter(response.stream))) == READ_SIZE
    response.close()
    response = send(transport, f"{server.url}/v2/other")
    assert b"".join(response.stream) == b"fresh"  # not the rest of the first body
    assert server.connections == 2
    transport.close()


def test_repeated_headers_all_arrive(serve):
    challenges = ('Bearer realm="https://auth.test/token"', 'Basic realm="registry"')
    def challenge(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(answer(b"", headers=tuple(f"WWW-Authenticate: {value}" for value in challenges)))
    server = serve(challenge)
    response = send(Urllib3Transport(keepalive=4), f"{server.url}/v2/")
    assert response.headers.get_list("www-authenticate") == list(challenges)


def test_a_body_cut_short_is_a_protocol_error(serve):
    def cut(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(answer(BIG, sent=1000))
    server = serve(cut)
    response = send(Urllib3Transport(keepalive=4), f"{server.url}/v2/blob")
    with pytest.raises(httpx.RemoteProtocolError, match="IncompleteRead"):
        list(response.stream)


def test_a_stalled_body_times_out(serve):
    server: ScriptedServer
    def stall(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(answer(BIG, sent=1000))
        server.released.wait(30)
    server = serve(stall)
    response = send(Urllib3Transport(keepalive=4), f"{server.url}/v2/blob", {**TIMEOUT, "read": 0.3})
    with pytest.raises(httpx.ReadTimeout):
        list(response.stream)


def test_a_closed_port_is_a_connect_error():
    with pytest.raises(httpx.ConnectError):
        send(Urllib3Transport(keepalive=4), f"http://127.0.0.1:{free_port()}/v2/")


def test_an_untrusted_certificate_is_refused(serve, tmp_path):
    tls.init(tmp_path, "localhost", ["127.0.0.1"])
    server = serve(read_request, wrap=tls.server_ssl_context(tmp_path / "server.crt", tmp_path / "server.key"))
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        send(Urllib3Transport(keepalive=4), f"{server.url}/v2/")


def test_the_client_turns_a_connection_closed_without_an_answer_into_unavailable(serve):
    server = serve(read_request)  # reads the request, then closes
    async def ping() -> None:
        client = UpstreamClient(Upstream("registry.test", server.url))
        try:
            await client.ping()
        finally:
            await client.close()
    with pytest.raises(UpstreamUnavailable, match="ping"):
        asyncio.run(ping())
