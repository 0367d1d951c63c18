"""Scale-out: three ``mirror serve`` instances on one bucket of a real Ceph RGW, coordinated through a real
redis-server, behind no load balancer (the tests spread requests over the instances themselves).

Pushes spread over instances (and two writers of one session racing, at the level of the S3 writer too), one
upstream GET for many cold clients, an instance killed while it fetches, gc
while serving, Redis lost and back, a bundle imported through one instance's config, and dockerd pulling through
an instance that never saw the image.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from mirror.config import S3Storage
from mirror.digest import Digest
from mirror.errors import BlobUploadInvalid, StorageUnavailable
from mirror.storage.s3 import PART, Bucket, S3BlobStore, list_parts
from tests.images import Blob, build_image, push, push_blob
from tests.peers import DistributionRegistry, MirrorProcess, run
from tests.scripted import Answer, ScriptedUpstream, http
from tests.test_auth import write_htpasswd

MIB = 1 << 20
SECRET = "scale-out-test-shared-secret"

pytestmark = [pytest.mark.peer("radosgw"), pytest.mark.peer("redis-server")]


def sha(data: bytes) -> str:
    """The sha256 digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def s3_config(ceph_rgw, bucket: str, redis_url: str | None, **extra: Any) -> dict[str, Any]:
    """The config of one instance on ``bucket``, coordinated through ``redis_url`` (if any)."""
    storage = {"s3": {"endpoint": ceph_rgw.endpoint, "bucket": bucket, "access_key": ceph_rgw.access_key,
                      "secret_key": ceph_rgw.secret_key}, **extra.pop("storage", {})}
    coordination = {} if redis_url is None else {"redis": redis_url}
    return {"storage": storage, **coordination, "secret": SECRET, "upstreams": [], **extra}


class Cluster:
    """Three instances sharing one bucket and one Redis."""

    def __init__(self, workdir: Path, config: dict[str, Any], count: int = 3):
        self.instances = [MirrorProcess(workdir / f"instance-{index}", config) for index in range(count)]

    def start(self) -> Cluster:
        """Start every instance."""
        for instance in self.instances:
            instance.start()
        return self

    def stop(self) -> None:
        """Stop every instance still running."""
        for instance in self.instances:
            instance.stop()

    def __iter__(self) -> Iterator[MirrorProcess]:
        return iter(self.instances)

    def __getitem__(self, index: int) -> MirrorProcess:
        return self.instances[index]


@pytest.fixture
def bucket(ceph_rgw, request):
    """A new bucket for the test."""
    name = "t-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    return ceph_rgw.bucket(name)


@pytest.fixture
def cluster(tmp_path, ceph_rgw, bucket, redis_server):
    """Three hosted-only instances on one bucket."""
    group = Cluster(tmp_path, s3_config(ceph_rgw, bucket, redis_server.url, storage={"gc_grace": 0})).start()
    yield group
    group.stop()


