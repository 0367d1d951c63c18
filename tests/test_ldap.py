"""LDAP / Active Directory logins (``auth.ldap``) against a real slapd: binds, groups, injection, a hung directory."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from mirror import config, storage
from mirror.auth import Auth, Caller
from mirror.directory import Directory
from mirror.errors import ConfigError, Denied, DirectoryUnavailable
from tests.images import BearerAuth, basic_authorization, build_image, push, write_oci_layout
from tests.peers import MirrorProcess, PeerProcess, free_port, require, write_self_signed_certificate
from tests.test_auth import hosted_only, write_htpasswd

SUFFIX = "dc=example,dc=com"
ROOT_DN, ROOT_PASSWORD = f"cn=admin,{SUFFIX}", "admin-secret"
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
RULES = [{"repository": "prod/*", "read": ["*"], "write": ["registry-admins"]}]
TIMEOUT = 1.0


class Slapd(PeerProcess):
    """OpenLDAP's slapd in the foreground on free loopback ports (ldap:// with StartTLS, and ldaps://, with a
    self-signed certificate): an mdb database of ``SUFFIX`` with people (alice, bob, carol) and the groups
    registry-admins (alice) and developers (alice, bob), loaded with slapadd before it starts."""

    name = "slapd"

    def __init__(self, workdir: str | Path):
        super().__init__(workdir)
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{free_port()}"
        self.certificate, self.key = write_self_signed_certificate(self.workdir, "slapd")

    def start(self) -> Slapd:
        """Write the config and data, load them, start slapd and wait until it answers a search."""
        slapd = require("slapd", root=True)
        database = self.workdir / "db"
        database.mkdir(exist_ok=True)
        conf = self.workdir / "slapd.conf"
        conf.write_text("\n".join([
            *(f"include /etc/ldap/schema/{schema}.schema" for schema in ("core", "cosine", "inetorgperson")),
            "modulepath /usr/lib/ldap", "moduleload back_mdb", f"pidfile {self.workdir / 'slapd.pid'}",
            f"TLSCertificateFile {self.certificate}", f"TLSCertificateKeyFile {self.key}",
            "database mdb", f'suffix "{SUFFIX}"', f'rootdn "{ROOT_DN}"', f"rootpw {ROOT_PASSWORD}",
            f"directory {database}", "maxsize 10485760",
            "access to attrs=userPassword by anonymous auth by * none", "access to * by * read", ""]))
        data = self.workdir / "data.ldif"
        data.write_text(directory_ldif())
        subprocess.run([require("slapadd", root=True), "-f", str(conf), "-l", str(data)], check=True,
                       capture_output=True, timeout=60)
        self._spawn([slapd, "-d", "0", "-f", str(conf), "-h", f"{self.url}/ {self.ldaps_url}/"])
        try:
            probe = Directory(ldap_settings(self.url, timeout=2.0))
            self.wait_until(lambda: self._answers(probe), f"{self.url} to answer", timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _answers(probe: Directory) -> bool:
        try:
            return probe.check("alice", PASSWORDS["alice"]) is not None
        except DirectoryUnavailable:
            return False


def directory_ldif() -> str:
    """The directory's entries: ou=people with the users, ou=groups with registry-admins and developers."""
    entries = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
               f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people",
               f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups"]
    entries += [f"dn: uid={user},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: {user}\ncn: {user}\n"
                f"sn: {user}\nuserPassword: {password}" for user, password in PASSWORDS.items()]
    entries += [f"dn: cn=registry-admins,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: registry-admins\n"
                f"member: uid=alice,ou=people,{SUFFIX}",
                f"dn: cn=developers,ou=groups,{SUFFIX}\nobjectClass: groupOfNames\ncn: developers\n"
                f"member: uid=alice,ou=people,{SUFFIX}\nmember: uid=bob,ou=people,{SUFFIX}"]
    return "\n\n".join(entries) + "\n"


