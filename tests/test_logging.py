"""Logs of a real ``mirror serve``: JSON lines or readable text by ``log_format``, access lines naming the cache
result and the upstream, and no third-party chatter at INFO."""
from __future__ import annotations

import io
import json
import logging
import os
import re

import pytest

from mirror.config import load
from mirror.errors import ConfigError
from mirror.metrics import QUIET_LOGGERS, configure_logging
from tests.images import build_image, push
from tests.peers import DistributionRegistry, MirrorProcess, wait_until
from tests.test_metrics import pull

UPSTREAM = "upstream.test"
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) [\w.]+\[\d+\] .+")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """An anonymous Distribution registry holding one image."""
    with DistributionRegistry(tmp_path_factory.mktemp("upstream")) as registry:
        registry.image = build_image("logging")
        push(registry.url, "org/tool", "1.0", registry.image)
        yield registry


def log_lines(mirror: MirrorProcess) -> list[str]:
    """What the mirror wrote, line by line (without the test's own line naming the command)."""
    return [line for line in mirror.log().splitlines() if not line.startswith("--- mirror: ")]


def pull_through(tmp_path, upstream, log_format: str | None, env: dict[str, str] | None = None) -> list[str]:
    """The lines of the whole log of a mirror of ``upstream`` that pulled the image twice, through the path
    prefix and the default route."""
    config = {"upstreams": [{"name": UPSTREAM, "url": upstream.url}], "default_upstream": UPSTREAM,
              **({"log_format": log_format} if log_format else {})}
    blobs = len(upstream.image.blobs)
    with MirrorProcess(tmp_path / "mirror", config, env=env) as mirror:
        pull(mirror, f"{UPSTREAM}/org/tool", "1.0")
        pull(mirror, "org/tool", "1.0")
        # a streamed blob is logged just after its last byte went out: wait for the last one
        wait_until(lambda: sum("/blobs/sha256:" in line for line in log_lines(mirror)) == 2 * blobs, 10,
                   "every blob GET to be logged")
    return log_lines(mirror)


def test_json_lines_name_the_cache_result_and_the_upstream(tmp_path, upstream):
    lines = pull_through(tmp_path, upstream, "json")
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    access = [record for record in records if record["logger"] == "mirror.access" and "/org/tool/" in record["path"]]
    blobs = len(upstream.image.blobs)
    assert [(record["cache"], record["upstream"], record["route"]) for record in access] == [
        ("miss", UPSTREAM, "manifest"), *[("miss", UPSTREAM, "blob")] * blobs,
        ("hit", UPSTREAM, "manifest"), *[("hit", UPSTREAM, "blob")] * blobs]
    assert all(f"cache={record['cache']} upstream={UPSTREAM}" in record["message"] for record in access)
    assert all(isinstance(record["pid"], int) for record in records)
    # the upstream requests behind the misses are not logged a second time by the HTTP libraries
    assert not [record for record in records if record["logger"].split(".")[0] in ("httpx", "httpcore", "urllib3")
                and record["level"] == "info"]
    assert not any("HTTP Request:" in line for line in lines)


def test_text_is_one_readable_line_per_request(tmp_path, upstream):
    lines = pull_through(tmp_path, upstream, "text")
    assert all(TEXT_LINE.fullmatch(line) for line in lines), lines
    access = [line for line in lines if " mirror.access[" in line and "/org/tool/" in line]
    blobs = len(upstream.image.blobs)
    assert len(access) == 2 * (1 + blobs)  # one line per request
    assert sum(" 200 " in line and f"cache=miss upstream={UPSTREAM}" in line for line in access) == 1 + blobs
    assert sum(" 200 " in line and f"cache=hit upstream={UPSTREAM}" in line for line in access) == 1 + blobs
    assert all('"GET /v2/' in line for line in access)
    assert not any("HTTP Request:" in line for line in lines)


def test_the_environment_chooses_the_format(tmp_path, upstream):
    lines = pull_through(tmp_path, upstream, "json", env={"MIRROR_LOG_FORMAT": "text"})
    assert lines and all(TEXT_LINE.fullmatch(line) for line in lines)


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        """Yes."""
        return True


@pytest.fixture
def root_logging():
    """Restore the logging configuration ``configure_logging`` changes."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    yield
    root.handlers[:], _, levels = saved
    root.setLevel(saved[1])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize(("stream", "log_format", "as_json"), [
    (Terminal, "auto", False), (io.StringIO, "auto", True), (Terminal, "json", True), (io.StringIO, "text", False)])
def test_auto_is_text_on_a_terminal_and_json_elsewhere(root_logging, stream, log_format, as_json):
    out = stream()
    configure_logging(out, log_format)
    logging.getLogger("mirror.test").info("hello %s", "world")
    logging.getLogger("httpx").info("HTTP Request: GET https://upstream.test/v2/")
    logging.getLogger("httpx").warning("a warning still shows")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "a warning still shows" in lines[1]
    if as_json:
        assert json.loads(lines[0])["message"] == "hello world"
    else:
        assert TEXT_LINE.fullmatch(lines[0]) and lines[0].endswith(f"INFO mirror.test[{os.getpid()}] hello world")


def test_log_format_is_checked(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("log_format: json\n")
    assert load(path, {}).log_format == "json"
    assert load(path, {"MIRROR_LOG_FORMAT": "text"}).log_format == "text"
    assert load(None, {}).log_format == "auto"
    for bad in ("yaml", "true", "[json]"):
        path.write_text(f"log_format: {bad}\n")
        with pytest.raises(ConfigError, match="log_format"):
            load(path, {})
