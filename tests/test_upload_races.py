"""Issue 12, against a real ``mirror serve``: one request at a time writes an upload session, so no pusher can
change the bytes of a blob another request is committing (or that is committed: a committed blob is never
written again); every route bounds its body before auth, so nobody can make the server buffer one; absurd
``Range`` numbers and upload paths without a session are clear 4xx. Every test ends with the store-consistency
check."""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import random
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mirror import storage
from tests.consistency import assert_store_consistent
from tests.images import basic_authorization, sha256
from tests.peers import MirrorProcess, require, wait_until

LAYER = random.Random(12).randbytes(1 << 20)
EXTRA = b"appended after the commit"
HUGE = 300 << 20  # bytes of a body nobody may make the server hold
SEND_CHUNK = 1 << 20
MAX_RSS_GROWTH = 64 << 20
ALICE = {"Authorization": basic_authorization("alice", "alice-secret")}


class Connection:
    """A raw HTTP/1.1 connection, to send a request's body in pieces and on a schedule of the test's own."""

    def __init__(self, mirror: MirrorProcess):
        self.sock = socket.create_connection(("127.0.0.1", mirror.port), timeout=30)
        self.chunked = False

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def start(self, method: str, target: str, length: int | None, headers: dict[str, str] | None = None) -> None:
        """Send the request head: a body of ``length`` bytes, or a chunked one when ``length`` is None."""
        self.chunked = length is None
        framing = "Transfer-Encoding: chunked" if self.chunked else f"Content-Length: {length}"
        fields = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: mirror\r\n{framing}\r\n{fields}\r\n".encode())

    def send(self, data: bytes) -> None:
        """Send the next piece of the body."""
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def answered(self) -> bool:
        """Whether the server has answered (or closed the connection) already."""
        return bool(select.select([self.sock], [], [], 0)[0])

    def response(self) -> tuple[int, http.client.HTTPMessage, bytes]:
        """Read the answer: its status, headers and body."""
        answer = http.client.HTTPResponse(self.sock)
        answer.begin()
        return answer.status, answer.headers, answer.read()


def error_code(status: int, body: bytes) -> tuple[int, str, str]:
    """The status with the first spec error's code and message of a JSON error document."""
    first = json.loads(body)["errors"][0]
    return status, first["code"], first["message"]


def store_root(mirror: MirrorProcess) -> Path:
    """Where ``mirror`` keeps its store."""
    return mirror.workdir / "store"


def uploaded(client: httpx.Client, location: str) -> int:
    """How many bytes the upload session at ``location`` holds (its GET's ``Range`` header, ``0-<last>``)."""
    response = client.get(location)
    assert response.status_code == 204, response.text
    return int(response.headers["Range"].split("-")[1]) + 1


def open_upload(client: httpx.Client, name: str, data: bytes = b"") -> str:
    """Open an upload session in ``name`` holding ``data``; return its location."""
    response = client.post(f"/v2/{name}/blobs/uploads/")
    assert response.status_code == 202, response.text
    location = response.headers["Location"]
    if data:
        response = client.patch(location, content=data, headers={"Content-Range": f"0-{len(data) - 1}"})
        assert response.status_code == 202, response.text
    return location


@pytest.fixture(scope="module", params=[1, 2], ids=["one-worker", "two-workers"])
def mirror(request, tmp_path_factory):
    """A hosted mirror with one serving process, or two sharing the port (and the store)."""
    workdir = tmp_path_factory.mktemp("races")
    with MirrorProcess(workdir, {"upstreams": [], "workers": request.param}) as server:
        yield server


@pytest.fixture
def client(mirror):
    """An HTTP client of ``mirror``."""
    with httpx.Client(base_url=mirror.url, timeout=30) as http:
        yield http


# one writer per upload session
def test_a_put_while_a_patch_writes_the_session_is_refused_and_the_shared_blob_stays_intact(mirror, client):
    digest = sha256(LAYER)
    assert client.post("/v2/victim/app/blobs/uploads/", params={"digest": digest}, content=LAYER).status_code == 201
    location = open_upload(client, "attacker/app")
    with Connection(mirror) as patching:
        patching.start("PATCH", location, len(LAYER) + len(EXTRA))
        patching.send(LAYER)
        wait_until(lambda: uploaded(client, location) == len(LAYER), 10, "the victim's bytes to land")
        for _ in range(4):  # fresh connections: with two workers, the kernel hands some to the other process
            with httpx.Client(base_url=mirror.url, timeout=30) as other:
                hijack = other.put(location, params={"digest": digest})
            status, code, message = error_code(hijack.status_code, hijack.content)
            assert (status, code) == (400, "BLOB_UPLOAD_INVALID")
            assert "another request is writing" in message
        patching.send(EXTRA)
        status, headers, _ = patching.response()
    assert status == 202 and headers["Range"] == f"0-{len(LAYER) + len(EXTRA) - 1}"
    served = client.get(f"/v2/victim/app/blobs/{digest}")
    assert served.status_code == 200 and sha256(served.content) == digest
    assert client.put(location, params={"digest": sha256(LAYER + EXTRA)}).status_code == 201
    assert_store_consistent(store_root(mirror))


