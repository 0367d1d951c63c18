"""Observability: Prometheus metrics and one structured log line per request.

A request is observed once, when it finishes (Tornado's ``log_function`` calls ``RequestLog.finished``): one
access log line, and the request, byte and cache counters. Handlers only note what they alone know, the body
bytes they wrote (``bytes_sent``) and where a blob or manifest came from (``cache_result``: hosted, hit or
miss; ``upstream``: which one a hit or miss is cached from). Upstream requests are timed by the
``UpstreamTransport`` each upstream client is given; the cache counts its evictions; the store's size is walked
in a thread when ``/metrics`` is scraped, at most once a minute; notification events dropped from full queues
are counted by ``events.py`` and added to a counter after each request and when scraped.

Several worker processes: ``serve`` runs the supervisor inside ``multiprocess_metrics()``, which points
prometheus-client at a fresh private directory (``PROMETHEUS_MULTIPROC_DIR``) before the workers fork. Every
worker writes its values to files there, and a scrape, whichever worker answers it, reads them all through a
``MultiProcessCollector`` in a fresh ``CollectorRegistry``: counters and histograms add up over the workers,
also those that ended (a counter never goes down), gauges follow their ``multiprocess_mode`` (a gauge must name
one). The store gauges come from whichever worker answers; process metrics (``process_*``) are read from
``/proc`` for the supervisor and each worker, labelled by ``pid``. With one process, values live in memory and
``process_*`` describe that process, unlabelled.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

import httpx
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mirror import events
from mirror.config import Upstream
from mirror.storage import Store, StoreStats
from mirror.upstream.client import upstream_transport

access_log = logging.getLogger("mirror.access")
STORE_STATS_SECONDS = 60.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # other methods count as "other"
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess mode, when it names a directory
QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "tornado.access")  # their INFO lines repeat the access log


def version() -> str:
    """The installed ``mirror`` package's version, "unknown" when it is run from a source tree alone."""
    try:
        return importlib.metadata.version("mirror")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """The appliance's Prometheus metrics: in their own registry, or with several workers in the files of
    prometheus-client's multiprocess mode (see the module's docstring)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, store: Store | None = None) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_DIR))
        self.registry = CollectorRegistry()
        metric = {"registry": None if self.multiprocess else self.registry}
        self.requests = Counter("mirror_http_requests", "Requests answered, by route (handler), method and status",
                                ["route", "method", "status"], **metric)
        self.durations = Histogram("mirror_http_request_duration_seconds", "Time to answer a request, by route",
                                   ["route"], **metric)
        self.sent = Counter("mirror_http_response_bytes", "Response body bytes sent, by route", ["route"], **metric)
        self.cache = Counter("mirror_cache_requests", "Blob and manifest requests answered from hosted content "
                             "(hosted), from the pull-through cache (hit) or from upstream (miss), by upstream "
                             "(empty for hosted content)", ["kind", "result", "upstream"], **metric)
        self.cache_bytes = Counter("mirror_cache_response_bytes", "Body bytes of the blobs and manifests sent, by "
                                   "kind, result and upstream", ["kind", "result", "upstream"], **metric)
        self.saved = Counter("mirror_cache_saved_bytes", "Bytes served from the cache instead of upstream, by upstream",
                             ["upstream"], **metric)
        self.evictions = Counter("mirror_cache_evictions", "Cached blobs evicted to stay under max_cache_size",
                                 **metric)
        self.evicted = Counter("mirror_cache_evicted_bytes", "Bytes of cached blobs evicted", **metric)
        self.upstream = Histogram("mirror_upstream_request_duration_seconds",
                                  "Time from sending a request to an upstream to its response headers",
                                  ["upstream"], **metric)
        self.upstream_errors = Counter("mirror_upstream_errors", "Upstream requests that failed, by reason "
                                       "(timeout, connection, http_429, http_5xx)", ["upstream", "reason"], **metric)
        self.upstream_up = Gauge("mirror_upstream_up", "Whether an upstream is up (1), or down (0): its requests "
                                 "fail at once until it answers a retry", ["upstream"], multiprocess_mode="livemin",
                                 **metric)
        self.redis_up = Gauge("mirror_redis_up", "Whether Redis answers (1) or not (0): while it does not, instances "
                              "fetch on their own and the shared LRU index is not updated", multiprocess_mode="livemin",
                              **metric)
        self.dropped = Counter("mirror_notification_events_dropped", "Notification events dropped, oldest first, "
                               "from the full queue of an endpoint that is down", ["endpoint"], **metric)
        self.signature_decisions = Counter("mirror_signature_decisions", "Manifest GETs the signature policy "
                                           "checked, by decision (allowed, refused, warned)", ["decision"], **metric)
        self._dropped_counted: collections.Counter[str] = collections.Counter()  # of events.DROPPED, so far
        Gauge("mirror_build_info", "The appliance's version (the value is always 1)", ["version"],
              multiprocess_mode="max", **metric).labels(version()).set(1)
        self.store = StoreCollector(store) if store is not None else None
        processes = ServiceProcessCollector() if self.multiprocess else BootProcessCollector(registry=None)
        self.collectors: list[Collector] = [processes] if self.store is None else [processes, self.store]
        if not self.multiprocess:
            for collector in self.collectors:
                self.registry.register(collector)

    def request_finished(self, route: str, method: str, status: int, sent: int, seconds: float,
                         cache_result: str | None, upstream: str | None = None) -> None:
        """Count one answered request (``upstream``: where a blob or manifest not hosted here came from)."""
        self.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
        self.durations.labels(route).observe(seconds)
        self.sent.labels(route).inc(sent)
        if cache_result is not None:
            self.cache.labels(route, cache_result, upstream or "").inc()
            self.cache_bytes.labels(route, cache_result, upstream or "").inc(sent)
            if cache_result == "hit":
                self.saved.labels(upstream or "").inc(sent)
        self._count_dropped()

    def _count_dropped(self) -> None:
        """Bring the dropped events counter up to ``events.DROPPED``, this process's count (events are dropped
        while a request is answered, so counting after each one misses none in the files of other workers)."""
        for endpoint, count in events.DROPPED.items():
            if count > self._dropped_counted[endpoint]:
                self.dropped.labels(endpoint).inc(count - self._dropped_counted[endpoint])
                self._dropped_counted[endpoint] = count

    def evicted_blobs(self, count: int, size: int) -> None:
        """Count ``count`` cached blobs of ``size`` bytes in all evicted."""
        self.evictions.inc(count)
        self.evicted.inc(size)

    def transport(self, upstream: Upstream) -> UpstreamTransport:
        """An HTTP transport for the clients of ``upstream`` that feeds the upstream metrics."""
        return UpstreamTransport(self, upstream.name, upstream_transport(upstream))

    async def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (the store walked first, in a thread, when stale)."""
        if self.store is not None:
            await asyncio.to_thread(self.store.refresh)
        self._count_dropped()
        if not self.multiprocess:
            return generate_latest(self.registry)
        registry = CollectorRegistry()  # every worker's values, from the files
        multiprocess.MultiProcessCollector(registry)
        for collector in self.collectors:
            registry.register(collector)
        return generate_latest(registry)


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


