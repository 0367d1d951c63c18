"""Side-by-side benchmark of the mirror against the Distribution registry 2.8 on loopback (issue 6).

    tools/bench [--quick] [--skip-docker] [--output bench-results.json] [--workers N] [--workdir DIR] [--only GROUPS]

One run starts an upstream Distribution registry holding test images it builds, then the mirror and the
Distribution registry side by side: hosted (the images pushed into each) and as pull-through caches of that
upstream. Every figure is measured for both, alternating which goes first round after round, and the median
of the rounds is reported with the ratio mirror / Distribution: for rates higher is better, for times, counts
and memory lower is better. Rates come from wrk over a fixed duration, times from curl fetching like a client;
both are C programs in their own processes, and the CPU they use is recorded to show they are not the limit.
Every server is stopped by its own pid, also when the run fails or is interrupted.

The ``s3`` group (issue 14) starts a single-node Ceph RGW and a redis-server of its own and compares the mirror
with ``storage.s3`` (coordinated through that Redis) against Distribution with its S3 driver on the same gateway,
each in a bucket of its own: cold pull-through, warm blob GETs as a client sees them end to end (curl follows
Distribution's redirect to the gateway), and the aggregate rate of 1, 2 and 3 mirror instances on one bucket.
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
import redis

from mirror.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST
from tests.images import Blob, Image, build_image, push
from tests.peers import CephRGW, DistributionRegistry, Dockerd, MirrorProcess, PeerError, RedisServer

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
    s3_gets: int = 8  # GETs of the big blob, one after the other, per warm S3 sample (2 GiB at 256 MiB)
    s3_clients: int = 6  # concurrent clients of the aggregate S3 rows, spread over the instances
    s3_client_gets: int = 2  # GETs of the big blob per client per aggregate sample


SETTLE_TIMEOUT, SETTLE_INTERVAL, IDLE_SHARE = 10.0, 0.2, 0.1  # idle: under 10% of a core for 0.2 s
GROUPS = ("cold", "fanout", "warm", "manifest", "memory", "docker", "bundle", "s3")  # of rows, for --only
QUICK = Plan(big_layer=4 * MiB, layer=256 * 1024, rounds=1, seconds=1, bundle=16 * MiB, docker_rounds=1,
             s3_gets=2, s3_clients=3, s3_client_gets=1)
S3_SCALE = (1, 2, 3)  # mirror instances on one bucket in the aggregate rows
SHARED_SECRET = "tools-bench-shared-secret"  # the `secret` every S3 instance of the bench shares


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
    """One measurement of one contender, with the CPU (in cores) the client, the contender and (for the S3 rows)
    the object storage used."""

    value: float
    client_cpu: float | None = None
    server_cpu: float | None = None
    store_cpu: float | None = None


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


@dataclass
class BucketContender(Contender):
    """A contender keeping its store in a bucket of ``rgw``: a cold restart deletes its bucket and points it at a
    new, empty one (``use_bucket`` rewrites its config); ``store`` is only its local scratch space."""

    rgw: CephRGW | None = None
    use_bucket: Callable[[str], None] = lambda bucket: None
    bucket: str = ""
    buckets: int = 0

    def restart(self, empty: bool) -> None:
        """Stop the server and start it again, on a new empty bucket if ``empty``."""
        assert self.rgw is not None
        self.server.stop()
        if empty:
            if self.bucket:
                drop_bucket(self.rgw, self.bucket)
            shutil.rmtree(self.store, ignore_errors=True)
            self.buckets += 1
            self.bucket = self.rgw.bucket(f"bench-{self.name}-{self.buckets}")
            self.use_bucket(self.bucket)
        self.server.start()


class StreamingDistribution(DistributionRegistry):
    """Distribution with its S3 driver told to send blob bytes itself (``storage.redirect.disable``) instead of
    redirecting clients to the object storage."""

    def config(self) -> dict[str, Any]:
        """The registry's config.yml, with redirects off."""
        config = super().config()
        config["storage"]["redirect"] = {"disable": True}
        return config


