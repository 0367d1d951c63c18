"""Side-by-side benchmark of the mirror against the Distribution registry 2.8 on loopback (issue 6).

    tools/bench [--quick] [--skip-docker] [--output bench-results.json] [--workers N] [--workdir DIR]

One run starts an upstream Distribution registry holding test images it builds, then the mirror and the
Distribution registry side by side: hosted (the images pushed into each) and as pull-through caches of that
upstream. Every figure is measured for both, alternating which goes first round after round, and the median
of the rounds is reported with the ratio mirror / Distribution: for rates higher is better, for times, counts
and memory lower is better. Rates come from wrk over a fixed duration, times from curl fetching like a client;
both are C programs in their own processes, and the CPU they use is recorded to show they are not the limit.
Every server is stopped by its own pid, also when the run fails or is interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from mirror.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from tests.images import Blob, Image, build_image, push
from tests.peers import DistributionRegistry, Dockerd, MirrorProcess, PeerError

MiB = 1 << 20
ACCEPT = "Accept: " + ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
WRK_SCRIPT = ('done = function(summary, latency, requests)\n'
              '  local e = summary.errors\n'
              '  io.write(string.format("WRK %d %d %d %d\\n", summary.requests, summary.bytes, summary.duration,\n'
              '                         e.connect + e.read + e.write + e.status + e.timeout))\n'
              'end\n')
TIMEOUT = 900  # bound on any one client command
QUIET_SECONDS = 2.0  # an upstream log that did not grow for this long has logged every request


class BenchError(RuntimeError):
    """A measurement could not be taken (a server failed, a client got errors)."""


@dataclass(frozen=True)
class Plan:
    """Sizes, counts and durations of one run."""

    big_layer: int = 256 * MiB  # the single-layer image
    layer: int = 8 * MiB  # each layer of the many-layer image
    layers: int = 10
    rounds: int = 5  # alternated rounds per figure; the median is reported
    seconds: int = 5  # each wrk measurement
    fanout: int = 8  # concurrent cold clients of one blob
    serve_gets: int = 40  # GETs of the big blob for the memory figure: 10 GiB at 256 MiB
    serve_streams: int = 8
    bundle: int = 512 * MiB
    docker_rounds: int = 3


SETTLE_TIMEOUT, SETTLE_INTERVAL, IDLE_SHARE = 10.0, 0.2, 0.1  # idle: under 10% of a core for 0.2 s
GROUPS = ("cold", "fanout", "warm", "manifest", "memory", "docker", "bundle")  # of rows, for --only
QUICK = Plan(big_layer=4 * MiB, layer=256 * 1024, rounds=1, seconds=1, bundle=16 * MiB, docker_rounds=1)


@dataclass(frozen=True)
class Target:
    """A bound the issue sets, on the ratio (mirror / Distribution) or on the mirror's own figure."""

    subject: str  # "ratio" or "mirror"
    op: str  # ">=", "<=", "<" or "="
    bound: float

    def met(self, mirror: float | None, ratio: float | None) -> bool | None:
        """Whether the bound holds; None when the figure was not measured."""
        value = ratio if self.subject == "ratio" else mirror
        if value is None:
            return None
        return {">=": value >= self.bound, "<=": value <= self.bound, "<": value < self.bound,
                "=": value == self.bound}[self.op]

    def __str__(self) -> str:
        return f"{self.subject} {self.op} {self.bound:g}"


@dataclass(frozen=True)
class Sample:
    """One measurement of one contender, with the CPU (in cores) the client and the contender used."""

    value: float
    client_cpu: float | None = None
    server_cpu: float | None = None


