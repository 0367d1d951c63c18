"""A hung upstream costs one timeout: the breaker of ``upstream/health.py`` on a fake clock, the client telling it
how each request went, then a real ``mirror serve`` and ``bundle export`` in front of a Distribution registry
stopped with SIGSTOP (``timeout: 2s``, ``manifest_ttl: 1``)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror import cli
from mirror.config import Upstream
from mirror.errors import UpstreamDenied, UpstreamNotFound, UpstreamUnavailable
from mirror.manifest import DOCKER_MANIFEST
from mirror.upstream import UpstreamClient
from mirror.upstream.health import MAX_BACKOFF, UpstreamDown, UpstreamHealth
from mirror.upstream.transport import ThreadedTransport
from tests.images import build_image, push
from tests.peers import DistributionRegistry, MirrorProcess

TIMEOUT = 2.0  # the upstream's timeout in the tests with real peers
FAST = 0.1  # seconds: "at once", the bound for what no longer waits for the upstream


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def health() -> tuple[UpstreamHealth, Clock, list[bool]]:
    """A breaker of ``docker.io`` on a fake clock, and what its watcher was told."""
    clock, told = Clock(), []
    breaker = UpstreamHealth("docker.io", clock)
    breaker.watch(told.append)
    return breaker, clock, told


def fail(health: UpstreamHealth, reason: str = "timed out") -> None:
    with health.attempt() as attempt:
        attempt.failed(reason)


def answer(health: UpstreamHealth) -> None:
    with health.attempt() as attempt:
        attempt.answered()


# --- the breaker --------------------------------------------------------------------------------------


def test_a_failure_takes_the_upstream_down_and_its_requests_fail_at_once_until_the_backoff_is_over(health):
    breaker, clock, told = health
    assert breaker.up and told == [True]
    fail(breaker, "manifest library/alpine:3.20: upstream timed out")
    assert not breaker.up and told == [True, False]
    clock.now += 0.4
    with pytest.raises(UpstreamDown, match=r"^upstream docker.io is down; retrying in 1 s \(manifest library/alpine"):
        breaker.attempt().__enter__()
    assert isinstance(UpstreamDown("x"), UpstreamUnavailable)  # answered 503 UNAVAILABLE
    clock.now += 0.6
    assert breaker.probe_due()
    answer(breaker)
    assert breaker.up and breaker.recoveries == 1 and told == [True, False, True]


def test_one_probe_at_a_time_and_the_backoff_doubles_with_each_failed_probe_up_to_a_minute(health):
    breaker, clock, _ = health
    fail(breaker)
    backoffs = []
    for _ in range(9):
        started = clock.now
        while not breaker.probe_due():
            clock.now += 0.5
        backoffs.append(clock.now - started)
        with breaker.attempt() as probe:
            assert probe.probe and not breaker.probe_due()
            with pytest.raises(UpstreamDown, match="retrying now"):  # the probe is out: nobody else goes
                breaker.attempt().__enter__()
            probe.failed("still hung")
    assert backoffs == [1, 2, 4, 8, 16, 32, 60, 60, 60] and MAX_BACKOFF == 60
    clock.now += 60
    answer(breaker)
    fail(breaker)  # down again: the backoff starts over
    clock.now += 1
    assert breaker.probe_due()


def test_requests_let_through_before_it_went_down_neither_lengthen_the_backoff_nor_log_again(health, caplog):
    breaker, clock, told = health
    caplog.set_level(logging.INFO, "mirror.upstream")
    with breaker.attempt() as first, breaker.attempt() as second:
        first.failed("timed out")
        second.failed("timed out too")  # the same outage, found by a request already on its way
    clock.now += 1
    assert breaker.probe_due() and told == [True, False]
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "upstream docker.io is down: timed out" in caplog.records[0].getMessage()
    answer(breaker)
    answer(breaker)
    assert [record.levelname for record in caplog.records] == ["WARNING", "INFO"]
    assert "upstream docker.io is up again" in caplog.records[1].getMessage()
    assert told == [True, False, True]


def test_a_probe_without_a_verdict_passes_its_turn_to_the_next_request(health):
    breaker, clock, _ = health
    fail(breaker)
    clock.now += 1
    with pytest.raises(asyncio.CancelledError), breaker.attempt() as probe:  # its client went away
        assert probe.probe
        raise asyncio.CancelledError
    assert breaker.probe_due() and not breaker.up
    answer(breaker)
    assert breaker.up


# --- the client tells the breaker --------------------------------------------------------------------


MANIFEST = b'{"schemaVersion": 2, "mediaType": "%s", "config": {}, "layers": []}' % DOCKER_MANIFEST.encode()
Handler = Callable[[httpx.Request], httpx.Response]


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Handler:
    """A handler answering every request with ``code``."""
    return lambda request: httpx.Response(code, headers=headers, content=body)


def raising(kind: type[httpx.TransportError]) -> Handler:
    """A handler failing every request with transport error ``kind``."""
    def handler(request: httpx.Request) -> httpx.Response:
        raise kind("injected", request=request)
    return handler


def client_run(handler: Handler, *actions: Callable[[UpstreamClient], Any], clock: Clock | None = None) -> list[Any]:
    """Run ``actions`` in turn on one client over ``handler``; return each one's result or exception, then whether
    the upstream is up."""
    async def main() -> list[Any]:
        transport = ThreadedTransport(httpx.MockTransport(handler), threads=4)
        client = UpstreamClient(Upstream("registry.test", "https://registry.test"), transport)
        if clock is not None:
            client.health = UpstreamHealth("registry.test", clock)
        results: list[Any] = []
        try:
            for action in actions:
                try:
                    results.append(await action(client))
                except Exception as exc:  # noqa: BLE001 - the result to check
                    results.append(exc)
            return [*results, client.health.up]
        finally:
            await client.close()
    return asyncio.run(main())


def head(client: UpstreamClient) -> Any:
    return client.head_manifest("library/alpine", "latest")


@pytest.mark.parametrize(("handler", "error", "down"), [
    (status(503), UpstreamUnavailable, True),
    (status(500), UpstreamUnavailable, True),
    (raising(httpx.ConnectError), UpstreamUnavailable, True),  # refused
    (raising(httpx.ConnectTimeout), UpstreamUnavailable, True),
    (raising(httpx.ReadTimeout), UpstreamUnavailable, True),  # nothing for `timeout` seconds
    (raising(httpx.RemoteProtocolError), UpstreamUnavailable, True),  # reset
    (status(404), UpstreamNotFound, False),
    (status(403), UpstreamDenied, False),
    (status(429, {"Retry-After": "5"}), UpstreamUnavailable, False),
    (status(501), UpstreamUnavailable, False),
], ids=["503", "500", "refused", "connect-timeout", "read-timeout", "reset", "404", "403", "429", "501"])
def test_unanswered_requests_and_5xx_take_the_upstream_down_other_answers_do_not(handler, error, down):
    sent: list[httpx.Request] = []
    def counting(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return handler(request)
    first, second, up = client_run(counting, head, head)
    assert isinstance(first, error) and not isinstance(first, UpstreamDown)
    assert up is not down
    if down:  # the second request failed at once, without being sent
        assert isinstance(second, UpstreamDown) and "upstream registry.test is down; retrying in 1 s" in str(second)
        assert len(sent) == 1
    else:
        assert isinstance(second, error) and len(sent) == 2


def test_the_probe_an_upstream_answers_brings_it_back():
    clock = Clock()
    replies = iter([status(502), status(200, {"Content-Type": DOCKER_MANIFEST}, MANIFEST)])
    handler: Handler = lambda request: next(replies)(request)  # noqa: E731
    def later(client: UpstreamClient) -> Any:
        clock.now += 1
        return client.get_manifest("library/alpine", "latest")
    first, second, third, up = client_run(handler, head, head, later, clock=clock)
    assert isinstance(first, UpstreamUnavailable) and isinstance(second, UpstreamDown)
    assert third[0] == MANIFEST and up


# --- a real mirror in front of a hung upstream --------------------------------------------------------


@contextlib.contextmanager
def hung(registry: DistributionRegistry) -> Iterator[None]:
    """The registry process stopped (SIGSTOP) inside the block: connections open, nothing is answered."""
    registry.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        registry.send_signal(signal.SIGCONT)


def upstream_metrics(mirror: MirrorProcess) -> dict[str, float]:
    """``mirror_upstream_up`` and the upstream request histogram's count and sum for docker.io."""
    text = httpx.get(f"{mirror.url}/metrics", timeout=10).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("upstream") == "docker.io"
            and sample.name in ("mirror_upstream_up", "mirror_upstream_request_duration_seconds_count",
                                "mirror_upstream_request_duration_seconds_sum")}


