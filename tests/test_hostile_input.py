"""Hostile input gets a clear 4xx, never a 500, and leaves the server serving: ambiguous manifests
(CVE-2021-41190), JSON nested past any sane depth, query and header numbers that ``int()`` chokes on. And
``mirror serve`` fails to start with one line on stderr and a non-zero status, never a traceback.
"""
from __future__ import annotations

import json
import socket

import pytest

from mirror.errors import BundleInvalid, ManifestInvalid
from mirror.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MAX_JSON_DEPTH, OCI_INDEX, OCI_MANIFEST, load_json
from tests.images import Blob, canonical_json
from tests.peers import MirrorProcess
from tests.test_handlers import MirrorTestCase, tiny_image

DEEP = 100_000


class AmbiguousManifestTest(MirrorTestCase):
    """A document with both an index's ``manifests`` and an image manifest's ``config``/``layers`` is refused
    however it is typed; so is a body whose ``mediaType`` contradicts the Content-Type."""

    def setUp(self) -> None:
        """Push a small image, so every descriptor the documents below name exists."""
        super().setUp()
        self.image = tiny_image("ambiguous")
        self.push_image("team/app", "base", self.image)
        self.image_data = json.loads(self.image.manifest.data)
        self.both = {"schemaVersion": 2, "config": self.image_data["config"], "layers": self.image_data["layers"],
                     "manifests": [self.image.manifest.descriptor()]}

    def put(self, document: dict, content_type: str | None, tag: str = "x") -> dict:
        """PUT ``document`` as ``team/app:tag``; assert 400 MANIFEST_INVALID, nothing stored; return the error."""
        headers = {} if content_type is None else {"Content_Type": content_type}
        response = self.request("PUT", f"/v2/team/app/manifests/{tag}", canonical_json(document), **headers)
        self.assert_error(response, 400, "MANIFEST_INVALID")
        self.assert_error(self.request("GET", f"/v2/team/app/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")
        return json.loads(response.body)["errors"][0]

    def test_both_shapes_are_refused_whatever_the_declared_type(self):
        for media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST):
            for declared in (None, media_type):
                with self.subTest(content_type=media_type, media_type=declared):
                    document = self.both if declared is None else {**self.both, "mediaType": declared}
                    error = self.put(document, media_type)
                    self.assertIn("must not have", error["message"])
                    self.assertIn("ambiguous", error["message"])

    def test_both_shapes_untyped_are_refused(self):
        for content_type in (None, "application/json", "application/octet-stream"):
            with self.subTest(content_type=content_type):
                error = self.put(self.both, content_type)
                self.assertIn("neither a mediaType nor the Content-Type", error["message"])
            with self.subTest(content_type=content_type, media_type=OCI_INDEX):
                self.assertIn("must not have config or layers", self.put({**self.both, "mediaType": OCI_INDEX},
                                                                         content_type)["message"])

    def test_an_index_with_a_layers_field_alone_is_refused(self):
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [self.image.manifest.descriptor()],
                 "layers": []}
        self.assertIn("must not have layers", self.put(index, OCI_INDEX)["message"])

    def test_an_image_manifest_with_a_manifests_field_alone_is_refused(self):
        for manifests in ([], None):
            with self.subTest(manifests=manifests):
                self.put({**self.image_data, "manifests": manifests}, OCI_MANIFEST)

    def test_a_media_type_that_contradicts_the_content_type_is_refused(self):
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [self.image.manifest.descriptor()]}
        for document, content_type in ((self.image_data, OCI_INDEX), (self.image_data, DOCKER_MANIFEST),
                                       (index, OCI_MANIFEST), (index, DOCKER_MANIFEST_LIST)):
            with self.subTest(media_type=document["mediaType"], content_type=content_type):
                self.assertIn("does not match Content-Type", self.put(document, content_type)["message"])

    def test_a_media_type_that_is_not_a_string_is_refused(self):
        for declared in ({"a": 1}, ["x"], 2):
            with self.subTest(media_type=declared):
                self.assertIn("mediaType", self.put({**self.image_data, "mediaType": declared}, None)["message"])

    def test_unambiguous_documents_without_media_type_are_typed_by_content_type_or_shape(self):
        untyped_image = {key: value for key, value in self.image_data.items() if key != "mediaType"}
        untyped_index = {"schemaVersion": 2, "manifests": [self.image.manifest.descriptor()]}
        for document, content_type, expected in ((untyped_image, OCI_MANIFEST, OCI_MANIFEST),
                                                 (untyped_image, None, OCI_MANIFEST),
                                                 (untyped_index, OCI_INDEX, OCI_INDEX),
                                                 (untyped_index, "application/json", OCI_INDEX)):
            with self.subTest(document=sorted(document), content_type=content_type):
                headers = {} if content_type is None else {"Content_Type": content_type}
                pushed = self.request("PUT", "/v2/team/app/manifests/typed", canonical_json(document), **headers)
                self.assertEqual(pushed.code, 201, pushed.body)
                served = self.request("GET", "/v2/team/app/manifests/typed")
                self.assertEqual(served.headers["Content-Type"], expected)


