"""Configuration: frozen dataclasses and ``load(path, environ)``, the only reader of the environment.

The YAML file's keys map one to one onto these dataclasses; every error names the key at fault. Every value
must have its key's YAML type: a boolean is ``true`` or ``false`` (never the string ``"false"``), a number is
never a boolean, a path or name is a string.
Without a file the embedded defaults serve on 0.0.0.0:5000 from ``./mirror-data`` with docker.io upstream; an
empty file is an error. Files the config names (keys, certificates, htpasswd, LDAP CA) must exist when it is loaded.
"""
from __future__ import annotations

import difflib
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from mirror.errors import ConfigError
from mirror.reference import DOCKER_HUB, normalise_registry

DEFAULT_LISTEN = "0.0.0.0:5000"
DEFAULT_ROOT = "mirror-data"
DOCKER_HUB_URL = "https://registry-1.docker.io"

# Environment variables that override one scalar key each (``MIRROR_CONFIG`` names the file itself).
ENV_OVERRIDES = {
    "MIRROR_LISTEN": "listen",
    "MIRROR_STORAGE_ROOT": "storage.root",
    "MIRROR_STORAGE_MAX_CACHE_SIZE": "storage.max_cache_size",
    "MIRROR_DEFAULT_UPSTREAM": "default_upstream",
    "MIRROR_WORKERS": "workers",
    "MIRROR_TLS_CERT": "tls.cert",
    "MIRROR_TLS_KEY": "tls.key",
    "MIRROR_LOG_FORMAT": "log_format",
    "MIRROR_STORAGE_S3_ENDPOINT": "storage.s3.endpoint",  # any MIRROR_STORAGE_S3_* makes storage.s3 exist
    "MIRROR_STORAGE_S3_BUCKET": "storage.s3.bucket",
    "MIRROR_STORAGE_S3_REGION": "storage.s3.region",
    "MIRROR_STORAGE_S3_ACCESS_KEY": "storage.s3.access_key",
    "MIRROR_STORAGE_S3_SECRET_KEY": "storage.s3.secret_key",
    "MIRROR_STORAGE_S3_PREFIX": "storage.s3.prefix",
    "MIRROR_REDIS": "redis",
    "MIRROR_SECRET": "secret",
}
LOG_FORMATS = ("auto", "text", "json")  # auto: text when stderr is a terminal, else JSON
SIGNATURE_MODES = ("enforce", "warn", "off")

# The actions a notification endpoint can subscribe to.
EVENT_ACTIONS = frozenset({"push", "pull", "delete", "import", "deny"})
MAX_QUEUED = 10**7  # notifications[].max_queued at most (the store's capacity bounds the queues too)

REGISTRY_NAME = re.compile(r"[A-Za-z0-9.-]+(:\d+)?")
S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")  # S3's bucket naming rules, 3 to 63 characters
S3_REGION = re.compile(r"[A-Za-z0-9._-]+")  # part of a SigV4 credential scope: no "/" or spaces
S3_PREFIX = re.compile(r"[A-Za-z0-9!_.*'()/-]*")  # S3's safe object key characters
MIN_SECRET_LENGTH = 16
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]i?)?b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
MAX_QUANTITY = 2**63  # sizes and durations are below this (and finite)


def _quantity(value: Any, pattern: re.Pattern[str], units: Mapping[str, float]) -> float | None:
    """``value`` (a number, not a boolean, or a string: a number and a unit) in base units, or None if invalid."""
    if isinstance(value, str):
        match = pattern.fullmatch(value.strip())
        value = float(match.group(1)) * units[(match.group(2) or "").lower()] if match else None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        value = None
    return value if value is not None and 0 <= value < MAX_QUANTITY else None


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from a number or a string such as ``"50GiB"`` or ``"4G"``."""
    size = _quantity(value, _SIZE, _SIZE_UNITS)
    if size is None:
        raise ConfigError(key, f"{value!r:.40} is not a size (bytes, or a number with KiB/MiB/GiB/TiB/KB/MB/GB)")
    return int(size)


def parse_duration(value: Any, key: str = "duration") -> float:
    """Seconds from a number or a string such as ``"5m"``, ``"300s"`` or ``"1h"``."""
    seconds = _quantity(value, _DURATION, _DURATION_UNITS)
    if seconds is None:
        raise ConfigError(key, f"{value!r:.40} is not a duration (seconds, or a number with ms/s/m/h/d)")
    return float(seconds)


@dataclass(frozen=True)
class Upstream:
    """One upstream registry that the mirror proxies and caches."""

    name: str
    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    manifest_ttl: float = 300.0
    allow_push: bool = False
    timeout: float = 10.0
    proxy: str | None = field(default=None, repr=False)  # the proxy its requests go through (None: direct)
    ca_file: Path | None = None  # CA certificates trusted besides the system's
    tls_verify: bool = True


@dataclass(frozen=True)
class S3Storage:
    """An S3-compatible bucket (Ceph RGW, AWS S3, SeaweedFS, MinIO...) that holds the store instead of the disk."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    prefix: str = ""  # "" or ending with "/": where the store's keys start inside the bucket
    redirect: bool = False  # answer blob GETs with presigned URLs (307) instead of streaming the bytes
    timeout: float = 20.0  # seconds a request to the storage waits for an answer before it counts as not answering