def drop_bucket(rgw: CephRGW, bucket: str) -> None:
    """Delete ``bucket`` with its objects and collect the gateway's garbage at once: the OSD keeps objects in
    memory, and the gateway would otherwise keep deleted ones (upload parts too) for two hours."""
    rgw.radosgw_admin("bucket", "rm", f"--bucket={bucket}", "--purge-objects", "--bypass-gc", check=False)
    rgw.radosgw_admin("gc", "process", "--include-all", check=False)


def s3_unavailable() -> str | None:
    """Why the S3 rows cannot run here (Ceph and Redis are missing, or not root), or None."""
    if os.geteuid() != 0:
        return "the Ceph daemons need root"
    for program in ("radosgw", "ceph-mon", "ceph-osd", "radosgw-admin", "monmaptool", "redis-server"):
        if not shutil.which(program, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])):
            return f"{program} is not installed (tools/test installs it)"
    return None


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


def observe(pid: int | Sequence[int], measure: Callable[[], float], store: Sequence[int] = ()) -> Sample:
    """Run ``measure``, recording the CPU its client commands, the server trees of ``pid`` (one or several) and
    the processes of the object storage (``store``, if any) used."""
    pids = [each for root in ([pid] if isinstance(pid, int) else pid) for each in process_tree(root)]
    stores = [each for root in store for each in process_tree(root)]
    client, server, storage = client_cpu_seconds(), cpu_seconds(pids), cpu_seconds(stores)
    start = time.perf_counter()
    value = measure()
    elapsed = time.perf_counter() - start
    return Sample(value, round((client_cpu_seconds() - client) / elapsed, 3),
                  round((cpu_seconds(pids) - server) / elapsed, 3),
                  round((cpu_seconds(stores) - storage) / elapsed, 3) if store else None)


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


