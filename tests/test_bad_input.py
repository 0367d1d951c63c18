"""Hostile and malformed requests get clear 4xx errors in the spec's form; the server stays up and the
store never gains a file outside its root."""
from __future__ import annotations

import hashlib
import socket
from urllib.parse import urlsplit

import httpx
import pytest


@pytest.fixture
def client(mirror_url):
    with httpx.Client(base_url=mirror_url, timeout=30) as http:
        yield http


def raw_request(url: str, request_line: bytes) -> bytes:
    """Send a request byte for byte (httpx would normalise the path) and return the status line."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
        return sock.recv(4096).split(b"\r\n", 1)[0]


@pytest.mark.parametrize("path", [
    "/v2/UPPER/tags/list",
    "/v2/-lead/tags/list",
    "/v2/a..b/tags/list",
    "/v2/a/_blobs/tags/list",
    "/v2/" + "a" * 300 + "/tags/list",
    "/v2/a%2Fb/tags/list",
    "/v2/a%2fb/manifests/latest",
    "/v2/a/b%5c..%5cc/tags/list",
])
def test_invalid_names(client, path):
    response = client.get(path)
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "NAME_INVALID"


@pytest.mark.parametrize("request_line", [
    b"GET /v2/../../etc/passwd HTTP/1.1",
    b"GET /v2/a/../../blobs/x HTTP/1.1",
    b"GET /v2/a/blobs/sha256:../../../../etc/passwd HTTP/1.1",
    b"GET /v2/%2e%2e/%2e%2e/tags/list HTTP/1.1",
])
def test_dot_segments_never_escape(mirror_url, request_line):
    status = raw_request(mirror_url, request_line)
    assert status.split()[1] in (b"400", b"404")


@pytest.mark.parametrize("digest", [
    "sha256:abc", "sha256:" + "g" * 64, "md5:" + "a" * 32, "sha256", "sha256:" + "A" * 64,
    "sha256:" + "a" * 64 + "%2f..", "sha512:" + "a" * 64,
])
def test_invalid_digests(client, digest):
    response = client.get(f"/v2/some/repo/blobs/{digest}")
    assert response.status_code in (400, 404)
    if response.status_code == 400:
        assert response.json()["errors"][0]["code"] in ("DIGEST_INVALID", "NAME_INVALID")


@pytest.mark.parametrize("tag", ["-lead", "a" * 129, ".dot", "sp ace"])
def test_invalid_tags(client, tag):
    response = client.put(f"/v2/some/repo/manifests/{tag}", content=b"{}",
                          headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 400


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"schemaVersion": 1}', b"\xff\xfe",
                                  b'{"schemaVersion": 2, "config": {"digest": "nope", "size": 1}, "layers": []}',
                                  b'{"schemaVersion": 2, "config": {"digest": "sha256:' + b"a" * 64 + b'"}}'])
def test_malformed_manifests(client, body):
    response = client.put("/v2/some/repo/manifests/latest", content=body,
                          headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "MANIFEST_INVALID"


def test_unknown_and_forged_upload_sessions(client):
    for session in ("0" * 32, "../../etc", "x" * 500):
        response = client.patch(f"/v2/some/repo/blobs/uploads/{session}", content=b"data")
        assert response.status_code in (400, 404)
    location = client.post("/v2/owner/repo/blobs/uploads/").headers["Location"]
    session = location.rsplit("/", 1)[1]
    stolen = client.patch(f"/v2/thief/repo/blobs/uploads/{session}", content=b"data")
    assert stolen.status_code == 404


def test_malformed_content_range(client):
    location = client.post("/v2/some/repo/blobs/uploads/").headers["Location"]
    for value in ("garbage", "5-1", "bytes=abc"):
        response = client.patch(location, content=b"data", headers={"Content-Range": value})
        assert response.status_code == 416
    assert client.get(location).status_code == 204


def test_complete_upload_without_digest(client):
    location = client.post("/v2/some/repo/blobs/uploads/").headers["Location"]
    response = client.put(location, content=b"data")
    assert response.status_code == 400
    assert response.json()["errors"][0]["code"] == "DIGEST_INVALID"


def test_pagination_garbage(client):
    for n in ("abc", "-5", "1e9", "9" * 400):
        response = client.get("/v2/_catalog", params={"n": n})
        assert response.status_code in (200, 400)


def test_unknown_routes_and_methods(client):
    assert client.get("/v3/").status_code == 404
    assert client.get("/").status_code == 404
    response = client.request("PATCH", "/v2/some/repo/manifests/latest")
    assert response.status_code == 405


def test_server_still_serves_and_store_stays_inside_root(client, mirror_root):
    data = b"still fine"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.post("/v2/after/bad/blobs/uploads/", params={"digest": digest}, content=data).status_code == 201
    assert client.get(f"/v2/after/bad/blobs/{digest}").content == data
    top_level = {path.name for path in mirror_root.iterdir()}
    assert top_level <= {"blobs", "uploads", "repositories", "state", "layout-version"}