def upload_in_chunks(instances: list[MirrorProcess], name: str, data: bytes, sizes: list[int]) -> httpx.Response:
    """POST on the first instance, PATCH each chunk of ``sizes`` on the next ones in turn, PUT the rest on the
    last; return the PUT's answer."""
    with httpx.Client(timeout=60) as client:
        opened = client.post(f"{instances[0].url}/v2/{name}/blobs/uploads/")
        assert opened.status_code == 202, opened.text
        location, offset = opened.headers["Location"], 0
        for turn, size in enumerate(sizes, 1):
            chunk = data[offset:offset + size]
            target = instances[turn % len(instances)]
            answer = client.patch(f"{target.url}{httpx.URL(location).raw_path.decode()}", content=chunk, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
            assert answer.status_code == 202, answer.text
            location, offset = answer.headers["Location"], offset + len(chunk)
            assert answer.headers["Range"] == f"0-{offset - 1}"
        last = instances[(len(sizes) + 1) % len(instances)]
        url = httpx.URL(f"{last.url}{httpx.URL(location).raw_path.decode()}").copy_add_param("digest", sha(data))
        return client.put(url, content=data[offset:], headers={"Content-Type": "application/octet-stream"})


def test_a_chunked_push_spread_over_three_instances_commits_and_every_instance_serves_it(cluster):
    instances = list(cluster)
    big = os.urandom(20 * MIB + 123)
    put = upload_in_chunks(instances, "team/app", big, [9 * MIB, 6 * MIB])  # parts S3 can copy as they are
    assert put.status_code == 201, put.text
    small = os.urandom(3 * MIB + 7)
    put = upload_in_chunks(instances, "team/app", small, [MIB, MIB, 100])  # small chunks: regrouped on commit
    assert put.status_code == 201, put.text
    image = build_image("scale-out-app", layers=2)
    push(cluster[1].url, "team/app", "1", image)
    with httpx.Client(timeout=60) as client:
        for instance in cluster:  # the tag pushed on one instance is served by every one at once
            manifest = client.get(f"{instance.url}/v2/team/app/manifests/1",
                                  headers={"Accept": image.manifest.media_type})
            assert manifest.status_code == 200 and manifest.content == image.manifest.data
            for blob in image.blobs:
                assert client.get(f"{instance.url}/v2/team/app/blobs/{blob.digest}").content == blob.data
            for data in (big, small):
                answer = client.get(f"{instance.url}/v2/team/app/blobs/{sha(data)}")
                assert answer.status_code == 200 and sha(answer.content) == sha(data)
            ranged = client.get(f"{instance.url}/v2/team/app/blobs/{sha(big)}", headers={"Range": "bytes=100-199"})
            assert ranged.status_code == 206 and ranged.content == big[100:200]
            assert client.get(f"{instance.url}/v2/team/app/tags/list").json()["tags"] == ["1"]


def test_two_writers_of_one_upload_on_two_instances_never_mix_their_bytes(cluster):
    with httpx.Client(timeout=60) as client:
        opened = client.post(f"{cluster[0].url}/v2/team/race/blobs/uploads/")
        path = httpx.URL(opened.headers["Location"]).raw_path.decode()
        first, second = os.urandom(9 * MIB), os.urandom(9 * MIB)

        def patch(instance: MirrorProcess, data: bytes) -> int:
            return client.patch(f"{instance.url}{path}", content=data, headers={
                "Content-Type": "application/octet-stream", "Content-Range": f"0-{len(data) - 1}"}).status_code

        with ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(patch, [cluster[1], cluster[2]], [first, second]))
        # the second writer is refused (400 while both write, 416 if it came after the first was done)
        assert sorted(statuses)[0] == 202 and sorted(statuses)[1] in (400, 416), statuses
        winner = first if statuses[0] == 202 else second
        status = client.get(f"{cluster[0].url}{path}")
        assert status.status_code == 204 and status.headers["Range"] == f"0-{len(winner) - 1}", status.text
        done = client.put(httpx.URL(f"{cluster[0].url}{path}").copy_add_param("digest", sha(winner)))
        assert done.status_code == 201, done.text
        assert client.get(f"{cluster[2].url}/v2/team/race/blobs/{sha(winner)}").content == winner


@pytest.fixture
def blob_store(tmp_path, ceph_rgw, bucket) -> S3BlobStore:
    """The S3 blob store in ``bucket``, as an instance has it (spooling on its scratch space)."""
    settings = S3Storage(ceph_rgw.endpoint, bucket, ceph_rgw.access_key, ceph_rgw.secret_key)
    return S3BlobStore(Bucket(settings), tmp_path / "spool", lambda: b"k" * 32)


def test_the_writer_that_lost_the_first_part_of_a_session_puts_no_other(blob_store):
    first, second = os.urandom(9 * MIB), os.urandom(9 * MIB)
    winner = blob_store.writer(repository="team/race")
    loser = blob_store.writer(winner.id)  # opened at the same offset: both will write from byte 0
    winner.write(first[:PART])
    winner.flush()
    loser.write(second)
    with pytest.raises(BlobUploadInvalid):
        loser.flush()
    assert list_parts(blob_store.bucket, winner.id) == [(0, PART)]  # nothing of the loser's landed after it
    winner.write(first[PART:])
    assert winner.commit(Digest.of(first)) == Digest.of(first)
    assert blob_store.read(Digest.of(first)) == first


def test_a_fetch_nobody_followed_goes_up_in_parts_of_8_mib_when_flushed(blob_store):
    data = os.urandom(20 * MIB)
    writer = blob_store.writer()
    writer.eager = False
    for start in range(0, len(data), MIB):
        writer.write(data[start:start + MIB])
    assert list_parts(blob_store.bucket, writer.id) == []
    writer.flush()
    assert list_parts(blob_store.bucket, writer.id) == [(0, PART), (PART, PART), (2 * PART, 4 * MIB)]
    assert writer.commit(Digest.of(data)) == Digest.of(data)
    assert blob_store.read(Digest.of(data)) == data


