"""Unbounded work (issue 12, item 5): referrers answers paged and built off the event loop, notification queues
bounded while their receiver is down, password checks on a bounded executor of their own with a cache of verified
credentials. Units first, then each shown against a real ``mirror serve``, ending with the store-consistency check.
"""
from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urljoin

import bcrypt
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror import auth, config, storage
from mirror.digest import Digest
from mirror.errors import ConfigError, TooManyRequests
from mirror.events import DROPPED, Events
from mirror.manifest import OCI_INDEX, OCI_MANIFEST
from mirror.registry import Registry
from mirror.repository import Referrers
from tests.consistency import assert_store_consistent
from tests.images import Blob, basic_authorization, build_image, canonical_json, push, push_blob, put_manifest
from tests.peers import MirrorProcess, free_port, require, wait_until
from tests.test_handlers import EMPTY_CONFIG, SBOM_TYPE, SIGNATURE_TYPE

MIB = 1 << 20
SUBJECT = build_image("unbounded-subject", oci=True)


def referrer(index: int, artifact_type: str, filler: int = 0) -> Blob:
    """An artifact manifest referring to SUBJECT, with an annotation of ``filler`` bytes."""
    payload = Blob(artifact_type, f"payload {index}".encode())
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                "config": EMPTY_CONFIG.descriptor(), "layers": [payload.descriptor()],
                "subject": SUBJECT.manifest.descriptor(),
                "annotations": {"org.example.index": str(index), "org.example.filler": "x" * filler}}
    return Blob(OCI_MANIFEST, canonical_json(manifest))


def descriptor(manifest: Blob) -> dict:
    """The referrers listing's descriptor of ``manifest``."""
    parsed = json.loads(manifest.data)
    return manifest.descriptor(artifactType=parsed["artifactType"], annotations=parsed["annotations"])


def vm_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory figure (VmRSS, VmHWM) in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:")))


def dropped_metric(mirror: MirrorProcess, endpoint: str) -> float:
    """``mirror_notification_events_dropped_total`` of ``endpoint`` from ``/metrics``."""
    families = text_string_to_metric_families(httpx.get(f"{mirror.url}/metrics").text)
    return sum(sample.value for family in families for sample in family.samples
               if sample.name == "mirror_notification_events_dropped_total" and sample.labels["endpoint"] == endpoint)


class Timer:
    """Times one small request again and again on a thread of its own, while the test does something else."""

    def __init__(self, url: str):
        self.url, self.latencies = url, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                client.get(self.url)
                self.latencies.append(time.monotonic() - started)
                time.sleep(0.01)

    def __enter__(self) -> Timer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


# referrers: units
def test_referrer_pages_are_bounded_by_count_and_bytes_and_read_lazily(tmp_path):
    store = storage.open(tmp_path)
    subject = Digest.parse(SUBJECT.digest)
    manifests = [referrer(index, SIGNATURE_TYPE if index % 2 else SBOM_TYPE, filler=100 * index) for index in range(7)]
    for manifest in manifests:
        store.metadata.add_referrer("team/app", subject, Digest.parse(manifest.digest), descriptor(manifest))
    ordered = sorted(manifests, key=lambda manifest: manifest.digest)
    reads = []
    stored = Referrers.stored(Registry(store), "team/app", subject)
    lazy = Referrers({digest: lambda entry=entry: reads.append(entry) or entry()
                      for digest, entry in stored.entries.items()})
    page = lazy.page(limit=3)
    assert [json.loads(d)["digest"] for d in page.descriptors] == [m.digest for m in ordered[:3]]
    assert page.next_last == ordered[2].digest and len(reads) == 4  # the page's and one to know there is more
    walked, last = [], None
    while True:
        page = lazy.page(last=last, budget=900)  # descriptors of 100 to 700 filler bytes: one or two a page
        assert page.descriptors and (len(page.descriptors) == 1 or sum(map(len, page.descriptors)) <= 900)
        walked += [json.loads(d)["digest"] for d in page.descriptors]
        if page.next_last is None:
            break
        last = page.next_last
    assert walked == [m.digest for m in ordered]
    signatures = lazy.page(SIGNATURE_TYPE, limit=2)
    assert [json.loads(d)["artifactType"] for d in signatures.descriptors] == [SIGNATURE_TYPE] * 2
    rest = lazy.page(SIGNATURE_TYPE, last=signatures.next_last)
    assert len(signatures.descriptors) + len(rest.descriptors) == 3 and rest.next_last is None
    index = json.loads(rest.index())
    assert index["mediaType"] == OCI_INDEX and index["schemaVersion"] == 2 and len(index["manifests"]) == 1
    assert json.loads(Referrers().page().index())["manifests"] == []


