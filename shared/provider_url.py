"""Provider URLs: the one rule for where the LLM broker may send a model call.

A provider's ``base_url`` comes from an operator (``zaki providers add``, ``ZAKI_LLM_BASE_URL``)
or from a user (bring-your-own-key in ``instance.requested``/``instance.update``), and the
broker runs on the host's network: an unchecked URL would let a tenant make the broker fetch
loopback-only services, the host's networks, other tenants' gateway ports or a cloud metadata
service. The same checks run in three places: when an event is validated, when an operator
adds a provider, and at call time in the broker (which also checks every address a name
resolves to, and connects only to a checked address: services/llm_broker/egress.py).

- https only; plain http only for hosts the operator names (``ZAKI_BROKER_HTTP_HOSTS``);
- no userinfo, query, fragment, percent-escape, backslash, whitespace, control or non-ASCII
  character, no dot segment, no non-canonical numeric host (``127.1``, ``0x7f.1``);
- the host must match ``ZAKI_BROKER_ALLOWED_HOSTS`` when it is set (domain suffixes);
- no local name (``localhost``, single labels, ``.local``, ``.internal`` ...) and no loopback,
  private, link-local, multicast, unspecified, reserved, CGNAT or platform address unless the
  operator allows that host (and port) in ``ZAKI_BROKER_PRIVATE_HOSTS``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from shared.settings import ZakiSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL = 512


class URLRefusal(StrEnum):
    MALFORMED = "malformed"
    CHARACTERS = "characters"
    SCHEME = "scheme"
    USERINFO = "userinfo"
    QUERY = "query"
    FRAGMENT = "fragment"
    HOST = "host"
    PATH = "path"
    HOST_NOT_ALLOWED = "host_not_allowed"
    LOCAL_NAME = "local_name"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link_local"
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"
    SHARED = "shared_address"  # CGNAT 100.64.0.0/10
    RESERVED = "reserved"
    PLATFORM = "platform_address"  # the host's own addresses, the tenant networks


# The address classes, for a message that says what the operator could allow.
ADDRESS_REFUSALS = frozenset(
    {
        URLRefusal.LOOPBACK,
        URLRefusal.PRIVATE,
        URLRefusal.LINK_LOCAL,
        URLRefusal.MULTICAST,
        URLRefusal.UNSPECIFIED,
        URLRefusal.SHARED,
        URLRefusal.RESERVED,
        URLRefusal.PLATFORM,
        URLRefusal.LOCAL_NAME,
    }
)


class ProviderURLError(ValueError):
    """A refused provider URL. The message never repeats the URL (it could hold a secret)."""

    def __init__(self, reason: URLRefusal, detail: str) -> None:
        hint = ""
        if reason in ADDRESS_REFUSALS:
            hint = "; an operator may allow such a host in ZAKI_BROKER_PRIVATE_HOSTS"
        elif reason is URLRefusal.SCHEME:
            hint = "; an operator may allow plain http for a host in ZAKI_BROKER_HTTP_HOSTS"
        super().__init__(f"provider URL refused ({reason.value}): {detail}{hint}")
        self.reason = reason


_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NUMERIC = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_PATH = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@-]*)*$")
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa", ".arpa", ".lan")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_RFC1918 = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


@dataclass(frozen=True)
class ProviderURL:
    scheme: str
    host: str  # lower case; an IPv6 address without brackets
    port: int
    path: str  # "" or "/..." without a trailing slash
    ip: IPAddress | None  # the host, when it is an address literal

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if isinstance(self.ip, ipaddress.IPv6Address) else self.host
        default = self.port == (443 if self.scheme == "https" else 80)
        return f"{self.scheme}://{host}{'' if default else f':{self.port}'}{self.path}"


def parse_provider_url(raw: str) -> ProviderURL:
    """The URL's parts, or ProviderURLError for anything but a plain scheme://host[:port]/path."""
    if not isinstance(raw, str) or not raw or len(raw) > MAX_URL:
        raise ProviderURLError(URLRefusal.MALFORMED, f"expected a URL of at most {MAX_URL} characters")
    if any(c <= " " or c >= "\x7f" or c in "\\%" for c in raw):
        raise ProviderURLError(
            URLRefusal.CHARACTERS, "no whitespace, control, non-ASCII, backslash or percent character"
        )
    if "#" in raw:
        raise ProviderURLError(URLRefusal.FRAGMENT, "a provider URL may not have a fragment")
    if "?" in raw:
        raise ProviderURLError(URLRefusal.QUERY, "a provider URL may not have a query")
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("http", "https") or not raw.lower().startswith(f"{parts.scheme}://"):
        raise ProviderURLError(URLRefusal.SCHEME, "the URL must start with https://")
    if "@" in parts.netloc:
        raise ProviderURLError(URLRefusal.USERINFO, "a provider URL may not carry a user or password")
    try:
        port = parts.port
    except ValueError:
        raise ProviderURLError(URLRefusal.MALFORMED, "the port is not a number from 1 to 65535") from None
    if port == 0:
        raise ProviderURLError(URLRefusal.MALFORMED, "the port is not a number from 1 to 65535")
    scheme = parts.scheme.lower()
    host, ip = _host(parts.netloc)
    path = parts.path.rstrip("/")
    if not _PATH.match(path) or any(seg in (".", "..") for seg in path.split("/")):
        raise ProviderURLError(URLRefusal.PATH, "the path may hold only plain segments (no . or ..)")
    return ProviderURL(scheme, host, port or (443 if scheme == "https" else 80), path, ip)


