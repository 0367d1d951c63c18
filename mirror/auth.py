"""Who may do what: htpasswd and directory (LDAP) users, access rules, and the bearer tokens of the docker login flow.

Handlers hand over the ``Authorization`` header, the method and the repository name; they get back the Caller,
or an Unauthorized (log in first: 401) or Denied (an authenticated user who may not: 403). No decision looks at
whether a repository exists, so no answer reveals it.

Access rules are tried in order and the first whose fnmatch glob matches the repository decides; after the
configured rules comes the default rule ``*``: every authenticated user reads and writes, anonymous callers read
when ``anonymous_pull`` is true. A rule names users, groups, ``*`` (any authenticated user) and ``anonymous``
(callers without credentials). ``write`` grants push and delete, and implies read.

Rules are matched against the store repositories of the repository a request resolved to
(``repository.py``): a pull through the default upstream (``/v2/library/alpine``) may be served by the hosted
repository of that name or by the upstream's (``docker.io/library/alpine``), so it needs read on both; with a
path prefix or ``?ns=`` only the upstream's. Writes need write on the repository they land in.

Tokens are JWTs signed with Ed25519 (``alg: EdDSA``) by a key generated on first start and kept in the store as
a secret, so every worker process and every restart accepts them until they expire.

Passwords are bcrypt-checked, slow on purpose, on ``PASSWORD_THREADS`` threads of their own with at most
``PASSWORDS_WAITING`` checks waiting (``PasswordChecks``): guessers can neither stall the event loop, nor starve
the default executor (blob commits, ``/readyz``), nor queue work without bound; a check that finds the queue
full is refused at once (TooManyRequests: 429). Credentials verified in the last ``REMEMBER_SECONDS`` are
remembered (a keyed hash, never the password), so clients sending Basic on every request pay bcrypt about once
a minute and skip the queue; wrong passwords are never remembered.

With ``auth.ldap`` (``directory.py``) users missing from the htpasswd file (which is then optional; a user in it
is decided by it alone) log in with their directory password, checked the same way: on the password threads,
remembered with the user's directory groups, which access rules name like configured groups. A directory that
cannot answer makes a login fail with DirectoryUnavailable (503); tokens carry the groups and are verified
locally, so tokens already issued keep working.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import fnmatch
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import bcrypt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mirror import config
from mirror.directory import Directory
from mirror.errors import ConfigError, Denied, NameInvalid, StorageError, TooManyRequests, Unauthorized
from mirror.storage import Store
from mirror.storage.paths import check_name

PULL, PUSH, DELETE = "pull", "push", "delete"
READ, WRITE = frozenset({PULL}), frozenset({PULL, PUSH, DELETE})
METHOD_ACTIONS = {"GET": PULL, "HEAD": PULL, "POST": PUSH, "PUT": PUSH, "PATCH": PUSH, "DELETE": DELETE}
# What a client asks for in the scope of a challenge, for each action (docker pushes ask for pull,push).
CHALLENGE_ACTIONS = {PULL: "pull", PUSH: "pull,push", DELETE: "delete"}
ANONYMOUS, ANY_USER = "anonymous", "*"
KEY_FILE = "token.key"
BCRYPT_LIMIT = 72  # bcrypt reads only the first 72 bytes of a password; htpasswd truncates the same way
MAX_TOKEN = 8192
CLOCK_SKEW = 30
PASSWORD_THREADS = 2  # bcrypt checks running at once
PASSWORDS_WAITING = 8  # and waiting for a thread, at most
REMEMBER_SECONDS = 60.0  # how long verified credentials skip bcrypt
REMEMBERED = 1024  # credentials remembered at most (the least recently verified are forgotten first)
T = TypeVar("T")




class Target(Protocol):
    """The store repositories a request's repository reads from and writes to (see ``repository.py``)."""

    access_names: tuple[str, ...]
    write_name: str


Resolve = Callable[[str, str | None], Target]


