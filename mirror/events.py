"""Notifications: registry events POSTed to webhooks in the Distribution registry's envelope format.

    {"events": [{"id", "timestamp", "action", "target": {"mediaType", "size", "digest", "length",
                 "repository", "url", "tag"}, "request": {"id", "addr", "host", "method", "useragent"},
                 "actor": {"name"}, "source": {"addr", "instanceID"}}]}

is sent with Content-Type ``application/vnd.docker.distribution.events.v1+json``, so receivers written for the
Distribution registry work unchanged. Actions: ``push`` (a manifest PUT), ``pull`` (a manifest GET; HEAD is
not a pull), ``delete`` (a manifest, tag or blob DELETE), ``import`` (an image published by ``mirror bundle
import``, an action of this appliance's own) and ``deny`` (a manifest GET the signature policy refuses, or in
warn mode would refuse; the event adds ``"policy": {"mode", "rule", "missing"}``, also this appliance's own).

Delivery is durable and at least once. Every event is first appended to the store's durable queue of each
endpoint it is for (``storage/queue.py``, named by the endpoint's URL), so any process can append: the server
for requests, ``mirror bundle import`` for imports. The server's sender delivers each endpoint's queue oldest
first, up to BATCH events an envelope, and removes them from the queue once the endpoint answered 2xx. A
failure is retried after a backoff that doubles from 1 s up to 5 min, per endpoint: a receiver that is down,
or an appliance restart, loses nothing. A receiver may see an event twice (after a crash between its 2xx and
the removal) and can tell by the event id. One sender runs per store (it holds the queues' consumer lock),
however many server processes share the store.

A receiver that stays down does not fill the disk: each endpoint's queue holds at most its ``max_queued`` events
(1000 by default), and all queues together at most ``QUEUE_SHARE`` (10%) of the store filesystem's capacity;
appending to a full queue drops its oldest events, counted in ``DROPPED`` (``mirror_notification_events_dropped``).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import logging
import socket
import uuid
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

from mirror.config import Config, Endpoint
from mirror.digest import Digest
from mirror.errors import MirrorError
from mirror.storage.filesystem import FileLock
from mirror.storage.queue import Queues
from mirror.upstream.client import USER_AGENT

log = logging.getLogger("mirror.events")
MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
BATCH = 32
POLL_SECONDS = 1.0  # how often a queue is looked at for events other processes wrote
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 300.0
QUEUE_SHARE = 0.10  # of the store filesystem's capacity, for the queues of all endpoints together
# Events this process dropped from full queues, by receiver (``scheme://host:port``: a webhook's path and query
# may hold its secret). Kept per process, like every metric, and across config reloads, which make new Events.
DROPPED: collections.Counter[str] = collections.Counter()


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

    def __init__(self, config: Config, queues: Queues) -> None:
        self.endpoints = config.notifications
        self.queues = queues
        self.source = {"addr": f"{socket.gethostname()}:{config.host_port[1]}", "instanceID": str(uuid.uuid4())}
        self._wake = {endpoint: asyncio.Event() for endpoint in self.endpoints}
        self._sender: asyncio.Task[None] | None = None
        self._dropping: set[Endpoint] = set()  # endpoints whose full queue was logged, until a delivery

    def emit(self, action: str, repository: str, reference: str | None = None, content: Content | None = None,
             request: Request | None = None, actor: str | None = None, policy: dict[str, Any] | None = None) -> None:
        """Queue an ``action`` event on ``repository`` (``reference``: the tag or digest the client named;
        ``policy``: a signature decision's mode, rule and missing keys) for every endpoint subscribed to it. A queue
        that cannot be written is logged; the request still succeeds."""
        endpoints = [endpoint for endpoint in self.endpoints if action in endpoint.events]
        if not endpoints:
            return
        event = self._event(action, repository, reference, content, request, actor)
        if policy is not None:
            event["policy"] = policy
        for endpoint in endpoints:
            try:
                share = self.queues.capacity() * QUEUE_SHARE / len(self.endpoints)
                dropped = self.queues.put(endpoint.url, event, endpoint.max_queued, share)
            except MirrorError as exc:
                log.error("lost a %s event for %s: %s", action, endpoint.url, exc.message)
                continue
            if dropped:
                self._dropped(endpoint, dropped)
            self._wake[endpoint].set()

    def _dropped(self, endpoint: Endpoint, count: int) -> None:
        parts = urlsplit(endpoint.url)
        DROPPED[f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"] += count
        if endpoint not in self._dropping:  # once until the endpoint takes events again
            self._dropping.add(endpoint)
            log.warning("the queue of %s is full (%d events, or its share of the store's disk): dropping the oldest",
                        endpoint.url, endpoint.max_queued)

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
            lock.release()

    async def _lock(self) -> FileLock:
        """Wait until this process is the store's one sender; return the lock it holds."""
        while (lock := self.queues.consumer_lock()) is None:
            await asyncio.sleep(POLL_SECONDS)
        return lock

    async def _deliver(self, client: httpx.AsyncClient, endpoint: Endpoint) -> None:
        """Send ``endpoint``'s queue for as long as the server runs, backing off while the endpoint fails."""
        backoff, failures = 0.0, 0
        while True:
            batch = self.queues.peek(endpoint.url, BATCH)
            if not batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake[endpoint].wait(), POLL_SECONDS)
                self._wake[endpoint].clear()
                continue
            problem = await self._post(client, endpoint, [event for _, event in batch])
            if problem is None:
                self.queues.remove(endpoint.url, [entry for entry, _ in batch])
                self._dropping.discard(endpoint)
                if failures:
                    log.info("delivered events to %s after %d failed attempts", endpoint.url, failures)
                backoff, failures = 0.0, 0
                continue
            backoff, failures = min(max(backoff * 2, FIRST_BACKOFF), MAX_BACKOFF), failures + 1
            log.warning("could not deliver %d events to %s (%s); retrying in %.0fs",
                        len(batch), endpoint.url, problem, backoff)
            await asyncio.sleep(backoff)

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