@dataclass
class Row:
    """One figure of the table: samples of both contenders, the target and what came of it."""

    key: str
    figure: str
    unit: str
    better: str  # "higher" or "lower"
    target: Target | None
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    aggregate: Callable[[list[float]], float] = statistics.median
    note: str = ""

    def add(self, contender: str, sample: Sample) -> None:
        """Record a sample of ``contender``."""
        self.samples.setdefault(contender, []).append(sample)

    def value(self, contender: str) -> float | None:
        """The reported figure of ``contender`` (median of its samples unless the row says otherwise)."""
        values = [sample.value for sample in self.samples.get(contender, [])]
        return self.aggregate(values) if values else None

    @property
    def ratio(self) -> float | None:
        """Mirror / Distribution."""
        mirror, distribution = self.value("mirror"), self.value("distribution")
        return mirror / distribution if mirror is not None and distribution else None

    @property
    def passed(self) -> bool | None:
        """Whether the target is met (None: no target, or not measured)."""
        return self.target.met(self.value("mirror"), self.ratio) if self.target else None

    def cpu(self, contender: str, which: str) -> float | None:
        """The most CPU (cores) the client or the contender (``which``) used in any sample."""
        values = [getattr(sample, which) for sample in self.samples.get(contender, [])]
        return max((value for value in values if value is not None), default=None)

    def as_json(self) -> dict[str, Any]:
        """The row as written to the JSON file."""
        return {"key": self.key, "figure": self.figure, "unit": self.unit, "better": self.better,
                "mirror": self.value("mirror"), "distribution": self.value("distribution"), "ratio": self.ratio,
                "target": str(self.target) if self.target else None, "passed": self.passed, "note": self.note,
                "samples": {name: [vars(sample) for sample in samples] for name, samples in self.samples.items()}}


@dataclass
class Contender:
    """One side of the comparison: a running server and the store a cold restart empties."""

    name: str
    server: MirrorProcess | DistributionRegistry
    store: Path

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.server.url

    def restart(self, empty: bool) -> None:
        """Stop the server and start it again: a fresh process, and a cold one too if ``empty`` (store deleted)."""
        self.server.stop()
        if empty:
            shutil.rmtree(self.store, ignore_errors=True)
        self.server.start()


# processes and clients

def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.isdigit():
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(children.get(current, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU seconds the processes used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    """CPU seconds used by the client commands this process ran (and waited for) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def observe(pid: int, measure: Callable[[], float]) -> Sample:
    """Run ``measure``, recording the CPU its client commands and the server tree of ``pid`` used."""
    pids = process_tree(pid)
    client, server, start = client_cpu_seconds(), cpu_seconds(pids), time.perf_counter()
    value = measure()
    elapsed = time.perf_counter() - start
    return Sample(value, round((client_cpu_seconds() - client) / elapsed, 3),
                  round((cpu_seconds(pids) - server) / elapsed, 3))


def settle(pids: Sequence[int], timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until the process trees of ``pids`` use almost no CPU and the disk has nothing left to write: a
    cache still storing what it just fetched (Distribution's proxy stores a blob after its client got it; the
    mirror commits) must not slow the next measurement down, whichever of the two it is. Distribution does
    not fsync, so without the ``sync`` the kernel would write its blobs back about 30 s later, during
    whichever measurement runs then."""
    tree = [each for pid in pids for each in process_tree(pid)]
    os.sync()
    deadline, used = time.monotonic() + timeout, cpu_seconds(tree)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_INTERVAL)
        used, before = cpu_seconds(tree), used
        if used - before <= SETTLE_INTERVAL * IDLE_SHARE:
            return


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid`` in KiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: int(rest.split()[0]) for key, _, rest in (line.partition(":") for line in lines)
            if key in ("VmRSS", "VmHWM")}


def peak_growth(pid: int, action: Callable[[], object]) -> float:
    """MiB by which the peaks of ``pid``'s process tree rose above their resident sizes during ``action``."""
    pids = process_tree(pid)
    for each in pids:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path(f"/proc/{each}/clear_refs").write_text("5")
    before = {each: memory_kib(each)["VmRSS"] for each in pids}
    action()
    return sum(max(memory_kib(each)["VmHWM"] - rss, 0) for each, rss in before.items()) / 1024


