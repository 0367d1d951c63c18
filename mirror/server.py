"""Wiring and process life: config -> store -> registry -> app, listening, signals."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import tornado.httpserver
import tornado.ioloop
import tornado.iostream
import tornado.netutil

from mirror import storage, systemd, tls
from mirror.api import make_app
from mirror.auth import Auth
from mirror.config import Config, load
from mirror.errors import ConfigError, MirrorError
from mirror.events import Events
from mirror.fetch import Fetcher
from mirror.metrics import Metrics, RequestLog, configure_logging, multiprocess_metrics, worker_ended
from mirror.registry import Registry
from mirror.repository import Repositories
from mirror.signatures import Policy
from mirror.upstream import UpstreamClient

log = logging.getLogger("mirror.server")
MAX_BODY = 1 << 40  # for routes that stream their body (uploads go to disk); the others take 16 KiB (api/app.py)
DRAIN_SECONDS = 30.0
UPLOAD_SWEEP_SECONDS = 3600.0
IDLE_SECONDS = 300.0
SUPERVISE_SECONDS = 0.5
TLS_HANDSHAKE = b"\x16"
NOT_TLS = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


class Activity:
    """Counts requests in flight so a shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def begin(self) -> None:
        """A request started."""
        self.count += 1
        self.idle.clear()

    def end(self) -> None:
        """A request ended."""
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            self.idle.set()


@dataclass
class Appliance:
    """Everything one serving process holds."""

    config: Config
    registry: Registry
    fetcher: Fetcher
    repositories: Repositories
    activity: Activity
    metrics: Metrics
    events: Events
    policy: Policy
    auth: Auth | None = None

    def dependencies(self) -> dict[str, Any]:
        """What the request handlers are given."""
        return {"registry": self.registry, "repositories": self.repositories, "activity": self.activity,
                "auth": self.auth, "metrics": self.metrics, "events": self.events, "policy": self.policy}

    async def close(self) -> None:
        """Release the upstream connections and the store (at once: fetches in flight fail)."""
        await self.fetcher.close()

    async def close_when_idle(self, timeout: float | None = None) -> None:
        """Release everything once no fetch is in flight (they finish committing), or after ``timeout``."""
        await self.fetcher.close_when_idle(timeout)


def build(config: Config, activity: Activity | None = None, metrics: Metrics | None = None) -> Appliance:
    """Open the store and wire the repositories, the upstream fetches and the signature policy for ``config``."""
    store = storage.connect(config)
    registry = Registry(store)
    metrics = metrics or Metrics(store)
    fetcher = Fetcher(config, store, metrics,
                      lambda upstream: UpstreamClient(upstream, metrics.transport(upstream)))
    repositories = Repositories(config, registry, fetcher)
    auth = None if config.auth is None else Auth.from_config(config.auth, store, repositories.resolve)
    events = Events(config, store.queues)
    policy = Policy(config.signatures, metrics)
    return Appliance(config, registry, fetcher, repositories, activity or Activity(), metrics, events, policy, auth)


def listen_sockets(config: Config) -> list[socket.socket]:
    """Bind the configured address (done before forking so workers share the sockets)."""
    host, port = config.host_port
    try:
        return tornado.netutil.bind_sockets(port, host or None, reuse_port=False)
    except OSError as exc:  # in use, not an address of this host, a privileged port...
        raise MirrorError(f"cannot listen on {config.listen}: {(exc.strerror or str(exc)).lower()}") from exc


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context for ``config.tls``, or None to serve plain HTTP."""
    return tls.server_ssl_context(config.tls.cert, config.tls.key) if config.tls else None


class HTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server that answers a TLS handshake on a plain-HTTP port at once.

    Clients such as skopeo and podman try HTTPS first; Tornado would wait for a request line that never
    comes, so they stall until their own timeout before falling back to HTTP. Like Go's servers, answer a
    TLS ClientHello with a plain 400 so the client's handshake fails immediately.
    """

    def handle_stream(self, stream: tornado.iostream.IOStream, address: tuple) -> None:
        """Peek at the first byte before handing the connection to HTTP."""
        if self.ssl_options is not None or not isinstance(stream.socket, socket.socket):
            return super().handle_stream(stream, address)
        loop, fd = tornado.ioloop.IOLoop.current(), stream.socket.fileno()

        def first_byte(*_: object) -> None:
            loop.remove_handler(fd)
            loop.remove_timeout(timeout)
            try:
                head = stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                head = b""
            if head == TLS_HANDSHAKE:
                with contextlib.suppress(OSError):
                    stream.socket.send(NOT_TLS)
                stream.close()
            elif head:
                super(HTTPServer, self).handle_stream(stream, address)
            else:
                stream.close()

        loop.add_handler(fd, first_byte, tornado.ioloop.IOLoop.READ)
        timeout = loop.call_later(IDLE_SECONDS, first_byte)


