"""Authentication and access rules: units of mirror.auth, then the HTTP flow with httpx, dockerd and skopeo."""
from __future__ import annotations

import base64
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import bcrypt
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mirror import config, storage
from mirror.auth import Auth, Caller, Htpasswd, Rules, Scope, Tokens, signing_key
from mirror.errors import ConfigError, Denied, StorageError, Unauthorized
from tests.images import BearerAuth, basic_authorization, build_image, parse_challenge, push, write_oci_layout
from tests.peers import MirrorProcess

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
RULES = [
    {"repository": "private/*", "read": ["readers"], "write": ["alice"]},
    {"repository": "public/*", "read": ["anonymous", "*"], "write": ["alice"]},
]


def write_htpasswd(path: Path, passwords: dict[str, str] = PASSWORDS) -> Path:
    """An htpasswd file with bcrypt entries in the ``$2y$`` form ``htpasswd -B`` writes."""
    lines = [f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode().replace('$2b$', '$2y$', 1)}"
             for user, password in passwords.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def settings(htpasswd: Path, **overrides: object) -> config.Auth:
    """Auth settings with the test rules: bob reads private/*, everyone reads public/*, alice writes both."""
    rules = tuple(config.AccessRule(rule["repository"], tuple(rule["read"]), tuple(rule["write"])) for rule in RULES)
    return config.Auth(**{"htpasswd": htpasswd, "groups": {"readers": ("bob",)}, "access": rules, **overrides})


def hosted_only(name: str, ns: str | None) -> SimpleNamespace:
    """A hosted repository's store names, as ``Repositories.resolve`` gives them without upstreams."""
    return SimpleNamespace(access_names=(name,), write_name=name)


def default_upstream(name: str, ns: str | None) -> SimpleNamespace:
    """Like the repositories with docker.io as default upstream: unprefixed pulls may land hosted or upstream."""
    store = name if name.startswith("docker.io/") else f"docker.io/{name}"
    names = (store,) if ns or name.startswith("docker.io/") else (name, store)
    return SimpleNamespace(access_names=names, write_name=names[0])


def authorize(auth: Auth, authorization: str | None, method: str, name: str | None, ns: str | None) -> Caller:
    """``auth.authorize`` of the repository ``name`` resolves to, as a handler asks it."""
    return auth.authorize(authorization, method, name, None if name is None else auth.resolve(name, ns))


@pytest.fixture
def htpasswd(tmp_path):
    return write_htpasswd(tmp_path / "htpasswd")


@pytest.fixture
def auth(htpasswd, tmp_path):
    return Auth.from_config(settings(htpasswd), storage.open(tmp_path / "store"), hosted_only)


def basic(user: str, password: str | None = None) -> str:
    return basic_authorization(user, PASSWORDS[user] if password is None else password)


# rules
def test_default_rule_lets_users_read_and_write_and_anonymous_pull_only_when_configured(htpasswd):
    closed, open_ = Rules(config.Auth(htpasswd)), Rules(config.Auth(htpasswd, anonymous_pull=True))
    assert closed.actions("alice", "any/thing") == {"pull", "push", "delete"}
    assert closed.actions(None, "any/thing") == frozenset()
    assert open_.actions(None, "any/thing") == {"pull"}


def test_first_matching_rule_decides_with_groups_star_and_anonymous(htpasswd):
    rules = Rules(settings(htpasswd))
    assert rules.actions("alice", "private/app") == {"pull", "push", "delete"}
    assert rules.actions("bob", "private/app") == {"pull"}
    assert rules.actions("carol", "private/app") == frozenset()
    assert rules.actions(None, "private/app") == frozenset()
    assert rules.actions(None, "public/app") == rules.actions("carol", "public/app") == {"pull"}
    assert rules.actions("carol", "private/deeper/app") == frozenset()  # the glob's * matches across /
    assert rules.actions("carol", "team/app") == {"pull", "push", "delete"}  # no rule matched: the default


# htpasswd
def test_htpasswd_checks_bcrypt_passwords_as_htpasswd_writes_them(htpasswd):
    users = Htpasswd.load(htpasswd)
    assert users.check("alice", "alice-secret")
    assert users.check("alice", "alice-secret")  # remembered
    assert not users.check("alice", "bob-secret")
    assert not users.check("mallory", "alice-secret")
    assert "bob" in users and "mallory" not in users