def wrk(url: str, connections: int, seconds: int, script: Path, headers: Sequence[str] = ()) -> tuple[float, float]:
    """Requests and bytes per second wrk gets from ``url`` with ``connections`` connections."""
    argv = ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "120s",
            "-s", str(script), *(f"-H{header}" for header in headers), url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + TIMEOUT)
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("WRK ")]
    if result.returncode != 0 or not lines:
        raise BenchError(f"wrk {url} failed: {result.stderr.strip() or result.stdout.strip()}")
    requests, received, micros, errors = map(int, lines[-1][1:])
    if errors:
        raise BenchError(f"wrk {url}: {errors} errors in {requests} requests\n{result.stdout}")
    return requests * 1e6 / micros, received * 1e6 / micros


def curl(fetches: Sequence[tuple[str, int]], parallel: int = 1, headers: Sequence[str] = ()) -> None:
    """GET each ``(url, size)`` to /dev/null, ``parallel`` at a time; each must answer 200 with ``size`` bytes."""
    argv = ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", str(TIMEOUT),
            "--write-out", "%{url_effective} %{http_code} %{size_download}\\n", *(f"-H{header}" for header in headers)]
    if parallel > 1:
        argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
    for url, _ in fetches:
        argv += ["--output", "/dev/null", url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT + 60)
    expected = Counter(f"{url} 200 {size}" for url, size in fetches)
    if result.returncode != 0 or Counter(result.stdout.splitlines()) != expected:
        raise BenchError(f"curl expected {dict(expected)}, got {result.stdout.splitlines()}: {result.stderr}")


def timed(action: Callable[[], object]) -> float:
    """Seconds ``action`` took."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def docker_unavailable() -> str | None:
    """Why a private dockerd cannot run here, or None."""
    if os.geteuid() != 0:
        return "dockerd needs root"
    for program in ("/usr/sbin/dockerd", "/usr/bin/containerd", "/usr/bin/docker"):
        if not os.access(program, os.X_OK):
            return f"{program} is not installed"
    return None


# the run

def size_text(size: int) -> str:
    """``size`` in the largest binary unit that keeps it whole-ish (256 MiB, 10 GiB, 512 KiB)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


