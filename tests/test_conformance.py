"""The OCI distribution-spec conformance workflows (pull, push, content discovery, content management),
written from the spec and run over HTTP against a real ``mirror serve`` process."""
from __future__ import annotations

import hashlib
import json
import os
import re

import httpx
import pytest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def error_codes(response: httpx.Response) -> list[str]:
    return [error["code"] for error in response.json()["errors"]]


@pytest.fixture
def client(mirror_url):
    with httpx.Client(base_url=mirror_url, timeout=30) as http:
        yield http


@pytest.fixture
def repo(request):
    return "conformance/" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:80]


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    digest = digest_of(data)
    response = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data,
                           headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    return digest


def image_manifest(client, repo, layers=(b"layer",), config=b"{}", media_type=OCI_MANIFEST, **extra):
    config_digest = push_blob(client, repo, config)
    descriptors = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": push_blob(client, repo, data),
                    "size": len(data)} for data in layers]
    document = {"schemaVersion": 2, "mediaType": media_type,
                "config": {"mediaType": extra.pop("config_type", "application/vnd.oci.image.config.v1+json"),
                           "digest": config_digest, "size": len(config)},
                "layers": descriptors, **extra}
    return json.dumps(document, indent=1).encode()


def put_manifest(client, repo, reference, body, media_type=OCI_MANIFEST):
    return client.put(f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type})


# --- pull ----------------------------------------------------------------------------------------------------

def test_ping_names_the_api_version(client):
    response = client.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_pull_manifest_by_tag_and_digest_byte_for_byte(client, repo):
    body = image_manifest(client, repo)
    digest = put_manifest(client, repo, "v1", body).headers["Docker-Content-Digest"]
    assert digest == digest_of(body)
    for reference in ("v1", digest):
        got = client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
        assert got.status_code == 200
        assert got.content == body
        assert got.headers["Content-Type"] == OCI_MANIFEST
        assert got.headers["Docker-Content-Digest"] == digest
        head = client.head(f"/v2/{repo}/manifests/{reference}")
        assert head.status_code == 200
        assert head.headers["Content-Length"] == str(len(body))
        assert head.content == b""


def test_pull_blob_whole_head_and_ranges(client, repo):
    data = os.urandom(100_000)
    digest = push_blob(client, repo, data)
    got = client.get(f"/v2/{repo}/blobs/{digest}")
    assert got.status_code == 200 and got.content == data
    assert got.headers["Docker-Content-Digest"] == digest
    head = client.head(f"/v2/{repo}/blobs/{digest}")
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data))
    part = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    tail = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == data[-5:]
    beyond = client.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(data)}"


def test_pull_unknown_manifest_and_blob_are_404_with_spec_codes(client, repo):
    push_blob(client, repo, b"make the repository exist")
    missing = client.get(f"/v2/{repo}/manifests/nope")
    assert missing.status_code == 404 and error_codes(missing) == ["MANIFEST_UNKNOWN"]
    missing = client.get(f"/v2/{repo}/blobs/{digest_of(b'never pushed')}")
    assert missing.status_code == 404 and error_codes(missing) == ["BLOB_UNKNOWN"]


def test_blobs_are_only_served_in_repositories_that_link_them(client, repo):
    digest = push_blob(client, repo, b"private to one repository")
    other = client.get(f"/v2/{repo}-other/blobs/{digest}")
    assert other.status_code == 404


# --- push ----------------------------------------------------------------------------------------------------

def test_push_monolithic_post_then_put(client, repo):
    data = os.urandom(5000)
    opened = client.post(f"/v2/{repo}/blobs/uploads/")
    assert opened.status_code == 202
    location = opened.headers["Location"]
    done = client.put(location, params={"digest": digest_of(data)}, content=data,
                      headers={"Content-Type": "application/octet-stream"})
    assert done.status_code == 201
    assert done.headers["Location"].endswith(f"/blobs/{digest_of(data)}")
    assert client.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_push_chunked_in_order_with_status_and_out_of_order_refused(client, repo):
    data = os.urandom(3000)
    location = client.post(f"/v2/{repo}/blobs/uploads/").headers["Location"]
    first = client.patch(location, content=data[:1000],
                         headers={"Content-Range": "0-999", "Content-Type": "application/octet-stream"})
    assert first.status_code == 202 and first.headers["Range"] == "0-999"
    location = first.headers["Location"]
    status = client.get(location)
    assert status.status_code == 204 and status.headers["Range"] == "0-999"
    wrong = client.patch(location, content=data[2000:],
                         headers={"Content-Range": "2000-2999", "Content-Type": "application/octet-stream"})
    assert wrong.status_code == 416
    second = client.patch(location, content=data[1000:2000],
                          headers={"Content-Range": "1000-1999", "Content-Type": "application/octet-stream"})
    assert second.status_code == 202 and second.headers["Range"] == "0-1999"
    done = client.put(second.headers["Location"], params={"digest": digest_of(data)}, content=data[2000:],
                      headers={"Content-Type": "application/octet-stream"})
    assert done.status_code == 201
    assert client.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_push_single_post_with_digest(client, repo):
    data = b"single post"
    response = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest_of(data)}, content=data)
    assert response.status_code == 201
    assert response.headers["Docker-Content-Digest"] == digest_of(data)


