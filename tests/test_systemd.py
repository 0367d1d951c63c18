"""The systemd units pass systemd-analyze, and the server talks sd_notify over a socket the test binds."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from mirror import config, tls
from mirror.systemd import Notifier
from tests.peers import REPO_ROOT, MirrorProcess, require, short_tempdir

UNITS = REPO_ROOT / "systemd"
SERVICES = ("mirror.service", "mirror-gc.service")
UNIT_FILES = (*SERVICES, "mirror-gc.timer")
MAX_EXPOSURE = 2.0


@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure_is_at_most_2(unit):
    analyze = require("systemd-analyze")
    result = subprocess.run([analyze, "security", "--offline=true", str(UNITS / unit)],
                            capture_output=True, text=True, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def install_into_root(root: Path) -> None:
    """Install the units into ``root`` as on a real host: units, the targets they name, their executables.

    ``systemd-analyze verify --root`` checks that every Exec*= program exists inside the root, so each one
    is a stub there; the real targets come from this machine.
    """
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    (root / "usr/lib/systemd/system").mkdir(parents=True)
    for target in Path("/usr/lib/systemd/system").glob("*.target"):
        shutil.copy(target, root / "usr/lib/systemd/system", follow_symlinks=False)
    for name in UNIT_FILES:
        unit = UNITS / name
        shutil.copy(unit, system)
        for line in unit.read_text().splitlines():
            if line.startswith("Exec"):
                program = root / line.split("=", 1)[1].lstrip("-@:+!").split()[0].lstrip("/")
                program.parent.mkdir(parents=True, exist_ok=True)
                program.write_text("#!/bin/sh\n")
                program.chmod(0o755)


def test_units_verify_without_errors(tmp_path):
    analyze = require("systemd-analyze")
    install_into_root(tmp_path)
    result = subprocess.run([analyze, "verify", f"--root={tmp_path}", *UNIT_FILES],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr + result.stdout


def test_verify_reports_a_broken_unit(tmp_path):
    """The verify check above is not vacuous: a wrong value and a missing program are errors."""
    analyze = require("systemd-analyze")
    install_into_root(tmp_path)
    unit = tmp_path / "etc/systemd/system/mirror.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus")
                    .replace("/opt/mirror/bin/mirror", "/opt/nowhere/mirror"))
    result = subprocess.run([analyze, "verify", f"--root={tmp_path}", "mirror.service"],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "ProtectSystem" in result.stderr or "bogus" in result.stderr
    assert "/opt/nowhere/mirror" in result.stderr


def test_sysusers_creates_the_user_the_units_run_as(tmp_path):
    sysusers = require("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    subprocess.run([sysusers, f"--root={tmp_path}", str(UNITS / "mirror-sysusers.conf")],
                   capture_output=True, text=True, check=True)
    user = next(line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
                if line.startswith("mirror:"))
    assert user[5] == "/var/lib/mirror" and user[6].endswith("nologin")
    for unit in SERVICES:
        assert {"User=mirror", "Group=mirror"} <= set((UNITS / unit).read_text().splitlines())


@pytest.fixture
def notify_socket():
    """A bound unix datagram socket and its path, like systemd's notification socket."""
    folder = short_tempdir("notify-")
    path = folder / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        yield sock, str(path)
    shutil.rmtree(folder, ignore_errors=True)


def test_ready_reaches_the_socket(notify_socket):
    sock, path = notify_socket
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.stopping("draining")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining"
    assert notifier.ping()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.reloading()
    assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", sock.recv(4096))


def test_abstract_socket():
    name = f"mirror-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        assert Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_systemd_nothing_is_sent():
    notifier = Notifier.from_environ({})
    assert not notifier.ready()
    assert notifier.watchdog_interval is None


def test_unreachable_socket_does_not_raise(tmp_path):
    assert not Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready()


@pytest.mark.parametrize(("environ", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval(environ, interval):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify", **environ}, pid=4242)
    assert notifier.watchdog_interval == interval


def test_serve_notifies_ready_watchdog_and_stopping(notify_socket, tmp_path):
    """The real ``python -m mirror serve`` under a fake service manager: READY=1, pings, STOPPING=1."""
    sock, path = notify_socket
    mirror = MirrorProcess(tmp_path, {"upstreams": []},
                           env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    with mirror:
        messages = [sock.recv(4096)]
        assert messages[0].startswith(b"READY=1")
        messages.append(sock.recv(4096))
        assert messages[1] == b"WATCHDOG=1"
        mirror.stop()
        while not messages[-1].startswith(b"STOPPING=1"):
            messages.append(sock.recv(4096))


def test_example_config_loads_with_the_units_paths(tmp_path):
    example = UNITS / "config.example.yaml"
    loaded = config.load(example, {})
    assert loaded.storage.root == Path("/var/lib/mirror")  # StateDirectory=mirror
    assert loaded.upstreams == ()
    enabled = tmp_path / "config.yaml"  # the commented TLS block, pointed at real files
    tls.init(tmp_path / "tls", "mirror.example", [])
    enabled.write_text(example.read_text().replace("# tls:", "tls:")
                       .replace("#   cert: /etc/mirror/tls", f"  cert: {tmp_path}/tls")
                       .replace("#   key: /etc/mirror/tls", f"  key: {tmp_path}/tls"))
    assert config.load(enabled, {}).tls == config.Tls(tmp_path / "tls/server.crt", tmp_path / "tls/server.key")
    for unit in SERVICES:
        assert "--config /etc/mirror/config.yaml" in (UNITS / unit).read_text()