class Verified:
    """Credentials verified in the last ``REMEMBER_SECONDS`` (a keyed hash, never the password) and their groups."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)
        # fingerprint of user and password -> until when, and the groups found
        self._verified: OrderedDict[bytes, tuple[float, frozenset[str]]] = OrderedDict()
        self._lock = threading.Lock()  # checks run on the password threads, ``recall`` on the event loop

    def recall(self, user: str, password: str) -> frozenset[str] | None:
        """The groups ``user`` had when ``password`` was verified lately, or None (not verified, or too long ago)."""
        fingerprint = self._fingerprint(user, password)
        with self._lock:
            until, groups = self._verified.get(fingerprint, (0.0, None))
            if groups is not None and until <= time.monotonic():
                del self._verified[fingerprint]
                groups = None
        return groups

    def keep(self, user: str, password: str, groups: frozenset[str]) -> None:
        """Remember that ``password`` of ``user`` was verified just now, with ``groups``."""
        fingerprint = self._fingerprint(user, password)
        with self._lock:
            self._verified[fingerprint] = (time.monotonic() + REMEMBER_SECONDS, groups)
            self._verified.move_to_end(fingerprint)
            while len(self._verified) > REMEMBERED:
                self._verified.popitem(last=False)

    def _fingerprint(self, user: str, password: str) -> bytes:
        return hmac.new(self._secret, f"{user}\0{password}".encode(), hashlib.sha256).digest()


class Htpasswd:
    """The users of an htpasswd file of bcrypt entries (as ``htpasswd -B`` writes them), and password checks."""

    def __init__(self, entries: Mapping[str, bytes]):
        self._entries = dict(entries)
        self._decoy = next(iter(self._entries.values()), None)
        self._verified = Verified()

    @classmethod
    def load(cls, path: Path) -> Htpasswd:
        """Read ``path``; raise ConfigError naming the line of an entry that is not bcrypt."""
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("auth.htpasswd", f"cannot read {path}: {exc}") from exc
        entries = {}
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.startswith("#"):
                continue
            user, _, stored = line.strip().partition(":")
            if not stored.startswith(("$2y$", "$2b$", "$2a$")):
                raise ConfigError("auth.htpasswd", f"{path} line {number}: not a bcrypt entry (use htpasswd -B)")
            if user in (ANONYMOUS, ANY_USER) or not user:
                raise ConfigError("auth.htpasswd", f"{path} line {number}: {user!r} cannot be a user name")
            entries[user] = stored.encode()
        return cls(entries)

    def __contains__(self, user: object) -> bool:
        return user in self._entries

    def remembered(self, user: str, password: str) -> bool:
        """Whether ``password`` of ``user`` was verified in the last ``REMEMBER_SECONDS`` (no bcrypt: fast)."""
        return self._verified.recall(user, password) is not None

    def check(self, user: str, password: str) -> bool:
        """Whether ``password`` is the password of ``user`` (unknown users take as long as known ones)."""
        if self.remembered(user, password):
            return True
        stored = self._entries.get(user)
        if self._decoy is None:
            return False
        try:
            valid = bcrypt.checkpw(password.encode()[:BCRYPT_LIMIT], stored or self._decoy) and stored is not None
        except ValueError:  # a damaged entry matches no password
            valid = False
        if valid:
            self._verified.keep(user, password, frozenset())
        return valid


class Accounts:
    """Who can log in: the htpasswd users, decided by the file, then the directory's users (if one is set)."""

    def __init__(self, htpasswd: Htpasswd, directory: Directory | None = None):
        self.htpasswd, self.directory = htpasswd, directory
        self._verified = Verified()

    def __contains__(self, user: object) -> bool:
        return user in self.htpasswd

    def remembered(self, user: str, password: str) -> bool:
        """Whether the credentials were verified lately, so checking them again costs nothing."""
        return self.htpasswd.remembered(user, password) or self._verified.recall(user, password) is not None

    def check(self, user: str, password: str) -> frozenset[str] | None:
        """The directory groups of ``user`` (none for htpasswd users) if ``password`` is theirs, else None; raise
        DirectoryUnavailable when the directory cannot say."""
        if user in self.htpasswd or self.directory is None:
            return frozenset() if self.htpasswd.check(user, password) else None
        groups = self._verified.recall(user, password)
        if groups is None:
            groups = self.directory.check(user, password)
            if groups is not None:
                self._verified.keep(user, password, groups)
        return groups


