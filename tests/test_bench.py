"""Smoke test of tools/bench: a quick run measures every row and writes them all as JSON (no timing asserted)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.peers import REPO_ROOT, require

ROWS = {
    "cold_blob", "cold_image", "upstream_gets", "cold_fanout", "rss_growth_cold",
    "blob_hosted_1", "blob_hosted_32", "blob_pull_1", "blob_pull_32",
    "manifest_hosted_tag", "manifest_hosted_digest", "manifest_pull_tag", "manifest_pull_digest",
    "rss_growth", "docker_pull_cold", "docker_pull_warm", "bundle_export", "bundle_import",
}


def test_quick_bench_reports_every_row(tmp_path):
    for program in ("/usr/bin/docker-registry", "wrk", "curl"):
        require(program)
    output = tmp_path / "bench.json"
    result = subprocess.run([str(REPO_ROOT / "tools" / "bench"), "--quick", "--skip-docker", "--output", str(output),
                             "--workdir", str(tmp_path / "work")],
                            env={"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row["key"]: row for row in json.loads(output.read_text())["rows"]}
    assert set(rows) == ROWS
    for key, row in rows.items():
        if key.startswith("docker_pull"):
            assert row["mirror"] is None and "--skip-docker" in row["note"]
        else:
            assert row["mirror"] is not None and row["distribution"] is not None, row
            assert row["target"] is None or row["passed"] in (True, False), row
    assert "| figure" in result.stdout
