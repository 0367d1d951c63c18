"""``mirror.config.load``: every value must have its key's YAML type, and the error names the key."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.config import S3Storage, load
from mirror.errors import ConfigError

BOOLEAN_KEYS = [("upstreams", 0, "allow_push"), ("auth", "anonymous_pull"), ("storage", "s3", "redirect")]
NUMBER_KEYS = [("workers",), ("storage", "max_cache_size"), ("storage", "upload_expiry"), ("storage", "gc_grace"),
               ("upstreams", 0, "manifest_ttl"), ("upstreams", 0, "timeout"), ("auth", "token_ttl"),
               ("notifications", 0, "timeout")]
STRING_KEYS = [("listen",), ("storage", "root"), ("upstreams", 0, "name"), ("upstreams", 0, "url"),
               ("upstreams", 0, "username"), ("upstreams", 0, "password"), ("default_upstream",),
               ("trusted_keys", 0), ("tls", "cert"), ("tls", "key"), ("auth", "htpasswd"), ("auth", "realm"),
               ("auth", "service"), ("auth", "groups", "admins", 0), ("auth", "access", 0, "repository"),
               ("auth", "access", 0, "read", 0), ("notifications", 0, "url"), ("notifications", 0, "events", 0),
               ("notifications", 0, "headers", "X-Token"), ("storage", "s3", "endpoint"), ("storage", "s3", "bucket"),
               ("storage", "s3", "region"), ("storage", "s3", "access_key"), ("storage", "s3", "secret_key"),
               ("storage", "s3", "prefix"), ("redis",), ("secret",)]
SECRET_KEY = "wJalrXUtnFEMI-K7MDENG"  # the values tests look for in error messages and reprs
SECRET = "a-long-random-string-0123"
REDIS_PASSWORD = "hunter2-redis"


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
                        "gc_grace": 3600,
                        "s3": {"endpoint": "http://rgw.example:7480", "bucket": "mirror", "region": "us-east-1",
                               "access_key": "AKIAEXAMPLE", "secret_key": SECRET_KEY, "prefix": "prod/",
                               "redirect": False}},
            "redis": f"redis://:{REDIS_PASSWORD}@redis.example:6379/0", "secret": SECRET,
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
    assert config.storage.s3 == S3Storage("http://rgw.example:7480", "mirror", "AKIAEXAMPLE", SECRET_KEY,
                                          "us-east-1", "prod/", False)
    assert config.redis == f"redis://:{REDIS_PASSWORD}@redis.example:6379/0" and config.secret == SECRET


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


S3_REQUIRED = {"endpoint": "http://rgw.example:7480", "bucket": "mirror", "access_key": "AKIAEXAMPLE",
               "secret_key": SECRET_KEY}
VALID_S3 = [  # (key, value as written, value loaded)
    ("endpoint", "https://s3.amazonaws.com", "https://s3.amazonaws.com"),
    ("endpoint", "http://rgw.example:7480/", "http://rgw.example:7480"),
    ("endpoint", "http://[::1]:9000", "http://[::1]:9000"),
    ("endpoint", "HTTPS://minio.example", "HTTPS://minio.example"),
    ("bucket", "abc", "abc"), ("bucket", "my.bucket-2", "my.bucket-2"), ("bucket", "a" * 63, "a" * 63),
    ("bucket", "0-9", "0-9"),
    ("region", "eu-west-3", "eu-west-3"), ("region", "default", "default"), ("region", "zg_1.a", "zg_1.a"),
    ("access_key", "x", "x"), ("secret_key", "y", "y"),
    ("prefix", "", ""), ("prefix", "prod/", "prod/"), ("prefix", "a/b.c/", "a/b.c/"),
    ("prefix", "Team_(1)!*'-x/", "Team_(1)!*'-x/"), ("prefix", "..a/", "..a/"),
    ("redirect", True, True), ("redirect", False, False),
    ("timeout", 5, 5.0), ("timeout", "1m", 60.0), ("timeout", 0.5, 0.5),
]
INVALID_S3 = [  # (key, value): refused, naming storage.s3.<key>
    *(("endpoint", value) for value in [
        "", "rgw.example:7480", "ftp://rgw.example", "http://", "http://:7480", "http://rgw.example/bucket",
        "http://rgw.example/?", "http://rgw.example?x=1", "http://rgw.example#f", "http://rgw.example:99999",
        "http://rgw.example:0", "http://rgw.example:port", "http://[::1", "http://user:pw@rgw.example",
        "http://@rgw.example", None]),
    *(("bucket", value) for value in [
        "", "ab", "a" * 64, "Mirror", "my_bucket", "-abc", "abc-", ".abc", "abc.", "a/b", "a b c", None]),
    ("access_key", ""), ("access_key", None), ("secret_key", ""), ("secret_key", None),
    ("region", ""), ("region", None), ("region", "us east"), ("region", "us/east-1"),
    *(("prefix", value) for value in [
        "prod", "/prod/", "/", "a//", "a/../", "../", "./", "a/./b/", "a b/", "ü/", "a\\b/", "a?b/", None]),
    ("redirect", "true"), ("redirect", None),
    ("timeout", 0), ("timeout", -1), ("timeout", "soon"), ("timeout", None),
]
VALID_REDIS = ["redis://redis.example:6379/0", "redis://redis.example", "redis://redis.example/",
               "rediss://:pw@redis.example:6380/15", "redis://user:pw@10.0.0.5/2", "redis://[::1]:6379",
               "redis://h/0?socket_timeout=5", "unix:///run/redis/redis.sock", "unix:///run/redis.sock?db=1",
               "unix://:pw@/run/redis.sock"]
INVALID_REDIS = ["", "redis.example:6379", "http://redis.example", "redis://", "redis://:6379", "redis://h:0",
                 "redis://h:99999", "redis://h:port", "redis://h/db", "redis://h/0/1", "redis://h#f",
                 "unix://", "unix://host/run/redis.sock", "unix://relative.sock", "redis://[::1"]


def s3_config(**s3: Any) -> dict[str, Any]:
    """A config whose storage.s3 is ``S3_REQUIRED`` with ``s3`` (a value of None removes its key)."""
    keys = {**S3_REQUIRED, **s3}
    return {"storage": {"s3": {key: value for key, value in keys.items() if value is not None}}}


def test_s3_needs_only_its_required_keys_and_keeps_the_local_root(tmp_path):
    config = load_raw(tmp_path, s3_config())
    assert config.storage.s3 == S3Storage("http://rgw.example:7480", "mirror", "AKIAEXAMPLE", SECRET_KEY)
    assert (config.storage.s3.region, config.storage.s3.prefix, config.storage.s3.redirect) == ("us-east-1", "", False)
    assert config.storage.root == Path("mirror-data")
    assert (config.redis, config.secret) == (None, None)
    assert load(None, {}).storage.s3 is None


@pytest.mark.parametrize(("key", "value", "loaded"), VALID_S3, ids=lambda value: repr(value)[:40])
def test_valid_s3_values(tmp_path, key, value, loaded):
    assert getattr(load_raw(tmp_path, s3_config(**{key: value})).storage.s3, key) == loaded


@pytest.mark.parametrize(("key", "value"), INVALID_S3, ids=lambda value: repr(value)[:40])
def test_invalid_s3_values_are_refused_naming_the_key(tmp_path, key, value):
    raw = s3_config()
    raw["storage"]["s3"][key] = value
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, raw)
    assert caught.value.key == f"storage.s3.{key}", caught.value
    assert "\n" not in caught.value.message


@pytest.mark.parametrize("key", sorted(S3_REQUIRED))
def test_s3_without_a_required_key_is_refused_naming_it(tmp_path, key):
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, s3_config(**{key: None}))
    assert caught.value.key == f"storage.s3.{key}"


@pytest.mark.parametrize("value", ["x", [], ["endpoint"], 5, True])
def test_s3_that_is_not_a_mapping_is_named(tmp_path, value):
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, {"storage": {"s3": value}})
    assert caught.value.key == "storage.s3"


def test_unknown_s3_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown key") as caught:
        load_raw(tmp_path, s3_config(endpoint_url="http://rgw.example"))
    assert caught.value.key == "storage.s3.endpoint_url"


def test_an_empty_s3_section_means_none(tmp_path):
    assert load_raw(tmp_path, {"storage": {"s3": None}}).storage.s3 is None


@pytest.mark.parametrize("value", VALID_REDIS)
def test_valid_redis_urls(tmp_path, value):
    assert load_raw(tmp_path, {"redis": value}).redis == value


@pytest.mark.parametrize("value", INVALID_REDIS)
def test_invalid_redis_urls_are_refused_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, {"redis": value})
    assert caught.value.key == "redis"


@pytest.mark.parametrize(("value", "valid"), [("x" * 16, True), ("ü" * 16, True), (SECRET, True), ("", False),
                                              ("x" * 15, False)])
def test_the_secret_is_a_string_of_at_least_16_characters(tmp_path, value, valid):
    if valid:
        assert load_raw(tmp_path, {"secret": value}).secret == value
    else:
        with pytest.raises(ConfigError, match="at least 16 characters") as caught:
            load_raw(tmp_path, {"secret": value})
        assert caught.value.key == "secret"


@pytest.mark.parametrize(("raw", "secret"), [
    ({"secret": "hunter2-short"}, "hunter2-short"),
    ({"secret": 867530912345678901}, "867530912345678901"),
    ({"redis": f"redis://:{REDIS_PASSWORD}@redis.example:0"}, REDIS_PASSWORD),
    ({"redis": f"http://:{REDIS_PASSWORD}@redis.example"}, REDIS_PASSWORD),
    ({"redis": f"unix://:{REDIS_PASSWORD}@host/sock"}, REDIS_PASSWORD),
    (s3_config(secret_key=86753091234), "86753091234"),
    (s3_config(access_key=86753091234), "86753091234"),
    (s3_config(secret_key=[SECRET_KEY]), SECRET_KEY),
    (s3_config(endpoint=f"http://user:{SECRET_KEY}@rgw.example"), SECRET_KEY),
    (s3_config(endpoint=f"http://rgw.example/?key={SECRET_KEY}"), SECRET_KEY),
], ids=lambda value: str(value)[:60])
def test_secret_values_are_not_repeated_in_errors(tmp_path, raw, secret):
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, raw)
    assert secret not in str(caught.value) and secret not in caught.value.message


def test_secret_values_are_not_in_the_repr_of_the_config(tmp_path, full):
    (tmp_path / "ca.pem").write_text("")
    full["auth"]["ldap"] = {"url": "ldap://ldap.example", "user_base": "ou=people,dc=example",
                            "group_base": "ou=groups,dc=example", "bind_dn": "cn=mirror,dc=example",
                            "bind_password": "ldap-s3cret-password"}
    config = load_raw(tmp_path, full)
    for text in (repr(config), str(config), repr(config.storage), repr(config.storage.s3)):
        for secret in (SECRET_KEY, SECRET, REDIS_PASSWORD, "s3cret", "ldap-s3cret-password"):
            assert secret not in text
    assert "AKIAEXAMPLE" in repr(config.storage.s3)  # the access key is an identifier, not a secret


S3_ENVIRON = {"MIRROR_STORAGE_S3_ENDPOINT": "http://rgw.example:7480", "MIRROR_STORAGE_S3_BUCKET": "mirror",
              "MIRROR_STORAGE_S3_REGION": "eu-1", "MIRROR_STORAGE_S3_ACCESS_KEY": "AKIAEXAMPLE",
              "MIRROR_STORAGE_S3_SECRET_KEY": SECRET_KEY, "MIRROR_STORAGE_S3_PREFIX": "prod/",
              "MIRROR_REDIS": "redis://redis.example:6379/0", "MIRROR_SECRET": SECRET}
S3_FROM_ENVIRON = S3Storage("http://rgw.example:7480", "mirror", "AKIAEXAMPLE", SECRET_KEY, "eu-1", "prod/")


@pytest.mark.parametrize("raw", [None, {"listen": "127.0.0.1:5000"}, {"storage": None},
                                 {"storage": {"root": "/srv/scratch"}}, {"storage": {"s3": None}}],
                         ids=str)
def test_the_environment_alone_can_configure_s3_redis_and_the_secret(tmp_path, raw):
    config = load(None, S3_ENVIRON) if raw is None else load_raw(tmp_path, raw, S3_ENVIRON)
    assert config.storage.s3 == S3_FROM_ENVIRON
    assert config.redis == "redis://redis.example:6379/0" and config.secret == SECRET
    assert config.storage.root == Path(((raw or {}).get("storage") or {}).get("root", "mirror-data"))


def test_the_environment_overrides_the_s3_keys_of_the_file(tmp_path, full):
    config = load_raw(tmp_path, full, S3_ENVIRON)
    assert config.storage.s3 == S3_FROM_ENVIRON
    assert config.redis == "redis://redis.example:6379/0" and config.secret == SECRET
    assert config.storage.max_cache_size == 50 * 2**30  # the rest of storage is the file's
    partial = load_raw(tmp_path, full, {"MIRROR_STORAGE_S3_BUCKET": "other"}).storage.s3
    assert (partial.bucket, partial.endpoint, partial.prefix) == ("other", "http://rgw.example:7480", "prod/")


@pytest.mark.parametrize("variable", sorted(name for name in S3_ENVIRON if name.startswith("MIRROR_STORAGE_S3_")))
def test_any_s3_variable_makes_storage_s3_exist(variable):
    with pytest.raises(ConfigError) as caught:  # alone, it makes an s3 section that lacks its other keys
        load(None, {variable: S3_ENVIRON[variable]})
    assert caught.value.key == ("storage.s3.bucket" if variable == "MIRROR_STORAGE_S3_ENDPOINT"
                                else "storage.s3.endpoint")


@pytest.mark.parametrize(("variable", "value", "key"), [
    ("MIRROR_STORAGE_S3_ENDPOINT", "rgw.example", "storage.s3.endpoint"),
    ("MIRROR_STORAGE_S3_BUCKET", "My_Bucket", "storage.s3.bucket"),
    ("MIRROR_STORAGE_S3_REGION", "", "storage.s3.region"),
    ("MIRROR_STORAGE_S3_ACCESS_KEY", "", "storage.s3.access_key"),
    ("MIRROR_STORAGE_S3_SECRET_KEY", "", "storage.s3.secret_key"),
    ("MIRROR_STORAGE_S3_PREFIX", "prod", "storage.s3.prefix"),
    ("MIRROR_REDIS", "", "redis"), ("MIRROR_REDIS", "redis.example:6379", "redis"),
    ("MIRROR_SECRET", "", "secret"), ("MIRROR_SECRET", "too-short", "secret"),
])
def test_invalid_variables_are_refused_naming_the_key(variable, value, key):
    with pytest.raises(ConfigError) as caught:
        load(None, {**S3_ENVIRON, variable: value})
    assert caught.value.key == key
    if key == "secret" and value:
        assert value not in str(caught.value)


def test_a_variable_under_a_section_that_is_not_a_mapping_leaves_the_section_to_be_named(tmp_path):
    for raw in ({"storage": "x"}, {"storage": {"s3": "x"}}):
        with pytest.raises(ConfigError) as caught:
            load_raw(tmp_path, raw, S3_ENVIRON)
        assert caught.value.key == ("storage" if raw["storage"] == "x" else "storage.s3")
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, {"storage": "x"}, {"MIRROR_STORAGE_ROOT": "/srv"})
    assert caught.value.key == "storage"