class PasswordChecks:
    """Runs what checks Basic credentials on a few threads of its own, with a bounded queue, unless they were
    verified lately (see the module's docstring)."""

    def __init__(self, users: Accounts, threads: int = PASSWORD_THREADS, waiting: int = PASSWORDS_WAITING):
        self.users = users
        self.limit, self.pending = threads + waiting, 0
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="mirror-passwords")
        weakref.finalize(self, self._threads.shutdown, wait=False)  # a reload replaces the Auth and these

    async def run(self, authorization: str | None, identify: Callable[[], T]) -> T:
        """``identify()``, which checks the Basic credentials of ``authorization`` if it has any: at once when that
        costs no bcrypt, else on the password threads; raise TooManyRequests when too many checks wait already."""
        credentials = basic_credentials(authorization)
        if credentials is None or self.users.remembered(*credentials):
            return identify()
        if self.pending >= self.limit:
            raise TooManyRequests("too many password checks are waiting; retry shortly")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, identify)
        finally:
            self.pending -= 1


@dataclass(frozen=True)
class Scope:
    """One resource and the actions on it, as in ``repository:team/app:pull,push``."""

    type: str
    name: str
    actions: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        """The scope ``text`` names (``type:name:actions``, the name may hold colons), or None if malformed."""
        kind, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not kind or not name:
            return None
        return cls(kind, name, frozenset(action for action in actions.split(",") if action))

    def claim(self) -> dict[str, Any]:
        """The scope as an entry of a token's ``access`` claim."""
        return {"type": self.type, "name": self.name, "actions": sorted(self.actions)}


@dataclass(frozen=True)
class Caller:
    """Who is asking: a user (None: anonymous), their directory groups, whether the directory vouched for them
    (not the htpasswd file), and, when a bearer token was shown, the access it carries."""

    user: str | None
    granted: tuple[Scope, ...] | None = None
    groups: frozenset[str] = frozenset()
    directory: bool = False

    def token_allows(self, name: str, action: str) -> bool:
        """Whether the token (if any) grants ``action`` on repository ``name``."""
        return self.granted is None or any(
            scope.type == "repository" and scope.name == name and action in scope.actions for scope in self.granted)


class Rules:
    """The configured access rules followed by the default rule; the first whose glob matches decides."""

    def __init__(self, settings: config.Auth):
        default_readers = (ANY_USER, ANONYMOUS) if settings.anonymous_pull else (ANY_USER,)
        self.rules = (*settings.access, config.AccessRule("*", default_readers, (ANY_USER,)))
        self.groups = settings.groups

    def actions(self, user: str | None, repository: str, groups: frozenset[str] = frozenset()) -> frozenset[str]:
        """What ``user`` (None: anonymous), a member of directory ``groups``, may do to ``repository``."""
        rule = next(rule for rule in self.rules if fnmatch.fnmatchcase(repository, rule.repository))
        if any(self._names(user, groups, principal) for principal in rule.write):
            return WRITE
        return READ if any(self._names(user, groups, principal) for principal in rule.read) else frozenset()

    def _names(self, user: str | None, groups: frozenset[str], principal: str) -> bool:
        if user is None:
            return principal == ANONYMOUS
        return principal in (ANY_USER, user) or principal in groups or user in self.groups.get(principal, ())


