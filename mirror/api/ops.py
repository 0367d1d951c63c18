"""Operations endpoints beside the registry API: ``/metrics``, ``/healthz`` and ``/readyz``.

They ask for no credentials, also when auth is on: probes and scrapers carry none, and nothing they answer
names a repository.
"""
from __future__ import annotations

import asyncio
from typing import Any

from mirror.api.handlers import BaseHandler
from mirror.metrics import Metrics


class OpsHandler(BaseHandler):
    """An operations endpoint: no access check."""

    def initialize(self, metrics: Metrics, **dependencies: Any) -> None:
        """Receive the metrics besides the registry's dependencies."""
        super().initialize(**dependencies)
        self.metrics = metrics

    def prepare(self) -> None:
        """Anyone may ask."""


class MetricsHandler(OpsHandler):
    """``/metrics``: every metric in the Prometheus text format."""

    async def get(self) -> None:
        """Answer with the current values."""
        body = await self.metrics.exposition()
        self.set_header("Content-Type", self.metrics.content_type)
        self.finish(body)


class HealthHandler(OpsHandler):
    """``/healthz``: 200 while the process serves."""

    def get(self) -> None:
        """Say the process is up."""
        self.write_json({"status": "ok"})

    head = get


class ReadyHandler(OpsHandler):
    """``/readyz``: 200 when the store takes writes, else 503 with the reason (the config is always loaded:
    the server does not start without one, and a failed reload keeps the running one)."""

    async def get(self) -> None:
        """Check that the store takes writes; the answer names no path (neither the store's nor the config's)."""
        problem = await asyncio.to_thread(self.registry.store.writable_problem)
        if problem is not None:
            self.set_status(503)
        self.write_json({"status": "ready" if problem is None else "unready", "reason": problem})