def ldap_raw(url: str, **overrides: object) -> dict[str, object]:
    """The ``auth.ldap`` mapping of a config file for the test directory."""
    return {"url": url, "bind_dn": ROOT_DN, "bind_password": ROOT_PASSWORD, "user_base": f"ou=people,{SUFFIX}",
            "user_filter": "(uid={username})", "group_base": f"ou=groups,{SUFFIX}",
            "group_filter": "(member={dn})", "group_attribute": "cn", "timeout": f"{TIMEOUT}s", **overrides}


def ldap_settings(url: str, **overrides: object) -> config.Ldap:
    """``config.Ldap`` for the test directory, as the config file would give it."""
    settings = config._build({"auth": {"ldap": ldap_raw(url)}}, "test").auth.ldap
    return config.Ldap(**{**settings.__dict__, **overrides})


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    with Slapd(tmp_path_factory.mktemp("slapd")) as server:
        yield server


@pytest.fixture(scope="module")
def mirror(slapd, tmp_path_factory):
    """A hosted mirror whose users come from the directory, plus a local htpasswd robot; prod/* is written by
    the directory group registry-admins only."""
    workdir = tmp_path_factory.mktemp("ldap-mirror")
    htpasswd = write_htpasswd(workdir / "htpasswd", {"robot": "robot-secret"})
    auth = {"ldap": ldap_raw(slapd.url), "htpasswd": str(htpasswd), "access": RULES}
    with MirrorProcess(workdir, {"upstreams": [], "auth": auth}) as server:
        yield server


def token_url(mirror: MirrorProcess, scope: str = "repository:prod/app:pull") -> str:
    return f"{mirror.url}/token?service=mirror&scope={scope}"


# config
@pytest.mark.parametrize(("raw", "key"), [
    ({"url": "http://ldap.example"}, "auth.ldap.url"),
    ({"url": 389}, "auth.ldap.url"),
    ({"start_tls": "yes"}, "auth.ldap.start_tls"),
    ({"url": "ldaps://ldap.example", "start_tls": True}, "auth.ldap.start_tls"),
    ({"ca_file": "/no/such/file"}, "auth.ldap.ca_file"),
    ({"bind_password": None}, "auth.ldap.bind_password"),
    ({"bind_password": 5}, "auth.ldap.bind_password"),
    ({"user_base": None}, "auth.ldap.user_base"),
    ({"user_filter": "uid={username}"}, "auth.ldap.user_filter"),
    ({"user_filter": "(uid={user})"}, "auth.ldap.user_filter"),
    ({"group_filter": "(member={username})"}, "auth.ldap.group_filter"),
    ({"group_attribute": "c n"}, "auth.ldap.group_attribute"),
    ({"timeout": "0s"}, "auth.ldap.timeout"),
    ({"timeout": True}, "auth.ldap.timeout"),
    ({"page_size": 5}, "auth.ldap.page_size"),
])
def test_ldap_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as caught:
        config._build({"auth": {"ldap": {**ldap_raw("ldap://127.0.0.1:389"), **raw}}}, "test")
    assert caught.value.key == key


def test_htpasswd_is_optional_with_ldap_and_required_without():
    loaded = config._build({"auth": {"ldap": ldap_raw("ldap://ldap.example")}}, "test").auth
    assert loaded.htpasswd is None and loaded.ldap.timeout == TIMEOUT and not loaded.ldap.start_tls
    with pytest.raises(ConfigError) as caught:
        config._build({"auth": {"anonymous_pull": True}}, "test")
    assert caught.value.key == "auth.htpasswd"


def test_directory_groups_work_in_rules_and_travel_in_tokens(tmp_path):
    rules = (config.AccessRule("prod/*", ("*",), ("registry-admins",)),)
    settings = config.Auth(ldap=ldap_settings(f"ldap://127.0.0.1:{free_port()}"), access=rules)
    auth = Auth.from_config(settings, storage.open(tmp_path / "store"), hosted_only)
    admin = Caller("alice", groups=frozenset({"registry-admins"}), directory=True)
    token = auth.token(admin, ["repository:prod/app:pull,push"])["token"]
    caller = auth.identify(f"Bearer {token}")  # a directory user's token needs no directory (it is down here)
    assert caller.user == "alice" and caller.groups == {"registry-admins"} and caller.directory
    assert auth.authorize(f"Bearer {token}", "POST", "prod/app", hosted_only("prod/app", None)).user == "alice"
    other = auth.token(Caller("bob", groups=frozenset({"developers"}), directory=True), ["repository:prod/app:*"])
    assert auth.identify(f"Bearer {other['token']}").granted[0].actions == {"pull"}
    with pytest.raises(Denied):
        auth.authorize(f"Bearer {other['token']}", "POST", "prod/app", hosted_only("prod/app", None))