@dataclass(frozen=True)
class Storage:
    """Where content lives and how much pull-through may keep."""

    root: Path = Path(DEFAULT_ROOT)  # with s3: local scratch space only
    max_cache_size: int | None = None
    upload_expiry: float = 24 * 3600.0
    gc_grace: float = 3600.0
    s3: S3Storage | None = None


@dataclass(frozen=True)
class Endpoint:
    """A webhook that is POSTed registry events of the subscribed ``events`` actions."""

    url: str
    events: frozenset[str] = EVENT_ACTIONS
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 5.0
    max_queued: int = 1000  # events waiting for it at most; beyond, the oldest are dropped


@dataclass(frozen=True)
class Tls:
    """The certificate (PEM, may include intermediates) and private key the server offers over HTTPS."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class AccessRule:
    """Who may read and who may write the repositories whose names match ``repository`` (an fnmatch glob)."""

    repository: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ldap:
    """An LDAP or Active Directory server whose users log in with their directory password."""

    url: str
    user_base: str
    group_base: str
    start_tls: bool = False
    ca_file: Path | None = None
    bind_dn: str | None = None
    bind_password: str | None = field(default=None, repr=False)
    user_filter: str = "(uid={username})"
    group_filter: str = "(member={dn})"
    group_attribute: str = "cn"
    timeout: float = 5.0


@dataclass(frozen=True)
class Auth:
    """Who may use the registry: htpasswd and directory users, their groups, access rules, and the token service."""

    htpasswd: Path | None = None
    ldap: Ldap | None = None
    realm: str | None = None
    service: str = "mirror"
    token_ttl: float = 300.0
    anonymous_pull: bool = False
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    access: tuple[AccessRule, ...] = ()


@dataclass(frozen=True)
class SignatureKey:
    """A public key (PEM: ECDSA P-256, Ed25519 or RSA) that image signatures are verified with, by name."""

    name: str
    public_key: Path


@dataclass(frozen=True)
class SignatureRule:
    """The keys one of which must have signed the images of repositories matching ``repository`` (a glob)."""

    repository: str
    require: tuple[str, ...] = ()


@dataclass(frozen=True)
class Signatures:
    """The image signature policy: its mode, the keys it names and its rules (the first match wins)."""

    mode: str = "off"
    keys: tuple[SignatureKey, ...] = ()
    rules: tuple[SignatureRule, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole configuration of one appliance."""

    listen: str = DEFAULT_LISTEN
    storage: Storage = field(default_factory=Storage)
    upstreams: tuple[Upstream, ...] = (Upstream(DOCKER_HUB, DOCKER_HUB_URL),)
    default_upstream: str | None = DOCKER_HUB
    workers: int = 1
    trusted_keys: tuple[Path, ...] = ()
    tls: Tls | None = None
    auth: Auth | None = None
    source: str = "embedded defaults"
    notifications: tuple[Endpoint, ...] = ()
    log_format: str = "auto"
    signatures: Signatures = field(default_factory=Signatures)
    redis: str | None = field(default=None, repr=False)  # coordination of instances sharing a store
    secret: str | None = field(default=None, repr=False)  # shared by every instance: signs upload state and tokens

    @property
    def host_port(self) -> tuple[str, int]:
        """The listen address split into host and port."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    def upstream(self, name: str) -> Upstream | None:
        """The upstream of registry ``name`` (any of its aliases), if configured."""
        name = normalise_registry(name)
        return next((u for u in self.upstreams if u.name == name), None)


def load(path: str | Path | None, environ: Mapping[str, str]) -> Config:
    """Read the config from ``path`` (or ``$MIRROR_CONFIG``, or the embedded defaults) plus overrides."""
    path = path or environ.get("MIRROR_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        raw = _read(Path(path))
    for variable, key in ENV_OVERRIDES.items():
        if variable in environ:
            value: Any = environ[variable]
            _set_path(raw, key, int(value) if key == "workers" and re.fullmatch(r"[0-9]{1,4}", value) else value)
    return _build(raw, str(path) if path else "embedded defaults", environ)


def _read(path: Path) -> dict[str, Any]:
    """The YAML mapping in the file ``path``; ConfigError (one line) when it cannot be read or is not one."""
    try:
        raw = yaml.safe_load(path.read_bytes())
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(str(path), f"not valid YAML{where}: {exc.problem or exc.context}") from exc
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # PyYAML's int() limit, its recursive composer
        raise ConfigError(str(path), f"not valid YAML: {' '.join(str(exc).split())}") from exc
    if raw is None:
        raise ConfigError(str(path), "is empty (or only comments): set at least one key (README: Configuration)")
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "the top level must be a mapping")
    return raw


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set the key ``dotted`` (``storage.s3.bucket``) of ``raw``, creating absent or empty (null) sections; a
    section that is there but not a mapping is left as it is, for ``_build`` to refuse by its name."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        if raw.get(part) is None:
            raw[part] = {}
        elif not isinstance(raw[part], dict):
            return
        raw = raw[part]
    raw[leaf] = value


def _build(raw: dict[str, Any], source: str, environ: Mapping[str, str] | None = None) -> Config:
    _known_keys(raw, "", {"listen", "storage", "upstreams", "default_upstream", "workers", "trusted_keys", "tls",
                          "auth", "notifications", "log_format", "proxy", "signatures", "redis", "secret"})
    listen = _listen(raw.get("listen", DEFAULT_LISTEN))
    storage = _storage(raw.get("storage"))
    proxy_for = _default_proxy(raw, environ or {})
    if "upstreams" in raw:
        upstreams = tuple(_upstream(i, u, proxy_for) for i, u in enumerate(_list(raw["upstreams"], "upstreams")))
        default = raw.get("default_upstream")
    else:
        upstreams = tuple(replace(u, proxy=proxy_for(u.url)) for u in Config.upstreams)
        default = raw.get("default_upstream", DOCKER_HUB)
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise ConfigError("upstreams", "two upstreams name the same registry (docker.io, index.docker.io and "
                                       "registry-1.docker.io are one)")
    default = _default_upstream(default, names)
    workers = raw.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise ConfigError("workers", f"{workers!r} is not a whole number from 1 to 64")
    keys = _list(raw.get("trusted_keys"), "trusted_keys")
    trusted_keys = tuple(_file(key, f"trusted_keys[{index}]", "an Ed25519 public key")
                         for index, key in enumerate(keys))
    endpoints = _list(raw.get("notifications"), "notifications")
    notifications = tuple(_endpoint(index, entry) for index, entry in enumerate(endpoints))
    if len({endpoint.url for endpoint in notifications}) != len(notifications):
        raise ConfigError("notifications", "two endpoints have the same url")
    log_format = _string(raw.get("log_format", Config.log_format), "log_format", " or ".join(LOG_FORMATS))
    if log_format not in LOG_FORMATS:
        raise ConfigError("log_format", f"{log_format!r:.40} is not one of {', '.join(LOG_FORMATS)}")
    return Config(listen, storage, upstreams, default, workers, trusted_keys, _tls(raw.get("tls")),
                  auth=_auth(raw.get("auth")), source=source,
                  notifications=notifications, log_format=log_format,
                  signatures=_signatures(raw.get("signatures")),
                  redis=_redis(raw.get("redis")), secret=_secret(raw.get("secret")))


def _default_upstream(value: Any, upstreams: list[str]) -> str | None:
    """The registry ``value`` names: a configured upstream, or a host name (a dot or a port, or ``localhost``)."""
    if value is None:
        return None
    if not isinstance(value, str) or not REGISTRY_NAME.fullmatch(value):
        raise ConfigError("default_upstream", f"{value!r:.80} is not a registry host name such as docker.io")
    name = normalise_registry(value)
    if name in upstreams or "." in name or ":" in name or name == "localhost":
        return name
    close = difflib.get_close_matches(name, upstreams, n=1)
    configured = f"the configured upstreams are {', '.join(upstreams)}" if upstreams else "no upstream is configured"
    raise ConfigError("default_upstream", f"{value!r} is neither a configured upstream nor a registry host name "
                      f"(one with a dot or a port, or localhost): {configured}"
                      + (f"; did you mean {close[0]}?" if close else ""))


def _file(value: Any, key: str, what: str) -> Path:
    """The path ``value`` names if it is a string naming an existing file; else a ConfigError naming ``key``."""
    if not isinstance(value, str):
        raise ConfigError(key, f"must be the path of {what} (a YAML string), not {_kind(value)}")
    if not value or not Path(value).is_file():
        raise ConfigError(key, f"{value!r}: no such file ({what})")
    return Path(value)


def _known_keys(raw: dict[str, Any], prefix: str, known: set[str]) -> None:
    """Refuse a key of ``raw`` that is not in ``known``, naming it with its ``prefix``."""
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(known))})")


def _listen(value: Any) -> str:
    host, _, port = _string(value, "listen", "HOST:PORT").rpartition(":")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ConfigError("listen", f"{value!r:.80} is not HOST:PORT")
    return f"{host or '0.0.0.0'}:{port}"


def _string(value: Any, key: str, what: str = "text") -> str:
    """``value`` if it is a string; else a ConfigError naming ``key`` and what it must be (never the value)."""
    if not isinstance(value, str):
        raise ConfigError(key, f"must be {what} (a YAML string), not {_kind(value)}")
    return value


def _boolean(value: Any, key: str) -> bool:
    """``value`` if it is a YAML boolean (``true``/``false``; the string ``"false"`` is not one)."""
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false (a YAML boolean), not {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """What YAML made of ``value``, for error messages that must not repeat it (it may be a password)."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "empty"}
    return kinds.get(type(value), type(value).__name__)