def timed(client: httpx.Client, path: str) -> tuple[httpx.Response, float]:
    """The answer to ``GET path`` and how many seconds it took."""
    started = time.monotonic()
    response = client.get(path, headers={"Accept": DOCKER_MANIFEST})
    return response, time.monotonic() - started


@pytest.fixture
def registry(tmp_path) -> Iterator[DistributionRegistry]:
    """An upstream holding library/cached:1, library/other:1 and library/later:1."""
    with DistributionRegistry(tmp_path / "upstream") as upstream:
        upstream.images = {name: build_image(name) for name in ("cached", "other", "later")}
        for name, image in upstream.images.items():
            push(upstream.url, f"library/{name}", "1", image)
        yield upstream


@pytest.fixture
def mirror(tmp_path, registry) -> Iterator[MirrorProcess]:
    """``mirror serve`` with that registry as docker.io (``manifest_ttl: 1``, ``timeout: 2s``)."""
    config = {"upstreams": [{"name": "docker.io", "url": registry.url, "manifest_ttl": 1, "timeout": "2s"}],
              "default_upstream": "docker.io"}
    with MirrorProcess(tmp_path / "mirror", config) as server:
        yield server


def pull(client: httpx.Client, name: str, image: Any) -> None:
    """GET the manifest of ``name:1`` and its blobs through the mirror."""
    response = client.get(f"/v2/docker.io/library/{name}/manifests/1", headers={"Accept": DOCKER_MANIFEST})
    assert response.status_code == 200 and response.content == image.manifest.data
    for blob in image.blobs:
        assert client.get(f"/v2/docker.io/library/{name}/blobs/{blob.digest}").content == blob.data


