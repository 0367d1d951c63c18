"""The ``mirror`` command line: help and version, and ``bundle import``'s store (named, required, its owner's)."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pwd
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import tests.test_handlers as handlers
from mirror import cli, storage
from mirror.digest import Digest
from tests.images import build_image
from tests.peers import REPO_ROOT, run
from tests.test_bundle import fill, mirror, write_config

IMAGE = build_image("cli", layers=2)
REFERENCE = "docker.io/library/cli:1"


def mirror_process(*argv: str | Path, env: dict[str, str] | None = None):
    """Run ``python -m mirror ARGV`` from the source tree, without a ``$MIRROR_CONFIG``; return the result."""
    environ = {"PYTHONPATH": str(REPO_ROOT), "MIRROR_CONFIG": "", **(env or {})}
    return run([sys.executable, "-m", "mirror", *map(str, argv)], env=environ, check=False)


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A bundle of one image exported from a store of its own."""
    source = tmp_path / "source-store"
    fill(source, REFERENCE, IMAGE)
    out = tmp_path / "cli.tar"
    assert mirror("bundle", "export", "--config", write_config(tmp_path / "source.yaml", source), "--output", out,
                  REFERENCE) == 0
    return out


def parsers(parser: argparse.ArgumentParser, prog: str = "mirror"):
    """``(prog, parser)`` for ``parser`` and every subcommand's parser below it."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{prog} {name}")


def test_every_command_and_option_says_what_it_does():
    for prog, parser in parsers(cli.build_parser()):
        assert parser.description, prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{prog} {choice.dest}"
            else:
                assert action.help and action.help != argparse.SUPPRESS, f"{prog} {action.dest}"


def test_help_is_for_users_and_version_prints_the_installed_version():
    helped = mirror_process("--help")
    assert helped.returncode == 0
    assert cli.__doc__.strip() not in helped.stdout
    for expected in ("pull-through cache", "--config FILE", "$MIRROR_CONFIG", "--version", "bundle", "tls"):
        assert expected in helped.stdout
    assert "--replace-names" in mirror_process("tls", "init", "--help").stdout
    version = mirror_process("--version")
    assert (version.returncode, version.stdout) == (0, f"mirror {importlib.metadata.version('mirror')}\n")


def test_version_without_an_installed_distribution(monkeypatch, capsys):
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == "mirror unknown\n"


def test_import_without_a_config_is_refused_unless_the_default_store_is_asked_for(bundle, tmp_path, monkeypatch,
                                                                                   capsys):
    refused = mirror_process("bundle", "import", bundle)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "--config" in refused.stderr and "--default-store" in refused.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIRROR_CONFIG", raising=False)
    assert mirror("bundle", "import", bundle) == 2
    assert not (tmp_path / "mirror-data").exists()
    capsys.readouterr()
    assert mirror("bundle", "import", "--default-store", bundle) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"importing into {tmp_path / 'mirror-data'}"
    stored = storage.open(tmp_path / "mirror-data").metadata.resolve_tag("docker.io/library/cli", "1")
    assert stored == Digest.parse(IMAGE.digest)
    config = write_config(tmp_path / "target.yaml", tmp_path / "target")
    assert mirror("bundle", "import", "--default-store", "--config", config, bundle) == 2  # which one?


def test_import_names_its_store_first(bundle, tmp_path):
    config = write_config(tmp_path / "target.yaml", tmp_path / "target")
    imported = mirror_process("bundle", "import", bundle, env={"MIRROR_CONFIG": str(config)})
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[0] == f"importing into {tmp_path / 'target'}"


def test_a_missing_or_left_out_part_is_named(tmp_path):
    source = tmp_path / "source-store"
    fill(source, REFERENCE, IMAGE)
    config = write_config(tmp_path / "source.yaml", source)
    out = tmp_path / "split.tar"
    assert mirror("bundle", "export", "--config", config, "--output", out, "--split", "64KiB", REFERENCE) == 0
    parts = sorted(tmp_path.glob("split.tar.*"))
    assert len(parts) > 2
    left_out = mirror_process("bundle", "verify", *parts[:-1])
    assert left_out.returncode == 1 and f"part {parts[-1]} is not given" in left_out.stderr
    parts[1].unlink()
    target = write_config(tmp_path / "target.yaml", tmp_path / "target")
    for argv in (["bundle", "import", "--config", target, out], ["bundle", "import", "--config", target, *parts[::2]],
                 ["bundle", "verify", out]):
        result = mirror_process(*argv)
        assert result.returncode == 1
        assert f"part {parts[1]} is missing" in result.stderr and "truncated" not in result.stderr


@pytest.fixture
def nobody_store():
    """An empty store owned by ``nobody``, in a directory that ``nobody`` can reach; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("changing a store's owner needs root")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("there is no user nobody")
    folder = Path(tempfile.mkdtemp(prefix="mirror-owner-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        root = folder / "store"
        storage.open(root)
        for path in [root, *root.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        yield root, nobody
    finally:
        shutil.rmtree(folder)


def test_root_imports_into_a_store_of_another_user_as_that_user(nobody_store, bundle, tmp_path):
    root, nobody = nobody_store
    config = write_config(tmp_path / "target.yaml", root)  # the config and the bundle only root can read
    imported = mirror_process("bundle", "import", "--config", config, bundle)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[:2] == [f"importing into {root}", f"writing as nobody, the owner of {root}"]
    owners = {str(path.relative_to(root)): (path.stat().st_uid, path.stat().st_gid) for path in root.rglob("*")}
    assert any(name.startswith("blobs/") for name in owners)
    assert set(owners.values()) == {(nobody.pw_uid, nobody.pw_gid)}, owners
    stored = storage.open(root).metadata.resolve_tag("docker.io/library/cli", "1")
    assert stored == Digest.parse(IMAGE.digest)


class ReadinessTest(handlers.MirrorTestCase):
    """``/readyz`` over the in-process appliance."""

    def test_readyz_names_no_path(self):
        response = self.request("GET", "/readyz")
        assert response.code == 200
        assert json.loads(response.body) == {"status": "ready", "reason": None}
        assert b"/" not in response.body
