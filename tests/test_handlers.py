"""In-process tests of the HTTP handlers: Tornado's AsyncHTTPTestCase over a temporary store.

They reach the appliance only through its public entry points (``mirror.config.load``, ``mirror.server.build``,
``Appliance.dependencies()``, ``mirror.api.make_app``) and HTTP, so ``MirrorTestCase`` is the one place to adapt
when the wiring changes. The real-peer tests (``test_conformance.py``, ``test_peers.py``...) run a real server.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import bcrypt
import yaml
from tornado.httpclient import HTTPResponse
from tornado.testing import AsyncHTTPTestCase

from mirror.api import make_app
from mirror.config import load
from mirror.manifest import OCI_INDEX, OCI_MANIFEST
from mirror.server import build
from tests.images import Blob, Image, basic_authorization, build_image, canonical_json, parse_challenge, sha256

EMPTY_CONFIG = Blob("application/vnd.oci.empty.v1+json", b"{}")
SIGNATURE_TYPE = "application/vnd.example.signature.v1"
SBOM_TYPE = "application/vnd.example.sbom.v1"
LINK = re.compile(r'<([^>]+)>;\s*rel="next"')
BODY_METHODS = ("POST", "PUT", "PATCH")


class MirrorTestCase(AsyncHTTPTestCase):
    """An in-process appliance over a temporary store, built from a YAML config as ``mirror serve`` builds it."""

    def config(self, root: Path) -> dict[str, Any]:
        """The config this test case serves: a purely hosted registry storing under ``root``."""
        return {"storage": {"root": str(root / "store")}, "upstreams": [], "default_upstream": None}

    def get_app(self):
        """Write the config to a temporary directory, load it and build the application."""
        tmp = tempfile.TemporaryDirectory(prefix="mirror-handlers-")
        self.addCleanup(tmp.cleanup)  # after tearDown, and also when building failed
        root = Path(tmp.name)
        path = root / "config.yaml"
        path.write_text(yaml.safe_dump(self.config(root)))
        self.appliance = build(load(path, {}))
        return make_app(self.appliance.dependencies())

    def tearDown(self) -> None:
        """Close the appliance's store handles, then the server and the loop."""
        self.io_loop.run_sync(self.appliance.close)
        super().tearDown()

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> HTTPResponse:
        """Send one request (``headers`` with ``_`` for ``-``) and return the response, whatever its status."""
        if body is None and method in BODY_METHODS:
            body = b""
        return self.fetch(path, method=method, body=body, follow_redirects=False,
                          headers={name.replace("_", "-"): value for name, value in headers.items()})

    def push_blob(self, name: str, blob: Blob, **headers: str) -> HTTPResponse:
        """Upload ``blob`` into ``name`` with one POST carrying its digest."""
        return self.request("POST", f"/v2/{name}/blobs/uploads/?digest={blob.digest}", blob.data,
                            Content_Type="application/octet-stream", **headers)

    def put_manifest(self, name: str, reference: str, manifest: Blob, **headers: str) -> HTTPResponse:
        """PUT ``manifest`` under ``reference`` (a tag or its digest)."""
        return self.request("PUT", f"/v2/{name}/manifests/{reference}", manifest.data,
                            Content_Type=manifest.media_type, **headers)

    def push_image(self, name: str, reference: str, image: Image) -> str:
        """Push ``image``'s blobs and manifest as ``name:reference``; return the manifest digest."""
        for blob in image.blobs:
            self.assertEqual(self.push_blob(name, blob).code, 201)
        self.assertEqual(self.put_manifest(name, reference, image.manifest).code, 201)
        return image.digest

    def open_upload(self, name: str) -> str:
        """Open an upload session in ``name``; return its location."""
        response = self.request("POST", f"/v2/{name}/blobs/uploads/")
        self.assertEqual(response.code, 202)
        return response.headers["Location"]

    def pages(self, path: str) -> list[list[str]]:
        """Follow ``Link: rel="next"`` headers from ``path``; return each page's tags or repositories."""
        pages = []
        while path:
            response = self.request("GET", path)
            self.assertEqual(response.code, 200, response.body)
            document = json.loads(response.body)
            pages.append(document["tags"] if "tags" in document else document["repositories"])
            link = LINK.fullmatch(response.headers.get("Link", ""))
            path = link.group(1) if link else ""
            self.assertLess(len(pages), 20, "pagination does not end")
        return pages

    def assert_error(self, response: HTTPResponse, status: int, code: str) -> None:
        """``response`` is the spec's JSON error document with ``status`` and first error ``code``."""
        self.assertEqual(response.code, status, response.body[:300])
        self.assertTrue(response.headers.get("Content-Type", "").startswith("application/json"))
        self.assertEqual(json.loads(response.body)["errors"][0]["code"], code)

    def catalog(self) -> list[str]:
        """Every repository the catalog lists."""
        response = self.request("GET", "/v2/_catalog")
        self.assertEqual(response.code, 200)
        return json.loads(response.body)["repositories"]