def curl(fetches: Sequence[tuple[str, int]], parallel: int = 1, headers: Sequence[str] = (),
         follow: bool = False) -> int:
    """GET each ``(url, size)`` to /dev/null, ``parallel`` at a time; each must answer 200 with ``size`` bytes.

    With ``follow`` redirects are followed (as registry clients do) and the answer at the end counts; return how
    many of the GETs were redirected.
    """
    argv = ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", str(TIMEOUT),
            *(["--location"] if follow else []),
            "--write-out", "%{url} %{http_code} %{size_download} %{num_redirects}\\n",
            *(f"-H{header}" for header in headers)]
    if parallel > 1:
        argv += ["--parallel", "--parallel-immediate", "--parallel-max", str(parallel)]
    for url, _ in fetches:
        argv += ["--output", "/dev/null", url]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT + 60)
    answers = [line.rsplit(" ", 1) for line in result.stdout.splitlines()]
    expected = Counter(f"{url} 200 {size}" for url, size in fetches)
    if result.returncode != 0 or Counter(answer for answer, _ in answers) != expected:
        raise BenchError(f"curl expected {dict(expected)}, got {result.stdout.splitlines()}: {result.stderr}")
    return sum(1 for _, redirects in answers if redirects != "0")


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
        self.running: list[Any] = []  # every server started, for settle
        self.hosted: list[Contender] = []
        self.proxies: list[Contender] = []
        self.rgw: CephRGW | None = None  # the S3 rows' object storage and Redis, once started
        self.redis: RedisServer | None = None
        self.s3_proxies: list[BucketContender] = []

    def run(self, only: Sequence[str] = ()) -> list[Row]:
        """Every row in table order, or those of the ``only`` groups (see ``GROUPS``)."""
        chosen = [name for name in GROUPS if not only or name in only]
        self.start_servers(hosted=bool({"warm", "manifest"} & set(chosen)),
                           proxies=bool({"cold", "fanout", "warm", "manifest", "memory", "docker"} & set(chosen)))
        groups = {"cold": self.cold_rows, "fanout": self.fanout_rows, "warm": self.warm_blob_rows,
                  "manifest": self.manifest_rows, "memory": lambda: [self.serving_memory_row()],
                  "docker": self.docker_rows, "bundle": self.bundle_rows, "s3": self.s3_rows}
        return [row for name in chosen for row in groups[name]()]

    def start(self, server: Any) -> Any:
        """Start ``server``, making sure it is stopped when the run ends however it ends."""
        self.stack.callback(server.stop)
        self.running.append(server)
        return server.start()

    def idle_pids(self) -> list[int]:
        """The pids of every server running now (the Ceph cluster's daemons too), for ``settle``."""
        pids = []
        for server in self.running:
            for process in getattr(server, "daemons", (server,)):
                if process.running():
                    pids.append(process.pid)
        return pids

    def start_servers(self, hosted: bool = True, proxies: bool = True) -> None:
        """The upstream, then the hosted pair and the pull-through pair (those asked for), with the images
        pushed."""
        progress("starting the upstream and pushing the test images")
        self.upstream = self.start(DistributionRegistry(self.workdir / "upstream"))
        self.push(self.upstream.url, {"bench/big": self.big, "bench/multi": self.multi, "bench/small": self.small})
        if hosted:
            self.hosted = self.pair("hosted", {"upstreams": []}, None)
            for contender in self.hosted:
                self.push(contender.url, {"bench/big": self.big, "bench/small": self.small})
        if proxies:
            self.proxies = self.pair("proxy", self.proxy_config(), self.upstream.url)

    def proxy_config(self) -> dict[str, Any]:
        """The mirror's config as a pull-through cache of the upstream."""
        return {"upstreams": [{"name": "docker.io", "url": self.upstream.url, "manifest_ttl": 300}],
                "default_upstream": "docker.io"}

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
        settle(self.idle_pids())
        return observe(contender.server.pid, lambda: timed(lambda: action(contender)), self.store_pids())

    def store_pids(self) -> list[int]:
        """The object storage's daemons, once the S3 rows started them."""
        rgw = self.rgw
        return [daemon.pid for daemon in rgw.daemons if daemon.running()] if rgw is not None else []

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


    # the S3 rows (issue 14)

    def s3_rows(self) -> list[Row]:
        """The mirror on an S3 bucket against Distribution's S3 driver on the same Ceph RGW: cold pull-through,
        warm blob GETs end to end, and the aggregate rate of 1, 2 and 3 mirror instances sharing one bucket."""
        plan, big = self.plan, size_text(self.plan.big_layer)
        clients = plan.s3_clients
        cold = Row("s3_cold_blob", f"S3: cold pull-through, {big} blob", "s", "lower", Target("ratio", "<=", 1.0))
        # The targets compare like with like: both redirecting clients to the gateway, or both streaming the
        # bytes themselves. The mirror streaming against Distribution redirecting (an extra hop against none, on
        # a machine whose two cores Ceph already half fills) is shown without a target.
        warm = Row("s3_blob_1", f"S3: warm blob GET, 1 stream ({big} blob), mirror streaming vs Distribution "
                   "redirecting", "MiB/s", "higher", None)
        redirect = Row("s3_blob_redirect_1", "S3: warm blob GET, 1 stream, both redirecting (mirror redirect: true)",
                       "MiB/s", "higher", Target("ratio", ">=", 1.0))
        streamed = Row("s3_blob_streamed_1", "S3: warm blob GET, 1 stream, both streaming", "MiB/s", "higher",
                       Target("ratio", ">=", 1.0))
        scale = [Row(f"s3_scale_{count}", f"S3: warm blob GETs, {clients} clients, {count} instance"
                     + (" vs Distribution redirecting" if count == 1 else "s vs 1 (in the Distribution column)"),
                     "MiB/s", "higher", None) for count in S3_SCALE]
        rows = [cold, warm, redirect, streamed, *scale]
        if reason := s3_unavailable():
            for row in rows:
                row.note = f"not measured: {reason}"
            return rows
        progress("starting Ceph RGW and redis-server")
        self.rgw = self.start(CephRGW(self.workdir / "rgw"))
        self.redis = self.start(RedisServer(self.workdir / "redis"))
        self.s3_proxies = self.s3_pair()
        self.s3_cold_row(cold)
        self.s3_warm_rows(warm, redirect, streamed)
        self.s3_scale_rows(scale)
        return rows

    def s3_pair(self) -> list[BucketContender]:
        """The mirror (``storage.s3``, Redis) and Distribution (S3 driver, redirects on as by default), both
        pull-through caches of the upstream, each on a bucket of its own, started."""
        assert self.rgw is not None
        mirror_dir, registry_dir = self.workdir / "s3-mirror", self.workdir / "s3-distribution"
        mirror = MirrorProcess(mirror_dir)
        registry = DistributionRegistry(registry_dir, proxy_remote_url=self.upstream.url)
        self.running += [mirror, registry]
        self.stack.callback(mirror.stop)
        self.stack.callback(registry.stop)

        def mirror_bucket(bucket: str) -> None:
            redis.Redis.from_url(self.redis.url).flushall()  # no claims, marks or LRU index of the last bucket
            mirror.write_config(self.s3_mirror_config(bucket))

        def registry_bucket(bucket: str) -> None:
            registry.s3 = self.rgw.storage(bucket)

        pair = [BucketContender("mirror", mirror, mirror_dir / "store", self.rgw, mirror_bucket),
                BucketContender("distribution", registry, registry_dir / "data", self.rgw, registry_bucket)]
        for contender in pair:
            contender.restart(empty=True)
        return pair

    def s3_mirror_config(self, bucket: str, **s3: Any) -> dict[str, Any]:
        """The config of a mirror instance caching the upstream in ``bucket`` (with ``s3`` settings added)."""
        rgw = self.rgw
        settings = {"endpoint": rgw.endpoint, "bucket": bucket, "access_key": rgw.access_key,
                    "secret_key": rgw.secret_key, **s3}
        return {**self.proxy_config(), "storage": {"s3": settings}, "redis": self.redis.url,
                "secret": SHARED_SECRET, **self.mirror_options}

    def s3_cold_row(self, row: Row) -> None:
        """Cold pull-through of the big blob, both caches on new empty buckets every round."""
        progress(row.figure)
        pair = self.s3_proxies
        for contender in pair:  # a round not counted: the first one faults fresh memory in (on a VM, slowly)
            self.get_big_blob(contender)
        for round_number in range(self.plan.rounds):
            for contender in pair:
                contender.restart(empty=True)
            for contender in self.order(round_number, pair):
                row.add(contender.name, self.timing(contender, self.get_big_blob))
        row.note = ("each round on new empty buckets; both fetch from the upstream Distribution (filesystem), "
                    "Distribution's proxy sends the upstream's bytes as they come and stores the blob afterwards, "
                    "in the background (not timed); the mirror stores as it sends and releases the last byte once "
                    "the blob is verified")

    def stored_in_bucket(self, contender: Contender) -> None:
        """Wait until Distribution's proxy stored the big blob it fetched: its GETs are then redirected to the
        gateway."""
        deadline = time.monotonic() + 120
        while not curl([(self.blob_url(contender), self.layer.size)], follow=True):
            if time.monotonic() > deadline:
                raise BenchError(f"{contender.name} did not store the blob in its bucket within 120 s")
            time.sleep(1)

    def s3_rate(self, contenders: Sequence[Contender], gets: int, clients: int, redirects: Counter[str],
                name: str) -> Sample:
        """MiB/s of ``gets`` GETs of the big blob, ``clients`` at a time, spread over ``contenders`` in turn and
        following redirects, once every server is idle; counts the redirected GETs in ``redirects[name]``."""
        fetches = [(self.blob_url(contenders[index % len(contenders)]), self.layer.size) for index in range(gets)]
        settle(self.idle_pids())

        def measure() -> float:
            seconds = timed(lambda: redirects.update({name: curl(fetches, parallel=clients, follow=True)}))
            return gets * self.layer.size / MiB / seconds
        return observe([contender.server.pid for contender in contenders], measure, self.store_pids())

    def s3_warm_rows(self, warm: Row, redirect: Row, streamed: Row) -> None:
        """Warm blob GETs on one stream: the mirror streaming and with ``redirect``, against Distribution
        redirecting (its default), and the mirror against Distribution streaming the bytes itself."""
        mirror, registry = self.s3_proxies
        self.stored_in_bucket(registry)
        redirecting = MirrorProcess(self.workdir / "s3-mirror-redirect",
                                    self.s3_mirror_config(mirror.bucket, redirect=True))
        streaming = StreamingDistribution(self.workdir / "s3-distribution-streamed",
                                          proxy_remote_url=self.upstream.url, s3=self.rgw.storage(registry.bucket))
        extra = [Contender("mirror", self.start(redirecting), redirecting.workdir / "store"),
                 Contender("distribution", self.start(streaming), streaming.workdir / "data")]
        gets = self.plan.s3_gets
        for row, pair in ((warm, self.s3_proxies), (redirect, [extra[0], registry]), (streamed, [mirror, extra[1]])):
            redirects: Counter[str] = Counter()
            self.alternate(row, pair, lambda contender, redirects=redirects: self.s3_rate(
                [contender], gets, 1, redirects, contender.name))
            row.note = f"{gets} GETs per sample, each of the big blob; " + ", ".join(
                f"{name} redirected {redirects[name]} of {len(row.samples[name]) * gets} GETs" for name in
                ("mirror", "distribution")) + " to the gateway (curl follows: the time is the client's, end to end)"
        for contender in extra:
            contender.server.stop()

    def s3_scale_rows(self, rows: list[Row]) -> None:
        """The aggregate warm blob GET rate of 1, 2 and 3 mirror instances (streaming) on one bucket, the same
        clients spread over them; the 1-instance row against Distribution, the others against 1 instance."""
        mirror, registry = self.s3_proxies
        config = self.s3_mirror_config(mirror.bucket)
        instances = [mirror] + [Contender("mirror", self.start(MirrorProcess(self.workdir / f"s3-mirror-{number}",
                                                                              config)), Path())
                                for number in range(2, max(S3_SCALE) + 1)]
        plan = self.plan
        gets = plan.s3_clients * plan.s3_client_gets
        progress(f"aggregate warm blob GET of {', '.join(map(str, S3_SCALE))} instances on one bucket, "
                 f"{plan.s3_clients} clients")
        redirects: Counter[str] = Counter()
        contenders: list[tuple[str, list[Contender]]] = [
            *((str(count), instances[:count]) for count in S3_SCALE), ("distribution", [registry])]
        samples: dict[str, list[Sample]] = {name: [] for name, _ in contenders}
        for round_number in range(plan.rounds):
            for name, group in (contenders if round_number % 2 == 0 else contenders[::-1]):
                samples[name].append(self.s3_rate(group, gets, plan.s3_clients, redirects, name))
        for count, row in zip(S3_SCALE, rows, strict=True):
            row.samples["mirror"] = samples[str(count)]
            row.samples["distribution"] = samples["distribution" if count == 1 else "1"]
            used = {which: max((getattr(sample, which) or 0) for sample in samples[str(count)])
                    for which in ("server_cpu", "store_cpu", "client_cpu")}
            row.note = (f"{gets} GETs per sample spread over the instances ({redirects[str(count)]} redirected); "
                        f"at most {used['server_cpu']:.2f} cores in the mirror instance{'s' if count > 1 else ''}, "
                        f"{used['store_cpu']:.2f} in Ceph (radosgw, OSD, monitor), {used['client_cpu']:.2f} in "
                        f"curl, of {os.cpu_count()}")
            if count == 1:
                row.note += (f"; Distribution redirected {redirects['distribution']} of "
                             f"{gets * plan.rounds} GETs to the gateway")
        for instance in instances[1:]:
            instance.server.stop()


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
