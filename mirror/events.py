"""Notifications: registry events POSTed to webhooks in the Distribution registry's envelope format.

    {"events": [{"id", "timestamp", "action", "target": {"mediaType", "size", "digest", "length",
                 "repository", "url", "tag"}, "request": {"id", "addr", "host", "method", "useragent"},
                 "actor": {"name"}, "source": {"addr", "instanceID"}}]}

is sent with Content-Type ``application/vnd.docker.distribution.events.v1+json``, so receivers written for the
Distribution registry work unchanged. Actions: ``push`` (a manifest PUT), ``pull`` (a manifest GET; HEAD is
not a pull), ``delete`` (a manifest, tag or blob DELETE) and ``import`` (an image published by ``mirror bundle
import``, an action of this appliance's own).

Delivery is durable and at least once. Every event is first written to a queue on disk, one file per event and
endpoint, atomically (a reader never sees half a file):

    <root>/state/events/<endpoint key>/<time ns>-<event id>.json      key: sha256(endpoint url)[:16]

so any process can append: the server for requests, ``mirror bundle import`` for imports. The server's sender
delivers each endpoint's queue oldest first, up to BATCH events an envelope, and deletes the files once the
endpoint answered 2xx. A failure is retried after a backoff that doubles from 1 s up to 5 min, per endpoint:
a receiver that is down, or an appliance restart, loses nothing. A receiver may see an event twice (after a
crash between its 2xx and the delete) and can tell by the event id. One sender runs per store (it holds an
flock on ``state/events/.sender.lock``), however many server processes share the store.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import httpx

from mirror.config import Config, Endpoint
from mirror.digest import Digest
from mirror.errors import MirrorError
from mirror.storage.filesystem import write_atomic
from mirror.storage.paths import Layout
from mirror.upstream.client import USER_AGENT

log = logging.getLogger("mirror.events")
MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
BATCH = 32
POLL_SECONDS = 1.0  # how often a queue is looked at for events other processes wrote
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 300.0


class Content(Protocol):
    """A manifest as the registry, the cache and the importer hold it."""

    digest: Digest
    media_type: str
    body: bytes


class Request(Protocol):
    """The parts of an HTTP request an event records (Tornado's ``HTTPServerRequest`` has them)."""

    protocol: str
    host: str
    method: str | None
    remote_ip: str | None
    headers: Any


class Events:
    """Queues events for the endpoints subscribed to them and, in the server, delivers the queues."""

    def __init__(self, config: Config) -> None:
        self.endpoints = config.notifications
        self.folder = Layout(config.storage.root).events
        self.source = {"addr": f"{socket.gethostname()}:{config.host_port[1]}", "instanceID": str(uuid.uuid4())}
        self._wake = {endpoint: asyncio.Event() for endpoint in self.endpoints}
        self._sender: asyncio.Task[None] | None = None

    def queue(self, endpoint: Endpoint) -> Path:
        """The folder of events waiting for ``endpoint``."""
        return self.folder / hashlib.sha256(endpoint.url.encode()).hexdigest()[:16]

    def emit(self, action: str, repository: str, reference: str | None = None, content: Content | None = None,
             request: Request | None = None, actor: str | None = None) -> None:
        """Queue an ``action`` event on ``repository`` (``reference``: the tag or digest the client named) for
        every endpoint subscribed to it. A queue that cannot be written is logged; the request still succeeds."""
        endpoints = [endpoint for endpoint in self.endpoints if action in endpoint.events]
        if not endpoints:
            return
        event = self._event(action, repository, reference, content, request, actor)
        data, name = json.dumps(event).encode(), f"{time.time_ns():020d}-{event['id']}.json"
        for endpoint in endpoints:
            try:
                write_atomic(self.queue(endpoint) / name, data)
            except MirrorError as exc:
                log.error("lost a %s event for %s: %s", action, endpoint.url, exc.message)
                continue
            self._wake[endpoint].set()

    def _event(self, action: str, repository: str, reference: str | None, content: Content | None,
               request: Request | None, actor: str | None) -> dict[str, Any]:
        target: dict[str, Any] = {"repository": repository}
        if content is not None:
            size = len(content.body)
            target.update(mediaType=content.media_type, size=size, digest=str(content.digest), length=size)
            if request is not None:
                target["url"] = f"{request.protocol}://{request.host}/v2/{repository}/manifests/{content.digest}"
        if reference is not None:
            target["digest" if Digest.is_digest(reference) else "tag"] = reference
        record = {} if request is None else {
            "id": str(uuid.uuid4()), "addr": request.remote_ip, "host": request.host, "method": request.method,
            "useragent": request.headers.get("User-Agent", "")}
        return {"id": str(uuid.uuid4()), "timestamp": datetime.datetime.now(datetime.UTC).isoformat(),
                "action": action, "target": target, "request": record,
                "actor": {} if actor is None else {"name": actor}, "source": self.source}

    def start(self) -> None:
        """Start delivering the queues (the server does, once it serves)."""
        if self.endpoints and self._sender is None:
            self._sender = asyncio.ensure_future(self._send())

    async def close(self) -> None:
        """Stop delivering; what is still queued is sent by the next sender, after a restart or a reload."""
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
            self._sender = None

    async def _send(self) -> None:
        lock = await self._lock()
        try:
            async with httpx.AsyncClient(trust_env=False, headers={"User-Agent": USER_AGENT}) as client:
                await asyncio.gather(*(self._deliver(client, endpoint) for endpoint in self.endpoints))
        finally:
            os.close(lock)

    async def _lock(self) -> int:
        """Wait until this process is the store's one sender; return the descriptor holding the lock."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.folder / ".sender.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
                await asyncio.sleep(POLL_SECONDS)

    async def _deliver(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        """Send ``endpoint``'s queue for as long as the server runs, backing off while the endpoint fails."""
        backoff, failures = 0.0, 0
        while True:
            batch = self._pending(endpoint)
            if not batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake[endpoint].wait(), POLL_SECONDS)
                self._wake[endpoint].clear()
                continue
            problem = await self._post(client, endpoint, [event for _, event in batch])
            if problem is None:
                for path, _ in batch:
                    path.unlink(missing_ok=True)
                if failures:
                    log.info("delivered events to %s after %d failed attempts", endpoint.url, failures)
                backoff, failures = 0.0, 0
                continue
            backoff, failures = min(max(backoff * 2, FIRST_BACKOFF), MAX_BACKOFF), failures + 1
            log.warning("could not deliver %d events to %s (%s); retrying in %.0fs",
                        len(batch), endpoint.url, problem, backoff)
            await asyncio.sleep(backoff)

    def _pending(self, endpoint: Endpoint) -> list[tuple[Path, Any]]:
        """The oldest queued events of ``endpoint`` (at most BATCH); an unreadable file is dropped."""
        folder = self.queue(endpoint)
        try:
            names = sorted(name for name in os.listdir(folder) if name.endswith(".json") and name[0] != ".")
        except FileNotFoundError:
            return []
        batch = []
        for name in names[:BATCH]:
            try:
                batch.append((folder / name, json.loads((folder / name).read_bytes())))
            except ValueError:
                log.error("dropping unreadable event file %s", folder / name)
                (folder / name).unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        return batch

    @staticmethod
    async def _post(client: httpx.AsyncClient, endpoint: Endpoint, events: list[Any]) -> str | None:
        """POST one envelope; return None when the endpoint took it, else what went wrong."""
        try:
            response = await client.post(endpoint.url, content=json.dumps({"events": events}).encode(),
                                         headers=[("Content-Type", MEDIA_TYPE), *endpoint.headers],
                                         timeout=endpoint.timeout)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if response.is_success else f"HTTP {response.status_code}"
