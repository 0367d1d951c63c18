"""How HTTP failures of an upstream become the domain's errors; no raw httpx exception gets past here.

    connection error, timeout, protocol error, 5xx, 429, other
    unexpected status                                           -> UpstreamUnavailable
    404                                                         -> UpstreamNotFound
    401, 403 (after authenticating)                             -> UpstreamDenied

Every error's ``detail`` is a dict with ``status`` (the HTTP status, or None without an answer) and
``retry_after`` (seconds the upstream asked us to wait, or None).
"""
from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from mirror.errors import UpstreamDenied, UpstreamNotFound, UpstreamUnavailable


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn httpx exceptions raised inside the block into UpstreamUnavailable about ``what``."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamUnavailable(f"{what}: upstream timed out", detail(None)) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise UpstreamUnavailable(f"{what}: {type(exc).__name__}: {exc}", detail(None)) from exc


def raise_for_status(response: httpx.Response, what: str) -> None:
    """Raise the upstream error that ``response``'s status means; return quietly on 2xx."""
    status = response.status_code
    if 200 <= status < 300:
        return
    info = detail(status, retry_after(response.headers.get("retry-after")))
    if status == 404:
        raise UpstreamNotFound(f"{what}: upstream has no such thing", info)
    if status in (401, 403):
        raise UpstreamDenied(f"{what}: upstream denied access ({status})", info)
    raise UpstreamUnavailable(f"{what}: upstream answered {status}", info)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date), or None if absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def detail(status: int | None, retry: float | None = None) -> dict[str, float | int | None]:
    """The ``detail`` of an upstream error: HTTP status (None without an answer) and Retry-After seconds."""
    return {"status": status, "retry_after": retry}