class Tokens:
    """Issues and verifies the bearer tokens of one service: JWTs signed with an Ed25519 key."""

    def __init__(self, key: Ed25519PrivateKey, service: str, ttl: float):
        self.key, self.service, self.ttl = key, service, int(ttl)
        self._header = _b64(json.dumps({"typ": "JWT", "alg": "EdDSA"}).encode())

    def issue(self, user: str | None, access: Iterable[Scope], groups: Iterable[str] = (),
              directory: bool = False) -> tuple[str, int]:
        """A token for ``user`` granting ``access`` (and naming their directory ``groups``), and the time it was
        issued."""
        now = int(time.time())
        claims = {"iss": self.service, "aud": self.service, "sub": user or "", "iat": now, "nbf": now,
                  "exp": now + self.ttl, "jti": uuid.uuid4().hex, "access": [scope.claim() for scope in access]}
        if directory:
            claims |= {"dir": True, "groups": sorted(groups)}
        signing_input = f"{self._header}.{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
        return f"{signing_input}.{_b64(self.key.sign(signing_input.encode()))}", now

    def verify(self, token: str) -> Caller:
        """The caller a valid token speaks for; raise Unauthorized for a forged, foreign or expired one."""
        try:
            if len(token) > MAX_TOKEN:
                raise ValueError("too long")
            header, payload, signature = token.split(".")
            if json.loads(_unb64(header)).get("alg") != "EdDSA":
                raise ValueError("not EdDSA")
            self.key.public_key().verify(_unb64(signature), f"{header}.{payload}".encode())
            claims = json.loads(_unb64(payload))
            now = time.time()
            if claims["aud"] != self.service or not claims["nbf"] - CLOCK_SKEW <= now < claims["exp"]:
                raise ValueError("not for us, or not valid now")
            granted = tuple(Scope(entry["type"], entry["name"], frozenset(entry["actions"]))
                            for entry in claims["access"])
            groups = frozenset(str(group) for group in claims.get("groups", ()))
            return Caller(claims["sub"] or None, granted, groups, claims.get("dir") is True)
        except (ValueError, KeyError, TypeError, AttributeError, InvalidSignature, binascii.Error) as exc:
            raise Unauthorized("invalid or expired token") from exc