def _storage(raw: Any) -> Storage:
    if raw is None:
        return Storage()
    if not isinstance(raw, dict):
        raise ConfigError("storage", "must be a mapping")
    _known_keys(raw, "storage.", {"root", "max_cache_size", "upload_expiry", "gc_grace", "s3"})
    root = raw.get("root", DEFAULT_ROOT)
    if not isinstance(root, str) or not root:
        raise ConfigError("storage.root", "must be a directory path")
    max_size = raw.get("max_cache_size")
    return Storage(
        root=Path(root),
        max_cache_size=None if max_size is None else parse_size(max_size, "storage.max_cache_size"),
        upload_expiry=parse_duration(raw.get("upload_expiry", Storage.upload_expiry), "storage.upload_expiry"),
        gc_grace=parse_duration(raw.get("gc_grace", Storage.gc_grace), "storage.gc_grace"),
        s3=_s3(raw.get("s3")),
    )


def _s3(raw: Any) -> S3Storage | None:
    """``storage.s3``; errors repeat only the bucket, region and prefix (keys and URLs may be secret)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("storage.s3", "must be a mapping with endpoint, bucket, access_key and secret_key")
    _known_keys(raw, "storage.s3.", {"endpoint", "bucket", "region", "access_key", "secret_key", "prefix",
                                     "redirect", "timeout"})
    endpoint = _string(raw.get("endpoint"), "storage.s3.endpoint", "an http:// or https:// URL")
    try:
        parts = urlsplit(endpoint)
        usable = (parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
                  and parts.username is None and parts.path in ("", "/") and not parts.query
                  and not parts.fragment and "?" not in endpoint and "#" not in endpoint)
    except ValueError:  # a port that is not a number below 65536, a broken [IPv6] host
        usable = False
    if not usable:
        raise ConfigError("storage.s3.endpoint", "must be an http:// or https:// URL with a host, an optional port "
                          "and nothing after it (no user:password@, path or query), such as http://rgw.example:7480")
    bucket = _string(raw.get("bucket"), "storage.s3.bucket", "a bucket name")
    if not S3_BUCKET.fullmatch(bucket):
        raise ConfigError("storage.s3.bucket", f"{bucket!r:.80} is not an S3 bucket name (3 to 63 lowercase "
                          "letters, digits, dots and hyphens, beginning and ending with a letter or digit)")
    access_key, secret_key = (_string(raw.get(key), f"storage.s3.{key}") for key in ("access_key", "secret_key"))
    for key, value in (("access_key", access_key), ("secret_key", secret_key)):
        if not value:
            raise ConfigError(f"storage.s3.{key}", "must not be empty")
    region = _string(raw.get("region", S3Storage.region), "storage.s3.region", "a region name such as us-east-1")
    if not S3_REGION.fullmatch(region):
        raise ConfigError("storage.s3.region", f"{region!r:.40} is not a region name such as us-east-1 (letters, "
                          "digits, '.', '_' and '-')")
    prefix = _string(raw.get("prefix", S3Storage.prefix), "storage.s3.prefix", "a key prefix such as prod/")
    if prefix and not (S3_PREFIX.fullmatch(prefix) and prefix.endswith("/")
                       and all(part not in ("", ".", "..") for part in prefix[:-1].split("/"))):
        raise ConfigError("storage.s3.prefix", f"{prefix!r:.80} is not a key prefix: \"\" or names of letters, "
                          "digits and !_.*'()- each followed by '/' (so it ends with '/'; no leading '/', no "
                          "empty, '.' or '..' names), such as prod/")
    return S3Storage(endpoint=endpoint.rstrip("/"), bucket=bucket, access_key=access_key, secret_key=secret_key,
                     region=region, prefix=prefix,
                     redirect=_boolean(raw.get("redirect", S3Storage.redirect), "storage.s3.redirect"),
                     timeout=_positive(parse_duration(raw.get("timeout", S3Storage.timeout), "storage.s3.timeout"),
                                       "storage.s3.timeout"))


def _redis(value: Any) -> str | None:
    """The Redis URL ``redis``: redis:// or rediss:// with a host, or unix:// with a socket path; None: none.
    Errors never repeat it (it may carry a password)."""
    if value is None:
        return None
    url = _string(value, "redis", "a redis://, rediss:// or unix:// URL")
    try:
        parts = urlsplit(url)
        port = parts.port
        if parts.scheme in ("redis", "rediss"):
            usable = bool(parts.hostname) and port != 0 and re.fullmatch(r"/?|/[0-9]{1,5}", parts.path) is not None
        else:
            usable = parts.scheme == "unix" and not parts.hostname and port is None and parts.path.startswith("/")
        usable = usable and not parts.fragment
    except ValueError:  # a port that is not a number below 65536, a broken [IPv6] host
        usable = False
    if not usable:
        raise ConfigError("redis", "must be a redis://[:PASSWORD@]HOST[:PORT][/DB] or rediss://... URL, or "
                                   "unix:///PATH/TO/SOCKET (optionally ?db=N)")
    return url


def _secret(value: Any) -> str | None:
    """The shared ``secret``: a string of at least MIN_SECRET_LENGTH characters; errors never repeat it."""
    if value is None:
        return None
    secret = _string(value, "secret", "a string")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError("secret", f"must be at least {MIN_SECRET_LENGTH} characters long: "
                                    "use a long random string, the same on every instance")
    return secret


def _tls(raw: Any) -> Tls | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"cert", "key"}:
        raise ConfigError("tls", "must be a mapping with exactly cert and key (PEM file paths)")
    return Tls(_file(raw["cert"], "tls.cert", "a PEM certificate"), _file(raw["key"], "tls.key", "a PEM private key"))


def _auth(raw: Any) -> Auth | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("auth", "must be a mapping with htpasswd, ldap or both")
    _known_keys(raw, "auth.", {"htpasswd", "ldap", "realm", "service", "token_ttl", "anonymous_pull", "groups",
                               "access"})
    ldap = _ldap(raw.get("ldap"))
    htpasswd = None if ldap is not None and raw.get("htpasswd") is None else _file(
        raw.get("htpasswd"), "auth.htpasswd", "an htpasswd file")
    realm = raw.get("realm")
    if realm is not None and (urlsplit(_string(realm, "auth.realm", "a URL")).scheme not in ("http", "https")
                              or '"' in realm):
        raise ConfigError("auth.realm", f"{realm!r} is not an http:// or https:// URL")
    service = raw.get("service", Auth.service)
    if not isinstance(service, str) or not re.fullmatch(r"[A-Za-z0-9._:-]+", service):
        raise ConfigError("auth.service", "must be a name of letters, digits, '.', '_', ':' or '-'")
    groups = raw.get("groups") or {}
    if not isinstance(groups, dict):
        raise ConfigError("auth.groups", "must map group names to lists of user names")
    for name in groups:
        _string(name, f"auth.groups.{name}", "a group name")
    for reserved in {"*", "anonymous"} & set(groups):
        raise ConfigError(f"auth.groups.{reserved}", "is a reserved name, not a group")
    return Auth(
        htpasswd=htpasswd,
        ldap=ldap,
        realm=realm,
        service=service,
        token_ttl=_positive(parse_duration(raw.get("token_ttl", Auth.token_ttl), "auth.token_ttl"), "auth.token_ttl"),
        anonymous_pull=_boolean(raw.get("anonymous_pull", False), "auth.anonymous_pull"),
        groups={name: _principals(members, f"auth.groups.{name}") for name, members in groups.items()},
        access=tuple(_access_rule(index, rule) for index, rule in enumerate(_list(raw.get("access"), "auth.access"))),
    )


def _signatures(raw: Any) -> Signatures:
    if raw is None:
        return Signatures()
    if not isinstance(raw, dict):
        raise ConfigError("signatures", "must be a mapping with mode, keys and rules")
    _known_keys(raw, "signatures.", {"mode", "keys", "rules"})
    mode = _string(raw.get("mode", Signatures.mode), "signatures.mode", " or ".join(SIGNATURE_MODES))
    if mode not in SIGNATURE_MODES:
        raise ConfigError("signatures.mode", f"{mode!r:.40} is not one of {', '.join(SIGNATURE_MODES)}")
    keys = tuple(_signature_key(index, entry) for index, entry in enumerate(_list(raw.get("keys"), "signatures.keys")))
    names = {key.name for key in keys}
    if len(names) != len(keys):
        raise ConfigError("signatures.keys", "two keys have the same name")
    rules = []
    for index, entry in enumerate(_list(raw.get("rules"), "signatures.rules")):
        key = f"signatures.rules[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("repository"), str) or not entry["repository"]:
            raise ConfigError(key, "must be a mapping with repository (a glob) and require (a list of key names)")
        _known_keys(entry, f"{key}.", {"repository", "require"})
        require = tuple(_list(entry.get("require"), f"{key}.require"))
        if not all(isinstance(name, str) for name in require):
            raise ConfigError(f"{key}.require", "must be a list of key names")
        unknown = [name for name in require if name not in names]
        if unknown:
            raise ConfigError(f"{key}.require", f"{unknown[0]!r:.80} is not the name of a key in signatures.keys")
        rules.append(SignatureRule(entry["repository"], require))
    return Signatures(mode, keys, tuple(rules))


def _signature_key(index: int, raw: Any) -> SignatureKey:
    key = f"signatures.keys[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a mapping with name and public_key")
    _known_keys(raw, f"{key}.", {"name", "public_key"})
    name = _string(raw.get("name"), f"{key}.name", "a key name")
    if not name:
        raise ConfigError(f"{key}.name", "must not be empty")
    return SignatureKey(name, _file(raw.get("public_key"), f"{key}.public_key", "a PEM public key"))


def _ldap(raw: Any) -> Ldap | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("auth.ldap", "must be a mapping with at least url, user_base and group_base")
    _known_keys(raw, "auth.ldap.", {"url", "start_tls", "ca_file", "bind_dn", "bind_password", "user_base",
                                    "user_filter", "group_base", "group_filter", "group_attribute", "timeout"})
    url = _string(raw.get("url"), "auth.ldap.url", "an ldap:// or ldaps:// URL")
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError("auth.ldap.url", f"{url!r:.80} is not an ldap://HOST[:PORT] or ldaps://HOST[:PORT] URL")
    start_tls = _boolean(raw.get("start_tls", False), "auth.ldap.start_tls")
    if start_tls and parts.scheme == "ldaps":
        raise ConfigError("auth.ldap.start_tls", "is for ldap:// URLs (ldaps:// is TLS already)")
    bind_dn, bind_password = (None if raw.get(key) is None else _string(raw[key], f"auth.ldap.{key}")
                              for key in ("bind_dn", "bind_password"))
    if (bind_dn is None) != (bind_password is None) or bind_password == "":
        raise ConfigError("auth.ldap.bind_password" if bind_dn else "auth.ldap.bind_dn",
                          "bind_dn and a non-empty bind_password go together (neither: anonymous search)")
    filters = {}
    for key, placeholder in (("user_filter", "{username}"), ("group_filter", "{dn}")):
        value = _string(raw.get(key, getattr(Ldap, key)), f"auth.ldap.{key}", "an LDAP filter")
        try:
            valid = value.startswith("(") and value.endswith(")") and placeholder in value and value.format(
                **{placeholder.strip("{}"): "x"}) is not None
        except (KeyError, IndexError, ValueError):
            valid = False
        if not valid:
            raise ConfigError(f"auth.ldap.{key}", f"must be a parenthesised LDAP filter using {placeholder} "
                              "(and no other {...})")
        filters[key] = value
    attribute = _string(raw.get("group_attribute", Ldap.group_attribute), "auth.ldap.group_attribute",
                        "an attribute name")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", attribute):
        raise ConfigError("auth.ldap.group_attribute", f"{attribute!r:.40} is not an attribute name such as cn")
    return Ldap(
        url=url,
        user_base=_string(raw.get("user_base"), "auth.ldap.user_base", "a DN"),
        group_base=_string(raw.get("group_base"), "auth.ldap.group_base", "a DN"),
        start_tls=start_tls,
        ca_file=None if raw.get("ca_file") is None else _ca_file(raw["ca_file"], "auth.ldap.ca_file"),
        bind_dn=bind_dn,
        bind_password=bind_password,
        group_attribute=attribute,
        timeout=_positive(parse_duration(raw.get("timeout", Ldap.timeout), "auth.ldap.timeout"), "auth.ldap.timeout"),
        **filters,
    )


def _access_rule(index: int, raw: Any) -> AccessRule:
    key = f"auth.access[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("repository"), str) or not raw["repository"]:
        raise ConfigError(key, "must be a mapping with repository (a glob) and read and/or write lists")
    _known_keys(raw, f"{key}.", {"repository", "read", "write"})
    return AccessRule(raw["repository"], _principals(raw.get("read"), f"{key}.read"),
                      _principals(raw.get("write"), f"{key}.write"))


def _principals(value: Any, key: str) -> tuple[str, ...]:
    names = _list(value, key)
    if not all(isinstance(name, str) and name for name in names):
        raise ConfigError(key, "must be a list of user names, group names, '*' or 'anonymous'")
    return tuple(names)


def _endpoint(index: int, raw: Any) -> Endpoint:
    key = f"notifications[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a mapping with url")
    _known_keys(raw, f"{key}.", {"url", "events", "headers", "timeout", "max_queued"})
    url = _string(raw.get("url"), f"{key}.url", "a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}.url", f"{url!r} is not an http:// or https:// URL")
    events = _list(raw.get("events", sorted(EVENT_ACTIONS)), f"{key}.events")
    if not events or not all(isinstance(event, str) and event in EVENT_ACTIONS for event in events):
        raise ConfigError(f"{key}.events", f"must list some of {', '.join(sorted(EVENT_ACTIONS))}")
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        raise ConfigError(f"{key}.headers", "must map header names to a value or a list of values")
    pairs = tuple((name, value) for name, values in headers.items()
                  for value in (values if isinstance(values, list) else [values]))
    for name, value in pairs:
        if not isinstance(name, str) or not isinstance(value, str):
            raise ConfigError(f"{key}.headers.{name}", "must be a header name with a string or a list of strings")
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name) or "\n" in value or "\r" in value:
            raise ConfigError(f"{key}.headers.{name}", "is not a valid header name and value")
    timeout = _positive(parse_duration(raw.get("timeout", Endpoint.timeout), f"{key}.timeout"), f"{key}.timeout")
    max_queued = raw.get("max_queued", Endpoint.max_queued)
    if isinstance(max_queued, bool) or not isinstance(max_queued, int) or not 1 <= max_queued <= MAX_QUEUED:
        raise ConfigError(f"{key}.max_queued", f"{max_queued!r:.40} is not a whole number from 1 to {MAX_QUEUED}")
    return Endpoint(url, frozenset(events), pairs, timeout, max_queued)


def _list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(key, "must be a list")
    return value


def _upstream(index: int, raw: Any, proxy_for: Callable[[str], str | None]) -> Upstream:
    key = f"upstreams[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(key, "must be a mapping with name and url")
    _known_keys(raw, f"{key}.", {"name", "url", "username", "password", "manifest_ttl", "allow_push", "timeout",
                                 "proxy", "ca_file", "tls_verify"})
    name = raw.get("name")
    if not isinstance(name, str) or not REGISTRY_NAME.fullmatch(name):
        raise ConfigError(f"{key}.name", "must be a registry host name such as docker.io")
    url = _string(raw.get("url"), f"{key}.url", "a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}.url", f"{url!r} is not an http:// or https:// URL")
    username, password = raw.get("username"), raw.get("password")
    if (username is None) != (password is None):
        raise ConfigError(f"{key}.password" if username else f"{key}.username", "username and password go together")
    for field_name, value in (("username", username), ("password", password)):
        if value is not None:
            _string(value, f"{key}.{field_name}")
    return Upstream(
        name=normalise_registry(name),
        url=url.rstrip("/"),
        username=username,
        password=password,
        manifest_ttl=parse_duration(raw.get("manifest_ttl", 300), f"{key}.manifest_ttl"),
        allow_push=_boolean(raw.get("allow_push", False), f"{key}.allow_push"),
        timeout=_positive(parse_duration(raw.get("timeout", 10), f"{key}.timeout"), f"{key}.timeout"),
        proxy=_proxy(raw["proxy"], f"{key}.proxy") if "proxy" in raw else proxy_for(url),
        ca_file=None if raw.get("ca_file") is None else _ca_file(raw["ca_file"], f"{key}.ca_file"),
        tls_verify=_boolean(raw.get("tls_verify", True), f"{key}.tls_verify"),
    )


def _default_proxy(raw: dict[str, Any], environ: Mapping[str, str]) -> Callable[[str], str | None]:
    """The proxy of an upstream URL whose entry has no ``proxy`` key: the top-level ``proxy`` if there is that
    key, else the environment's."""
    if "proxy" in raw:
        proxy = _proxy(raw["proxy"], "proxy")
        return lambda url: proxy
    return lambda url: _environment_proxy(url, environ)