def tiny_image(seed: object = 0) -> Image:
    """A small OCI image of one layer (a few KiB), the same for the same seed."""
    return build_image(seed, layers=1, layer_size=256, oci=True)


def artifact(subject: Blob, artifact_type: str) -> tuple[Blob, Blob]:
    """An OCI artifact manifest of ``artifact_type`` whose subject is ``subject``, and its one layer."""
    layer = Blob(artifact_type, f"{artifact_type} of {subject.digest}".encode())
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                "config": EMPTY_CONFIG.descriptor(), "layers": [layer.descriptor()],
                "subject": subject.descriptor()}
    return Blob(OCI_MANIFEST, canonical_json(manifest)), layer


def with_query(location: str, **params: str) -> str:
    """``location`` with ``params`` added to its query string."""
    return location + ("&" if "?" in location else "?") + urlencode(params)


class HostedHandlersTest(MirrorTestCase):
    """The Distribution API of a purely hosted registry."""

    # ping
    def test_ping_answers_200_with_api_version(self):
        response = self.request("GET", "/v2/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["Docker-Distribution-API-Version"], "registry/2.0")
        self.assertEqual(json.loads(response.body), {})

    # uploads
    def test_monolithic_upload_post_then_put(self):
        blob = Blob("application/octet-stream", b"monolithic bytes")
        location = self.open_upload("a/one")
        response = self.request("PUT", with_query(location, digest=blob.digest), blob.data,
                                Content_Type="application/octet-stream")
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers["Docker-Content-Digest"], blob.digest)
        self.assertEqual(response.headers["Location"], f"/v2/a/one/blobs/{blob.digest}")
        self.assertEqual(self.request("GET", f"/v2/a/one/blobs/{blob.digest}").body, blob.data)

    def test_single_post_with_digest_stores_the_blob(self):
        blob = Blob("application/octet-stream", b"single post")
        response = self.push_blob("a/one", blob)
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers["Docker-Content-Digest"], blob.digest)
        self.assertEqual(self.request("GET", response.headers["Location"]).body, blob.data)

    def test_chunked_upload_with_content_range(self):
        data = b"first chunk|second chunk"
        location = self.open_upload("a/one")
        first = self.request("PATCH", location, data[:12], Content_Range="0-11",
                             Content_Type="application/octet-stream")
        self.assertEqual(first.code, 202)
        self.assertEqual(first.headers["Range"], "0-11")
        second = self.request("PATCH", first.headers["Location"], data[12:], Content_Range=f"12-{len(data) - 1}",
                              Content_Type="application/octet-stream")
        self.assertEqual(second.code, 202)
        self.assertEqual(second.headers["Range"], f"0-{len(data) - 1}")
        done = self.request("PUT", with_query(second.headers["Location"], digest=sha256(data)))
        self.assertEqual(done.code, 201)
        self.assertEqual(self.request("GET", f"/v2/a/one/blobs/{sha256(data)}").body, data)

    def test_upload_status_reports_the_received_range(self):
        location = self.open_upload("a/one")
        self.request("PATCH", location, b"12345", Content_Range="0-4", Content_Type="application/octet-stream")
        response = self.request("GET", location)
        self.assertEqual(response.code, 204)
        self.assertEqual(response.headers["Range"], "0-4")
        self.assertTrue(response.headers["Docker-Upload-UUID"])
        self.assertEqual(response.headers["Location"], location)

    def test_out_of_order_chunk_is_416(self):
        location = self.open_upload("a/one")
        self.request("PATCH", location, b"12345", Content_Range="0-4", Content_Type="application/octet-stream")
        response = self.request("PATCH", location, b"abc", Content_Range="10-12",
                                Content_Type="application/octet-stream")
        self.assertEqual(response.code, 416)
        self.assertIn("errors", json.loads(response.body))

    def test_cancelled_upload_is_unknown_afterwards(self):
        location = self.open_upload("a/one")
        self.assertEqual(self.request("DELETE", location).code, 204)
        self.assert_error(self.request("GET", location), 404, "BLOB_UPLOAD_UNKNOWN")

    def test_wrong_digest_is_digest_invalid_and_stores_nothing(self):
        data, claimed = b"actual bytes", sha256(b"other bytes")
        location = self.open_upload("a/one")
        response = self.request("PUT", with_query(location, digest=claimed), data,
                                Content_Type="application/octet-stream")
        self.assert_error(response, 400, "DIGEST_INVALID")
        self.assertEqual(self.request("HEAD", f"/v2/a/one/blobs/{claimed}").code, 404)
        self.assertEqual(self.request("HEAD", f"/v2/a/one/blobs/{sha256(data)}").code, 404)

    # blobs
    def push_sixteen_bytes(self) -> Blob:
        """Push a 16-byte blob to ``a/one``."""
        blob = Blob("application/octet-stream", b"0123456789abcdef")
        self.push_blob("a/one", blob)
        return blob

    def test_blob_head_describes_without_body(self):
        blob = self.push_sixteen_bytes()
        response = self.request("HEAD", f"/v2/a/one/blobs/{blob.digest}")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["Content-Length"], "16")
        self.assertEqual(response.headers["Docker-Content-Digest"], blob.digest)
        self.assertEqual(response.body, b"")

    def test_blob_get_with_range_is_206(self):
        blob = self.push_sixteen_bytes()
        response = self.request("GET", f"/v2/a/one/blobs/{blob.digest}", Range="bytes=2-5")
        self.assertEqual(response.code, 206)
        self.assertEqual(response.headers["Content-Range"], "bytes 2-5/16")
        self.assertEqual(response.body, b"2345")

    def test_blob_head_with_range_is_206(self):
        blob = self.push_sixteen_bytes()
        response = self.request("HEAD", f"/v2/a/one/blobs/{blob.digest}", Range="bytes=10-")
        self.assertEqual(response.code, 206)
        self.assertEqual(response.headers["Content-Range"], "bytes 10-15/16")
        self.assertEqual(response.headers["Content-Length"], "6")

    def test_unsatisfiable_range_is_416(self):
        blob = self.push_sixteen_bytes()
        response = self.request("GET", f"/v2/a/one/blobs/{blob.digest}", Range="bytes=16-20")
        self.assertEqual(response.code, 416)
        self.assertEqual(response.headers["Content-Range"], "bytes */16")

    def test_blob_is_served_only_in_repositories_that_link_it(self):
        blob = Blob("application/octet-stream", b"only in a/one")
        self.push_blob("a/one", blob)
        self.push_blob("a/two", Blob("application/octet-stream", b"something else"))
        self.assert_error(self.request("GET", f"/v2/a/two/blobs/{blob.digest}"), 404, "BLOB_UNKNOWN")

    # manifests
    def test_manifest_put_by_tag_then_get_is_byte_identical(self):
        image = tiny_image()
        for blob in image.blobs:
            self.push_blob("a/one", blob)
        put = self.put_manifest("a/one", "v1", image.manifest)
        self.assertEqual(put.code, 201)
        self.assertEqual(put.headers["Docker-Content-Digest"], image.digest)
        for reference in ("v1", image.digest):
            response = self.request("GET", f"/v2/a/one/manifests/{reference}")
            self.assertEqual(response.code, 200)
            self.assertEqual(response.body, image.manifest.data)
            self.assertEqual(response.headers["Content-Type"], OCI_MANIFEST)
            self.assertEqual(response.headers["Docker-Content-Digest"], image.digest)

    def test_manifest_put_by_digest_then_get(self):
        image = tiny_image()
        for blob in image.blobs:
            self.push_blob("a/one", blob)
        self.assertEqual(self.put_manifest("a/one", image.digest, image.manifest).code, 201)
        response = self.request("GET", f"/v2/a/one/manifests/{image.digest}")
        self.assertEqual(response.body, image.manifest.data)
        self.assertEqual(json.loads(self.request("GET", "/v2/a/one/tags/list").body)["tags"], [])

    def test_manifest_head_matches_get(self):
        image = tiny_image()
        self.push_image("a/one", "v1", image)
        response = self.request("HEAD", "/v2/a/one/manifests/v1")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.headers["Content-Length"], str(image.manifest.size))
        self.assertEqual(response.headers["Content-Type"], OCI_MANIFEST)
        self.assertEqual(response.headers["Docker-Content-Digest"], image.digest)

    def test_manifest_referencing_missing_blob_is_manifest_blob_unknown(self):
        image = tiny_image()
        self.push_blob("a/one", image.config)
        self.assert_error(self.put_manifest("a/one", "v1", image.manifest), 400, "MANIFEST_BLOB_UNKNOWN")

    def test_delete_manifest_by_digest_then_404(self):
        image = tiny_image()
        self.push_image("a/one", "v1", image)
        self.assertEqual(self.request("DELETE", f"/v2/a/one/manifests/{image.digest}").code, 202)
        self.assert_error(self.request("GET", f"/v2/a/one/manifests/{image.digest}"), 404, "MANIFEST_UNKNOWN")

    def test_delete_tag_keeps_the_manifest(self):
        image = tiny_image()
        self.push_image("a/one", "v1", image)
        self.assertEqual(self.request("DELETE", "/v2/a/one/manifests/v1").code, 202)
        self.assert_error(self.request("GET", "/v2/a/one/manifests/v1"), 404, "MANIFEST_UNKNOWN")
        self.assertEqual(self.request("GET", f"/v2/a/one/manifests/{image.digest}").code, 200)

    # listings
    def test_tags_list_paginates_with_link(self):
        image = tiny_image()
        tags = ["t1", "t2", "t3", "t4", "t5"]
        for tag in tags:
            self.push_image("a/one", tag, image)
        first = self.request("GET", "/v2/a/one/tags/list?n=2")
        self.assertEqual(json.loads(first.body), {"name": "a/one", "tags": ["t1", "t2"]})
        self.assertEqual(first.headers["Link"], '</v2/a/one/tags/list?n=2&last=t2>; rel="next"')
        self.assertEqual(self.pages("/v2/a/one/tags/list?n=2"), [["t1", "t2"], ["t3", "t4"], ["t5"]])

    def test_tags_list_after_last(self):
        image = tiny_image()
        self.push_image("a/one", "t1", image)
        self.put_manifest("a/one", "t2", image.manifest)
        self.put_manifest("a/one", "t3", image.manifest)
        response = self.request("GET", "/v2/a/one/tags/list?last=t1")
        self.assertEqual(json.loads(response.body)["tags"], ["t2", "t3"])

    def test_catalog_paginates_with_link(self):
        image = tiny_image()
        for name in ("r/c", "r/a", "r/b"):
            self.push_image(name, "v1", image)
        first = self.request("GET", "/v2/_catalog?n=2")
        self.assertEqual(json.loads(first.body)["repositories"], ["r/a", "r/b"])
        self.assertEqual(first.headers["Link"], '</v2/_catalog?n=2&last=r/b>; rel="next"')
        self.assertEqual(self.pages("/v2/_catalog?n=2"), [["r/a", "r/b"], ["r/c"]])

    # referrers
    def push_referrers(self) -> tuple[str, Blob, Blob]:
        """Push an image to ``a/one`` and a signature and an SBOM referring to it; return them."""
        subject_digest = self.push_image("a/one", "v1", tiny_image())
        subject = Blob(OCI_MANIFEST, self.request("GET", f"/v2/a/one/manifests/{subject_digest}").body)
        pushed = []
        for artifact_type in (SIGNATURE_TYPE, SBOM_TYPE):
            manifest, layer = artifact(subject, artifact_type)
            self.push_blob("a/one", EMPTY_CONFIG)
            self.push_blob("a/one", layer)
            response = self.put_manifest("a/one", manifest.digest, manifest)
            self.assertEqual(response.code, 201)
            self.assertEqual(response.headers["OCI-Subject"], subject_digest)
            pushed.append(manifest)
        return subject_digest, pushed[0], pushed[1]

    def test_referrers_lists_every_referrer(self):
        subject, signature, sbom = self.push_referrers()
        response = self.request("GET", f"/v2/a/one/referrers/{subject}")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["Content-Type"], OCI_INDEX)
        self.assertNotIn("OCI-Filters-Applied", response.headers)
        index = json.loads(response.body)
        self.assertEqual(sorted(d["digest"] for d in index["manifests"]), sorted([signature.digest, sbom.digest]))

    def test_referrers_filtered_by_artifact_type(self):
        subject, signature, _ = self.push_referrers()
        response = self.request("GET", f"/v2/a/one/referrers/{subject}?artifactType={SIGNATURE_TYPE}")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers["OCI-Filters-Applied"], "artifactType")
        [descriptor] = json.loads(response.body)["manifests"]
        self.assertEqual(descriptor["digest"], signature.digest)
        self.assertEqual(descriptor["artifactType"], SIGNATURE_TYPE)
        self.assertEqual(descriptor["size"], signature.size)

    # reads of unknown names
    def test_gets_of_unknown_names_create_no_repository(self):
        self.push_image("a/one", "v1", tiny_image())
        before = self.catalog()
        digest = sha256(b"nothing")
        gets = ("/v2/ghost/tags/list", f"/v2/ghost/referrers/{digest}",
                "/v2/ghost/blobs/uploads/00000000-0000-0000-0000-000000000000")
        gets_and_heads = ("/v2/ghost/manifests/latest", f"/v2/ghost/manifests/{digest}", f"/v2/ghost/blobs/{digest}",
                          "/v2/docker.io/library/ghost/manifests/latest", "/v2/ghost/manifests/latest?ns=quay.io")
        requests = [("GET", path) for path in gets + gets_and_heads] + [("HEAD", path) for path in gets_and_heads]
        for method, path in requests:
            response = self.request(method, path)
            self.assertIn(response.code, (200, 404), f"{method} {path}")
        self.assertEqual(self.catalog(), before)

    # malformed input
    def test_uppercase_name_is_name_invalid(self):
        self.assert_error(self.request("GET", "/v2/UPPER/tags/list"), 400, "NAME_INVALID")

    def test_double_dot_name_is_name_invalid(self):
        self.assert_error(self.request("GET", "/v2/a..b/tags/list"), 400, "NAME_INVALID")

    def test_dot_dot_segment_is_name_invalid(self):
        self.assert_error(self.request("GET", "/v2/a/../b/tags/list"), 400, "NAME_INVALID")

    def test_encoded_slash_in_name_is_name_invalid(self):
        self.assert_error(self.request("GET", "/v2/a%2Fb/tags/list"), 400, "NAME_INVALID")

    def test_invalid_digest_in_blob_get_is_digest_invalid(self):
        self.assert_error(self.request("GET", "/v2/a/one/blobs/sha256:xyz"), 400, "DIGEST_INVALID")

    def test_invalid_digest_in_upload_is_digest_invalid(self):
        response = self.request("POST", "/v2/a/one/blobs/uploads/?digest=sha256:xyz", b"data",
                                Content_Type="application/octet-stream")
        self.assert_error(response, 400, "DIGEST_INVALID")

    def test_invalid_digest_in_referrers_is_digest_invalid(self):
        self.assert_error(self.request("GET", "/v2/a/one/referrers/sha256:xyz"), 400, "DIGEST_INVALID")

    def test_non_numeric_page_size_is_pagination_invalid(self):
        self.push_image("a/one", "v1", tiny_image())
        self.assert_error(self.request("GET", "/v2/a/one/tags/list?n=abc"), 400, "PAGINATION_NUMBER_INVALID")
        self.assert_error(self.request("GET", "/v2/_catalog?n=abc"), 400, "PAGINATION_NUMBER_INVALID")

    def test_negative_page_size_is_pagination_invalid(self):
        self.push_image("a/one", "v1", tiny_image())
        self.assert_error(self.request("GET", "/v2/a/one/tags/list?n=-1"), 400, "PAGINATION_NUMBER_INVALID")
        self.assert_error(self.request("GET", "/v2/_catalog?n=-1"), 400, "PAGINATION_NUMBER_INVALID")

    def test_manifest_get_by_invalid_tag_is_404(self):
        self.push_image("a", "v1", tiny_image())
        response = self.request("GET", "/v2/a/manifests/..bad")
        self.assertEqual(response.code, 404, response.body[:300])
        self.assertIn(json.loads(response.body)["errors"][0]["code"], ("MANIFEST_UNKNOWN", "NAME_UNKNOWN"))


