"""Shared fixtures: a real ``mirror serve`` process for the API tests, and the real peers."""
from __future__ import annotations

import pytest

from tests.peers import CephRGW, Containerd, Dockerd, MirrorProcess, Podman, RedisServer, Skopeo


@pytest.fixture(scope="session")
def hosted_mirror(tmp_path_factory):
    """One purely hosted mirror (no upstreams) shared by the API tests."""
    workdir = tmp_path_factory.mktemp("hosted-mirror")
    server = MirrorProcess(workdir, {"storage": {"root": str(workdir / "store")}, "upstreams": []}).start()
    yield server
    server.stop()


@pytest.fixture
def mirror_url(hosted_mirror):
    """Base URL of the shared hosted mirror."""
    return hosted_mirror.url


@pytest.fixture
def mirror_root(hosted_mirror, tmp_path_factory):
    """Store root of the shared hosted mirror."""
    return hosted_mirror.workdir / "store"


@pytest.fixture(scope="session")
def dockerd_daemon(tmp_path_factory):
    """One private dockerd for the whole run (use the ``dockerd`` fixture in tests)."""
    with Dockerd(tmp_path_factory.mktemp("dockerd")) as daemon:
        yield daemon


@pytest.fixture
def dockerd(dockerd_daemon):
    """The shared dockerd, reset after the test (no images, daemon.json extras, logins or trusted CAs)."""
    yield dockerd_daemon
    dockerd_daemon.reset()


@pytest.fixture
def containerd(tmp_path):
    """A private containerd of the test's own (it starts in a tenth of a second), so every pull is cold."""
    with Containerd(tmp_path / "containerd") as daemon:
        yield daemon


@pytest.fixture
def podman(tmp_path):
    """A podman with its own storage and registries.conf."""
    with Podman(tmp_path / "podman") as client:
        yield client


@pytest.fixture
def skopeo(tmp_path):
    """skopeo with an accept-all policy and its own auth file."""
    return Skopeo(tmp_path / "skopeo")


@pytest.fixture(scope="session")
def ceph_rgw(tmp_path_factory):
    """One single-node Ceph cluster with radosgw as S3 for the whole run, started (about 1 s) by the first test
    that asks for it; tests share it, so each makes buckets of its own (``ceph_rgw.bucket(name)``)."""
    with CephRGW(tmp_path_factory.mktemp("ceph-rgw")) as cluster:
        yield cluster


@pytest.fixture
def redis_server(tmp_path):
    """A private, empty redis-server of the test's own (it starts in a tenth of a second)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server