def test_push_wrong_digest_is_refused_and_nothing_stored(client, repo):
    data, claimed = b"what was sent", digest_of(b"what was claimed")
    location = client.post(f"/v2/{repo}/blobs/uploads/").headers["Location"]
    response = client.put(location, params={"digest": claimed}, content=data)
    assert response.status_code == 400 and error_codes(response) == ["DIGEST_INVALID"]
    for digest in (claimed, digest_of(data)):
        assert client.head(f"/v2/{repo}/blobs/{digest}").status_code == 404
    assert client.get(location).status_code == 404


def test_cancel_upload(client, repo):
    location = client.post(f"/v2/{repo}/blobs/uploads/").headers["Location"]
    assert client.delete(location).status_code == 204
    gone = client.get(location)
    assert gone.status_code == 404 and error_codes(gone) == ["BLOB_UPLOAD_UNKNOWN"]


def test_cross_repository_mount(client, repo):
    digest = push_blob(client, repo, b"mount me")
    mounted = client.post(f"/v2/{repo}-target/blobs/uploads/", params={"mount": digest, "from": repo})
    assert mounted.status_code == 201
    assert mounted.headers["Location"].endswith(f"/v2/{repo}-target/blobs/{digest}")
    assert client.get(f"/v2/{repo}-target/blobs/{digest}").content == b"mount me"
    unknown = digest_of(b"not there")
    fallback = client.post(f"/v2/{repo}-target/blobs/uploads/", params={"mount": unknown, "from": repo})
    assert fallback.status_code == 202 and "/blobs/uploads/" in fallback.headers["Location"]


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_push_manifest_by_tag_and_by_digest(client, repo, media_type):
    body = image_manifest(client, repo, media_type=media_type)
    by_digest = put_manifest(client, repo, digest_of(body), body, media_type)
    assert by_digest.status_code == 201
    assert by_digest.headers["Location"].endswith(f"/manifests/{digest_of(body)}")
    assert put_manifest(client, repo, "latest", body, media_type).status_code == 201
    assert client.get(f"/v2/{repo}/manifests/latest").headers["Content-Type"] == media_type


@pytest.mark.parametrize("index_type,child_type", [(OCI_INDEX, OCI_MANIFEST), (DOCKER_LIST, DOCKER_MANIFEST)])
def test_push_index_and_manifest_list(client, repo, index_type, child_type):
    children = []
    for arch in ("amd64", "arm64"):
        body = image_manifest(client, repo, layers=(arch.encode(),), media_type=child_type)
        put_manifest(client, repo, digest_of(body), body, child_type)
        children.append({"mediaType": child_type, "digest": digest_of(body), "size": len(body),
                         "platform": {"os": "linux", "architecture": arch}})
    index = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": children}).encode()
    assert put_manifest(client, repo, "multi", index, index_type).status_code == 201
    got = client.get(f"/v2/{repo}/manifests/multi")
    assert got.content == index and got.headers["Content-Type"] == index_type


def test_index_with_unknown_child_is_refused(client, repo):
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest_of(b"nope"), "size": 4}]}).encode()
    response = put_manifest(client, repo, "bad", index, OCI_INDEX)
    assert response.status_code == 400 and error_codes(response) == ["MANIFEST_BLOB_UNKNOWN"]


def test_manifest_with_missing_blob_is_refused(client, repo):
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": EMPTY_CONFIG, "digest": digest_of(b"{}"), "size": 2},
                       "layers": []}).encode()
    response = put_manifest(client, repo, "missing", body)
    assert response.status_code == 400 and error_codes(response) == ["MANIFEST_BLOB_UNKNOWN"]


def test_manifest_media_type_must_match_content_type(client, repo):
    body = image_manifest(client, repo, media_type=OCI_MANIFEST)
    response = put_manifest(client, repo, "mismatch", body, DOCKER_MANIFEST)
    assert response.status_code == 400 and error_codes(response) == ["MANIFEST_INVALID"]


def test_manifest_over_4_mib_is_413(client, repo):
    body = image_manifest(client, repo, annotations={"padding": "x" * (4 * 1024 * 1024)})
    response = put_manifest(client, repo, "huge", body)
    assert response.status_code == 413
    assert client.get("/v2/").status_code == 200


def test_manifest_put_with_wrong_digest_reference(client, repo):
    body = image_manifest(client, repo)
    response = put_manifest(client, repo, digest_of(b"other"), body)
    assert response.status_code == 400 and error_codes(response) == ["DIGEST_INVALID"]


# --- content discovery ---------------------------------------------------------------------------------------