class AuthHandlersTest(MirrorTestCase):
    """Authentication: htpasswd user alice, no anonymous pulls, bearer tokens from ``/token``."""

    password = "wonderland"

    def config(self, root: Path) -> dict[str, Any]:
        """The hosted config with auth on (bcrypt htpasswd at the lowest cost, to keep the tests fast)."""
        htpasswd = root / "htpasswd"
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd.write_text(f"alice:{hashed}\n")
        return {**super().config(root), "auth": {"htpasswd": str(htpasswd), "anonymous_pull": False}}

    def token(self, scope: str, password: str | None = None) -> HTTPResponse:
        """Ask ``/token`` for ``scope`` with alice's Basic credentials."""
        query = urlencode({"service": "mirror", "scope": scope})
        return self.request("GET", f"/token?{query}",
                            Authorization=basic_authorization("alice", password or self.password))

    def test_ping_without_credentials_is_challenged(self):
        response = self.request("GET", "/v2/")
        self.assert_error(response, 401, "UNAUTHORIZED")
        challenge = response.headers["WWW-Authenticate"]
        self.assertTrue(challenge.startswith("Bearer realm="), challenge)
        self.assertEqual(parse_challenge(challenge)["realm"], self.get_url("/token"))

    def test_token_from_basic_credentials_allows_a_push(self):
        response = self.token("repository:team/app:pull,push")
        self.assertEqual(response.code, 200)
        bearer = f"Bearer {json.loads(response.body)['token']}"
        image = tiny_image()
        for blob in image.blobs:
            self.assertEqual(self.push_blob("team/app", blob, Authorization=bearer).code, 201)
        self.assertEqual(self.put_manifest("team/app", "v1", image.manifest, Authorization=bearer).code, 201)
        pulled = self.request("GET", "/v2/team/app/manifests/v1", Authorization=bearer)
        self.assertEqual(pulled.body, image.manifest.data)

    def test_push_without_token_is_challenged_with_scope(self):
        response = self.push_blob("team/app", Blob("application/octet-stream", b"x"))
        self.assert_error(response, 401, "UNAUTHORIZED")
        self.assertEqual(parse_challenge(response.headers["WWW-Authenticate"])["scope"],
                         "repository:team/app:pull,push")

    def test_wrong_password_gets_no_token(self):
        self.assert_error(self.token("repository:team/app:pull", password="guess"), 401, "UNAUTHORIZED")