class Bench:
    """Starts the servers, pushes the images and measures every row."""

    def __init__(self, plan: Plan, workdir: Path, stack: contextlib.ExitStack, workers: int | None,
                 skip_docker: bool):
        self.plan, self.workdir, self.stack, self.skip_docker = plan, workdir, stack, skip_docker
        self.mirror_options: dict[str, Any] = {"workers": workers} if workers else {}
        self.script = workdir / "wrk-summary.lua"
        self.script.write_text(WRK_SCRIPT)
        self.big = build_image("bench-big", layers=1, layer_size=plan.big_layer)
        self.multi = build_image("bench-multi", layers=plan.layers, layer_size=plan.layer)
        self.small = build_image("bench-small", layers=2)
        self.layer = self.big.layers[0]
        self.layer_digest = self.layer.digest  # a property that hashes every time: compute it once

    def run(self, only: Sequence[str] = ()) -> list[Row]:
        """Every row in table order, or those of the ``only`` groups (see ``GROUPS``)."""
        self.start_servers()
        groups = {"cold": self.cold_rows, "fanout": self.fanout_rows, "warm": self.warm_blob_rows,
                  "manifest": self.manifest_rows, "memory": lambda: [self.serving_memory_row()],
                  "docker": self.docker_rows, "bundle": self.bundle_rows}
        return [row for name in GROUPS if not only or name in only for row in groups[name]()]

    def start(self, server: Any) -> Any:
        """Start ``server``, making sure it is stopped when the run ends however it ends."""
        self.stack.callback(server.stop)
        return server.start()

    def start_servers(self) -> None:
        """The upstream, then the hosted pair and the pull-through pair, with the images pushed."""
        progress("starting the upstream and pushing the test images")
        self.upstream = self.start(DistributionRegistry(self.workdir / "upstream"))
        self.push(self.upstream.url, {"bench/big": self.big, "bench/multi": self.multi, "bench/small": self.small})
        upstreams = [{"name": "docker.io", "url": self.upstream.url, "manifest_ttl": 300}]
        self.hosted = self.pair("hosted", {"upstreams": []}, None)
        for contender in self.hosted:
            self.push(contender.url, {"bench/big": self.big, "bench/small": self.small})
        self.proxies = self.pair("proxy", {"upstreams": upstreams, "default_upstream": "docker.io"},
                                 self.upstream.url)

    def pair(self, kind: str, mirror_config: dict[str, Any], remote: str | None) -> list[Contender]:
        """A mirror and a Distribution registry of one kind (hosted, or caching ``remote``), both started."""
        mirror_dir, registry_dir = self.workdir / f"{kind}-mirror", self.workdir / f"{kind}-distribution"
        mirror = MirrorProcess(mirror_dir, {**mirror_config, **self.mirror_options})
        registry = DistributionRegistry(registry_dir, proxy_remote_url=remote)
        return [Contender("mirror", self.start(mirror), mirror_dir / "store"),
                Contender("distribution", self.start(registry), registry_dir / "data")]

    @staticmethod
    def push(url: str, images: dict[str, Image]) -> None:
        """Push each image as ``<repository>:v1``."""
        with httpx.Client(timeout=300, trust_env=False) as client:
            for repository, image in images.items():
                push(url, repository, "v1", image, client=client)

    def order(self, round_number: int, pair: list[Contender]) -> list[Contender]:
        """The pair, in the opposite order every other round."""
        return pair if round_number % 2 == 0 else pair[::-1]

    def alternate(self, row: Row, pair: list[Contender], measure: Callable[[Contender], Sample]) -> Row:
        """Fill ``row`` with ``plan.rounds`` samples of each contender, alternating who goes first."""
        progress(row.figure)
        for round_number in range(self.plan.rounds):
            for contender in self.order(round_number, pair):
                row.add(contender.name, measure(contender))
        return row

    def restart_proxies(self, empty: bool = True) -> None:
        """Restart both pull-through caches, with empty stores unless told otherwise."""
        for contender in self.proxies:
            contender.restart(empty)

    def upstream_gets(self, path: str) -> int:
        """GETs of ``path`` the upstream logged, once it logged none for a while.

        The upstream logs a request when it ends, and Distribution's proxy stores a blob with a GET of its own
        that may end after its clients got their bytes.
        """
        count, deadline = self.upstream.count_requests("GET", path), time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(QUIET_SECONDS)
            count, previous = self.upstream.count_requests("GET", path), count
            if count == previous:
                break
        return count

    # URLs and client actions

    def timing(self, contender: Contender, action: Callable[[Contender], object]) -> Sample:
        """Seconds ``action(contender)`` took, with the CPU the client and the contender used meanwhile,
        measured once every server is idle."""
        settle([self.upstream.pid, *(each.server.pid for each in (*self.hosted, *self.proxies))])
        return observe(contender.server.pid, lambda: timed(lambda: action(contender)))

    def blob_url(self, contender: Contender, blob: Blob | None = None) -> str:
        """Where ``contender`` serves a blob (the big layer by default) of its image."""
        repository = "bench/big" if blob is None else "bench/multi"
        return f"{contender.url}/v2/{repository}/blobs/{self.layer_digest if blob is None else blob.digest}"

    def get_big_blob(self, contender: Contender, clients: int = 1) -> None:
        """``clients`` concurrent GETs of the big layer."""
        curl([(self.blob_url(contender), self.layer.size)] * clients, parallel=clients)

    def pull_multi(self, contender: Contender) -> None:
        """Pull the many-layer image like a client: its manifest, then its blobs 4 at a time."""
        image = self.multi
        curl([(f"{contender.url}/v2/bench/multi/manifests/v1", image.manifest.size)], headers=[ACCEPT])
        curl([(self.blob_url(contender, blob), blob.size) for blob in image.blobs], parallel=4)

    # rows

    def cold_rows(self) -> list[Row]:
        """Cold pull-through of the big blob and of the many-layer image, both caches emptied every round."""
        plan, big = self.plan, size_text(self.plan.big_layer)
        blob = Row("cold_blob", f"cold pull-through, {big} blob", "s", "lower", Target("ratio", "<=", 1.2))
        image = Row("cold_image", f"cold pull-through, {plan.layers}-layer image "
                    f"({size_text(plan.layers * plan.layer)}), 4 blobs at a time", "s", "lower",
                    Target("ratio", "<=", 1.2))
        progress(f"{blob.figure}; {image.figure}")
        self.restart_proxies()
        for contender in self.proxies:  # a round not counted: the first one faults fresh memory in (on a VM, slowly)
            self.get_big_blob(contender)
            self.pull_multi(contender)
        for round_number in range(plan.rounds):
            self.restart_proxies()
            for row, fetch in ((blob, self.get_big_blob), (image, self.pull_multi)):
                for contender in self.order(round_number, self.proxies):
                    row.add(contender.name, self.timing(contender, fetch))
        return [blob, image]

    def fanout_rows(self) -> list[Row]:
        """Concurrent cold clients of the big blob: upstream GETs it cost, time, and memory while streaming."""
        plan, big = self.plan, size_text(self.plan.big_layer)
        gets = Row("upstream_gets", f"upstream GETs for {plan.fanout} concurrent cold clients of one blob", "GETs",
                   "lower", Target("mirror", "=", 1), aggregate=max)
        fanout = Row("cold_fanout", f"cold pull-through, {plan.fanout} concurrent clients of the {big} blob", "s",
                     "lower", Target("ratio", "<=", 1.2))
        memory = Row("rss_growth_cold", "peak RSS growth during that cold pull-through", "MiB", "lower",
                     Target("mirror", "<", 100))
        progress(fanout.figure)
        path = f"/blobs/{self.layer_digest}"
        for round_number in range(plan.rounds):
            self.restart_proxies()
            for contender in self.order(round_number, self.proxies):
                before = self.upstream_gets(path)
                timing, growth = self.cold_fanout(contender)
                gets.add(contender.name, Sample(self.upstream_gets(path) - before))
                fanout.add(contender.name, timing)
                memory.add(contender.name, Sample(growth))
        return [gets, fanout, memory]

    def cold_fanout(self, contender: Contender) -> tuple[Sample, float]:
        """The time of ``plan.fanout`` concurrent GETs of the big blob, and the peak RSS growth meanwhile."""
        timings: list[Sample] = []
        growth = peak_growth(contender.server.pid, lambda: timings.append(
            self.timing(contender, lambda contender: self.get_big_blob(contender, self.plan.fanout))))
        return timings[0], growth

    def warm_blob_rows(self) -> list[Row]:
        """Warm blob GET throughput, hosted and cached, on 1 and on 32 streams."""
        rows = []
        for key, where, pair in (("hosted", "hosted", self.hosted), ("pull", "pull-through cached", self.proxies)):
            for contender in pair:
                self.get_big_blob(contender)  # fills the cache, and checks the URL answers
            for streams in (1, 32):
                row = Row(f"blob_{key}_{streams}", f"warm blob GET, {where}, {streams} stream"
                          f"{'s' if streams > 1 else ''} ({size_text(self.plan.big_layer)} blob)", "MB/s",
                          "higher", Target("ratio", ">=", 1.0))
                rows.append(self.alternate(row, pair, lambda contender, streams=streams: self.load(
                    contender, self.blob_url(contender), streams, bytes_rate=True)))
        return rows

    def manifest_rows(self) -> list[Row]:
        """Manifest GETs per second by tag and by digest, hosted and pull-through (within the tag TTL)."""
        rows = []
        for key, pair, tag_target in (("hosted", self.hosted, 1.0), ("pull", self.proxies, 5.0)):
            where = "pull-through" if key == "pull" else key
            for kind, reference, bound in (("tag", "v1", tag_target), ("digest", self.small.digest, 1.0)):
                for contender in pair:  # caches the manifest, and checks the URL answers
                    curl([(self.manifest_url(contender, reference), self.small.manifest.size)], headers=[ACCEPT])
                row = Row(f"manifest_{key}_{kind}", f"manifest GET by {kind}, {where}, "
                          "32 connections", "req/s", "higher", Target("ratio", ">=", bound))
                rows.append(self.alternate(row, pair, lambda contender, reference=reference: self.load(
                    contender, self.manifest_url(contender, reference), 32, headers=[ACCEPT])))
        return rows

    def manifest_url(self, contender: Contender, reference: str) -> str:
        """Where ``contender`` serves the small image's manifest by ``reference``."""
        return f"{contender.url}/v2/bench/small/manifests/{reference}"

    def load(self, contender: Contender, url: str, connections: int, bytes_rate: bool = False,
             headers: Sequence[str] = ()) -> Sample:
        """wrk's rate against ``url``: MB/s with ``bytes_rate``, else requests/s."""
        def measure() -> float:
            requests, received = wrk(url, connections, self.plan.seconds, self.script, headers)
            return received / 1e6 if bytes_rate else requests
        return observe(contender.server.pid, measure)

    def serving_memory_row(self) -> Row:
        """Peak RSS growth of a fresh process serving the cached big blob (``serve_gets`` GETs, in parallel)."""
        plan = self.plan
        self.restart_proxies(empty=False)
        total = size_text(plan.serve_gets * plan.big_layer)
        row = Row("rss_growth", f"peak RSS growth of a fresh process serving {total} ({plan.serve_gets} GETs, "
                  f"{plan.serve_streams} streams)", "MiB", "lower", Target("mirror", "<", 100))
        progress(row.figure)
        for contender in self.proxies:
            fetches = [(self.blob_url(contender), self.layer.size)] * plan.serve_gets
            serve = functools.partial(curl, fetches, parallel=plan.serve_streams)
            row.add(contender.name, Sample(peak_growth(contender.server.pid, serve)))
        return row

    def docker_rows(self) -> list[Row]:
        """``docker pull`` of the many-layer image through ``registry-mirrors``: cold, then warm."""
        cold = Row("docker_pull_cold", f"docker pull via registry-mirrors, cold ({self.plan.layers} layers)", "s",
                   "lower", Target("ratio", "<=", 1.2))
        warm = Row("docker_pull_warm", f"docker pull via registry-mirrors, warm ({self.plan.layers} layers)", "s",
                   "lower", Target("ratio", "<=", 1.0))
        reason = "--skip-docker" if self.skip_docker else docker_unavailable()
        if reason:
            cold.note = warm.note = f"not measured: {reason}"
            return [cold, warm]
        progress("docker pull through registry-mirrors")
        daemon = self.start(Dockerd(self.workdir / "dockerd"))
        for round_number in range(self.plan.docker_rounds):
            self.restart_proxies()
            for contender in self.order(round_number, self.proxies):
                daemon.configure({"registry-mirrors": [contender.url]})
                for row in (cold, warm):
                    row.add(contender.name, self.timing(contender, lambda _, daemon=daemon: daemon.docker(
                        "pull", "bench/multi:v1", timeout=TIMEOUT)))
                    daemon.remove_all_images()
        daemon.stop()
        return [cold, warm]

    def bundle_rows(self) -> list[Row]:
        """Bundle export and import throughput; the Distribution column holds an fsync'd copy of the bundle."""
        rows = [Row(f"bundle_{step}", f"bundle {step} ({size_text(self.plan.bundle)}) vs fsync'd copy in the "
                    "Distribution column", "MiB/s", "higher", None) for step in ("export", "import")]
        progress("bundle export and import (tools/bench_bundle.py)")
        try:
            from tools import bench_bundle
            results = bench_bundle.measure(self.workdir / "bundle", self.plan.bundle, self.plan.rounds)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the other rows still stand
            for row in rows:
                row.note = f"not measured: {type(exc).__name__}: {exc}"
            return rows
        for row, step in zip(rows, ("export", "import"), strict=True):
            row.add("mirror", Sample(results[f"{step}_mib_s"]))
            row.add("distribution", Sample(results["copy_mib_s"]))
            row.note = "distribution column: copying the bundle with fsync on the same disk"
        return rows


