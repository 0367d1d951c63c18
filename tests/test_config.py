"""``mirror.config.load``: every value must have its key's YAML type, and the error names the key."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.config import load
from mirror.errors import ConfigError

BOOLEAN_KEYS = [("upstreams", 0, "allow_push"), ("auth", "anonymous_pull")]
NUMBER_KEYS = [("workers",), ("storage", "max_cache_size"), ("storage", "upload_expiry"), ("storage", "gc_grace"),
               ("upstreams", 0, "manifest_ttl"), ("upstreams", 0, "timeout"), ("auth", "token_ttl"),
               ("notifications", 0, "timeout")]
STRING_KEYS = [("listen",), ("storage", "root"), ("upstreams", 0, "name"), ("upstreams", 0, "url"),
               ("upstreams", 0, "username"), ("upstreams", 0, "password"), ("default_upstream",),
               ("trusted_keys", 0), ("tls", "cert"), ("tls", "key"), ("auth", "htpasswd"), ("auth", "realm"),
               ("auth", "service"), ("auth", "groups", "admins", 0), ("auth", "access", 0, "repository"),
               ("auth", "access", 0, "read", 0), ("notifications", 0, "url"), ("notifications", 0, "events", 0),
               ("notifications", 0, "headers", "X-Token")]


def dotted(path: tuple[str | int, ...]) -> str:
    """The key as a ConfigError names it: ``upstreams[0].allow_push``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


@pytest.fixture
def full(tmp_path) -> dict[str, Any]:
    """A config that sets every key (files it names exist), and loads."""
    for name in ("htpasswd", "server.crt", "server.key", "bundle.pub"):
        (tmp_path / name).write_text("")
    return {"listen": "127.0.0.1:5000",
            "storage": {"root": str(tmp_path / "store"), "max_cache_size": "50GiB", "upload_expiry": "24h",
                        "gc_grace": 3600},
            "upstreams": [{"name": "docker.io", "url": "https://registry-1.docker.io", "username": "alice",
                           "password": "s3cret", "manifest_ttl": "5m", "timeout": 10, "allow_push": False}],
            "default_upstream": "docker.io", "workers": 2, "trusted_keys": [str(tmp_path / "bundle.pub")],
            "tls": {"cert": str(tmp_path / "server.crt"), "key": str(tmp_path / "server.key")},
            "notifications": [{"url": "https://ci.example/events", "events": ["push"],
                               "headers": {"X-Token": "abc"}, "timeout": "5s"}],
            "auth": {"htpasswd": str(tmp_path / "htpasswd"), "realm": "https://mirror.example/token",
                     "service": "mirror", "token_ttl": "5m", "anonymous_pull": True,
                     "groups": {"admins": ["alice"]}, "access": [{"repository": "team/*", "read": ["admins"]}]}}


