"""Wiring and process life: config -> store -> registry -> app, listening, signals."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tornado.httpserver
import tornado.netutil

from mirror import systemd, tls
from mirror.api import make_app
from mirror.cache import PullThrough
from mirror.config import Config, load
from mirror.errors import ConfigError, MirrorError
from mirror.registry import Registry
from mirror.storage import FilesystemBlobStore, Metadata

log = logging.getLogger("mirror.server")
MAX_BODY = 1 << 40  # uploads stream to disk, so the body size is bounded by the disk, not memory
DRAIN_SECONDS = 30.0
UPLOAD_SWEEP_SECONDS = 3600.0


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
    cache: PullThrough
    activity: Activity

    def dependencies(self) -> dict[str, Any]:
        """What the request handlers are given."""
        return {"registry": self.registry, "cache": self.cache, "activity": self.activity}


def build(config: Config, activity: Activity | None = None) -> Appliance:
    """Open the store and wire the registry and the pull-through cache for ``config``."""
    root = config.storage.root
    registry = Registry(FilesystemBlobStore(root), Metadata(root))
    return Appliance(config, registry, PullThrough(config, registry), activity or Activity())


def listen_sockets(config: Config) -> list[socket.socket]:
    """Bind the configured address (done before forking so workers share the sockets)."""
    host, port = config.host_port
    return tornado.netutil.bind_sockets(port, host or None, reuse_port=False)


def ssl_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context for ``config.tls``, or None to serve plain HTTP."""
    return tls.server_ssl_context(config.tls.cert, config.tls.key) if config.tls else None


class Service:
    """One serving process: the HTTP server over the current appliance, and what signals do to it."""

    def __init__(self, config: Config, config_path: str | None, environ: Mapping[str, str],
                 notifier: systemd.Notifier):
        self.config_path, self.environ, self.notifier = config_path, environ, notifier
        self.appliance = build(config)
        self.dependencies = self.appliance.dependencies()
        self.server = tornado.httpserver.HTTPServer(make_app(self.dependencies), max_body_size=MAX_BODY,
                                                    idle_connection_timeout=300, ssl_options=ssl_context(config))
        self.stopping = asyncio.Event()

    async def run(self, sockets: list[socket.socket]) -> None:
        """Serve on ``sockets`` until SIGTERM or SIGINT, then drain in-flight requests."""
        self.server.add_sockets(sockets)
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
        log.info("serving %s from %s (config: %s)", config.listen, config.storage.root, config.source)
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
        await self.appliance.cache.close()

    def reload(self) -> None:
        """Re-read the config and serve new requests with it; on any error keep the running config."""
        self.notifier.reloading()
        try:
            config = load(self.config_path, self.environ)
            old = self.appliance.config
            for key, before, after in (("listen", old.listen, config.listen), ("workers", old.workers, config.workers),
                                       ("storage.root", old.storage.root, config.storage.root)):
                if before != after:
                    raise ConfigError(key, "cannot change on reload; restart the service")
            context = ssl_context(config)
            appliance = build(config, activity=self.appliance.activity)
        except MirrorError as exc:
            log.error("reload failed, keeping the running config: %s", exc.message)
        else:
            previous, self.appliance = self.appliance, appliance
            self.dependencies.update(appliance.dependencies())
            self.server.ssl_options = context
            asyncio.ensure_future(previous.cache.close_when_idle())
            log.info("reloaded config from %s", config.source)
        self.notifier.ready()

    def _sweep_uploads(self) -> None:
        self.appliance.registry.expire_uploads(self.appliance.config.storage.upload_expiry)


def serve(config: Config, config_path: str | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the server for ``config`` until stopped; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    environ = environ or {}
    sockets = listen_sockets(config)

    async def main() -> None:
        await Service(config, config_path, environ, systemd.Notifier.from_environ(environ)).run(sockets)

    asyncio.run(main())
    return 0