class BootProcessCollector(ProcessCollector):
    """prometheus-client's process metrics, also where ``/proc/stat`` is hidden (systemd's ``ProcSubset=pid``):
    the boot time they add to a process's start then comes from the clocks, and without it they say nothing."""

    def _boot_time(self) -> float:
        with contextlib.suppress(OSError):
            return super()._boot_time()
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


class ServiceProcessCollector(Collector):
    """The process metrics of the supervisor (this worker's parent) and of each of its workers, labelled by pid."""

    def __init__(self) -> None:
        self.supervisor = os.getppid()

    def pids(self) -> list[int]:
        """The supervisor and its children, the workers (only this worker once the supervisor is gone)."""
        children = Path(f"/proc/{self.supervisor}/task/{self.supervisor}/children")
        try:
            return [self.supervisor, *map(int, children.read_text().split())]
        except OSError:
            return [os.getpid()]

    def collect(self) -> Iterator[Metric]:
        """Each family once, with a sample per process."""
        families: dict[str, Metric] = {}
        for pid in self.pids():
            for family in BootProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged.samples += [sample._replace(labels={**sample.labels, "pid": str(pid)})
                                   for sample in family.samples]
        yield from families.values()


class UpstreamTransport(httpx.AsyncBaseTransport):
    """Wraps the transport to one upstream: times each request to its response headers (a failed one, a timeout
    too, to its failure) and counts failures, also those that happen while the body streams."""

    def __init__(self, metrics: Metrics, upstream: str, inner: httpx.AsyncBaseTransport) -> None:
        self.metrics, self.upstream, self.inner = metrics, upstream, inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the wrapped transport, observing it."""
        started = time.monotonic()
        try:
            with self.counting_errors():
                response = await self.inner.handle_async_request(request)
        finally:
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
        upstream = getattr(handler, "upstream", None)
        seconds = request.request_time()
        self.metrics.request_finished(route, request.method, status, sent, seconds, cache_result, upstream)
        user = handler.current_user
        fields = {"method": request.method, "path": request.path, "query": request.query or None,
                  "status": status, "bytes": sent, "duration_ms": round(seconds * 1000, 3),
                  "client": request.remote_ip, "user": None if user is None else str(user),
                  "cache": cache_result, "upstream": upstream, "route": route, "error": error}
        level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 or error else logging.INFO
        access_log.log(level, '%s %s "%s %s" %d %dB %.1fms cache=%s upstream=%s%s', request.remote_ip,
                       fields["user"] or "-", request.method, request.uri, status, sent, fields["duration_ms"],
                       cache_result or "-", upstream or "-", f" error={error}" if error else "",
                       extra={"fields": fields})


class LogFormatter(logging.Formatter):
    """One line per record: a JSON object (for journald and log shippers) or readable text (on a terminal)."""

    def __init__(self, as_json: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON, or as text."""
        if not self.as_json:
            return super().format(record)
        document = {"time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
                    "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
                    "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def configure_logging(stream: TextIO, log_format: str = "auto") -> None:
    """Send every log record at INFO and above to ``stream``, one line each: JSON (``json``), text (``text``) or,
    for ``auto``, text on a terminal and JSON elsewhere; third-party libraries' only from WARNING."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogFormatter(as_json=log_format == "json" or log_format == "auto" and not stream.isatty()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def multiprocess_metrics() -> Iterator[Path]:
    """Put the worker processes forked inside the block in prometheus-client's multiprocess mode: their values go
    to files in a fresh private directory (yielded), removed with everything in it when the block ends."""
    path = Path(tempfile.mkdtemp(prefix="mirror-metrics-"))
    os.environ[MULTIPROC_DIR] = str(path)
    values.ValueClass = values.get_value_class()  # the class metrics created from now on keep their values in
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_DIR, None)
        values.ValueClass = values.get_value_class()
        shutil.rmtree(path, ignore_errors=True)


def worker_ended(pid: int) -> None:
    """Forget the live gauges of worker ``pid``, which ended (its counters keep counting in the sum)."""
    multiprocess.mark_process_dead(pid)