def test_an_upload_the_object_storage_refuses_is_storage_unavailable(tmp_path, ceph_rgw):
    settings = S3Storage(ceph_rgw.endpoint, "no-such-bucket-here", ceph_rgw.access_key, ceph_rgw.secret_key)
    blobs = S3BlobStore(Bucket(settings), tmp_path / "spool", lambda: b"k" * 32)
    verified = tmp_path / "verified"
    verified.write_bytes(b"imported blob")
    with pytest.raises(StorageUnavailable, match="refused the upload"):
        blobs.adopt(verified, Digest.of(b"imported blob"))


@pytest.fixture
def upstream(tmp_path):
    """A Distribution registry as the upstream of the instances."""
    with DistributionRegistry(tmp_path / "upstream") as registry:
        yield registry


def caching_cluster(tmp_path: Path, ceph_rgw, bucket: str, redis_url: str, upstream_url: str) -> Cluster:
    """Three instances mirroring ``upstream_url`` as ghcr.io, started."""
    config = s3_config(ceph_rgw, bucket, redis_url, upstreams=[{"name": "ghcr.io", "url": upstream_url}],
                       storage={"gc_grace": 0})
    return Cluster(tmp_path, config).start()


def fetch_all(urls: list[str]) -> list[str]:
    """GET every URL at once; return the digest of each body."""
    def get(url: str) -> str:
        with httpx.Client(timeout=120) as client, client.stream("GET", url) as answer:
            assert answer.status_code == 200, answer.read()[:300]
            hasher = hashlib.sha256()
            for chunk in answer.iter_bytes():
                hasher.update(chunk)
            return "sha256:" + hasher.hexdigest()

    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(get, urls))


def test_twelve_cold_clients_over_three_instances_cost_one_upstream_get(tmp_path, ceph_rgw, bucket,
                                                                        redis_server, upstream):
    blob = os.urandom(48 * MIB)
    with httpx.Client(timeout=120) as client:
        push_blob(client, upstream.url, "org/big", type("B", (), {"digest": sha(blob), "data": blob})())
    group = caching_cluster(tmp_path, ceph_rgw, bucket, redis_server.url, upstream.url)
    try:
        urls = [f"{group[index % 3].url}/v2/ghcr.io/org/big/blobs/{sha(blob)}" for index in range(12)]
        try:
            assert fetch_all(urls) == [sha(blob)] * 12
        except Exception:
            for instance in group:
                print(instance.log_tail(30))
            raise
        assert upstream.count_requests("GET", f"/blobs/{sha(blob)}") == 1
    finally:
        group.stop()


def test_killing_the_instance_that_fetches_midway_still_gives_every_other_client_correct_bytes(
        tmp_path, ceph_rgw, bucket, redis_server):
    blob = os.urandom(48 * MIB)
    digest, gets = sha(blob), []

    def script(method: str, path: str, headers: dict[str, str]) -> Answer:
        if path.endswith("/v2/"):
            return Answer(http(200, b"{}"))
        if method == "HEAD":
            return Answer(http(200, headers={"Docker-Content-Digest": digest}, length=len(blob)))
        gets.append(path)
        head = http(200, headers={"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"},
                    length=len(blob))
        return Answer(head + blob[:9 * MIB], blob[9 * MIB:], rate=12 * MIB)  # about 3.3 s for the whole blob

    fake = ScriptedUpstream(script)
    group = caching_cluster(tmp_path, ceph_rgw, bucket, redis_server.url, fake.url)
    try:
        first = threading.Thread(target=lambda: _swallow(fetch_all, [
            f"{group[0].url}/v2/ghcr.io/org/big/blobs/{digest}"]))
        first.start()
        keys = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 20
        while not keys.exists(f"mirror:claim:fetch:{digest}") and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # instance 0 has parts in the bucket now
        urls = [f"{group[1 + index % 2].url}/v2/ghcr.io/org/big/blobs/{digest}" for index in range(8)]
        with ThreadPoolExecutor(1) as pool:
            followers = pool.submit(fetch_all, urls)
            time.sleep(0.5)
            group[0].send_signal(signal.SIGKILL)
            assert followers.result(timeout=120) == [digest] * 8
        first.join(timeout=30)
        assert len(gets) == 2  # the killed instance's fetch, and one more by the instance that took over
    finally:
        group.stop()
        fake.close()