class DeepJsonTest(MirrorTestCase):
    """Nesting deeper than MAX_JSON_DEPTH is MANIFEST_INVALID, before the JSON parser could recurse."""

    def test_a_manifest_nested_100000_deep_is_refused_and_the_server_stays_up(self):
        for body in (b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP + b"1" + b"}" * DEEP,
                     b'{"schemaVersion": 2, "annotations": ' + b"[" * DEEP + b"]" * DEEP + b"}"):
            with self.subTest(body=body[:40]):
                response = self.request("PUT", "/v2/team/app/manifests/deep", body, Content_Type=OCI_MANIFEST)
                self.assert_error(response, 400, "MANIFEST_INVALID")
                self.assertIn("deeper than", json.loads(response.body)["errors"][0]["message"])
        self.assertEqual(self.request("GET", "/v2/").code, 200)
        self.push_image("team/app", "after", tiny_image("after"))
        self.assertEqual(self.request("GET", "/v2/team/app/manifests/after").code, 200)

    def test_brackets_inside_strings_do_not_count(self):
        image = tiny_image("strings")
        manifest = json.loads(image.manifest.data)
        manifest["annotations"] = {"deep": "[{" * DEEP, "quoted": '\\"[' * 100}
        for blob in image.blobs:
            self.push_blob("team/app", blob)
        body = Blob(OCI_MANIFEST, canonical_json(manifest))
        self.assertEqual(self.put_manifest("team/app", "strings", body).code, 201)


@pytest.mark.parametrize(("data", "valid"), [
    (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, True),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), False),
    (b'{"a":' * (MAX_JSON_DEPTH + 1) + b"0" + b"}" * (MAX_JSON_DEPTH + 1), False),
    (b'["' + b"[" * 1000 + b'"]', True),  # brackets in a string
    (b'["\\\\",' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"]", False),  # the string ends after \\
    (b'["\\"' + b"[" * 1000 + b'"]', True),  # an escaped quote ends no string
])
def test_load_json_counts_nesting_outside_strings(data, valid):
    if valid:
        assert load_json(data, "document") is not None
    else:
        with pytest.raises(ManifestInvalid, match="deeper than"):
            load_json(data, "document")


@pytest.mark.parametrize(("data", "problem"), [
    (b'{"a": 1', "not valid JSON"), (b"\xff{}", "not UTF-8"), (b"[" + b"1," * 100 + b"1]", "over the 200 byte"),
    (b"1" * 5000, "not valid JSON"),  # more digits than int() takes
])
def test_load_json_refuses_with_the_error_asked_for(data, problem):
    with pytest.raises(BundleInvalid, match=problem) as caught:
        load_json(data[:5000], "bundle.json", max_size=200 if b"," in data else 5000, error=BundleInvalid)
    assert caught.value.message.startswith("bundle.json ")


