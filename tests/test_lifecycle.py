"""Process life of ``mirror serve``: sd_notify readiness, SIGTERM drains in-flight transfers, SIGHUP reloads, the
hourly upload sweep outlives an unavailable store."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import socket

import httpx
import yaml

from mirror.config import load
from mirror.errors import StorageUnavailable
from mirror.server import Service
from mirror.systemd import Notifier
from tests.images import Blob, build_image, push, push_blob
from tests.peers import DistributionRegistry, MirrorProcess, wait_until


def test_ready_and_stopping_reach_notify_socket(tmp_path):
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(30)
        mirror = MirrorProcess(tmp_path / "mirror", {"upstreams": []}, env={"NOTIFY_SOCKET": address}).start()
        try:
            assert b"READY=1" in listener.recv(4096).split(b"\n")
            mirror.send_signal(signal.SIGTERM)
            assert b"STOPPING=1" in listener.recv(4096).split(b"\n")
            assert mirror.wait(30) == 0
        finally:
            mirror.stop()


def test_sigterm_lets_a_large_download_finish(tmp_path):
    data = hashlib.sha256(b"seed").digest() * (64 * 1024 * 1024 // 32)
    blob = Blob("application/octet-stream", data)
    with MirrorProcess(tmp_path / "mirror", {"upstreams": []}) as mirror:
        with httpx.Client(timeout=60) as client:
            push_blob(client, mirror.url, "big/blob", blob)
            digest = hashlib.sha256()
            with client.stream("GET", f"{mirror.url}/v2/big/blob/blobs/{blob.digest}") as response:
                chunks = response.iter_bytes(1024 * 1024)
                digest.update(next(chunks))
                mirror.send_signal(signal.SIGTERM)
                for chunk in chunks:
                    digest.update(chunk)
        assert "sha256:" + digest.hexdigest() == blob.digest
        assert mirror.wait(30) == 0
        assert not mirror.running()


def test_sighup_picks_up_a_new_upstream_and_survives_a_broken_config(tmp_path):
    with DistributionRegistry(tmp_path / "upstream") as upstream, \
            MirrorProcess(tmp_path / "mirror", {"upstreams": []}) as mirror, httpx.Client(timeout=30) as client:
        image = build_image("reload")
        push(upstream.url, "org/app", "1", image)
        assert client.get(f"{mirror.url}/v2/ghcr.io/org/app/manifests/1").status_code == 404
        config = dict(mirror.config, upstreams=[{"name": "ghcr.io", "url": upstream.url}])
        mirror.config_path.write_text(yaml.safe_dump(config))
        mirror.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded config" in mirror.log(), 30, "the reload")
        assert client.get(f"{mirror.url}/v2/ghcr.io/org/app/manifests/1").content == image.manifest.data
        mirror.config_path.write_text("upstreams: [{name: ghcr.io}]\n")
        mirror.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in mirror.log(), 30, "the failed reload")
        assert "upstreams[0].url" in mirror.log()
        assert client.get(f"{mirror.url}/v2/ghcr.io/org/app/manifests/1").content == image.manifest.data


def test_the_hourly_upload_sweep_outlives_a_store_that_is_unavailable(tmp_path, monkeypatch, caplog):
    async def sweep() -> None:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "store")}, "upstreams": []}))
        service = Service(load(config, {}), None, {}, Notifier(None))
        try:
            def unavailable(*args: object) -> None:
                raise StorageUnavailable("object storage is not answering")
            monkeypatch.setattr(service.appliance.registry, "expire_uploads", unavailable)
            service._sweep_uploads()
        finally:
            await service.appliance.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(sweep())
    assert "could not sweep idle uploads: object storage is not answering" in caplog.text