def test_tags_list_paginates_with_link_header(client, repo):
    body = image_manifest(client, repo)
    tags = ["a", "b", "c", "d", "e"]
    for tag in tags:
        put_manifest(client, repo, tag, body)
    assert client.get(f"/v2/{repo}/tags/list").json() == {"name": repo, "tags": tags}
    first = client.get(f"/v2/{repo}/tags/list", params={"n": 2})
    assert first.json()["tags"] == ["a", "b"]
    assert first.headers["Link"] == f'</v2/{repo}/tags/list?n=2&last=b>; rel="next"'
    second = client.get(f"/v2/{repo}/tags/list", params={"n": 2, "last": "b"})
    assert second.json()["tags"] == ["c", "d"]
    last = client.get(f"/v2/{repo}/tags/list", params={"n": 2, "last": "d"})
    assert last.json()["tags"] == ["e"] and "Link" not in last.headers
    assert client.get(f"/v2/{repo}/tags/list", params={"n": 0}).json()["tags"] == []
    huge = client.get(f"/v2/{repo}/tags/list", params={"n": 10**30})
    assert huge.status_code == 200 and huge.json()["tags"] == tags
    bad = client.get(f"/v2/{repo}/tags/list", params={"n": "-1"})
    assert bad.status_code == 400 and error_codes(bad) == ["PAGINATION_NUMBER_INVALID"]


def test_tags_of_unknown_repository(client):
    response = client.get("/v2/never/pushed/tags/list")
    assert response.status_code == 404 and error_codes(response) == ["NAME_UNKNOWN"]


def test_catalog_lists_repositories_that_hold_a_manifest(client, repo):
    push_blob(client, f"{repo}-blob-only", b"not catalogued")
    body = image_manifest(client, repo, layers=(b"catalogued",))
    put_manifest(client, repo, "v1", body)
    names = client.get("/v2/_catalog").json()["repositories"]
    assert f"{repo}-blob-only" not in names
    names = client.get("/v2/_catalog").json()["repositories"]
    assert repo in names and names == sorted(names)
    page = client.get("/v2/_catalog", params={"n": 1})
    assert len(page.json()["repositories"]) == 1 and 'rel="next"' in page.headers["Link"]


def test_referrers_with_subject_and_artifact_type_filter(client, repo):
    subject_body = image_manifest(client, repo)
    subject = digest_of(subject_body)
    empty = client.get(f"/v2/{repo}/referrers/{subject}")
    assert empty.status_code == 200 and empty.json()["manifests"] == []
    assert empty.headers["Content-Type"] == OCI_INDEX
    # a referrer may arrive before its subject
    signature = image_manifest(client, repo, layers=(b"sig",), config=b"{}", config_type=EMPTY_CONFIG,
                               artifactType="application/vnd.example.signature",
                               subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)},
                               annotations={"org.example": "yes"})
    pushed = put_manifest(client, repo, digest_of(signature), signature)
    assert pushed.status_code == 201 and pushed.headers["OCI-Subject"] == subject
    sbom = image_manifest(client, repo, layers=(b"sbom",), config=b"{}", config_type="application/vnd.example.sbom",
                          subject={"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)})
    put_manifest(client, repo, digest_of(sbom), sbom)
    put_manifest(client, repo, "v1", subject_body)
    listing = client.get(f"/v2/{repo}/referrers/{subject}").json()["manifests"]
    assert {d["digest"] for d in listing} == {digest_of(signature), digest_of(sbom)}
    signed = next(d for d in listing if d["digest"] == digest_of(signature))
    assert signed["artifactType"] == "application/vnd.example.signature"
    assert signed["annotations"] == {"org.example": "yes"} and signed["size"] == len(signature)
    filtered = client.get(f"/v2/{repo}/referrers/{subject}",
                          params={"artifactType": "application/vnd.example.sbom"})
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["digest"] for d in filtered.json()["manifests"]] == [digest_of(sbom)]
    client.delete(f"/v2/{repo}/manifests/{digest_of(sbom)}")
    after = client.get(f"/v2/{repo}/referrers/{subject}").json()["manifests"]
    assert [d["digest"] for d in after] == [digest_of(signature)]


# --- content management --------------------------------------------------------------------------------------

def test_delete_tag_then_manifest_then_blob(client, repo):
    body = image_manifest(client, repo, layers=(b"to be deleted",))
    digest = put_manifest(client, repo, "gone", body).headers["Docker-Content-Digest"]
    put_manifest(client, repo, "kept", body)
    assert client.delete(f"/v2/{repo}/manifests/gone").status_code == 202
    assert client.get(f"/v2/{repo}/manifests/gone").status_code == 404
    assert client.get(f"/v2/{repo}/manifests/{digest}").status_code == 200
    assert client.delete(f"/v2/{repo}/manifests/{digest}").status_code == 202
    assert client.get(f"/v2/{repo}/manifests/{digest}").status_code == 404
    assert client.get(f"/v2/{repo}/manifests/kept").status_code == 404
    assert client.get(f"/v2/{repo}/tags/list").json()["tags"] == []
    layer = digest_of(b"to be deleted")
    assert client.delete(f"/v2/{repo}/blobs/{layer}").status_code == 202
    assert client.get(f"/v2/{repo}/blobs/{layer}").status_code == 404
    assert client.delete(f"/v2/{repo}/blobs/{layer}").status_code == 404
    assert client.delete(f"/v2/{repo}/manifests/{digest}").status_code == 404