class HostileNumbersTest(MirrorTestCase):
    """Query and header numbers that are not plain ASCII digits of a sane length are 4xx, never 500."""

    def test_page_sizes_of_other_digits_are_refused(self):
        self.push_image("team/app", "v1", tiny_image("numbers"))
        for n in ("%C2%B2", "%D9%A1", "1%C2%B2"):  # '²' and '١' are str.isdigit(); int() refuses one, reads the other
            for path in ("/v2/team/app/tags/list", "/v2/_catalog"):
                with self.subTest(path=path, n=n):
                    self.assert_error(self.request("GET", f"{path}?n={n}"), 400, "PAGINATION_NUMBER_INVALID")

    def test_page_sizes_of_5000_digits_are_the_largest_page(self):
        self.push_image("team/app", "v1", tiny_image("numbers"))
        self.push_image("team/app", "v2", tiny_image("numbers"))
        for n, tags in (("9" * 5000, ["v1", "v2"]), ("0" * 5000 + "1", ["v1"]), ("0" * 5000, [])):
            with self.subTest(n=n[:10], length=len(n)):
                response = self.request("GET", f"/v2/team/app/tags/list?n={n}")
                self.assertEqual(response.code, 200, response.body[:200])
                self.assertEqual(json.loads(response.body)["tags"], tags)
        self.assertEqual(json.loads(self.request("GET", "/v2/_catalog?n=" + "9" * 5000).body)["repositories"],
                         ["team/app"])

    def test_a_content_range_of_5000_digits_is_refused(self):
        location = self.open_upload("team/app")
        for content_range in ("0-" + "9" * 5000, "9" * 5000 + "-" + "9" * 5000):
            with self.subTest(content_range=content_range[:10]):
                response = self.request("PATCH", location, b"abc", Content_Type="application/octet-stream",
                                        Content_Range=content_range)
                self.assert_error(response, 416, "RANGE_INVALID")
        self.assertEqual(self.request("GET", "/v2/").code, 200)


def serve_fails(mirror: MirrorProcess, status: int) -> str:
    """Run ``mirror serve`` for ``mirror``'s config, assert it exits ``status`` with one line on stderr; return it."""
    result = mirror.run_cli("serve", timeout=60)
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mirror: "), result.stderr
    return lines[0]


def test_serve_on_a_port_in_use_says_so(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        line = serve_fails(MirrorProcess(tmp_path, {"listen": listen, "upstreams": []}), 1)
    assert line == f"mirror: cannot listen on {listen}: address already in use"


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_a_storage_root_that_is_a_file_says_so(tmp_path, workers):
    root = tmp_path / "not-a-directory"
    root.write_text("")
    line = serve_fails(MirrorProcess(tmp_path, {"storage": {"root": str(root)}, "upstreams": [],
                                                "workers": workers}), 1)
    assert str(root) in line and "not a directory" in line


@pytest.mark.parametrize(("text", "expected"), [
    ("listen: [\n", "not valid YAML at line 2"),
    ("storage:\n  root: x\n   bad: indent\n", "not valid YAML at line 3"),
    ("[" * DEEP, "not valid YAML"),
    ("workers: " + "9" * 5000, "not valid YAML"),
    ("upstreams:\n  - name: docker.io\n    url: https://registry-1.docker.io\n    allow_push: 'false'\n",
     "upstreams[0].allow_push"),
])
def test_serve_with_a_bad_config_says_why(tmp_path, text, expected):
    mirror = MirrorProcess(tmp_path)
    mirror.config_path.write_text(text)
    assert expected in serve_fails(mirror, 2)


def test_serve_with_an_unreadable_config_says_so(tmp_path):
    mirror = MirrorProcess(tmp_path)
    mirror.config_path.unlink()
    mirror.config_path.mkdir()
    assert "cannot read" in serve_fails(mirror, 2)
