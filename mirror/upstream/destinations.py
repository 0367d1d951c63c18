"""Where an upstream may send the appliance: its own origin, or public addresses.

A redirect (``Location``) or a bearer challenge's ``realm`` makes the appliance send a request wherever the
upstream, or whoever answers in its name, chooses: followed blindly, that reaches what only the appliance
can reach (a cloud metadata service at 169.254.169.254, an admin port on loopback, the internal network)
and relays the answer. So every connection an upstream's client opens is judged before it is opened:

- to the upstream's own origin (the scheme, host and port of its ``url``): always allowed;
- anywhere else (a blob storage CDN, a token service): the host is resolved and every address it resolves
  to must be public, or of the same kind as an address of the upstream's own host (a registry on the
  internal network may send its clients to storage on that network, a loopback test registry to loopback).
  The kinds: loopback, link-local, private (RFC 1918, ULA fc00::/7 and the other special-purpose blocks
  Python's ``ipaddress`` counts as private), unspecified, multicast, and reserved (any other address that
  is not global);
- the connection then goes only to the addresses that were judged (``transport.py`` resolves, asks
  ``Destinations.admit``, and connects to those), so a name cannot resolve elsewhere in between.

Through the upstream's proxy (trusted config: the connection to the proxy itself is never judged) the proxy
resolves the destination and connects to it, so less holds: a destination other than the origin is judged on
what its host resolves to here (an IP address as itself), as above, but the proxy may resolve a name
differently, and a name that does not resolve here at all (a network whose only way out is the proxy) is
admitted, left to the proxy and its own rules. The origin is never resolved here.

A refusal is ``DestinationRefused`` (an UpstreamInvalid), raised before any connection is attempted; the
client names the redirect or realm that led there. At most ``MAX_REDIRECTS`` redirects are followed.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import httpx

from mirror.errors import UpstreamInvalid
from mirror.upstream.status import detail

MAX_REDIRECTS = 5
PUBLIC = "public"
_KINDS = ("unspecified", "loopback", "link_local", "multicast", "private")  # checked in this order


class DestinationRefused(UpstreamInvalid):
    """A connection the destination policy refused (see the module docstring)."""

    def __init__(self, destination: str, reason: str):
        super().__init__(f"refused to connect to {destination}: {reason}", detail(None))
        self.reason = reason


def address_kind(address: str) -> str:
    """``public``, or which kind of non-public address ``address`` is (an IPv4-mapped IPv6 address as IPv4)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in _KINDS:
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return PUBLIC if ip.is_global else "reserved"


class Destinations:
    """The destination policy of one upstream: what it may redirect to or name as its token realm."""

    def __init__(self, upstream_url: str):
        url = httpx.URL(upstream_url)
        self.url = upstream_url
        self.origin = (url.scheme, url.host, url.port or _default_port(url.scheme))

    def admit(self, scheme: str, host: str, port: int, addresses: Sequence[str] | None) -> None:
        """Raise DestinationRefused unless ``scheme://host:port``, ``host`` resolved to ``addresses``, may be asked
        (``addresses`` None: asked through the proxy, ``host`` resolved here if it needs judging and can be)."""
        if (scheme, host.lower(), port) == self.origin:
            return
        if addresses is None:
            addresses = _resolve(host, port)
            if addresses is None:  # only the proxy can resolve it
                return
        reason = self.refusal(addresses)
        if reason is not None:
            netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise DestinationRefused(f"{scheme}://{netloc}", reason)

    def refusal(self, addresses: Sequence[str]) -> str | None:
        """Why a host (not the upstream's origin) resolving to ``addresses`` is refused; None if it is not."""
        if not addresses:
            return "it resolves to no address"
        own: frozenset[str] | None = None
        for address in addresses:
            kind = address_kind(address)
            if kind == PUBLIC:
                continue
            own = self._own_kinds() if own is None else own
            if kind not in own:
                return (f"{address} is a {kind} address, and the upstream {self.url} is not; redirects and token "
                        "realms may lead only to the upstream's own origin or to public addresses")
        return None

    def _own_kinds(self) -> frozenset[str]:
        """The kinds of the addresses of the upstream's own host (none if it does not resolve now)."""
        host = self.origin[1]
        try:
            return frozenset({address_kind(host)})
        except ValueError:  # a name
            pass
        return frozenset(map(address_kind, _resolve(host, self.origin[2]) or ()))


def _resolve(host: str, port: int) -> list[str] | None:
    """The addresses ``host`` resolves to here, each once; None if it does not resolve."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80