def test_merged_referrers_keep_the_first_descriptor_of_a_digest_and_skip_vanished_ones(tmp_path):
    store = storage.open(tmp_path)
    subject = Digest.parse(SUBJECT.digest)
    kept, gone = referrer(1, SIGNATURE_TYPE), referrer(2, SIGNATURE_TYPE)
    for manifest in (kept, gone):
        store.metadata.add_referrer("team/app", subject, Digest.parse(manifest.digest), descriptor(manifest))
    stored = Referrers.stored(Registry(store), "team/app", subject)
    store.metadata.remove_referrer("team/app", subject, Digest.parse(gone.digest))  # between listing and page
    upstream = referrer(3, SBOM_TYPE)
    listed = Referrers.listed([{**descriptor(kept), "annotations": {"from": "upstream"}}, descriptor(upstream)])
    merged = [json.loads(d) for d in (stored | listed).page().descriptors]
    assert {d["digest"] for d in merged} == {kept.digest, upstream.digest}
    assert next(d for d in merged if d["digest"] == kept.digest)["annotations"]["org.example.index"] == "1"


# referrers: a real server
def test_large_referrers_are_paged_in_bounded_memory_without_stalling_other_clients(tmp_path):
    kinds = (SIGNATURE_TYPE, SBOM_TYPE)
    manifests = [referrer(index, kinds[index % 2], filler=3 * MIB) for index in range(24)]
    with MirrorProcess(tmp_path / "mirror", {"upstreams": []}) as mirror, \
            httpx.Client(base_url=mirror.url, timeout=60) as client:
        push(mirror.url, "big/app", "v1", SUBJECT)
        for blob in {EMPTY_CONFIG, *(Blob(kind, f"payload {i}".encode()) for i, kind in enumerate(kinds * 12))}:
            push_blob(client, mirror.url, "big/app", blob)
        for manifest in manifests:
            put_manifest(client, mirror.url, "big/app", manifest.digest, manifest)
        before = vm_kib(mirror.pid, "VmRSS")
        Path(f"/proc/{mirror.pid}/clear_refs").write_text("5")  # VmHWM from here: the peak of what follows
        walks: dict[str, list[httpx.Response]] = {}

        def walk(artifact_type: str | None) -> None:
            with httpx.Client(base_url=mirror.url, timeout=60) as walker:
                url = f"/v2/big/app/referrers/{SUBJECT.digest}" + (f"?artifactType={artifact_type}" if artifact_type
                                                                    else "")
                pages = walks.setdefault(artifact_type or "all", [])
                while url:
                    pages.append(walker.get(url))
                    assert pages[-1].status_code == 200, pages[-1].text
                    link = pages[-1].headers.get("Link")
                    url = urljoin(url, link.split(";")[0].strip("<>")) if link else None

        with Timer(f"{mirror.url}/v2/") as timer:
            walkers = [threading.Thread(target=walk, args=(kind,)) for kind in (None, SIGNATURE_TYPE)]
            started = time.monotonic()
            for thread in walkers:
                thread.start()
            for thread in walkers:
                thread.join()
            seconds = time.monotonic() - started
        growth = (vm_kib(mirror.pid, "VmHWM") - before) / 1024
        print(f"\n{sum(map(len, walks.values()))} pages in {seconds:.2f}s; peak RSS growth {growth:.1f} MiB; "
              f"GET /v2/ during them: {len(timer.latencies)} requests, median "
              f"{statistics.median(timer.latencies) * 1000:.1f} ms, max {max(timer.latencies) * 1000:.1f} ms")
    for kind, expected in (("all", manifests), (SIGNATURE_TYPE, manifests[::2])):
        pages = walks[kind]
        assert all(len(page.content) <= 4 * MIB + 1024 for page in pages)
        assert all(page.headers["Content-Type"] == OCI_INDEX for page in pages)
        listed = [d["digest"] for page in pages for d in page.json()["manifests"]]
        assert sorted(listed) == sorted(m.digest for m in expected)  # each exactly once
        assert len(pages) == len(expected)  # 3 MiB descriptors: one a page
    assert all(page.headers["OCI-Filters-Applied"] == "artifactType" for page in walks[SIGNATURE_TYPE])
    assert growth < 64, f"RSS grew by {growth:.1f} MiB"
    assert statistics.median(timer.latencies) < 0.1 and max(timer.latencies) < 0.5, timer.latencies
    assert_store_consistent(mirror.workdir / "store")


