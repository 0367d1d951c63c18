"""Observability: Prometheus metrics and one structured log line per request.

A request is observed once, when it finishes (Tornado's ``log_function`` calls ``RequestLog.finished``): one
access log line, and the request, byte and cache counters. Handlers only note what they alone know, the body
bytes they wrote (``bytes_sent``) and where a blob or manifest came from (``cache_result``: hosted, hit or
miss). Upstream requests are timed by the ``UpstreamTransport`` each upstream client is given; the cache counts
its evictions; the store's size is walked in a thread when ``/metrics`` is scraped, at most once a minute;
notification events dropped from full queues are counted by ``events.py`` and read when scraped.

Several worker processes: prometheus-client keeps values per process unless ``PROMETHEUS_MULTIPROC_DIR`` names
an empty directory before it is first imported. To switch, set it in the parent before forking the workers and
let ``/metrics`` expose a fresh ``CollectorRegistry`` holding a ``prometheus_client.multiprocess.
MultiProcessCollector`` and this module's ``StoreCollector``: counters and histograms then add up over the
workers, and the store gauges come from whichever worker answers the scrape.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TextIO

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from mirror import events
from mirror.storage import Store, StoreStats
from mirror.upstream.client import upstream_transport

access_log = logging.getLogger("mirror.access")
STORE_STATS_SECONDS = 60.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # other methods count as "other"


class Metrics:
    """The appliance's Prometheus metrics, kept in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, store: Store | None = None) -> None:
        self.registry = CollectorRegistry()
        metric = {"registry": self.registry}
        self.requests = Counter("mirror_http_requests", "Requests answered, by route (handler), method and status",
                                ["route", "method", "status"], **metric)
        self.durations = Histogram("mirror_http_request_duration_seconds", "Time to answer a request, by route",
                                   ["route"], **metric)
        self.sent = Counter("mirror_http_response_bytes", "Response body bytes sent, by route", ["route"], **metric)
        self.cache = Counter("mirror_cache_requests", "Blob and manifest requests answered from hosted content "
                             "(hosted), from the pull-through cache (hit) or from upstream (miss)",
                             ["kind", "result"], **metric)
        self.saved = Counter("mirror_cache_saved_bytes", "Bytes served from the cache instead of upstream", **metric)
        self.evictions = Counter("mirror_cache_evictions", "Cached blobs evicted to stay under max_cache_size",
                                 **metric)
        self.evicted = Counter("mirror_cache_evicted_bytes", "Bytes of cached blobs evicted", **metric)
        self.upstream = Histogram("mirror_upstream_request_duration_seconds",
                                  "Time from sending a request to an upstream to its response headers",
                                  ["upstream"], **metric)
        self.upstream_errors = Counter("mirror_upstream_errors", "Upstream requests that failed, by reason "
                                       "(timeout, connection, http_429, http_5xx)", ["upstream", "reason"], **metric)
        self.store = StoreCollector(store) if store is not None else None
        if self.store is not None:
            self.registry.register(self.store)
        self.registry.register(DroppedEventsCollector())

    def request_finished(self, route: str, method: str, status: int, sent: int, seconds: float,
                         cache_result: str | None) -> None:
        """Count one answered request."""
        self.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
        self.durations.labels(route).observe(seconds)
        self.sent.labels(route).inc(sent)
        if cache_result is not None:
            self.cache.labels(route, cache_result).inc()
            if cache_result == "hit":
                self.saved.inc(sent)

    def evicted_blobs(self, count: int, size: int) -> None:
        """Count ``count`` cached blobs of ``size`` bytes in all evicted."""
        self.evictions.inc(count)
        self.evicted.inc(size)

    def transport(self, upstream: str) -> UpstreamTransport:
        """An HTTP transport for the clients of ``upstream`` that feeds the upstream metrics."""
        return UpstreamTransport(self, upstream, upstream_transport())

    async def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (the store walked first, in a thread, when stale)."""
        if self.store is not None:
            await asyncio.to_thread(self.store.refresh)
        return generate_latest(self.registry)


class StoreCollector(Collector):
    """Gauges of the store's blobs and pinned (imported) blobs, from a walk redone at most once a minute."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.stats = StoreStats()
        self._walked = -STORE_STATS_SECONDS

    def refresh(self) -> None:
        """Walk the store again if the last walk is over a minute old."""
        if time.monotonic() - self._walked >= STORE_STATS_SECONDS:
            self.stats = self.store.stats()
            self._walked = time.monotonic()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges from the last walk."""
        stats = self.stats
        yield GaugeMetricFamily("mirror_store_blobs", "Blobs in the store", stats.blobs)
        yield GaugeMetricFamily("mirror_store_blob_bytes", "Bytes of all blobs in the store", stats.blob_bytes)
        yield GaugeMetricFamily("mirror_store_pinned_blobs", "Pinned blobs (imported from bundles, never evicted)",
                                stats.pinned)
        yield GaugeMetricFamily("mirror_store_pinned_bytes", "Bytes of pinned blobs", stats.pinned_bytes)


class DroppedEventsCollector(Collector):
    """The counter of notification events dropped from full queues, by receiver (``events.DROPPED``)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The counts so far."""
        family = CounterMetricFamily("mirror_notification_events_dropped", "Notification events dropped, oldest "
                                     "first, from the full queue of an endpoint that is down", labels=["endpoint"])
        for endpoint, count in sorted(events.DROPPED.items()):
            family.add_metric([endpoint], count)
        yield family


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Wraps the transport to one upstream: times each request to its response headers and counts failures,
    also those that happen while the body streams."""

    def __init__(self, metrics: Metrics, upstream: str, inner: httpx.AsyncBaseTransport) -> None:
        self.metrics, self.upstream, self.inner = metrics, upstream, inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the wrapped transport, observing it."""
        started = time.monotonic()
        with self.counting_errors():
            response = await self.inner.handle_async_request(request)
        self.metrics.upstream.labels(self.upstream).observe(time.monotonic() - started)
        if response.status_code == 429 or response.status_code >= 500:
            self.failed("http_429" if response.status_code == 429 else "http_5xx")
        response.stream = _ObservedStream(self, response.stream)
        return response

    def failed(self, reason: str) -> None:
        """Count one failed request."""
        self.metrics.upstream_errors.labels(self.upstream, reason).inc()

    @contextlib.contextmanager
    def counting_errors(self) -> Iterator[None]:
        """Count a transport error raised inside the block by its kind, and let it propagate."""
        try:
            yield
        except httpx.TimeoutException:
            self.failed("timeout")
            raise
        except httpx.TransportError:
            self.failed("connection")
            raise

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.inner.aclose()


class _ObservedStream(httpx.AsyncByteStream):
    """A response body whose transport errors are counted."""

    def __init__(self, transport: UpstreamTransport, stream: Any) -> None:
        self.transport, self.stream = transport, stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with self.transport.counting_errors():
            async for chunk in self.stream:
                yield chunk

    async def aclose(self) -> None:
        """Close the wrapped body."""
        await self.stream.aclose()


class RequestLog:
    """Observes every finished request (Tornado's ``log_function``): one access log line and the request metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def finished(self, handler: Any) -> None:
        """Log and count the request ``handler`` just answered."""
        request, status = handler.request, handler.get_status()
        route = type(handler).__name__.removesuffix("Handler").lower()
        sent = 0 if request.method == "HEAD" else getattr(handler, "bytes_sent", 0)  # HEAD bodies are not sent
        cache_result, error = getattr(handler, "cache_result", None), getattr(handler, "error_message", None)
        seconds = request.request_time()
        self.metrics.request_finished(route, request.method, status, sent, seconds, cache_result)
        user = handler.current_user
        fields = {"method": request.method, "path": request.path, "query": request.query or None,
                  "status": status, "bytes": sent, "duration_ms": round(seconds * 1000, 3),
                  "client": request.remote_ip, "user": None if user is None else str(user),
                  "cache": cache_result, "route": route, "error": error}
        level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 or error else logging.INFO
        access_log.log(level, '%s %s "%s %s" %d %dB %.1fms cache=%s%s', request.remote_ip, fields["user"] or "-",
                       request.method, request.uri, status, sent, fields["duration_ms"], cache_result or "-",
                       f" error={error}" if error else "", extra={"fields": fields})


class LogFormatter(logging.Formatter):
    """One line per record: a JSON object (for journald and log shippers) or readable text (on a terminal)."""

    def __init__(self, as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON, or as text."""
        if not self.as_json:
            return super().format(record)
        document = {"time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
                    "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
                    **getattr(record, "fields", {})}
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def configure_logging(stream: TextIO) -> None:
    """Send every log record to ``stream``: JSON lines unless it is a terminal."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter(as_json=not stream.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