class Service:
    """One serving process: the HTTP server over the current appliance, and what signals do to it."""

    def __init__(self, config: Config, config_path: str | None, environ: Mapping[str, str],
                 notifier: systemd.Notifier):
        self.config_path, self.environ, self.notifier = config_path, environ, notifier
        self.appliance = build(config)
        self.dependencies = self.appliance.dependencies()
        app = make_app(self.dependencies, RequestLog(self.appliance.metrics).finished)
        self.server = HTTPServer(app, max_body_size=MAX_BODY, idle_connection_timeout=IDLE_SECONDS,
                                 ssl_options=ssl_context(config))
        self.stopping = asyncio.Event()

    async def run(self, sockets: list[socket.socket]) -> None:
        """Serve on ``sockets`` until SIGTERM or SIGINT, then drain in-flight requests."""
        self.server.add_sockets(sockets)
        self.appliance.events.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        timers = [tornado.ioloop.PeriodicCallback(self._sweep_uploads, UPLOAD_SWEEP_SECONDS * 1000)]
        if self.notifier.watchdog_interval:
            timers.append(tornado.ioloop.PeriodicCallback(self.notifier.ping, self.notifier.watchdog_interval * 1000))
        for timer in timers:
            timer.start()
        config = self.appliance.config
        log.info("serving %s from %s (config: %s)", config.listen, storage.location(config), config.source)
        self.notifier.ready(f"serving {config.listen}")
        await self.stopping.wait()
        self.notifier.stopping()
        activity = self.appliance.activity
        log.info("stopping: no new connections, draining %d requests", activity.count)
        for timer in timers:
            timer.stop()
        self.server.stop()
        try:
            await asyncio.wait_for(activity.idle.wait(), DRAIN_SECONDS)
        except TimeoutError:
            log.warning("drain timed out with %d requests in flight", activity.count)
        await self.server.close_all_connections()
        await self.appliance.events.close()
        await self.appliance.close_when_idle(DRAIN_SECONDS)

    def reload(self) -> None:
        """Re-read the config and serve new requests with it; on any error keep the running config."""
        self.notifier.reloading()
        try:
            config = load(self.config_path, self.environ)
            old = self.appliance.config
            for key, before, after in (("listen", old.listen, config.listen), ("workers", old.workers, config.workers),
                                       ("storage.root", old.storage.root, config.storage.root),
                                       ("storage.s3", old.storage.s3, config.storage.s3),
                                       ("redis", old.redis, config.redis), ("secret", old.secret, config.secret)):
                if before != after:
                    raise ConfigError(key, "cannot change on reload; restart the service")
            context = ssl_context(config)
            appliance = build(config, activity=self.appliance.activity, metrics=self.appliance.metrics)
        except MirrorError as exc:
            log.error("reload failed, keeping the running config: %s", exc.message)
        else:
            previous, self.appliance = self.appliance, appliance
            self.dependencies.update(appliance.dependencies())
            self.server.ssl_options = context
            asyncio.ensure_future(previous.close_when_idle())
            appliance.events.start()
            asyncio.ensure_future(previous.events.close())
            log.info("reloaded config from %s", config.source)
        self.notifier.ready()

    def _sweep_uploads(self) -> None:
        try:
            self.appliance.registry.expire_uploads(self.appliance.config.storage.upload_expiry)
        except MirrorError as exc:  # the store is unavailable now; the next sweep tries again
            log.warning("could not sweep idle uploads: %s", exc.message)


class Supervisor:
    """Forks the worker processes that share the listening sockets, passes signals on, replaces crashed ones.

    The supervisor is the service's main process: it alone talks to systemd (READY, STOPPING, watchdog).
    """

    def __init__(self, count: int, work: Callable[[], None], notifier: systemd.Notifier):
        self.count, self.work, self.notifier = count, work, notifier
        self.children: set[int] = set()
        self.stopping = False

    def run(self) -> int:
        """Start the workers and wait for them; return the exit status."""
        for _ in range(self.count):
            self._spawn()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._forward)
        self.notifier.ready(f"{self.count} workers")
        interval, next_ping = self.notifier.watchdog_interval, time.monotonic()
        while self.children:
            if interval and time.monotonic() >= next_ping:
                self.notifier.ping()
                next_ping = time.monotonic() + interval
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(SUPERVISE_SECONDS)
                continue
            self.children.discard(pid)
            worker_ended(pid)
            if not self.stopping:
                log.error("worker %d ended (status %d); starting another", pid, status)
                self._spawn()
        return 0

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            code = 1
            try:
                self.work()
                code = 0
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                os._exit(code)
        self.children.add(pid)

    def _stop(self, signum: int, _: object) -> None:
        self.stopping = True
        self.notifier.stopping()
        self._forward(signum, _)

    def _forward(self, signum: int, _: object) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def keep_freed_chunks() -> None:
    """Have glibc's allocator reuse the memory of freed blob chunks rather than map fresh pages for each.

    Blobs stream as 1 MiB ``bytes``. glibc maps allocations that large with ``mmap`` and gives freed memory
    at the top of its heap back to the kernel, with thresholds it adjusts as it goes; a cold pull-through,
    whose chunks are freed on other threads, kept getting fresh pages faulted in, about 8% of its time.
    Fixed thresholds keep the chunks on the heap, and at most 64 MiB of freed memory in the process.
    Other C libraries have no ``mallopt``, and nothing is changed.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 4 << 20)
        mallopt(M_TRIM_THRESHOLD, 64 << 20)


def serve(config: Config, config_path: str | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the server for ``config`` until stopped, in ``config.workers`` processes; return the exit status."""
    configure_logging(sys.stderr, config.log_format)
    keep_freed_chunks()
    environ = environ or {}
    try:  # here, before any worker starts: a store that cannot be used ends the command with one line
        store = storage.connect(config)
    except OSError as exc:
        raise MirrorError(f"cannot open the store {storage.location(config)}: "
                          f"{(exc.strerror or str(exc)).lower()}") from exc
    problem = store.writable_problem()
    store.close()
    if problem:
        raise MirrorError(f"cannot use the store {storage.location(config)}: {problem}")
    ssl_context(config)  # likewise a certificate and key that do not fit
    sockets = listen_sockets(config)
    notifier = systemd.Notifier.from_environ(environ)

    def work(notifier: systemd.Notifier) -> None:
        asyncio.run(Service(config, config_path, environ, notifier).run(sockets))

    if config.workers == 1:
        work(notifier)
        return 0
    with multiprocess_metrics():  # so that a scrape, whichever worker answers it, counts what all of them did
        return Supervisor(config.workers, lambda: work(systemd.Notifier(None)), notifier).run()
