"""LDAP / Active Directory logins: a user binds with their directory password, groups come from a search.

Each check opens its own connections (a search bound as the service account, or anonymous, finds the user's DN;
a bind as that DN checks the password; a search lists the groups naming the DN), every operation bounded by the
configured timeout. Checks run on the password threads of ``auth.PasswordChecks`` (never on the event loop),
and what they verify is remembered there for a while, so a pull costs no directory round-trip per request.
User names and DNs go into filters escaped; names with control characters and empty passwords never bind.
"""
from __future__ import annotations

import contextlib
import logging
import math
import ssl
import unicodedata

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from mirror import config
from mirror.errors import DirectoryUnavailable

log = logging.getLogger(__name__)
INVALID_CREDENTIALS = 49


class Directory:
    """Checks passwords against an LDAP directory and reads the groups of the users it knows."""

    def __init__(self, settings: config.Ldap):
        self.settings = settings
        self._seconds = max(1, math.ceil(settings.timeout))  # ldap3 takes whole seconds for reads
        self._use_ssl = settings.url.lower().startswith("ldaps:")
        self._tls = None
        if self._use_ssl or settings.start_tls:
            # the configured CA is trusted beside the system store
            self._tls = ldap3.Tls(validate=ssl.CERT_REQUIRED,
                                  ca_certs_file=settings.ca_file and str(settings.ca_file),
                                  ca_certs_path=settings.ca_file and ssl.get_default_verify_paths().capath)

    def check(self, user: str, password: str) -> frozenset[str] | None:
        """The directory groups of ``user`` if ``password`` is theirs, else None; raise DirectoryUnavailable when
        the directory cannot say (down, hanging past the timeout, or refusing the service account)."""
        if not user or not password or any(unicodedata.category(char).startswith("C") for char in user):
            return None
        # a server of each check's own: ldap3 servers keep per-connection state, and checks run on several threads
        server = ldap3.Server(self.settings.url, use_ssl=self._use_ssl, tls=self._tls, get_info=ldap3.NONE,
                              connect_timeout=self.settings.timeout)
        service = self._connection(server, self.settings.bind_dn, self.settings.bind_password)
        own = None
        try:
            if not self._bind(service):
                raise DirectoryUnavailable("the directory refused the service account (auth.ldap.bind_dn)")
            dn = self._find(service, user)
            if dn is None:
                return None
            own = self._connection(server, dn, password)
            return self._groups(service, dn) if self._bind(own) else None
        except (LDAPException, OSError) as exc:
            log.warning("LDAP directory %s: %s", self.settings.url, exc)
            raise DirectoryUnavailable(f"the directory cannot check passwords now: {type(exc).__name__}") from exc
        finally:
            for connection in (own, service):
                if connection is not None and not connection.closed:
                    with contextlib.suppress(LDAPException, OSError):  # the connection is gone either way
                        connection.unbind()

    def _connection(self, server: ldap3.Server, dn: str | None, password: str | None) -> ldap3.Connection:
        return ldap3.Connection(server, user=dn, password=password, auto_bind=ldap3.AUTO_BIND_NONE,
                                receive_timeout=self._seconds, read_only=True, raise_exceptions=False,
                                authentication=ldap3.SIMPLE if dn else ldap3.ANONYMOUS)

    def _bind(self, connection: ldap3.Connection) -> bool:
        connection.open()
        if self.settings.start_tls and not connection.start_tls():
            raise DirectoryUnavailable(f"StartTLS failed: {connection.result.get('description')}")
        if connection.bind():
            return True
        if connection.user and connection.result.get("result") != INVALID_CREDENTIALS:
            log.warning("LDAP bind as %s refused: %s", connection.user, connection.result.get("description"))
        return False

    def _find(self, service: ldap3.Connection, user: str) -> str | None:
        query = self.settings.user_filter.format(username=escape_filter_chars(user))
        self._search(service, self.settings.user_base, query, [], size_limit=2)
        entries = [entry for entry in service.response or () if entry.get("type") == "searchResEntry"]
        return entries[0]["dn"] if len(entries) == 1 else None  # unknown, or ambiguous: no login

    def _groups(self, service: ldap3.Connection, dn: str) -> frozenset[str]:
        attribute = self.settings.group_attribute
        query = self.settings.group_filter.format(dn=escape_filter_chars(dn))
        self._search(service, self.settings.group_base, query, [attribute])
        names = set()
        for entry in service.response or ():
            if entry.get("type") == "searchResEntry":
                value = entry.get("attributes", {}).get(attribute)
                names.update(value if isinstance(value, list) else [value] if value else [])
        return frozenset(str(name) for name in names)

    def _search(self, service: ldap3.Connection, base: str, query: str, attributes: list[str],
                size_limit: int = 0) -> None:
        service.search(base, query, search_scope=ldap3.SUBTREE, attributes=attributes, size_limit=size_limit,
                       time_limit=self._seconds)
        if service.result.get("result") not in (0, 4):  # success, or more than the size limit
            raise DirectoryUnavailable(f"the directory search failed: {service.result.get('description')}")