def test_htpasswd_refuses_other_hash_formats_and_reserved_names_naming_the_line(tmp_path):
    path = write_htpasswd(tmp_path / "htpasswd", {"alice": "x"})
    path.write_text(path.read_text() + "bob:$apr1$abcdefgh$0123456789abcdefghijkl\n")
    with pytest.raises(ConfigError, match="line 2: not a bcrypt entry"):
        Htpasswd.load(path)
    write_htpasswd(path, {"anonymous": "x"})
    with pytest.raises(ConfigError, match="'anonymous' cannot be a user name"):
        Htpasswd.load(path)


# tokens and scopes
def test_scopes_parse_names_with_colons():
    assert Scope.parse("repository:team/app:pull,push") == Scope("repository", "team/app", frozenset({"pull", "push"}))
    assert Scope.parse("repository:host:5000/app:pull").name == "host:5000/app"
    assert Scope.parse("registry:catalog:*") == Scope("registry", "catalog", frozenset({"*"}))
    assert Scope.parse("nonsense") is None


def test_tokens_round_trip_and_refuse_tampering_expiry_and_foreign_keys():
    key = Ed25519PrivateKey.generate()
    tokens = Tokens(key, "mirror", 60)
    token, _ = tokens.issue("alice", [Scope("repository", "team/app", frozenset({"pull"}))])
    caller = tokens.verify(token)
    assert caller.user == "alice" and caller.token_allows("team/app", "pull")
    assert not caller.token_allows("team/app", "push") and not caller.token_allows("other", "pull")
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "bob"}).encode()).rstrip(b"=").decode()
    for bad in (f"{header}.{forged}.{signature}", token + "x", "a.b", "", "x" * 10000):
        with pytest.raises(Unauthorized):
            tokens.verify(bad)
    with pytest.raises(Unauthorized):
        Tokens(Ed25519PrivateKey.generate(), "mirror", 60).verify(token)
    with pytest.raises(Unauthorized):
        Tokens(key, "another-service", 60).verify(token)
    expired, _ = Tokens(key, "mirror", 0).issue("alice", [])  # expires the second it is issued
    with pytest.raises(Unauthorized):
        tokens.verify(expired)


def test_signing_key_is_generated_once_and_kept_in_the_store(tmp_path):
    first = signing_key(storage.open(tmp_path / "store"))
    assert signing_key(storage.open(tmp_path / "store")).public_key() == first.public_key()
    assert b"PRIVATE KEY" in storage.open(tmp_path / "store").secret("token.key", lambda: pytest.fail("made again"))


def test_a_damaged_signing_key_is_a_storage_error(tmp_path):
    store = storage.open(tmp_path / "store")
    store.secret("token.key", lambda: b"not a key")
    with pytest.raises(StorageError, match="token signing key"):
        signing_key(store)


# decisions
def test_authorize_answers_401_to_strangers_and_403_to_users_the_rules_refuse(auth):
    assert authorize(auth, basic("alice"), "PUT", "private/app", None).user == "alice"
    assert authorize(auth, basic("bob"), "GET", "private/app", None).user == "bob"
    assert authorize(auth, None, "GET", "public/app", None).user is None
    with pytest.raises(Denied):
        authorize(auth, basic("bob"), "PUT", "private/app", None)
    with pytest.raises(Denied):
        authorize(auth, basic("carol"), "HEAD", "private/app", None)
    with pytest.raises(Unauthorized):
        authorize(auth, None, "GET", "private/app", None)
    with pytest.raises(Unauthorized):
        authorize(auth, None, "POST", "public/app", None)
    with pytest.raises(Unauthorized):
        authorize(auth, basic("alice", "wrong"), "GET", "public/app", None)
    with pytest.raises(Unauthorized):
        authorize(auth, None, "GET", None, None)  # /v2/ and the catalog want credentials
    assert authorize(auth, basic("carol"), "GET", None, None).user == "carol"