def test_racing_puts_of_one_complete_upload_commit_it_once(mirror, client):
    data = LAYER[:5000]
    location = open_upload(client, "race/app", data[:-1])
    target = f"{location}?digest={sha256(data)}"
    with Connection(mirror) as first, Connection(mirror) as second:
        for connection in (first, second):
            connection.start("PUT", target, 1)
        time.sleep(0.5)  # both requests are prepared: one holds the session, the other was refused
        for connection in (first, second):
            connection.send(data[-1:])
        answers = sorted([first.response(), second.response()], key=lambda answer: answer[0])
    assert [status for status, _, _ in answers] == [201, 400]
    assert error_code(answers[1][0], answers[1][2])[1] == "BLOB_UPLOAD_INVALID"
    # without a body the PUTs are over in a moment: one commits, the other finds the session taken or gone
    whole = LAYER[5000:9000]
    target = f"{open_upload(client, 'race/app', whole)}?digest={sha256(whole)}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(lambda _: httpx.put(f"{mirror.url}{target}", timeout=30).status_code, range(2)))
    assert statuses[0] == 201 and statuses[1] in (400, 404)
    for blob in (data, whole):
        assert client.get(f"/v2/race/app/blobs/{sha256(blob)}").content == blob
    assert_store_consistent(store_root(mirror))


def test_another_process_holding_the_session_keeps_every_request_out(mirror, client):
    data = LAYER[:3000]
    location = open_upload(client, "held/app", data[:1000])
    store = storage.open(store_root(mirror))
    writer = store.blobs.writer(location.rsplit("/", 1)[1])  # this test process writes to the session now
    try:
        for response in (client.patch(location, content=data[1000:], headers={"Content-Range": "1000-2999"}),
                         client.put(location, params={"digest": sha256(data)}, content=data[1000:]),
                         client.delete(location)):
            assert error_code(response.status_code, response.content)[:2] == (400, "BLOB_UPLOAD_INVALID")
    finally:
        writer.close()
    assert client.put(location, params={"digest": sha256(data)}, content=data[1000:]).status_code == 201
    assert client.get(f"/v2/held/app/blobs/{sha256(data)}").content == data
    store.close()
    assert_store_consistent(store_root(mirror))


def test_a_blob_pushed_again_is_not_replaced(mirror, client):
    data = LAYER[:7000]
    digest = sha256(data)
    assert client.post("/v2/first/app/blobs/uploads/", params={"digest": digest}, content=data).status_code == 201
    path = store_root(mirror) / "blobs" / "sha256" / digest[7:9] / digest[7:]
    inode = path.stat().st_ino
    assert client.post("/v2/second/app/blobs/uploads/", params={"digest": digest}, content=data).status_code == 201
    location = open_upload(client, "third/app", data)
    assert client.put(location, params={"digest": digest}).status_code == 201
    assert path.stat().st_ino == inode and path.read_bytes() == data
    for name in ("first/app", "second/app", "third/app"):
        assert client.get(f"/v2/{name}/blobs/{digest}").content == data
    assert not list((store_root(mirror) / "uploads").iterdir())
    assert_store_consistent(store_root(mirror))


# absurd numbers and missing sessions
@pytest.mark.parametrize("value", ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=-" + "9" * 5000,
                                   "bytes=" + "1" * 19 + "-"])
def test_range_numbers_thousands_of_digits_long_are_416(mirror, client, value):
    data = LAYER[:100]
    digest = sha256(data)
    assert client.post("/v2/ranges/app/blobs/uploads/", params={"digest": digest}, content=data).status_code == 201
    response = client.get(f"/v2/ranges/app/blobs/{digest}", headers={"Range": value})
    assert error_code(response.status_code, response.content)[:2] == (416, "RANGE_INVALID")
    assert response.headers["Content-Range"] == "bytes */100"
    assert client.get(f"/v2/ranges/app/blobs/{digest}", headers={"Range": "bytes=10-19"}).content == data[10:20]
    assert_store_consistent(store_root(mirror))