# the directory itself
def test_directory_binds_users_and_reads_their_groups(slapd):
    directory = Directory(ldap_settings(slapd.url))
    assert directory.check("alice", PASSWORDS["alice"]) == {"registry-admins", "developers"}
    assert directory.check("bob", PASSWORDS["bob"]) == {"developers"}
    assert directory.check("alice", "wrong") is None
    assert directory.check("nobody", "x") is None
    anonymous_search = Directory(ldap_settings(slapd.url, bind_dn=None, bind_password=None))
    assert anonymous_search.check("bob", PASSWORDS["bob"]) == {"developers"}


def test_start_tls_and_ldaps_trust_the_configured_ca_only(slapd):
    for url, start_tls in ((slapd.url, True), (slapd.ldaps_url, False)):
        trusting = Directory(ldap_settings(url, start_tls=start_tls, ca_file=slapd.certificate))
        assert trusting.check("bob", PASSWORDS["bob"]) == {"developers"}
        with pytest.raises(DirectoryUnavailable):  # self-signed: not in the system store
            Directory(ldap_settings(url, start_tls=start_tls)).check("bob", PASSWORDS["bob"])


@pytest.mark.parametrize("user", ["*", "alice)(uid=*", "al*", "alice)(|(uid=*", "alice\x00", "alice\n",
                                  "alice\u200b", ""])
def test_filter_metacharacters_and_control_characters_log_no_one_in(slapd, user):
    directory = Directory(ldap_settings(slapd.url))
    assert directory.check(user, PASSWORDS["alice"]) is None


def test_an_empty_password_is_never_an_anonymous_login(slapd):
    assert Directory(ldap_settings(slapd.url)).check("alice", "") is None


def test_a_directory_that_is_down_is_unavailable_not_a_wrong_password():
    directory = Directory(ldap_settings(f"ldap://127.0.0.1:{free_port()}"))
    with pytest.raises(DirectoryUnavailable):
        directory.check("alice", PASSWORDS["alice"])


# over HTTP, against a real mirror process
def test_directory_user_in_the_group_pushes_and_others_are_refused(mirror):
    image = build_image(seed="ldap")
    push(mirror.url, "prod/app", "v1", image, "alice", PASSWORDS["alice"])
    with httpx.Client(auth=BearerAuth("bob", PASSWORDS["bob"])) as bob:
        assert bob.get(f"{mirror.url}/v2/prod/app/manifests/v1").content == image.manifest.data
        refused = bob.post(f"{mirror.url}/v2/prod/app/blobs/uploads/")
        assert refused.status_code == 403 and refused.json()["errors"][0]["code"] == "DENIED"
    basic_bob = httpx.post(f"{mirror.url}/v2/prod/app/blobs/uploads/",
                           headers={"Authorization": basic_authorization("bob", PASSWORDS["bob"])})
    assert basic_bob.status_code == 403
    basic_alice = httpx.get(f"{mirror.url}/v2/prod/app/manifests/v1",
                            headers={"Authorization": basic_authorization("alice", PASSWORDS["alice"])})
    assert basic_alice.status_code == 200
    robot = httpx.get(token_url(mirror), headers={"Authorization": basic_authorization("robot", "robot-secret")})
    assert robot.status_code == 200  # htpasswd users log in beside the directory's


