"""Smoke test of tools/bench: a quick run measures every row and writes them all as JSON (no timing asserted).

The S3 rows need Ceph RGW and redis-server (as root); where they cannot run, they must say why instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.peers import REPO_ROOT, require

ROWS = {
    "cold_blob", "cold_image", "upstream_gets", "cold_fanout", "rss_growth_cold",
    "blob_hosted_1", "blob_hosted_32", "blob_pull_1", "blob_pull_32",
    "manifest_hosted_tag", "manifest_hosted_digest", "manifest_pull_tag", "manifest_pull_digest",
    "rss_growth", "docker_pull_cold", "docker_pull_warm", "bundle_export", "bundle_import",
}
S3_ROWS = {"s3_cold_blob", "s3_blob_1", "s3_blob_redirect_1", "s3_blob_streamed_1", "s3_scale_1", "s3_scale_2",
           "s3_scale_3"}
SBIN = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def s3_peers() -> bool:
    """Whether the S3 rows can run here (what tools/bench checks before it starts Ceph)."""
    return os.geteuid() == 0 and all(shutil.which(program, path=SBIN) for program in (
        "radosgw", "ceph-mon", "ceph-osd", "radosgw-admin", "monmaptool", "redis-server"))


def test_quick_bench_reports_every_row(tmp_path):
    for program in ("/usr/bin/docker-registry", "wrk", "curl"):
        require(program)
    output = tmp_path / "bench.json"
    result = subprocess.run([str(REPO_ROOT / "tools" / "bench"), "--quick", "--skip-docker", "--output", str(output),
                             "--workdir", str(tmp_path / "work")],
                            env={"PATH": SBIN, "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row["key"]: row for row in json.loads(output.read_text())["rows"]}
    assert set(rows) == ROWS | S3_ROWS
    for key, row in rows.items():
        if key.startswith("docker_pull"):
            assert row["mirror"] is None and "--skip-docker" in row["note"]
        elif key in S3_ROWS and not s3_peers():
            assert row["mirror"] is None and row["note"].startswith("not measured: "), row
        else:
            assert row["mirror"] is not None and row["distribution"] is not None, row
            assert row["target"] is None or row["passed"] in (True, False), row
    if s3_peers():  # each S3 row measured what it says: who redirected, and the 3 instances on one bucket
        assert "distribution redirected 2 of 2 GETs" in rows["s3_blob_1"]["note"], rows["s3_blob_1"]["note"]
        assert "mirror redirected 0 of 2 GETs" in rows["s3_blob_1"]["note"]
        assert "mirror redirected 2 of 2 GETs" in rows["s3_blob_redirect_1"]["note"]
        assert "distribution redirected 0 of 2 GETs" in rows["s3_blob_streamed_1"]["note"]
        assert rows["s3_scale_3"]["distribution"] == rows["s3_scale_1"]["mirror"]
        assert all(sample["store_cpu"] is not None for sample in rows["s3_scale_3"]["samples"]["mirror"])
    assert "| figure" in result.stdout
