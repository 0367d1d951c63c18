"""Notifications against a real ``mirror serve``: events in the Distribution envelope reach a webhook that was
down when they happened, also across an appliance restart, including imports by the separate importer."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from mirror import cli
from tests.images import build_image, push
from tests.peers import MirrorProcess, free_port, wait_until
from tests.test_bundle import fill

MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"


class Receiver:
    """A webhook on a fixed loopback port that can be stopped and started again; it keeps what it was sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.requests: list[tuple[dict[str, str], Any]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event received, in order."""
        return [event for _, envelope in self.requests for event in envelope["events"]]

    def actions(self) -> list[str]:
        """The action of every event received."""
        return [event["action"] for event in self.events]

    def start(self) -> None:
        """Listen and answer every POST with 200."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def queued(mirror: MirrorProcess) -> list[Path]:
    """The event files waiting on disk."""
    return sorted((mirror.workdir / "store" / "state" / "events").glob("*/*.json"))


def test_events_wait_for_a_receiver_that_is_down(tmp_path):
    receiver = Receiver()
    endpoint = {"url": receiver.url, "events": ["push", "delete"], "headers": {"Authorization": "Bearer s3cret"},
                "timeout": "2s"}
    image = build_image("events")
    try:
        with MirrorProcess(tmp_path / "mirror", {"upstreams": [], "notifications": [endpoint]}) as mirror:
            push(mirror.url, "ci/app", "v1", image)
            wait_until(lambda: "could not deliver" in mirror.log(), 30, "a failed delivery")
            assert len(queued(mirror)) == 1
            with httpx.Client(base_url=f"{mirror.url}/v2/ci/app") as client:
                assert client.get("/manifests/v1").status_code == 200  # a pull: not subscribed
                assert client.delete("/manifests/v1").status_code == 202
            receiver.start()
            wait_until(lambda: receiver.actions() == ["push", "delete"], 60, "the push and delete events")
            wait_until(lambda: not queued(mirror), 10, "the queue to empty")
    finally:
        receiver.stop()
    headers, _ = receiver.requests[0]
    assert headers["Content-Type"] == MEDIA_TYPE and headers["Authorization"] == "Bearer s3cret"
    pushed, deleted = receiver.events
    assert pushed["target"] == {
        "mediaType": image.manifest.media_type, "size": image.manifest.size, "length": image.manifest.size,
        "digest": image.digest, "repository": "ci/app", "tag": "v1",
        "url": f"{mirror.url}/v2/ci/app/manifests/{image.digest}"}
    assert pushed["request"]["method"] == "PUT" and pushed["request"]["addr"] == "127.0.0.1"
    assert pushed["request"]["host"] == mirror.host and pushed["request"]["useragent"].startswith("python-httpx")
    assert pushed["id"] and pushed["timestamp"] and pushed["source"]["instanceID"]
    assert pushed["source"]["addr"].endswith(f":{mirror.port}") and pushed["actor"] == {}
    assert deleted["target"] == {"repository": "ci/app", "tag": "v1"} and deleted["request"]["method"] == "DELETE"


def test_events_survive_a_restart_and_include_imports(tmp_path):
    source = tmp_path / "source"
    fill(source, "alpine:3.20", build_image("alpine"))
    source_config = tmp_path / "source.yaml"
    source_config.write_text(yaml.safe_dump({"storage": {"root": str(source)}, "upstreams": []}))
    bundle = tmp_path / "bundle.tar"
    assert cli.main(["bundle", "export", "--config", str(source_config), "--output", str(bundle), "alpine:3.20"]) == 0

    receiver = Receiver()
    config = {"upstreams": [], "notifications": [{"url": receiver.url, "events": ["push", "import"]}]}
    image = build_image("restart")
    mirror = MirrorProcess(tmp_path / "mirror", config).start()
    try:
        push(mirror.url, "ci/app", "v2", image)
        # the importer runs in this test's process, not the server's
        assert cli.main(["bundle", "import", "--config", str(mirror.config_path), str(bundle)]) == 0
        wait_until(lambda: len(queued(mirror)) == 2, 30, "both events queued")
        mirror.stop()
        mirror.start()
        receiver.start()
        wait_until(lambda: sorted(receiver.actions()) == ["import", "push"], 60, "the queued events")
        wait_until(lambda: not queued(mirror), 10, "the queue to empty")
    finally:
        mirror.stop()
        receiver.stop()
    events = {event["action"]: event for event in receiver.events}
    assert events["push"]["target"]["digest"] == image.digest and events["push"]["target"]["tag"] == "v2"
    imported = events["import"]["target"]
    assert imported["repository"] == "docker.io/library/alpine" and imported["tag"] == "3.20"
    assert imported["digest"] == build_image("alpine").digest and "url" not in imported
    assert events["import"]["request"] == {}