def test_a_hung_upstream_costs_one_timeout_then_the_cache_answers_at_once_and_it_recovers_alone(mirror, registry):
    images = registry.images
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, "cached", images["cached"])
        before = upstream_metrics(mirror)
        assert before["mirror_upstream_up"] == 1
        time.sleep(1.2)  # the cached tag is past its manifest_ttl
        with hung(registry):
            first, waited = timed(client, "/v2/docker.io/library/cached/manifests/1")
            uncached, refused_in = timed(client, "/v2/docker.io/library/later/manifests/1")
            stale, stale_in = timed(client, "/v2/docker.io/library/cached/manifests/1")
            default_route, default_in = timed(client, "/v2/library/cached/manifests/1")
            layer = client.get(f"/v2/docker.io/library/cached/blobs/{images['cached'].layers[0].digest}")
            down = upstream_metrics(mirror)
            print(f"hung upstream: first revalidation {waited:.3f} s, uncached manifest {refused_in * 1000:.1f} ms, "
                  f"stale tag {stale_in * 1000:.1f} ms, stale tag by the default route {default_in * 1000:.1f} ms")
            assert first.status_code == 200 and TIMEOUT - 0.5 < waited < 3 * TIMEOUT + 1
            assert uncached.status_code == 503 and refused_in < FAST, refused_in
            assert uncached.json()["errors"][0]["code"] == "UNAVAILABLE"
            assert "upstream docker.io is down; retrying in" in uncached.json()["errors"][0]["message"]
            assert stale.content == default_route.content == images["cached"].manifest.data
            assert stale_in < FAST and default_in < FAST, (stale_in, default_in)
            assert layer.content == images["cached"].layers[0].data
            assert down["mirror_upstream_up"] == 0
            counted = down["mirror_upstream_request_duration_seconds_count"] - before[
                "mirror_upstream_request_duration_seconds_count"]
            assert counted >= 1  # the timeout is in the histogram, with the time it took
            assert down["mirror_upstream_request_duration_seconds_sum"] - before[
                "mirror_upstream_request_duration_seconds_sum"] >= TIMEOUT - 0.5
            resumed = time.monotonic()
        deadline = resumed + 1 + 2 * TIMEOUT  # the backoff (1 s), and a probe already waiting
        while (later := client.get("/v2/docker.io/library/later/manifests/1",
                                   headers={"Accept": DOCKER_MANIFEST})).status_code != 200:
            assert time.monotonic() < deadline, f"not back after {time.monotonic() - resumed:.1f} s: {later.text}"
            time.sleep(0.05)
        print(f"back {time.monotonic() - resumed:.2f} s after SIGCONT")
        assert later.content == images["later"].manifest.data
        assert upstream_metrics(mirror)["mirror_upstream_up"] == 1
    assert "upstream docker.io is down" in mirror.log() and "upstream docker.io is up again" in mirror.log()


def test_export_from_the_store_with_the_upstream_hung_waits_once_and_says_why(mirror, registry, tmp_path, capsys):
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        for name in ("cached", "other"):
            pull(client, name, registry.images[name])
    with hung(registry):
        started = time.monotonic()
        status = cli.main(["bundle", "export", "--config", str(mirror.config_path), "--output",
                           str(tmp_path / "out.tar"), "docker.io/library/cached:1", "docker.io/library/other:1"])
        took = time.monotonic() - started
    out = capsys.readouterr().out
    assert status == 0
    for name in ("cached", "other"):
        assert f"docker.io/library/{name}:1: {registry.images[name].digest} (1 image, 0 referrers) from the store " \
               "(upstream docker.io is down: manifest library/cached:1: upstream timed out" in out, out
    assert took < 2 * TIMEOUT + 1, out  # one timeout, not one per request (8 of them)
    print(f"export of 2 cached images with the upstream hung: {took:.2f} s")


def test_pulls_of_cached_tags_alone_bring_the_upstream_back_without_waiting_for_it(mirror, registry):
    with httpx.Client(base_url=mirror.url, timeout=30) as client:
        pull(client, "cached", registry.images["cached"])
        time.sleep(1.2)
        with hung(registry):
            assert timed(client, "/v2/docker.io/library/cached/manifests/1")[1] > TIMEOUT - 0.5
            time.sleep(1.1)  # the backoff is over: the next pull's revalidation is the probe, in the background
            assert timed(client, "/v2/docker.io/library/cached/manifests/1")[1] < FAST
        slowest, deadline = 0.0, time.monotonic() + 2 * TIMEOUT + 1  # the hung probe gets its answer now
        while upstream_metrics(mirror)["mirror_upstream_up"] == 0:
            assert time.monotonic() < deadline, "the upstream is still down"
            response, took = timed(client, "/v2/docker.io/library/cached/manifests/1")
            assert response.status_code == 200
            slowest = max(slowest, took)
            time.sleep(0.05)
    assert slowest < FAST, slowest