def _swallow(work, *arguments) -> None:
    """Run ``work``; its client is cut when its instance is killed, which is expected."""
    with contextlib.suppress(httpx.HTTPError, AssertionError):
        work(*arguments)


def test_gc_while_instances_serve_keeps_every_referenced_blob_and_warm_pulls_survive_losing_redis(
        cluster, redis_server):
    image, garbage = build_image("gc-kept", layers=3), os.urandom(MIB)
    push(cluster[0].url, "team/kept", "1", image)
    put = upload_in_chunks([cluster[1]], "team/loose", garbage, [])
    assert put.status_code == 201
    failures: list[str] = []
    stop = threading.Event()

    def pull_warm(instance: MirrorProcess) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    manifest = client.get(f"{instance.url}/v2/team/kept/manifests/1",
                                          headers={"Accept": image.manifest.media_type})
                    if manifest.content != image.manifest.data:
                        failures.append(f"{instance.url} manifest {manifest.status_code}")
                    for blob in image.blobs:
                        answer = client.get(f"{instance.url}/v2/team/kept/blobs/{blob.digest}")
                        if answer.status_code != 200 or answer.content != blob.data:
                            failures.append(f"{instance.url} {blob.digest} {answer.status_code}")
                except httpx.HTTPError as exc:
                    failures.append(f"{instance.url} {exc!r}")

    pullers = [threading.Thread(target=pull_warm, args=(instance,)) for instance in cluster]
    for thread in pullers:
        thread.start()
    try:
        collected = cluster[2].run_cli("gc")
        assert collected.returncode == 0, collected.stderr
        redis_server.stop()
        time.sleep(2)
        redis_server.start()
        time.sleep(2)
    finally:
        stop.set()
        for thread in pullers:
            thread.join(timeout=60)
    assert not failures, failures[:10]
    with httpx.Client(timeout=30) as client:
        for blob in image.blobs:
            assert client.get(f"{cluster[1].url}/v2/team/kept/blobs/{blob.digest}").content == blob.data
        unreferenced = client.head(f"{cluster[0].url}/v2/team/loose/blobs/{sha(garbage)}")
        assert unreferenced.status_code == 404  # gc took the blob no manifest references


def test_a_bundle_imported_through_one_instance_config_is_served_by_all_and_dockerd_pulls_through_a_new_one(
        tmp_path, ceph_rgw, bucket, redis_server, upstream, dockerd):
    image = build_image("bundled-app", layers=2)
    push(upstream.url, "org/app", "1", image)
    source = MirrorProcess(tmp_path / "source", {"upstreams": [{"name": "ghcr.io", "url": upstream.url}]})
    bundle, key = tmp_path / "app.tar", tmp_path / "sign.key"
    assert run([sys.executable, "-m", "mirror", "bundle", "keygen", str(key)]).returncode == 0
    run([sys.executable, "-m", "mirror", "bundle", "export", "--config", str(source.config_path),
                    "--sign-key", str(key), "--output", str(bundle), "ghcr.io/org/app:1"])
    group = Cluster(tmp_path / "cluster", s3_config(ceph_rgw, bucket, redis_server.url)).start()
    try:
        imported = run([sys.executable, "-m", "mirror", "bundle", "import", "--config", str(group[0].config_path),
                        "--trust", f"{key}.pub", str(bundle)])
        assert imported.returncode == 0, imported.stderr
        with httpx.Client(timeout=60) as client:
            for instance in group:
                answer = client.get(f"{instance.url}/v2/ghcr.io/org/app/manifests/1",
                                    headers={"Accept": image.manifest.media_type})
                assert answer.status_code == 200 and answer.content == image.manifest.data
        fresh = group[2]
        dockerd.configure({"insecure-registries": [fresh.host]})
        dockerd.docker("pull", f"{fresh.host}/ghcr.io/org/app:1")
        inspected = dockerd.docker("image", "inspect", "--format", "{{.Id}}", f"{fresh.host}/ghcr.io/org/app:1")
        assert inspected.stdout.strip() == image.config.digest
    finally:
        group.stop()


