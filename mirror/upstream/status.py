"""How an upstream's answers become the domain's values and errors; no raw httpx exception gets past here.

    connection error, timeout (also a missed deadline, see
    ``transport.Deadlines``), protocol error, 5xx, 429, other
    unexpected status, a body shorter than its Content-Length   -> UpstreamUnavailable
    404                                                         -> UpstreamNotFound
    401, 403 (after authenticating)                             -> UpstreamDenied
    a body longer than its Content-Length, a small answer over
    ``MAX_ANSWER_SIZE``, JSON that is malformed or nested deeper
    than ``manifest.MAX_JSON_DEPTH``                            -> UpstreamInvalid

Every error's ``detail`` is a dict with ``status`` (the HTTP status, or None without an answer) and
``retry_after`` (seconds the upstream asked us to wait, or None).
"""
from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from mirror.errors import ManifestInvalid, UpstreamDenied, UpstreamInvalid, UpstreamNotFound, UpstreamUnavailable
from mirror.manifest import MAX_MANIFEST_SIZE, load_json

MAX_ANSWER_SIZE = MAX_MANIFEST_SIZE  # bytes of a small answer: a manifest, a tag list page, referrers, a token


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Turn httpx exceptions raised inside the block into UpstreamUnavailable about ``what``."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamUnavailable(f"{what}: upstream timed out: {exc}", detail(None)) from exc
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


async def checked_body(response: httpx.Response, what: str, chunk_size: int | None = None) -> AsyncIterator[bytes]:
    """The body, its bytes on the wire checked against Content-Length when the upstream gave one."""
    expected = content_length(response)
    with translated(what):
        async for chunk in response.aiter_bytes(chunk_size):
            if expected is not None and response.num_bytes_downloaded > expected:
                raise UpstreamInvalid(f"{what}: more bytes than the {expected} announced", detail(200))
            yield chunk
    if expected is not None and response.num_bytes_downloaded < expected:
        raise UpstreamUnavailable(f"{what}: body truncated at {response.num_bytes_downloaded} of {expected} "
                                  "bytes", detail(response.status_code))


async def read_small(response: httpx.Response, what: str) -> bytes:
    """The whole body of a small answer, at most ``MAX_ANSWER_SIZE`` bytes, checked as ``checked_body`` does."""
    size = content_length(response)
    if size is not None and size > MAX_ANSWER_SIZE:
        raise UpstreamInvalid(f"{what}: {size} bytes are over the limit of {MAX_ANSWER_SIZE}",
                              detail(response.status_code))
    body = bytearray()
    async for chunk in checked_body(response, what):
        body += chunk
        if len(body) > MAX_ANSWER_SIZE:
            raise UpstreamInvalid(f"{what}: the answer is over the limit of {MAX_ANSWER_SIZE} bytes",
                                  detail(response.status_code))
    return bytes(body)


def parse_json(body: bytes, what: str) -> Any:
    """An upstream's JSON ``body`` parsed, nested at most ``MAX_JSON_DEPTH`` deep; UpstreamInvalid otherwise."""
    try:
        return load_json(body, what, max_size=MAX_ANSWER_SIZE)
    except ManifestInvalid as exc:  # load_json's error, about any JSON
        raise UpstreamInvalid(exc.message, detail(200)) from None


def content_length(response: httpx.Response) -> int | None:
    """The body size the upstream announced, or None."""
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None
