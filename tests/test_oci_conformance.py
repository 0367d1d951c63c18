"""The official OCI distribution-spec conformance suite (v1.1.1, in shared/conformance beside the repository)
run against a real ``mirror serve``: all four workflows (pull, push, content discovery, content management),
on a fresh store each time, hosted-only and with a default upstream."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.peers import REPO_ROOT, DistributionRegistry, MirrorProcess, require, run

CONFORMANCE = REPO_ROOT.parent / "shared" / "conformance"
# run.sh first calls build.sh: a no-op once built (tools/test builds it ahead), else about 70 s plus apt.
# The suite itself runs in seconds.
TIMEOUT = 1800


@pytest.fixture
def conformance() -> str:
    """The suite's run.sh; skip (fail when CI=true) when the suite or the Go toolchain to build it is missing."""
    suite = require(str(CONFORMANCE / "run.sh"))
    if os.geteuid() != 0:
        require("go")  # build.sh would apt-install it, which needs root (tools/test does it as root)
    return suite


def run_conformance(suite: str, root_url: str, results: Path) -> None:
    """Run the suite against ``root_url`` (results in ``results``); fail listing its FAIL lines."""
    result = run([suite, root_url], env={"CONFORMANCE_OUT": str(results)}, check=False, timeout=TIMEOUT)
    exit_status = result.returncode
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL: ")]
    summary = (result.stdout.strip().splitlines() or ["no result"])[-1]
    assert exit_status == 0, (
        f"run.sh {root_url} exited {exit_status}: {summary} (results in {results})\n"
        + "\n".join(failures or [result.stderr[-3000:]]))


@pytest.mark.peer("oci-conformance")
def test_hosted_only_mirror_passes_the_oci_conformance_suite(conformance, tmp_path):
    # MirrorProcess keeps its store in its own workdir: tmp_path makes it a fresh one.
    with MirrorProcess(tmp_path / "mirror", {"upstreams": [], "default_upstream": None}) as mirror:
        run_conformance(conformance, mirror.url, tmp_path / "conformance")


@pytest.mark.peer("oci-conformance")
def test_mirror_with_a_default_upstream_passes_the_oci_conformance_suite(conformance, tmp_path):
    # An empty anonymous Distribution registry as docker.io: every name the suite uses routes to it.
    with DistributionRegistry(tmp_path / "upstream") as upstream, MirrorProcess(
            tmp_path / "mirror", {"upstreams": [{"name": "docker.io", "url": upstream.url}],
                                  "default_upstream": "docker.io"}) as mirror:
        run_conformance(conformance, mirror.url, tmp_path / "conformance")