class Auth:
    """The gatekeeper: identifies callers, decides what each may do to which repository, and issues tokens."""

    def __init__(self, settings: config.Auth, users: Accounts, tokens: Tokens, resolve: Resolve):
        self.settings = settings
        self.users = users
        self.passwords = PasswordChecks(users)
        self.rules = Rules(settings)
        self.tokens = tokens
        self.resolve = resolve

    @classmethod
    def from_config(cls, settings: config.Auth, store: Store, resolve: Resolve) -> Auth:
        """Load the htpasswd file (if any), and the signing key kept in ``store`` (generated on first start).

        ``resolve(name, ns)`` is the repository a request name means (token scopes name repositories).
        """
        tokens = Tokens(signing_key(store), settings.service, settings.token_ttl)
        htpasswd = Htpasswd.load(settings.htpasswd) if settings.htpasswd is not None else Htpasswd({})
        users = Accounts(htpasswd, Directory(settings.ldap) if settings.ldap is not None else None)
        return cls(settings, users, tokens, resolve)

    # who is asking
    def identify(self, authorization: str | None) -> Caller:
        """The caller that ``Authorization`` (Basic or Bearer, or none: anonymous) names."""
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            caller = self.tokens.verify(credentials.strip())
            if caller.user is not None and not caller.directory and caller.user not in self.users:
                raise Unauthorized("the token's user is no longer known")
            return caller
        return self.login(authorization)

    def login(self, authorization: str | None) -> Caller:
        """The caller of Basic credentials (or none: anonymous), as the token endpoint takes them."""
        if not authorization:
            return Caller(None)
        if authorization.partition(" ")[0].lower() != "basic":
            raise Unauthorized("use Basic credentials to get a token")
        credentials = basic_credentials(authorization)
        if credentials is None:
            raise Unauthorized("malformed Basic credentials")
        user, password = credentials
        groups = self.users.check(user, password)
        if groups is None:
            raise Unauthorized("invalid username or password")
        return Caller(user, groups=groups, directory=user not in self.users)

    # what they may do
    def allowed(self, user: str | None, target: Target, groups: frozenset[str] = frozenset()) -> frozenset[str]:
        """The actions ``user`` (in directory ``groups``) may take on ``target``: writes where they land, pulls
        where they may be served."""
        own = self.rules.actions(user, target.write_name, groups)
        readable = all(PULL in self.rules.actions(user, store, groups) for store in target.access_names)
        return (own - READ) | (READ if readable else frozenset())

    def may_read(self, caller: Caller, target: Target | str) -> bool:
        """Whether ``caller`` may pull from ``target`` (a repository, or a store repository's name)."""
        names = (target,) if isinstance(target, str) else target.access_names
        return all(PULL in self.rules.actions(caller.user, name, caller.groups) for name in names)

    def authorize(self, authorization: str | None, method: str, name: str | None,
                  target: Target | None) -> Caller:
        """The caller, if it may send ``method`` to ``target``, the repository request name ``name`` resolved
        to (None: ``/v2/`` or the catalog).

        Raise Unauthorized when it should log in (or get a token with more scope), Denied when it is
        authenticated and the rules refuse it.
        """
        caller = self.identify(authorization)
        if name is None or target is None:
            if not authorization:
                raise Unauthorized("authentication required")
            return caller
        action = METHOD_ACTIONS.get(method, PUSH)
        if action not in self.allowed(caller.user, target, caller.groups):
            if caller.user is None:
                raise Unauthorized("authentication required", detail=_access_detail(name, action))
            raise Denied("requested access to the resource is denied", detail=_access_detail(name, action))
        if not caller.token_allows(name, action):
            raise Unauthorized("the token does not grant this access", detail=_access_detail(name, action))
        return caller

    # tokens
    def token(self, caller: Caller, scopes: Iterable[str]) -> dict[str, Any]:
        """The token endpoint's answer: a token granting ``caller`` what the rules allow of ``scopes``."""
        granted = [scope for text in scopes for part in text.split() if (scope := self._grant(caller, part))]
        token, issued = self.tokens.issue(caller.user, granted, caller.groups, caller.directory)
        issued_at = datetime.datetime.fromtimestamp(issued, datetime.UTC).isoformat().replace("+00:00", "Z")
        return {"token": token, "access_token": token, "expires_in": self.tokens.ttl, "issued_at": issued_at}

    def _grant(self, caller: Caller, text: str) -> Scope | None:
        scope = Scope.parse(text)
        if scope is None:
            return None
        if scope.type == "registry" and scope.name == "catalog":
            return Scope("registry", "catalog", frozenset({"*"}))
        if scope.type != "repository":
            return None
        try:
            allowed = self.allowed(caller.user, self.resolve(scope.name, None), caller.groups)
        except NameInvalid:
            return None
        wanted = WRITE if "*" in scope.actions else scope.actions
        return Scope("repository", scope.name, wanted & allowed)

    def challenge(self, base_url: str, method: str, name: str | None) -> str:
        """The ``WWW-Authenticate`` value sending a client to the token endpoint for ``method`` on ``name``."""
        realm = self.settings.realm or f"{base_url}/token"
        challenge = f'Bearer realm="{realm}",service="{self.settings.service}"'
        try:
            scope = f"repository:{check_name(name)}:{CHALLENGE_ACTIONS[METHOD_ACTIONS.get(method, PUSH)]}"
        except (NameInvalid, TypeError):
            return challenge
        return f'{challenge},scope="{scope}"'


def signing_key(store: Store) -> Ed25519PrivateKey:
    """The token signing key, the store's secret ``token.key``, generated when there is none yet (worker
    processes starting together all get the one that was stored first); with a configured ``secret``, the 32
    bytes derived from it are the key's seed, so every instance signs and checks with the same key."""
    material = store.secret(KEY_FILE, _new_key)
    if len(material) == SEED_SIZE:
        return Ed25519PrivateKey.from_private_bytes(material)
    try:
        key = serialization.load_pem_private_key(material, password=None)
    except ValueError as exc:
        raise StorageError(f"the store's token signing key {KEY_FILE} cannot be loaded: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise StorageError(f"the store's token signing key {KEY_FILE} is not an Ed25519 private key")
    return key


SEED_SIZE = 32  # bytes of an Ed25519 private key's seed


def _new_key() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """The user and password of ``Authorization: Basic ...``; None for another scheme or malformed credentials."""
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def _access_detail(name: str, action: str) -> list[dict[str, str]]:
    return [{"Type": "repository", "Name": name, "Action": action}]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