# notification queues
def test_a_full_queue_drops_its_oldest_records(tmp_path):
    queues = storage.open(tmp_path).queues
    assert queues.capacity() > 0
    assert [queues.put("hook", {"n": n}, max_records=3) for n in range(5)] == [0, 0, 0, 1, 1]
    assert [record["n"] for _, record in queues.peek("hook", 10)] == [2, 3, 4]
    assert queues.put("hook", {"n": 5}, max_bytes=1) == 3  # bytes on disk: none fit, the newest is kept
    assert [record["n"] for _, record in queues.peek("hook", 10)] == [5]
    assert queues.put("other", {"n": 0}, max_records=1) == 0  # queues are bounded one by one


@pytest.mark.parametrize("value", [True, "1000", 0, -1, 1.5, 10**8])
def test_max_queued_must_be_a_whole_number_in_range(value):
    with pytest.raises(ConfigError, match=r"notifications\[0\]\.max_queued"):
        config._build({"notifications": [{"url": "https://ci.example/hook", "max_queued": value}]}, "test")


def test_max_queued_defaults_to_1000():
    loaded = config._build({"notifications": [{"url": "https://ci.example/hook"},
                                              {"url": "https://ci.example/b", "max_queued": 5}]}, "test")
    assert [endpoint.max_queued for endpoint in loaded.notifications] == [1000, 5]


def test_pull_events_for_a_receiver_that_is_down_stay_bounded_newest_kept(tmp_path):
    port = free_port()  # nothing listens there
    endpoint = {"url": f"http://127.0.0.1:{port}/events", "events": ["pull"]}
    with MirrorProcess(tmp_path / "mirror", {"upstreams": [], "notifications": [endpoint]}) as mirror:
        image = build_image("queued")
        push(mirror.url, "pulled/app", "v1", image)
        started = time.monotonic()
        with httpx.Client(base_url=mirror.url, timeout=30) as client:
            for number in range(1200):
                response = client.get("/v2/pulled/app/manifests/v1", headers={"User-Agent": f"puller-{number:04d}",
                                                                                "Accept": image.manifest.media_type})
                assert response.status_code == 200
        seconds = time.monotonic() - started
        files = sorted((mirror.workdir / "store" / "state" / "events").glob("*/*.json"))
        agents = sorted(json.loads(path.read_bytes())["request"]["useragent"] for path in files)
        dropped = dropped_metric(mirror, f"http://127.0.0.1:{port}")
        print(f"\n1200 pulls in {seconds:.1f}s; {len(files)} events queued, {dropped:.0f} dropped")
        assert "could not deliver" in mirror.log() and "dropping the oldest" in mirror.log()
    assert len(files) <= 1000 and dropped >= 200
    assert agents == [f"puller-{number:04d}" for number in range(1200 - len(files), 1200)]  # the newest
    assert_store_consistent(mirror.workdir / "store")


