"""Whether an upstream answers: a circuit breaker, so that one that stopped answering costs no more waiting.

A request the upstream leaves unanswered (a connection refused or reset, nothing for ``timeout`` seconds) or
answers with a 5xx (but 501, which says only that the server lacks that endpoint) marks it down. Then every
request to it fails at once with UpstreamDown, without touching the network, for a backoff of 1 s that
doubles with each failed probe up to 60 s. Once the backoff is over, one request at a time goes through as
the probe (half-open): an answer closes the breaker, a failure opens it for the next backoff. Answers that do
arrive, however unwelcome (404, 401, 429, invalid content, an answer too slow for its deadline), do not mark
the upstream down. Each change is logged once (WARNING down, INFO up) and told to the watchers (the
``mirror_upstream_up`` gauge). The state is one client's, in one process: each worker process finds out alone.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator

from mirror.errors import UpstreamUnavailable
from mirror.upstream.status import detail

log = logging.getLogger("mirror.upstream")
FIRST_BACKOFF = 1.0  # seconds an upstream is left alone after it stopped answering
MAX_BACKOFF = 60.0  # the backoff doubles with each failed probe, up to this


class UpstreamDown(UpstreamUnavailable):
    """The upstream is down: the request was not sent."""


class UpstreamHealth:
    """The circuit breaker of one upstream: up (closed), or down (open) until a probe gets an answer."""

    def __init__(self, name: str, clock: Callable[[], float] = time.monotonic):
        self.name, self._clock = name, clock
        self.reason: str | None = None  # why the upstream is down; None while it is up
        self.recoveries = 0  # how often it came back
        self._down_since = self._retry_at = self._backoff = 0.0
        self._probing = False
        self._watchers: list[Callable[[bool], object]] = []

    @property
    def up(self) -> bool:
        """Whether requests go to the upstream (the breaker is closed)."""
        return self.reason is None

    def probe_due(self) -> bool:
        """Whether the upstream is down and a request now would go through as the probe."""
        return not self.up and not self._probing and self._clock() >= self._retry_at

    def watch(self, watcher: Callable[[bool], object]) -> None:
        """Call ``watcher(up)`` now and whenever the upstream goes down or comes back."""
        self._watchers.append(watcher)
        watcher(self.up)

    @contextlib.contextmanager
    def attempt(self) -> Iterator[Attempt]:
        """Let one request through (the block tells the Attempt how it went), or raise UpstreamDown at once."""
        probe = not self.up
        if probe:
            if not self.probe_due():
                raise UpstreamDown(self._refusal(), detail(None))
            self._probing = True
        try:
            yield Attempt(self, probe)
        finally:
            if probe:
                self._probing = False

    def _answered(self) -> None:
        if not self.up:
            log.info("upstream %s is up again, after %.1f s down", self.name, self._clock() - self._down_since)
            self.reason = None
            self.recoveries += 1
            self._tell()

    def _failed(self, reason: str, probe: bool) -> None:
        now = self._clock()
        if self.up:
            self.reason, self._down_since, self._backoff = reason, now, FIRST_BACKOFF
            self._retry_at = now + self._backoff
            log.warning("upstream %s is down: %s; its requests fail at once until it answers a retry (every %g s "
                        "at first, up to every %g s)", self.name, reason, FIRST_BACKOFF, MAX_BACKOFF)
            self._tell()
        elif probe:
            self.reason, self._backoff = reason, min(2 * self._backoff, MAX_BACKOFF)
            self._retry_at = now + self._backoff

    def _refusal(self) -> str:
        wait = self._retry_at - self._clock()
        when = f"retrying in {math.ceil(wait)} s" if wait > 0 else "retrying now"
        return f"upstream {self.name} is down; {when} ({self.reason})"

    def _tell(self) -> None:
        for watcher in self._watchers:
            watcher(self.up)


class Attempt:
    """One request let through to the upstream (``probe``: the one that finds out whether it is back); without a
    verdict, nothing changes and a probe's turn passes to the next request."""

    def __init__(self, health: UpstreamHealth, probe: bool):
        self.health, self.probe = health, probe

    def answered(self) -> None:
        """The upstream answered: it is up."""
        self.health._answered()

    def failed(self, reason: str) -> None:
        """The upstream left the request unanswered, or answered 5xx: it is down (for longer, after a probe)."""
        self.health._failed(reason, self.probe)