def test_bearer_tokens_grant_only_their_scope_and_only_what_the_rules_allow(auth):
    scopes = ["repository:private/app:pull,push repository:public/app:pull", "registry:catalog:*", "bad"]
    bob = auth.token(Caller("bob"), scopes)
    assert bob["token"] == bob["access_token"] and bob["expires_in"] == 300 and bob["issued_at"].endswith("Z")
    granted = auth.tokens.verify(bob["token"]).granted
    assert {(scope.name, tuple(sorted(scope.actions))) for scope in granted} == {
        ("private/app", ("pull",)), ("public/app", ("pull",)), ("catalog", ("*",))}
    bearer = f"Bearer {bob['token']}"
    assert authorize(auth, bearer, "GET", "private/app", None).user == "bob"
    with pytest.raises(Unauthorized):  # allowed by the rules, but not in the token: get a new token
        authorize(auth, bearer, "GET", "team/app", None)
    with pytest.raises(Denied):
        authorize(auth, bearer, "PUT", "private/app", None)
    everything = auth.tokens.verify(auth.token(Caller("alice"), ["repository:private/app:*"])["token"])
    assert everything.granted[0].actions == {"pull", "push", "delete"}
    anonymous = auth.tokens.verify(auth.token(Caller(None), ["repository:private/app:pull"])["token"])
    assert anonymous.user is None and anonymous.granted[0].actions == frozenset()


def test_tokens_of_users_removed_from_htpasswd_stop_working(auth, htpasswd, tmp_path):
    token = auth.token(Caller("carol"), ["repository:team/app:pull"])["token"]
    write_htpasswd(htpasswd, {"alice": "alice-secret"})
    reloaded = Auth.from_config(settings(htpasswd), storage.open(tmp_path / "store"), hosted_only)
    with pytest.raises(Unauthorized):
        authorize(reloaded, f"Bearer {token}", "GET", "team/app", None)


def test_pulls_through_the_default_upstream_need_read_on_hosted_and_upstream_names(htpasswd, tmp_path):
    rules = (config.AccessRule("docker.io/*", ("anonymous",), ()), config.AccessRule("*", (), ()))
    auth = Auth.from_config(config.Auth(htpasswd, access=rules), storage.open(tmp_path / "store"), default_upstream)
    assert authorize(auth, None, "GET", "library/alpine", "docker.io").user is None
    assert authorize(auth, None, "GET", "docker.io/library/alpine", None).user is None
    with pytest.raises(Unauthorized):  # may be served by a hosted library/alpine, which anonymous may not read
        authorize(auth, None, "GET", "library/alpine", None)


def test_challenge_names_realm_service_and_scope(auth, htpasswd, tmp_path):
    challenge = parse_challenge(auth.challenge("http://mirror.example:5000", "PATCH", "team/app"))
    assert challenge == {"realm": "http://mirror.example:5000/token", "service": "mirror",
                         "scope": "repository:team/app:pull,push"}
    configured = Auth.from_config(settings(htpasswd, realm="https://login.example/token", service="reg"),
                                  storage.open(tmp_path / "store"), hosted_only)
    assert configured.challenge("http://x", "GET", None) == 'Bearer realm="https://login.example/token",service="reg"'


@pytest.mark.parametrize(("raw", "key"), [
    ({"htpasswd": "/no/such/file"}, "auth.htpasswd"),
    ({"anonymous_pull": "yes"}, "auth.anonymous_pull"),
    ({"token_ttl": "0s"}, "auth.token_ttl"),
    ({"realm": "ftp://x/token"}, "auth.realm"),
    ({"groups": {"anonymous": ["alice"]}}, "auth.groups.anonymous"),
    ({"access": [{"repository": "a/*", "reed": ["alice"]}]}, "auth.access[0].reed"),
    ({"access": [{"read": ["alice"]}]}, "auth.access[0]"),
    ({"access": [{"repository": "a/*", "write": "alice"}]}, "auth.access[0].write"),
    ({"passwords": "x"}, "auth.passwords"),
])
def test_config_errors_name_the_key(htpasswd, raw, key):
    with pytest.raises(ConfigError) as caught:
        config._build({"auth": {"htpasswd": str(htpasswd), **raw}}, "test")
    assert caught.value.key == key


def test_auth_is_off_unless_configured(htpasswd):
    assert config._build({}, "test").auth is None
    loaded = config._build({"auth": {"htpasswd": str(htpasswd), "token_ttl": "10m", "access": RULES}}, "test")
    assert loaded.auth.token_ttl == 600 and loaded.auth.access[0].write == ("alice",)