def _host(netloc: str) -> tuple[str, IPAddress | None]:
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0 or not re.fullmatch(r"(:\d{1,5})?", netloc[end + 1 :]):
            raise ProviderURLError(URLRefusal.HOST, "not a valid IPv6 address")
        try:
            ip = ipaddress.IPv6Address(netloc[1:end])
        except ValueError:
            raise ProviderURLError(URLRefusal.HOST, "not a valid IPv6 address") from None
        return str(ip), ip
    host = netloc.rsplit(":", 1)[0].lower() if ":" in netloc else netloc.lower()
    if not host or len(host) > 253:
        raise ProviderURLError(URLRefusal.HOST, "the URL has no valid host")
    labels = host.split(".")
    if _NUMERIC.match(labels[-1]):
        # Only a canonical dotted quad: 127.1, 2130706433 or 0x7f.0.0.1 all mean loopback.
        try:
            ip4 = ipaddress.IPv4Address(host)
        except ValueError:
            raise ProviderURLError(
                URLRefusal.HOST, "a numeric host must be a canonical IPv4 address"
            ) from None
        return str(ip4), ip4
    if not all(_LABEL.match(label) for label in labels):
        raise ProviderURLError(URLRefusal.HOST, "the host name is not valid (letters, digits, - and .)")
    return host, None


def address_class(ip: IPAddress) -> URLRefusal | None:
    """Why an address is not a public one, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address are judged by that address.
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            return URLRefusal.RESERVED
    if ip.is_unspecified:
        return URLRefusal.UNSPECIFIED
    if ip.is_loopback:
        return URLRefusal.LOOPBACK
    if ip.is_link_local:
        return URLRefusal.LINK_LOCAL
    if ip.is_multicast:
        return URLRefusal.MULTICAST
    if ip in _SHARED:
        return URLRefusal.SHARED
    if any(ip in n for n in _RFC1918 if n.version == ip.version):
        return URLRefusal.PRIVATE
    if ip.is_reserved or ip.is_private or not ip.is_global:
        return URLRefusal.RESERVED
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return URLRefusal.RESERVED
    return None


def is_local_name(host: str) -> bool:
    return "." not in host or host == "localhost" or host.endswith(_LOCAL_SUFFIXES)


@dataclass(frozen=True)
class HostRule:
    """An operator's entry: ``name``, ``address`` or ``network``, with an optional ``:port``."""

    name: str | None
    net: IPNetwork | None
    port: int | None

    @classmethod
    def parse(cls, entry: str) -> HostRule:
        entry = entry.strip().lower()
        port: int | None = None
        m = re.match(r"^(\[[^\]]+\]|[^:\[\]]+)(?::(\d{1,5}))?$", entry)
        if m is None:
            raise ValueError(f"not a host[:port] entry: {entry!r}")
        host, p = m.group(1).strip("[]"), m.group(2)
        if p is not None:
            port = int(p)
        try:
            return cls(None, ipaddress.ip_network(host, strict=False), port)
        except ValueError:
            return cls(host.rstrip("."), None, port)

    def matches(self, host: str, port: int, ip: IPAddress | None = None) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.name is not None:
            return host == self.name
        assert self.net is not None
        return ip is not None and ip.version == self.net.version and ip in self.net