@pytest.mark.parametrize(("user", "password"), [
    ("alice", "wrong"), ("alice", ""), ("*", PASSWORDS["alice"]), ("alice)(uid=*", PASSWORDS["alice"]),
    ("*)(uid=alice", PASSWORDS["alice"]), ("robot", PASSWORDS["alice"]), ("alice", "robot-secret"),
])
def test_wrong_passwords_and_injected_names_get_401(mirror, user, password):
    answer = httpx.get(token_url(mirror), headers={"Authorization": basic_authorization(user, password)})
    assert answer.status_code == 401 and answer.json()["errors"][0]["code"] == "UNAUTHORIZED"


def test_skopeo_pushes_as_a_directory_user(mirror, skopeo, tmp_path):
    image = build_image(seed="ldap-skopeo", oci=True)
    layout = write_oci_layout(tmp_path / "layout", {"v1": image})
    destination = f"docker://{mirror.host}/prod/skopeo:v1"
    skopeo.copy(f"oci:{layout}:v1", destination, f"--dest-creds=alice:{PASSWORDS['alice']}")
    refused = skopeo.copy(f"oci:{layout}:v1", f"docker://{mirror.host}/prod/bob:v1",
                          f"--dest-creds=bob:{PASSWORDS['bob']}", check=False)
    assert refused.returncode != 0 and "denied" in refused.stderr.lower()
    assert skopeo.inspect(destination, f"--creds=bob:{PASSWORDS['bob']}", raw=True) == json.loads(
        image.manifest.data)


def test_docker_login_and_push_as_a_directory_user(mirror, dockerd):
    dockerd.configure({"insecure-registries": [mirror.host]})
    image = build_image(seed="ldap-docker")
    push(mirror.url, "prod/docker-source", "v1", image, "alice", PASSWORDS["alice"])
    wrong = dockerd.docker("login", "-u", "alice", "--password-stdin", mirror.host, input="wrong\n", check=False)
    assert wrong.returncode != 0
    dockerd.docker("login", "-u", "alice", "--password-stdin", mirror.host, input=PASSWORDS["alice"] + "\n")
    dockerd.docker("pull", f"{mirror.host}/prod/docker-source:v1")
    dockerd.docker("tag", f"{mirror.host}/prod/docker-source:v1", f"{mirror.host}/prod/docker:v1")
    dockerd.docker("push", f"{mirror.host}/prod/docker:v1")


def test_a_hung_directory_gives_503_in_time_while_tokens_keep_working(mirror, slapd):
    image = build_image(seed="ldap-hung")
    push(mirror.url, "prod/hung", "v1", image, "alice", PASSWORDS["alice"])
    issued = httpx.get(token_url(mirror, "repository:prod/hung:pull"),
                       headers={"Authorization": basic_authorization("alice", PASSWORDS["alice"])})
    token = {"Authorization": f"Bearer {issued.json()['token']}"}
    carol = {"Authorization": basic_authorization("carol", PASSWORDS["carol"])}  # never logged in before
    slapd.send_signal(signal.SIGSTOP)
    try:
        answers: dict[str, tuple[int, float]] = {}

        def login(name: str) -> None:
            started = time.monotonic()
            status = httpx.get(token_url(mirror), headers=carol, timeout=30).status_code
            answers[name] = (status, time.monotonic() - started)

        logins = [threading.Thread(target=login, args=(f"carol-{index}",)) for index in range(3)]
        for thread in logins:
            thread.start()
        time.sleep(0.2)  # the logins now wait for the directory
        started = time.monotonic()
        assert httpx.get(f"{mirror.url}/v2/", headers=token, timeout=5).status_code == 200
        pulled = httpx.get(f"{mirror.url}/v2/prod/hung/manifests/v1", headers=token, timeout=5)
        assert pulled.status_code == 200 and pulled.content == image.manifest.data
        assert time.monotonic() - started < 0.5  # not queued behind the directory
        for thread in logins:
            thread.join(30)
        assert all(status == 503 and elapsed < 4 * TIMEOUT + 1 for status, elapsed in answers.values()), answers
        unavailable = httpx.get(token_url(mirror), headers=carol, timeout=30)
        assert unavailable.json()["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        slapd.send_signal(signal.SIGCONT)
    assert httpx.get(token_url(mirror), headers=carol, timeout=30).status_code == 200