def load_raw(tmp_path: Path, raw: dict[str, Any], environ: dict[str, str] | None = None):
    """Write ``raw`` as the config file and load it."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load(path, environ or {})


def refused(tmp_path: Path, raw: dict[str, Any], path: tuple[str | int, ...], value: Any) -> ConfigError:
    """Load ``raw`` with ``value`` at ``path``; assert the error names the key (or its list or rule); return it."""
    raw = copy.deepcopy(raw)
    parent = raw
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, raw)
    assert caught.value.key in {dotted(path[:end]) for end in range(len(path) - 2, len(path) + 1)}, caught.value
    assert "\n" not in caught.value.message
    return caught.value


def test_the_full_config_loads_with_its_types(tmp_path, full):
    config = load_raw(tmp_path, full)
    assert config.upstreams[0].allow_push is False and config.auth.anonymous_pull is True
    assert config.storage.max_cache_size == 50 * 2**30 and config.storage.upload_expiry == 86400.0
    assert config.upstreams[0].manifest_ttl == 300.0 and config.workers == 2
    assert config.notifications[0].headers == (("X-Token", "abc"),)


@pytest.mark.parametrize("path", BOOLEAN_KEYS, ids=dotted)
@pytest.mark.parametrize("value", ["false", "true", "yes", 0, 1, None])
def test_booleans_must_be_yaml_booleans(tmp_path, full, path, value):
    assert "true or false" in refused(tmp_path, full, path, value).message


def test_allow_push_as_the_string_false_does_not_allow_pushes(tmp_path, full):
    full["upstreams"][0]["allow_push"] = "false"
    with pytest.raises(ConfigError, match=r"upstreams\[0\]\.allow_push.*YAML boolean"):
        load_raw(tmp_path, full)


@pytest.mark.parametrize("path", NUMBER_KEYS, ids=dotted)
@pytest.mark.parametrize("value", [True, False, [1], {"a": 1}, "", float("inf"), float("nan"), -1,
                                   "9" * 400, 10**30])
def test_numbers_are_never_booleans_or_out_of_range(tmp_path, full, path, value):
    refused(tmp_path, full, path, value)


@pytest.mark.parametrize(("path", "value"), [(("workers",), "2"), (("workers",), 2.0), (("workers",), 0),
                                             (("workers",), 65), (("storage", "max_cache_size"), "5i"),
                                             (("storage", "max_cache_size"), "²"), (("storage", "gc_grace"), "1e3"),
                                             (("storage", "gc_grace"), "٣s"), (("listen",), "h:²"),
                                             (("listen",), "h:" + "9" * 5000), (("listen",), "h:65536")])
def test_numbers_in_strings_are_plain_digits(tmp_path, full, path, value):
    refused(tmp_path, full, path, value)


@pytest.mark.parametrize("path", STRING_KEYS, ids=dotted)
@pytest.mark.parametrize("value", [True, 5000, [True], {"a": "b"}])
def test_strings_are_strings(tmp_path, full, path, value):
    refused(tmp_path, full, path, value)


def test_a_password_of_the_wrong_type_is_not_repeated(tmp_path, full):
    assert "8675309" not in refused(tmp_path, full, ("upstreams", 0, "password"), 8675309).message


@pytest.mark.parametrize("name", [True, 5])
def test_group_names_are_strings(tmp_path, full, name):
    full["auth"]["groups"] = {name: ["alice"]}
    with pytest.raises(ConfigError, match="group name"):
        load_raw(tmp_path, full)


def test_sections_that_are_not_mappings_are_named(tmp_path, full):
    for section in ("storage", "tls", "auth"):
        raw = {**full, section: "x"}
        with pytest.raises(ConfigError) as caught:
            load_raw(tmp_path, raw)
        assert caught.value.key == section


def test_the_workers_variable_is_a_number_of_digits(tmp_path, full):
    assert load_raw(tmp_path, full, {"MIRROR_WORKERS": "3"}).workers == 3
    for value in ("x", "²", "9" * 5000, "true"):
        with pytest.raises(ConfigError, match="workers"):
            load_raw(tmp_path, full, {"MIRROR_WORKERS": value})


def test_a_default_upstream_that_is_no_upstream_nor_host_name_is_refused_with_the_upstreams(tmp_path, full):
    full["default_upstream"] = "dockerio"
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, full)
    assert caught.value.key == "default_upstream"
    assert "configured upstreams are docker.io" in caught.value.message
    assert "did you mean docker.io?" in caught.value.message
    with pytest.raises(ConfigError, match="no upstream is configured"):
        load_raw(tmp_path, {"upstreams": [], "default_upstream": "dockerio"})
    with pytest.raises(ConfigError, match="default_upstream"):
        load(None, {"MIRROR_DEFAULT_UPSTREAM": "dockerio"})


@pytest.mark.parametrize("name", ["quay.io", "registry:5000", "localhost", "Index.Docker.IO"])
def test_a_default_upstream_may_be_any_registry_host_name(tmp_path, name):
    default = load_raw(tmp_path, {"upstreams": [], "default_upstream": name}).default_upstream
    assert default == ("docker.io" if name == "Index.Docker.IO" else name)


def test_a_default_upstream_may_be_a_configured_upstream_without_a_dot(tmp_path):
    raw = {"upstreams": [{"name": "registry", "url": "https://registry.example"}], "default_upstream": "registry"}
    assert load_raw(tmp_path, raw).default_upstream == "registry"


@pytest.mark.parametrize("path", [("trusted_keys", 0), ("tls", "cert"), ("tls", "key"), ("auth", "htpasswd")],
                         ids=dotted)
def test_files_the_config_names_must_exist(tmp_path, full, path):
    error = refused(tmp_path, full, path, str(tmp_path / "nope.pub"))
    assert error.key == dotted(path) and "no such file" in error.message


@pytest.mark.parametrize("text", ["", "\n\n", "# every key commented out\n# listen: 127.0.0.1:5000\n"])
def test_an_empty_config_file_is_an_error(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is empty") as caught:
        load(path, {})
    assert caught.value.key == str(path)