# output

def progress(message: str) -> None:
    """Say what is being measured (stderr, so the table on stdout stays clean)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def number(value: float | None) -> str:
    """A figure with as many digits as it deserves."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table (readable on a terminal, pasteable into the README)."""
    header = ("figure", "unit", "mirror", "distribution", "ratio", "better", "target", "result")
    lines = [header]
    for row in rows:
        result = {True: "pass", False: "FAIL", None: "-"}[row.passed]
        if row.value("mirror") is None:
            result = "not measured"
        lines.append((row.figure, row.unit, number(row.value("mirror")), number(row.value("distribution")),
                      number(row.ratio), row.better, str(row.target) if row.target else "-", result))
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    text = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) + " |"
            for line in lines]
    text.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(text)


def footnotes(rows: Sequence[Row]) -> str:
    """Notes of the rows, and the most CPU the load generators used (to show they were not the limit)."""
    notes = [f"- {row.key}: {row.note}" for row in rows if row.note]
    client = {row.key: max(filter(None, (row.cpu(name, "client_cpu") for name in row.samples)), default=0)
              for row in rows}
    busiest = max(client, key=client.get)
    notes.append(f"- ratio = mirror / distribution; 'better' says which direction of the figures is better. "
                 f"The load generators (wrk, curl) used at most {client[busiest]:.2f} cores ({busiest}) of "
                 f"{os.cpu_count()}.")
    return "\n".join(notes)


