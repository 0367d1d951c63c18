"""A scripted upstream for fault injection: a loopback HTTP server on threads answering each request as a
test's script says, byte for byte and at the rate it says (a lying, corrupt or trickling registry)."""
from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mirror.digest import Digest
from mirror.manifest import OCI_MANIFEST


@dataclass(frozen=True)
class Answer:
    """What an upstream sends for one request: ``fast`` at once, then ``slow`` at ``rate`` bytes a second."""

    fast: bytes
    slow: bytes = b""
    rate: float = 1.0


def http(status: int, body: bytes = b"", headers: Mapping[str, str] | None = None, *,
         length: int | None = None) -> bytes:
    """A raw HTTP/1.1 response announcing ``length`` bytes (default: the body's) and carrying ``body``."""
    fields = {"Content-Length": str(len(body) if length is None else length), **(headers or {})}
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"HTTP/1.1 {status} Scripted\r\n{head}\r\n".encode() + body


def manifest_answer(body: bytes) -> bytes:
    """A 200 answer carrying manifest ``body``."""
    return http(200, body, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": str(Digest.of(body))})


Script = Callable[[str, str, dict[str, str]], Answer]


class ScriptedUpstream:
    """A loopback HTTP server (HTTPS with ``wrap``) answering each request with ``script(method, path, headers)``;
    it records the requests and stops trickling when closed."""

    def __init__(self, script: Script, wrap: ssl.SSLContext | None = None):
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._script, self._wrap = script, wrap
        self._stopped = threading.Event()
        self._connections: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if wrap else 'http'}://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self._listener.accept()
                self._connections.append(connection)
                threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        pending = b""
        with connection, contextlib.suppress(OSError):
            if self._wrap is not None:
                connection = self._wrap.wrap_socket(connection, server_side=True)
            while not self._stopped.is_set():
                while b"\r\n\r\n" not in pending:
                    received = connection.recv(65536)
                    if not received:
                        return
                    pending += received
                head, _, pending = pending.partition(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {name.strip().lower(): value.strip() for name, _, value in (x.partition(":") for x in lines)}
                self.requests.append((method, path, headers))
                answer = self._script(method, path, headers)
                connection.sendall(answer.fast)
                piece = max(1, int(answer.rate / 10))
                for start in range(0, len(answer.slow), piece):
                    if self._stopped.wait(piece / answer.rate):
                        return
                    connection.sendall(answer.slow[start:start + piece])

    def close(self) -> None:
        """Stop listening and trickling, and drop every connection."""
        self._stopped.set()
        for sock in (self._listener, *self._connections):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