def _environment_proxy(url: str, environ: Mapping[str, str]) -> str | None:
    """The proxy ``https_proxy`` or ``http_proxy`` (by ``url``'s scheme; lower case first, as curl) names for
    ``url``, unless ``no_proxy`` names its host; an empty variable is unset, one without a scheme is http://."""
    parts = urlsplit(url)
    variable = f"{parts.scheme}_proxy"
    name, value = next(((name, environ[name]) for name in (variable, variable.upper()) if environ.get(name)),
                       (variable, ""))
    if not value or _bypassed(parts.hostname or "", environ.get("no_proxy") or environ.get("NO_PROXY") or ""):
        return None
    return _proxy(value if "://" in value else f"http://{value}", f"${name} (environment)")


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (comma-separated: ``*``, a host name or address, a domain with or without a leading
    dot for it and its subdomains; a ``:port`` is ignored) names ``host``."""
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if entry.startswith("["):
            entry = entry[1:].partition("]")[0]
        elif entry.count(":") == 1:
            entry = entry.partition(":")[0]
        entry = entry.lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith(f".{entry}"))):
            return True
    return False


def _proxy(value: Any, key: str) -> str | None:
    """A proxy URL (http:// or https://, a host, optional ``user:password@`` and port); None or empty: direct."""
    if value is None or value == "":
        return None
    text = _string(value, key, "a proxy URL")
    try:
        parts = urlsplit(text)
        usable = (parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
                  and parts.path in ("", "/") and not parts.query and not parts.fragment)
    except ValueError:  # a port that is not a number below 65536, a broken [IPv6] host
        usable = False
    if not usable:
        raise ConfigError(key, "must be an http:// or https:// proxy URL with a host and nothing after it, such as "
                               "http://proxy.example:3128 (or null or \"\": none)")
    return text


def _ca_file(value: Any, key: str) -> Path:
    """The path of a readable PEM bundle of CA certificates."""
    path = _file(value, key, "a PEM bundle of CA certificates")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)
    except ssl.SSLError as exc:
        raise ConfigError(key, f"{value!r}: no PEM CA certificate in it ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(key, f"{value!r}: cannot read it ({exc.strerror})") from exc
    return path


def _positive(value: float, key: str) -> float:
    if value <= 0:
        raise ConfigError(key, "must be more than zero")
    return value