def test_events_dropped_are_counted_by_receiver_without_its_path_or_credentials(tmp_path):
    settings = config._build({"storage": {"root": str(tmp_path)}, "upstreams": [], "notifications": [
        {"url": "https://user:secret@hooks.example:8443/T0/B0/XYZ?token=1", "max_queued": 2}]}, "test")
    events = Events(settings, storage.open(tmp_path).queues)
    before = DROPPED["https://hooks.example:8443"]
    for _ in range(5):
        events.emit("pull", "team/app", "v1")
    assert DROPPED["https://hooks.example:8443"] - before == 3
    assert not any("secret" in key or "XYZ" in key for key in DROPPED)


# password checks: units
@pytest.fixture
def counted_bcrypt(monkeypatch):
    """bcrypt.checkpw as mirror.auth calls it, counting its calls."""
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(auth.bcrypt, "checkpw", lambda *args: calls.append(args) or real(*args))
    return calls


def users(cost: int = 4) -> auth.Htpasswd:
    """alice with password ``right``."""
    return auth.Htpasswd({"alice": bcrypt.hashpw(b"right", bcrypt.gensalt(cost))})


def test_a_right_password_costs_one_bcrypt_a_minute_and_wrong_ones_are_never_remembered(counted_bcrypt,
                                                                                        monkeypatch):
    htpasswd = users()
    assert all(htpasswd.check("alice", "right") for _ in range(50))
    assert len(counted_bcrypt) == 1
    assert not any(htpasswd.check("alice", "wrong") for _ in range(50))
    assert not htpasswd.check("alice", "Right") and not htpasswd.check("bob", "right")
    assert len(counted_bcrypt) == 53
    now = time.monotonic()
    monkeypatch.setattr(auth.time, "monotonic", lambda: now + auth.REMEMBER_SECONDS + 1)
    assert not htpasswd.remembered("alice", "right")
    assert htpasswd.check("alice", "right") and len(counted_bcrypt) == 54


def test_remembered_credentials_are_bounded_least_recent_forgotten(counted_bcrypt, monkeypatch):
    monkeypatch.setattr(auth, "REMEMBERED", 3)
    htpasswd = auth.Htpasswd({f"user{n}": bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) for n in range(5)})
    for n in range(5):
        assert htpasswd.check(f"user{n}", "pw")
    assert [htpasswd.remembered(f"user{n}", "pw") for n in range(5)] == [False, False, True, True, True]


