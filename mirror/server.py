"""Wiring and process life: config -> store -> registry -> app, listening, signals."""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass

import tornado.httpserver
import tornado.netutil
import tornado.web

from mirror.api import make_app
from mirror.cache import PullThrough
from mirror.config import Config
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

    def application(self) -> tornado.web.Application:
        """The Tornado application wired to this appliance."""
        return make_app(registry=self.registry, cache=self.cache, activity=self.activity)


def build(config: Config) -> Appliance:
    """Open the store and wire the registry and the pull-through cache for ``config``."""
    root = config.storage.root
    registry = Registry(FilesystemBlobStore(root), Metadata(root))
    return Appliance(config, registry, PullThrough(config, registry), Activity())


def listen_sockets(config: Config) -> list[socket.socket]:
    """Bind the configured address (done before forking so workers share the sockets)."""
    host, port = config.host_port
    return tornado.netutil.bind_sockets(port, host or None, reuse_port=False)


async def run(config: Config, sockets: list[socket.socket]) -> None:
    """Serve on ``sockets`` until SIGTERM or SIGINT, then drain in-flight requests."""
    appliance = build(config)
    server = tornado.httpserver.HTTPServer(appliance.application(), max_body_size=MAX_BODY,
                                           idle_connection_timeout=300)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sweeper = tornado.ioloop.PeriodicCallback(
        lambda: appliance.registry.expire_uploads(config.storage.upload_expiry), UPLOAD_SWEEP_SECONDS * 1000)
    sweeper.start()
    log.info("serving %s from %s (config: %s)", config.listen, config.storage.root, config.source)
    await stop.wait()
    log.info("stopping: no new connections, draining %d requests", appliance.activity.count)
    sweeper.stop()
    server.stop()
    try:
        await asyncio.wait_for(appliance.activity.idle.wait(), DRAIN_SECONDS)
    except TimeoutError:
        log.warning("drain timed out with %d requests in flight", appliance.activity.count)
    await server.close_all_connections()
    await appliance.cache.close()


def serve(config: Config, config_path: str | None = None) -> int:
    """Run the server for ``config`` until stopped; return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sockets = listen_sockets(config)
    asyncio.run(run(config, sockets))
    return 0