def _rules(spec: str) -> tuple[HostRule, ...]:
    return tuple(HostRule.parse(e) for e in spec.split(",") if e.strip())


@dataclass(frozen=True)
class URLPolicy:
    allowed: tuple[str, ...] = ()  # domain suffixes; empty: any public host
    http: tuple[HostRule, ...] = ()  # may be called over plain http
    private: tuple[HostRule, ...] = ()  # may be (or resolve to) a non-public or platform address
    platform: tuple[IPNetwork, ...] = ()  # the platform's own addresses and networks

    @classmethod
    def from_settings(cls, s: ZakiSettings, host_addresses: bool = True) -> URLPolicy:
        platform: list[IPNetwork] = [ipaddress.ip_network(s.network_pool, strict=False)]
        for addr in (s.broker_host, s.gateway_publish_ip):
            with contextlib.suppress(ValueError):  # a name, not an address
                platform.append(ipaddress.ip_network(addr))
        if host_addresses:
            platform += local_networks()
        return cls(
            allowed=tuple(
                a.strip().lower().removeprefix("*").strip(".")
                for a in s.broker_allowed_hosts.split(",")
                if a.strip()
            ),
            http=_rules(s.broker_http_hosts),
            private=_rules(s.broker_private_hosts),
            platform=tuple(platform),
        )

    def check_url(self, raw: str) -> ProviderURL:
        """Every check that needs no DNS: the URL's form, its scheme, the allowlist, a local name
        or an address literal. Raises ProviderURLError."""
        u = parse_provider_url(raw)
        named = any(r.matches(u.host, u.port, u.ip) for r in (*self.http, *self.private))
        if u.scheme == "http" and not any(r.matches(u.host, u.port, u.ip) for r in self.http):
            raise ProviderURLError(URLRefusal.SCHEME, f"plain http to {u.host}:{u.port} is not allowed")
        if (
            self.allowed
            and not named
            and not any(u.host == a or u.host.endswith("." + a) for a in self.allowed)
        ):
            raise ProviderURLError(
                URLRefusal.HOST_NOT_ALLOWED, f"{u.host} is not in ZAKI_BROKER_ALLOWED_HOSTS"
            )
        if u.ip is not None:
            reason = self.address_refusal(u.host, u.port, u.ip)
            if reason is not None:
                raise ProviderURLError(
                    reason, f"{u.host} is a {reason.value.removesuffix('_address').replace('_', ' ')} address"
                )
        elif is_local_name(u.host) and not any(r.matches(u.host, u.port) for r in self.private):
            raise ProviderURLError(URLRefusal.LOCAL_NAME, f"{u.host} is a local name")
        return u

    def address_refusal(self, host: str, port: int, ip: IPAddress) -> URLRefusal | None:
        """Why a call to *host*:*port* may not go to *ip* (checked for every resolved address)."""
        reason = address_class(ip)
        if reason is None and any(ip.version == n.version and ip in n for n in self.platform):
            reason = URLRefusal.PLATFORM
        if reason is not None and any(r.matches(host, port, ip) for r in self.private):
            return None
        return reason


@lru_cache(maxsize=1)
def local_networks() -> tuple[IPNetwork, ...]:
    """This host's own addresses (every interface), read from /proc: the broker runs on the
    host's network, so a public address of the host itself must be refused too."""
    found: list[IPNetwork] = []
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in itertools.pairwise(lines):
            if line.strip() == "/32 host LOCAL":
                found.append(ipaddress.ip_network(prev.strip().removeprefix("|-- ")))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.append(ipaddress.IPv6Network(ipaddress.IPv6Address(int(line.split()[0], 16))))
    except (OSError, ValueError, IndexError):
        pass
    return tuple(dict.fromkeys(found))


def current_policy() -> URLPolicy:
    """The policy of this process's settings (for event validation)."""
    from shared.settings import get_settings

    return URLPolicy.from_settings(get_settings())


def check_provider_url(raw: str, policy: URLPolicy | None = None) -> ProviderURL:
    return (policy or current_policy()).check_url(raw)