class Cuttable:
    """A TCP forwarder to the gateway that a test can cut (every connection dropped, new ones refused) and
    restore: object storage that goes away and comes back; or hang (connections kept, no byte passed on) and
    resume: object storage that stops answering."""

    def __init__(self, target: str):
        host, port = httpx.URL(target).host, httpx.URL(target).port
        self.target = (host, port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self.restore()

    @property
    def endpoint(self) -> str:
        """The URL to use instead of the gateway's."""
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        """Listen (on the same port as before) and forward."""
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def hang(self) -> None:
        """Keep every connection, and take new ones, but pass no more bytes on."""
        self._flowing.clear()

    def resume(self) -> None:
        """Pass bytes on again, those held back first."""
        self._flowing.set()

    def cut(self) -> None:
        """Drop every connection and stop listening."""
        for sock in [self._listener, *self._connections]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
                self._connections += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                self._flowing.wait()
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_object_storage_going_away_gives_503_and_loses_nothing(tmp_path, ceph_rgw, bucket):
    forwarder = Cuttable(ceph_rgw.endpoint)
    config = s3_config(ceph_rgw, bucket, None)
    config["storage"]["s3"]["endpoint"] = forwarder.endpoint
    image = build_image("s3-fault", layers=1)
    with MirrorProcess(tmp_path / "mirror", config) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        push(server.url, "team/app", "1", image)
        forwarder.cut()
        answers = [client.get("/v2/team/app/manifests/1", headers={"Accept": image.manifest.media_type}),
                   client.head(f"/v2/team/app/blobs/{image.layers[0].digest}"),
                   client.get(f"/v2/team/app/blobs/{image.layers[0].digest}"),
                   client.post("/v2/team/app/blobs/uploads/"),
                   client.get("/v2/team/app/tags/list"),
                   client.get("/readyz")]
        assert [answer.status_code for answer in answers] == [503] * 6, [a.text[:200] for a in answers]
        for answer in answers[:1] + answers[2:5]:
            assert answer.json()["errors"][0]["code"] == "UNAVAILABLE", answer.text
        assert "Traceback" not in server.log()
        forwarder.restore()
        manifest = client.get("/v2/team/app/manifests/1", headers={"Accept": image.manifest.media_type})
        assert manifest.content == image.manifest.data
        push(server.url, "team/app", "2", build_image("s3-fault-after", layers=1))
        assert client.get("/v2/team/app/tags/list").json()["tags"] == ["1", "2"]
    forwarder.cut()


def test_object_storage_that_stops_answering_costs_one_wait_not_one_per_request(tmp_path, ceph_rgw, bucket):
    forwarder = Cuttable(ceph_rgw.endpoint)
    config = s3_config(ceph_rgw, bucket, None, workers=1)
    config["storage"]["s3"].update(endpoint=forwarder.endpoint, timeout=2)
    image = build_image("s3-hang", layers=1)
    manifest_headers = {"Accept": image.manifest.media_type}
    with MirrorProcess(tmp_path / "mirror", config) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        push(server.url, "team/app", "1", image)
        forwarder.hang()
        first = client.get("/v2/team/app/manifests/1", headers=manifest_headers)
        assert first.status_code == 503 and "did not answer" in first.json()["errors"][0]["message"], first.text
        started = time.monotonic()
        answers = [client.get("/v2/team/app/manifests/1", headers=manifest_headers),
                   client.head(f"/v2/team/app/blobs/{image.layers[0].digest}"),
                   client.get(f"/v2/team/app/blobs/{image.layers[0].digest}"),
                   client.get("/v2/team/app/tags/list"),
                   client.get("/readyz")]
        # five requests that would each wait 2 s twice (timeout, one retry) if the instance waited every time
        assert time.monotonic() - started < 4
        assert [answer.status_code for answer in answers] == [503] * 5, [a.text[:200] for a in answers]
        for answer in (answers[0], answers[2], answers[3]):
            assert "is not answering" in answer.json()["errors"][0]["message"], answer.text
        forwarder.resume()
        deadline = time.monotonic() + 30
        while (manifest := client.get("/v2/team/app/manifests/1", headers=manifest_headers)).status_code != 200:
            assert time.monotonic() < deadline, manifest.text
            time.sleep(0.5)
        assert manifest.content == image.manifest.data
        push(server.url, "team/app", "2", build_image("s3-hang-after", layers=1))
        assert client.get("/v2/team/app/tags/list").json()["tags"] == ["1", "2"]
        assert "Traceback" not in server.log() and "answers again" in server.log()
    forwarder.cut()


def test_object_storage_that_stalls_in_the_middle_of_a_blob_counts_as_not_answering(tmp_path, ceph_rgw, bucket):
    forwarder = Cuttable(ceph_rgw.endpoint)
    config = s3_config(ceph_rgw, bucket, None, workers=1)
    config["storage"]["s3"].update(endpoint=forwarder.endpoint, timeout=2)
    blob = Blob("application/octet-stream", os.urandom(48 * MIB))
    path = f"/v2/team/app/blobs/{blob.digest}"
    with MirrorProcess(tmp_path / "mirror", config) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        push_blob(client, server.url, "team/app", blob)
        with client.stream("GET", path) as response:  # the gateway answered; then it stops sending the body
            chunks = response.iter_bytes(MIB)
            assert len(next(chunks)) == MIB
            forwarder.hang()
            with pytest.raises(httpx.HTTPError):  # cut short: never taken for the whole blob
                for _ in chunks:
                    pass
        started = time.monotonic()
        head = client.head(path)
        assert head.status_code == 503 and time.monotonic() - started < 2  # not another 2 s timeout, twice
        forwarder.resume()
        deadline = time.monotonic() + 30
        while (pulled := client.get(path)).status_code != 200:
            assert time.monotonic() < deadline, pulled.text
            time.sleep(0.5)
        assert pulled.content == blob.data
        assert "Traceback" not in server.log()
    forwarder.cut()


def test_gc_aborts_the_blob_assembly_a_commit_that_died_halfway_left(tmp_path, ceph_rgw, bucket):
    s3 = ceph_rgw.client()
    image = build_image("s3-assembly", layers=1)
    server = MirrorProcess(tmp_path / "mirror", s3_config(ceph_rgw, bucket, None, storage={"upload_expiry": "1s"}))
    with server:
        push(server.url, "team/app", "1", image)
    # what an instance killed between starting and completing a blob's multipart assembly leaves in the bucket
    key = f"blobs/sha256/ab/{'ab' * 32}"
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * (5 << 20))
    time.sleep(2)  # older than upload_expiry
    dry = server.run_cli("gc", "--dry-run", check=True)
    assert f"would remove expired upload assembly of {key} (5242880 bytes)" in dry.stdout, dry.stdout
    assert [upload["Key"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", ())] == [key]
    swept = server.run_cli("gc", check=True)
    assert f"removed expired upload assembly of {key} (5242880 bytes)" in swept.stdout, swept.stdout
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        pulled = client.get(f"/v2/team/app/blobs/{image.layers[0].digest}")
        assert pulled.status_code == 200 and pulled.content == image.layers[0].data


def test_redirect_answers_blob_gets_with_a_presigned_url_of_the_gateway(tmp_path, ceph_rgw, bucket):
    config = s3_config(ceph_rgw, bucket, None)
    config["storage"]["s3"]["redirect"] = True
    image = build_image("s3-redirect", layers=1)
    layer = image.layers[0]
    with MirrorProcess(tmp_path / "mirror", config) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        push(server.url, "team/app", "1", image)
        answer = client.get(f"/v2/team/app/blobs/{layer.digest}")
        assert answer.status_code == 307 and answer.headers["Location"].startswith(ceph_rgw.endpoint)
        assert httpx.get(answer.headers["Location"], timeout=30).content == layer.data
        followed = client.get(f"/v2/team/app/blobs/{layer.digest}", follow_redirects=True,
                              headers={"Range": "bytes=1-10"})
        assert followed.status_code == 206 and followed.content == layer.data[1:11]
        head = client.head(f"/v2/team/app/blobs/{layer.digest}")
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == layer.size
        assert client.get(f"/v2/other/app/blobs/{layer.digest}").status_code == 404  # still only where linked


def committed(s3, bucket: str, digest: str) -> None:
    """Wait until blob ``digest`` is in the bucket (a pull-through client has every byte before the commit)."""
    key = f"blobs/sha256/{digest[7:9]}/{digest[7:]}"
    deadline = time.monotonic() + 30
    while not s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount") and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_for_redis(client: httpx.Client, group: Cluster) -> None:
    """Wait until every instance says Redis answers (one that saw it go away looks for it every second)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all("mirror_redis_up 1.0" in client.get(f"{instance.url}/metrics").text for instance in group):
            return
        time.sleep(0.1)
    raise AssertionError("an instance did not see Redis come back")


def test_the_cache_bound_holds_across_instances_and_after_redis_lost_its_index(tmp_path, ceph_rgw, bucket,
                                                                               redis_server, upstream):
    blobs = [os.urandom(4 * MIB) for _ in range(6)]
    with httpx.Client(timeout=120) as client:
        for data in blobs:
            push_blob(client, upstream.url, "org/lru", type("B", (), {"digest": sha(data), "data": data})())
    config = s3_config(ceph_rgw, bucket, redis_server.url, upstreams=[{"name": "ghcr.io", "url": upstream.url}],
                       storage={"max_cache_size": "14MiB"})
    group = Cluster(tmp_path, config, count=2).start()
    s3 = ceph_rgw.client()

    def stored() -> int:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix="blobs/").get("Contents", [])
        return sum(item["Size"] for item in listed)

    try:
        with httpx.Client(timeout=120) as client:
            for index, data in enumerate(blobs):
                if index == 3:
                    redis_server.restart()  # no persistence: the shared index is gone
                    wait_for_redis(client, group)
                answer = client.get(f"{group[index % 2].url}/v2/ghcr.io/org/lru/blobs/{sha(data)}")
                assert answer.status_code == 200 and answer.content == data
                committed(s3, bucket, sha(data))
                assert stored() <= 14 * MIB, f"after blob {index}: {stored()} bytes stored\n" + "\n".join(
                    instance.log_tail(20) for instance in group)
        assert stored() >= 12 * MIB  # the bound is used, not emptied
    finally:
        group.stop()


def test_a_token_issued_by_one_instance_is_honoured_by_every_other(tmp_path, ceph_rgw, bucket, redis_server):
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "alice-secret"})
    config = s3_config(ceph_rgw, bucket, redis_server.url, auth={"htpasswd": str(htpasswd)})
    group = Cluster(tmp_path, config).start()
    try:
        with httpx.Client(timeout=30) as client:
            issued = client.get(f"{group[0].url}/token", params={"scope": "repository:team/app:pull,push"},
                                auth=("alice", "alice-secret"))
            assert issued.status_code == 200, issued.text
            bearer = {"Authorization": f"Bearer {issued.json()['token']}"}
            for instance in group:
                assert client.get(f"{instance.url}/v2/", headers=bearer).status_code == 200
                opened = client.post(f"{instance.url}/v2/team/app/blobs/uploads/", headers=bearer)
                assert opened.status_code == 202, opened.text
                assert client.get(f"{instance.url}/v2/").status_code == 401
    finally:
        group.stop()


def test_inventory_export_and_prefetch_work_with_the_instances_config(tmp_path, ceph_rgw, bucket, redis_server,
                                                                      upstream):
    cached, hosted = build_image("prefetched", layers=1), build_image("hosted-export", layers=1)
    push(upstream.url, "org/cached", "1", cached)
    config = s3_config(ceph_rgw, bucket, redis_server.url, upstreams=[{"name": "ghcr.io", "url": upstream.url}])
    group = Cluster(tmp_path, config, count=2).start()
    try:
        prefetched = group[0].run_cli("prefetch", "ghcr.io/org/cached:1")
        assert prefetched.returncode == 0, prefetched.stderr
        push(group[1].url, "team/app", "1", hosted)
        inventory = tmp_path / "inventory.json"
        listed = group[1].run_cli("inventory", "--output", str(inventory))
        assert listed.returncode == 0, listed.stderr
        digests = {blob.digest for blob in (*cached.blobs, *hosted.blobs)}
        assert digests <= set(json.loads(inventory.read_text())["blobs"])
        bundle = tmp_path / "hosted.tar"
        exported = run([sys.executable, "-m", "mirror", "bundle", "export", "--config", str(group[0].config_path),
                        "--output", str(bundle), "team/app:1"], check=False)
        assert exported.returncode == 0, exported.stderr
        with tarfile.open(bundle) as tar:
            names = "\n".join(tar.getnames())
        assert all(blob.digest.split(":")[1] in names for blob in hosted.blobs)
        with httpx.Client(timeout=30) as client:
            manifest = client.get(f"{group[1].url}/v2/ghcr.io/org/cached/manifests/1",
                                  headers={"Accept": cached.manifest.media_type})
            assert manifest.status_code == 200 and manifest.content == cached.manifest.data
    finally:
        group.stop()