@pytest.mark.parametrize("method", ["PUT", "PATCH", "GET", "DELETE"])
@pytest.mark.parametrize("path", ["/v2/x/blobs/uploads/", "/v2/x/blobs/uploads"])
def test_upload_paths_without_a_session_are_blob_upload_unknown(mirror, client, method, path):
    response = client.request(method, path, params={"digest": sha256(b"x")} if method == "PUT" else None,
                              content=b"x" if method in ("PUT", "PATCH") else None)
    assert error_code(response.status_code, response.content)[:2] == (404, "BLOB_UPLOAD_UNKNOWN")
    assert_store_consistent(store_root(mirror))


# bodies are bounded before auth
@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A hosted mirror with auth on: alice (htpasswd -B) may read and write, nobody else anything."""
    workdir = tmp_path_factory.mktemp("guarded")
    entry = subprocess.run([require("htpasswd"), "-bnB", "alice", "alice-secret"], capture_output=True, text=True,
                           check=True).stdout.strip()
    (workdir / "htpasswd").write_text(entry + "\n")
    with MirrorProcess(workdir, {"upstreams": [], "auth": {"htpasswd": str(workdir / "htpasswd")}}) as server:
        yield server


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def zeros(size: int) -> Iterator[bytes]:
    """``size`` zero bytes, a MiB at a time, never all in memory."""
    for start in range(0, size, SEND_CHUNK):
        yield bytes(min(SEND_CHUNK, size - start))


def stream_body(mirror: MirrorProcess, method: str, target: str, headers: dict[str, str], chunked: bool) -> int | None:
    """Send HUGE zero bytes from a generator as the body of ``method target`` until the server answers or stops
    reading; return the answer's status, or None when the connection was cut before it could be read."""
    with Connection(mirror) as connection:
        connection.start(method, target, None if chunked else HUGE, headers)
        try:
            for chunk in zeros(HUGE):
                if connection.answered():
                    break
                connection.send(chunk)
        except OSError:  # the server stopped reading and closed the connection
            pass
        try:
            return connection.response()[0]
        except (OSError, http.client.HTTPException):
            return None


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_huge_bodies_never_reach_memory_whoever_sends_them(guarded, chunked):
    pid = guarded.pid
    before = rss(pid)
    requests = [("POST", "/v2/", {}), ("POST", "/v2/_catalog", {}), ("GET", "/v2/x/tags/list", {}),
                ("POST", "/token", {}), ("PATCH", "/v2/x/blobs/uploads/" + "0" * 32, {}),
                ("POST", "/v2/", ALICE), ("GET", "/v2/_catalog", ALICE), ("POST", "/token", ALICE)]
    for method, target, headers in requests:
        status = stream_body(guarded, method, target, headers, chunked)
        grown = rss(pid) - before
        assert status in (400, 401, 413, None), (method, target, status)
        assert grown < MAX_RSS_GROWTH, f"{method} {target}: RSS grew {grown >> 20} MiB ({before >> 20} MiB before)"
    assert httpx.get(f"{guarded.url}/v2/", headers=ALICE).status_code == 200
    assert_store_consistent(store_root(guarded))


@pytest.mark.parametrize(("target", "headers", "small"), [
    ("/v2/", ALICE, (405, "UNSUPPORTED")), ("/v2/_catalog", ALICE, (405, "UNSUPPORTED")),
    ("/token", {}, (405, "UNSUPPORTED")), ("/v2/x/tags/list", ALICE, (405, "UNSUPPORTED")),
    ("/v2/", {}, (401, "UNAUTHORIZED")),
])
def test_an_oversized_body_is_refused_before_any_of_it_is_read(guarded, target, headers, small):
    with Connection(guarded) as connection:  # a declared length: 413 at once, whoever sends it
        connection.start("POST", target, HUGE, headers)
        status, answer_headers, body = connection.response()
    assert error_code(status, body)[:2] == (413, "SIZE_INVALID")
    assert answer_headers["Connection"] == "close"
    with Connection(guarded) as connection:  # a chunked one: Tornado stops at the first chunk past the bound
        connection.start("POST", target, None, headers)
        connection.sock.sendall(b"%x\r\n" % HUGE)
        assert connection.response()[0] == 400
    answer = httpx.post(f"{guarded.url}{target}", headers=headers, content=bytes(1024))  # small: as ever
    assert error_code(answer.status_code, answer.content)[:2] == small
    assert httpx.get(f"{guarded.url}/v2/", headers=ALICE).status_code == 200
    assert_store_consistent(store_root(guarded))