# over HTTP, against a real mirror process
@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A hosted mirror with auth: the test rules, anonymous pull off elsewhere."""
    workdir = tmp_path_factory.mktemp("auth-mirror")
    htpasswd = write_htpasswd(workdir / "htpasswd")
    auth = {"htpasswd": str(htpasswd), "groups": {"readers": ["bob"]}, "access": RULES}
    with MirrorProcess(workdir, {"upstreams": [], "auth": auth}) as server:
        yield server


@pytest.fixture(scope="module")
def pushed(mirror):
    """Images alice pushed with the token flow: private/app:v1, public/app:v1 and team/app:v1."""
    image = build_image(seed="auth")
    for repository in ("private/app", "public/app", "team/app"):
        push(mirror.url, repository, "v1", image, "alice", PASSWORDS["alice"])
    return image


def test_ping_challenges_with_the_host_the_client_used(mirror):
    for host in (mirror.host, f"localhost:{mirror.port}"):
        response = httpx.get(f"http://{host}/v2/")
        assert response.status_code == 401
        assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert parse_challenge(response.headers["www-authenticate"]) == {
            "realm": f"http://{host}/token", "service": "mirror"}


def test_token_endpoint_refuses_a_wrong_password(mirror):
    url = f"{mirror.url}/token?service=mirror&scope=repository:team/app:pull"
    refused = httpx.get(url, headers={"Authorization": basic("alice", "wrong")})
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic ")
    assert httpx.get(url, headers={"Authorization": basic("alice")}).status_code == 200


def test_token_flow_pulls_and_anonymous_pushes_are_refused(mirror, pushed):
    with httpx.Client(auth=BearerAuth("bob", PASSWORDS["bob"])) as client:
        response = client.get(f"{mirror.url}/v2/private/app/manifests/v1")
        assert response.status_code == 200 and response.content == pushed.manifest.data
        assert client.get(f"{mirror.url}/v2/private/app/blobs/{pushed.layers[0].digest}").content == \
            pushed.layers[0].data
        assert client.post(f"{mirror.url}/v2/private/app/blobs/uploads/").status_code == 403
    with httpx.Client(auth=BearerAuth()) as anonymous:
        assert anonymous.get(f"{mirror.url}/v2/public/app/manifests/v1").status_code == 200
        assert anonymous.get(f"{mirror.url}/v2/team/app/manifests/v1").status_code == 401
        refused = anonymous.post(f"{mirror.url}/v2/public/app/blobs/uploads/")
        assert refused.status_code == 401 and refused.json()["errors"][0]["code"] == "UNAUTHORIZED"
    with pytest.raises(httpx.HTTPStatusError, match="401"):
        push(mirror.url, "public/app", "v2", build_image(seed="anonymous"))


def test_basic_credentials_work_without_tokens(mirror, pushed):
    image = build_image(seed="basic")
    with httpx.Client(headers={"Authorization": basic("alice")}, timeout=60) as client:
        push(mirror.url, "team/basic", "v1", image, client=client)
        assert client.get(f"{mirror.url}/v2/team/basic/manifests/v1").content == image.manifest.data
        assert client.delete(f"{mirror.url}/v2/team/basic/manifests/v1").status_code == 202
    wrong = httpx.get(f"{mirror.url}/v2/public/app/manifests/v1", headers={"Authorization": basic("bob", "x")})
    assert wrong.status_code == 401


def test_answers_do_not_reveal_whether_a_private_repository_exists(mirror, pushed):
    def answer(path: str, authorization: str | None) -> tuple[int, dict[str, str], str]:
        response = httpx.get(f"{mirror.url}{path}", headers={"Authorization": authorization} if authorization else {})
        headers = {key: value for key, value in response.headers.items() if key != "date"}
        return response.status_code, headers, response.text

    digest = pushed.layers[0].digest
    for authorization, status in ((None, 401), (basic("carol"), 403)):
        for kind in ("manifests/v1", f"blobs/{digest}", "tags/list"):
            existing = answer(f"/v2/private/app/{kind}", authorization)
            missing = answer(f"/v2/private/xyz/{kind}", authorization)  # same length: same headers
            assert existing[0] == status
            assert existing == tuple(json.loads(json.dumps(missing).replace("private/xyz", "private/app")))


def test_catalog_lists_only_what_the_caller_may_read(mirror, pushed):
    def catalog(user: str | None) -> list[str]:
        with httpx.Client(auth=BearerAuth(user, PASSWORDS.get(user))) as client:
            response = client.get(f"{mirror.url}/v2/_catalog")
            response.raise_for_status()
            return response.json()["repositories"]

    assert {"private/app", "public/app", "team/app"} <= set(catalog("alice"))
    assert "private/app" not in catalog("carol") and {"public/app", "team/app"} <= set(catalog("carol"))
    assert catalog(None) == ["public/app"]


def test_mounting_needs_read_access_to_the_source(mirror, pushed):
    digest = pushed.layers[0].digest
    with httpx.Client(headers={"Authorization": basic("carol")}) as client:
        refused = client.post(f"{mirror.url}/v2/team/carol/blobs/uploads/?mount={digest}&from=private/app")
        assert refused.status_code == 202  # an upload session instead: carol may not read private/app
        mounted = client.post(f"{mirror.url}/v2/team/carol/blobs/uploads/?mount={digest}&from=public/app")
        assert mounted.status_code == 201


def test_skopeo_copies_with_credentials(mirror, skopeo, tmp_path):
    image = build_image(seed="skopeo-auth", oci=True)
    layout = write_oci_layout(tmp_path / "layout", {"v1": image})
    destination = f"docker://{mirror.host}/team/skopeo:v1"
    refused = skopeo.copy(f"oci:{layout}:v1", destination, check=False)
    assert refused.returncode != 0 and "unauthorized" in refused.stderr.lower()
    skopeo.copy(f"oci:{layout}:v1", destination, f"--dest-creds=alice:{PASSWORDS['alice']}")
    inspected = skopeo.inspect(destination, f"--creds=bob:{PASSWORDS['bob']}", raw=True)
    assert inspected == json.loads(image.manifest.data)


def test_docker_login_push_and_pull(mirror, dockerd):
    dockerd.configure({"insecure-registries": [mirror.host]})
    reference = f"{mirror.host}/team/docker:v1"
    image = build_image(seed="docker-auth")
    push(mirror.url, "team/docker-source", "v1", image, "alice", PASSWORDS["alice"])
    wrong = dockerd.docker("login", "-u", "alice", "--password-stdin", mirror.host, input="wrong\n", check=False)
    assert wrong.returncode != 0
    dockerd.docker("login", "-u", "alice", "--password-stdin", mirror.host, input=PASSWORDS["alice"] + "\n")
    dockerd.docker("pull", f"{mirror.host}/team/docker-source:v1")
    dockerd.docker("tag", f"{mirror.host}/team/docker-source:v1", reference)
    dockerd.docker("push", reference)
    dockerd.docker("rmi", reference, f"{mirror.host}/team/docker-source:v1")
    dockerd.docker("pull", reference)
    dockerd.docker("logout", mirror.host)
    dockerd.docker("tag", reference, f"{mirror.host}/team/anonymous:v1")
    refused = dockerd.docker("push", f"{mirror.host}/team/anonymous:v1", check=False)
    assert refused.returncode != 0 and "unauthorized" in (refused.stderr + refused.stdout).lower()


def test_sighup_rereads_htpasswd_and_rules(tmp_path):
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "alice-secret"})
    config_ = {"upstreams": [], "auth": {"htpasswd": str(htpasswd)}}
    with MirrorProcess(tmp_path / "mirror", config_) as server:
        token_url = f"{server.url}/token?service=mirror&scope=repository:team/app:pull"
        dave = {"Authorization": basic_authorization("dave", "dave-secret")}
        assert httpx.get(token_url, headers=dave).status_code == 401
        assert httpx.get(f"{server.url}/v2/team/app/tags/list").status_code == 401
        write_htpasswd(htpasswd, {"alice": "alice-secret", "dave": "dave-secret"})
        server.write_config({**config_, "auth": {**config_["auth"], "anonymous_pull": True}})
        server.send_signal(signal.SIGHUP)
        server.wait_until(lambda: httpx.get(token_url, headers=dave).status_code == 200, "the reload")
        assert httpx.get(f"{server.url}/v2/team/app/tags/list").status_code == 404