def report(rows: Sequence[Row], plan: Plan, started: datetime.datetime, load: tuple[float, ...],
           output: Path) -> None:
    """Print the table and write the JSON file; ``load`` is the load average when the run started."""
    print(table(rows))
    print()
    print(footnotes(rows))
    print(f"- load average before the run: {' '.join(f'{value:.2f}' for value in load)} "
          "(other work on the machine makes every figure noisier)")
    document = {"started": started.isoformat(timespec="seconds"),
                "seconds": round((datetime.datetime.now(datetime.UTC) - started).total_seconds()),
                "host": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                         "load_average_before": load},
                "plan": vars(plan), "rows": [row.as_json() for row in rows]}
    output.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {output}")


def row_groups(text: str) -> list[str]:
    """The value of ``--only``: groups of rows named in ``GROUPS``, separated by commas."""
    chosen = text.split(",")
    if unknown := [name for name in chosen if name not in GROUPS]:
        raise argparse.ArgumentTypeError(f"no group {', '.join(unknown)}; the groups are {', '.join(GROUPS)}")
    return chosen


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="tools/bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    parser.add_argument("--skip-docker", action="store_true", help="leave out the docker pull rows")
    parser.add_argument("--output", type=Path, default=Path("bench-results.json"), help="the JSON file to write")
    parser.add_argument("--rounds", type=int, help="alternated rounds per figure (default 5, quick 1)")
    parser.add_argument("--seconds", type=int, help="duration of each wrk measurement (default 5, quick 1)")
    parser.add_argument("--workers", type=int, help="the mirror's `workers` setting (default: its own default)")
    parser.add_argument("--only", type=row_groups, default=(), metavar="GROUP[,GROUP]",
                        help=f"measure only these groups of rows: {', '.join(GROUPS)}")
    parser.add_argument("--workdir", type=Path, help="where servers keep their stores and logs "
                        "(default: a temporary folder, deleted afterwards)")
    return parser.parse_args(argv)


def missing_programs() -> list[str]:
    """The programs the run needs that are not installed."""
    return [program for program in ("/usr/bin/docker-registry", "wrk", "curl") if not shutil.which(program)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every row was measured or left out on purpose, 1 on failure."""
    args = arguments(argv)
    if missing := missing_programs():
        print(f"tools/bench: missing {', '.join(missing)} (apt-get install docker-registry wrk curl)",
              file=sys.stderr)
        return 2
    plan = QUICK if args.quick else Plan()
    plan = replace(plan, rounds=args.rounds or plan.rounds, seconds=args.seconds or plan.seconds)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so every server is stopped
    started, load = datetime.datetime.now(datetime.UTC), os.getloadavg()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mirror-bench-"))
        workdir.mkdir(parents=True, exist_ok=True)
        if args.workdir is None:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        try:
            rows = Bench(plan, workdir.resolve(), stack, args.workers, args.skip_docker).run(args.only)
        except (BenchError, PeerError) as exc:
            print(f"tools/bench: {exc}", file=sys.stderr)
            return 1
    report(rows, plan, started, load, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