def test_password_checks_run_on_their_own_threads_with_a_bounded_queue():
    checks = auth.PasswordChecks(users(), threads=1, waiting=1)
    release = threading.Event()
    threads: list[str] = []

    def slow() -> str:
        threads.append(threading.current_thread().name)
        release.wait(10)
        return "checked"

    async def scenario() -> None:
        wrong = basic_authorization("alice", "wrong")
        running = [asyncio.ensure_future(checks.run(wrong, slow)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(TooManyRequests):
            await checks.run(wrong, slow)  # one running, one waiting: refused at once
        assert await checks.run(None, lambda: "anonymous") == "anonymous"  # no password: no queue
        assert await checks.run("Bearer x", lambda: "token") == "token"
        release.set()
        assert await asyncio.gather(*running) == ["checked", "checked"]
        assert checks.pending == 0

    asyncio.run(scenario())
    assert threads and all(name.startswith("mirror-passwords") for name in threads)
    assert checks.users.check("alice", "right")
    assert asyncio.run(checks.run(basic_authorization("alice", "right"), threading.current_thread)) \
        is threading.main_thread()  # remembered: checked at once, on the event loop's thread


# password checks: a real server
GUESSERS = """
import collections, json, sys, threading, time
import httpx
url, seconds = sys.argv[1], float(sys.argv[2])
statuses, lock = collections.Counter(), threading.Lock()
def guess(number):
    with httpx.Client(timeout=30, auth=("alice", f"guess-{number}")) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = client.get(url).status_code
            with lock:
                statuses[status] += 1
threads = [threading.Thread(target=guess, args=(n,)) for n in range(40)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(statuses))
"""


def test_password_guessers_do_not_slow_readiness_nor_blob_transfers(tmp_path):
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"alice:{bcrypt.hashpw(b'right', bcrypt.gensalt(10)).decode()}\n")  # ~0.1 s a check
    settings = {"upstreams": [], "auth": {"htpasswd": str(htpasswd)}}
    with MirrorProcess(tmp_path / "mirror", settings) as mirror, \
            httpx.Client(base_url=mirror.url, timeout=30, auth=("alice", "right")) as alice:
        assert alice.get("/v2/").status_code == 200  # verified once, before the guessers come
        guessers = subprocess.Popen([sys.executable, "-c", GUESSERS, f"{mirror.url}/v2/", "6"],
                                    stdout=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: '"status": 429' in mirror.log(), 10, "a full password queue")
            ready, transfers = [], []
            for number in range(20):
                started = time.monotonic()
                assert httpx.get(f"{mirror.url}/readyz", timeout=30).status_code == 200
                ready.append(time.monotonic() - started)
                blob = Blob("application/octet-stream", f"blob {number}".encode() * 1000)
                started = time.monotonic()
                push_blob(alice, mirror.url, "team/app", blob)
                assert alice.get(f"/v2/team/app/blobs/{blob.digest}").content == blob.data
                transfers.append(time.monotonic() - started)
            assert guessers.poll() is None, "the guessers stopped before the measurements ended"
            statuses = json.loads(guessers.communicate(timeout=60)[0])
        finally:
            if guessers.poll() is None:
                guessers.kill()
                guessers.wait()
    print(f"\nguessers' answers {statuses}; /readyz median {statistics.median(ready) * 1000:.1f} ms, max "
          f"{max(ready) * 1000:.1f} ms; blob push+pull median {statistics.median(transfers) * 1000:.1f} ms, max "
          f"{max(transfers) * 1000:.1f} ms")
    assert statuses.get("401") and statuses.get("429") and set(statuses) <= {"401", "429"}
    assert statistics.median(ready) < 0.3 and statistics.median(transfers) < 0.5
    assert_store_consistent(mirror.workdir / "store")


def test_queued_events_never_take_more_than_a_tenth_of_a_small_disk_and_pushes_still_fit(tmp_path):
    mount = require("mount", root=True)
    store = tmp_path / "small-disk"
    store.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(store)], check=True)
    try:
        endpoint = {"url": f"http://127.0.0.1:{free_port()}/events", "events": ["pull"], "max_queued": 1000000}
        config = {"upstreams": [], "notifications": [endpoint], "storage": {"root": str(store)}}
        with MirrorProcess(tmp_path / "mirror", config) as mirror, \
                httpx.Client(base_url=mirror.url, timeout=30) as client:
            image = build_image("small-disk", layers=1, layer_size=16 * 1024)
            push(mirror.url, "pulled/app", "v1", image)
            for number in range(1500):  # about 1 KiB an event on disk: 1.5 MiB unbounded, over a tenth of 4 MiB
                response = client.get("/v2/pulled/app/manifests/v1", headers={"User-Agent": f"p-{number:04d}",
                                                                                "Accept": image.manifest.media_type})
                assert response.status_code == 200
            queued = sum(path.stat().st_blocks * 512 for path in (store / "state" / "events").glob("*/*.json"))
            assert 0 < queued <= 4 * 1024 * 1024 // 10
            later = build_image("pushed-after", layers=1, layer_size=512 * 1024)
            push(mirror.url, "pushed/after", "v1", later)  # no 507: the events left room
        assert_store_consistent(store)
    finally:
        subprocess.run(["umount", str(store)], check=True)
