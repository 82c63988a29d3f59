"""Tenant egress: what a gateway container may reach, enforced with iptables on the host.

Default: DNS (the host's resolvers) and the public internet, plus the LLM broker's port.
Everything else is refused: RFC 1918, CGNAT, loopback, link-local (cloud metadata),
multicast and reserved space, the host's own addresses and its public connected subnets
(its LAN), and so every platform service and every other tenant.

Two paths need rules (a packet to one of the host's own addresses is delivered locally,
through INPUT, never FORWARD):
- FORWARD: ``DOCKER-USER -> ZAKI-EGRESS -> ZKF-<id>`` per tenant bridge ``br-<id>``;
- INPUT: ``INPUT -> ZAKI-INPUT -> ZKI-<id>``.
Each tenant's two chains are rebuilt atomically (``iptables-restore --noflush``); the
shared chains only hold one jump per bridge. Replies (ESTABLISHED, RELATED) always pass:
the proxy and the monitor connect *into* the container through its published port.

``tenant_rules`` is a pure function (bridge, subnet, policy -> rules); ``TenantEgress``
reads the host's state, applies, removes and garbage-collects. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import re
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shared.settings import ZakiSettings

log = logging.getLogger("zaki.provisioner.egress")

IPv4Net = ipaddress.IPv4Network
IPv4Addr = ipaddress.IPv4Address

# Never reachable from a tenant unless the operator allowlists it (ZAKI_EGRESS_ALLOW).
# Documentation ranges (TEST-NET) are not listed: they are not routed on the internet.
BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # carrier-grade NAT (some clouds' internal services)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local: cloud metadata services
        "172.16.0.0/12",  # RFC 1918 (Docker's default bridges)
        "192.0.0.0/24",  # IETF protocol assignments
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved and limited broadcast
    )
)
FORWARD_CHAIN = "ZAKI-EGRESS"  # jumped to from DOCKER-USER
INPUT_CHAIN = "ZAKI-INPUT"  # jumped to from INPUT
DOCKER_USER = "DOCKER-USER"
REJECT = "-j REJECT --reject-with icmp-admin-prohibited"  # fails fast, and says why
# (shared chain, the built-in chain that jumps to it)
_BASE_JUMPS = ((FORWARD_CHAIN, DOCKER_USER), (INPUT_CHAIN, "INPUT"))
# A tenant network's bridge, or a Swarm node's docker_gwbridge (every overlay task's way out:
# one pair of chains there fences in every tenant on the node; services/node_guard).
GWBRIDGE = "docker_gwbridge"
_BRIDGE_NAME = rf"br-[0-9a-f]{{12}}|{GWBRIDGE}"
_BRIDGE = re.compile(rf"^(?:{_BRIDGE_NAME})$")
_ALLOW = re.compile(r"^(?P<net>[0-9./]+)(?::(?:(?P<proto>tcp|udp)/)?(?P<port>\d{1,5}))?$")


class EgressConfigError(ValueError):
    """A malformed egress setting (the message names it)."""


class EgressError(Exception):
    """Applying the rules failed; the message is safe to publish."""


@dataclass(frozen=True)
class Allow:
    """One destination tenants may reach: a network, optionally one protocol and port."""

    net: IPv4Net
    proto: str | None = None  # tcp | udp | None (any)
    port: int | None = None

    def match(self) -> str:
        m = f"-d {self.net}"
        if self.proto:
            m += f" -p {self.proto} -m {self.proto}"
            if self.port:
                m += f" --dport {self.port}"
        return m


def parse_allow(spec: str) -> tuple[Allow, ...]:
    """``ZAKI_EGRESS_ALLOW``: "CIDR", "CIDR:PORT" (tcp) or "CIDR:tcp/PORT" / "CIDR:udp/PORT", comma-separated."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        m = _ALLOW.match(item)
        try:
            net = ipaddress.IPv4Network(m["net"], strict=False) if m else None
        except ValueError:
            net = None
        port = int(m["port"]) if m and m["port"] else None
        if net is None or (port is not None and not 0 < port < 65536):
            raise EgressConfigError(
                f"ZAKI_EGRESS_ALLOW: {item!r} is not CIDR, CIDR:PORT or CIDR:tcp|udp/PORT (IPv4)"
            )
        out.append(Allow(net, (m["proto"] or "tcp") if port else None, port))
    return tuple(out)


@dataclass(frozen=True)
class EgressPolicy:
    """What every tenant may reach besides the public internet."""

    broker_port: int
    broker_ip: IPv4Addr | None = None  # None: the port on any host address
    dns: tuple[IPv4Addr, ...] = ()
    allow: tuple[Allow, ...] = ()
    host_nets: tuple[IPv4Net, ...] = ()  # host addresses and LANs outside BLOCKED


def chains_for(bridge: str) -> tuple[str, str]:
    """The tenant's FORWARD and INPUT chains, named after its bridge (``br-<12 hex>``; the
    first 12 hex digits of docker_gwbridge's SHA-256 for a Swarm node's)."""
    if _BRIDGE.match(bridge) is None:
        raise EgressConfigError(f"not a tenant bridge name: {bridge!r}")
    tag = bridge[3:] if bridge.startswith("br-") else hashlib.sha256(bridge.encode()).hexdigest()[:12]
    return f"ZKF-{tag}", f"ZKI-{tag}"


def tenant_rules(bridge: str, subnet: str, policy: EgressPolicy) -> list[str]:
    """The ``iptables-restore`` lines that (re)build the tenant's two chains. Pure."""
    fwd, inp = chains_for(bridge)
    src = ipaddress.IPv4Network(subnet)
    lines = [f":{fwd} - [0:0]", f":{inp} - [0:0]"]  # declaring a chain with --noflush empties it
    for chain in (fwd, inp):
        lines += [
            f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
            f"-A {chain} ! -s {src} -j DROP",  # spoofed source: never ours to pass
        ]
        lines += [f"-A {chain} {a.match()} -j RETURN" for a in policy.allow]
        for ip in policy.dns:
            lines += [f"-A {chain} -d {ip}/32 -p {p} -m {p} --dport 53 -j RETURN" for p in ("udp", "tcp")]
    broker = f"-d {policy.broker_ip}/32 " if policy.broker_ip else ""
    lines.append(f"-A {inp} {broker}-p tcp -m tcp --dport {policy.broker_port} -j RETURN")
    if policy.broker_ip:  # a broker on another host (a Swarm node's tenants reach the manager's)
        lines.append(f"-A {fwd} {broker}-p tcp -m tcp --dport {policy.broker_port} -j RETURN")
    lines.append(f"-A {inp} {REJECT}")  # anything else to the host itself
    for net in (*BLOCKED, *policy.host_nets):
        lines.append(f"-A {fwd} -d {net} {REJECT}")
    return lines  # what is left in ZKF returns to Docker's rules: the public internet


# --- reading the host ---------------------------------------------------------------------------


def _blocked(net: IPv4Net) -> bool:
    return any(net.subnet_of(b) for b in BLOCKED)


def interface_addresses(dev: str | None = None) -> list[ipaddress.IPv4Interface]:
    """The IPv4 addresses (with their prefix) of *dev*, or of every interface: ``ip -4 -o addr``."""
    cmd = ["ip", "-4", "-o", "addr", "show", *(["dev", dev] if dev else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    found = []
    for word in out.split():
        if "/" in word and word[0].isdigit():
            with contextlib.suppress(ValueError):
                found.append(ipaddress.IPv4Interface(word))
    return found


def host_networks() -> tuple[IPv4Net, ...]:
    """The host's own IPv4 addresses and connected subnets that BLOCKED does not cover
    (a public address and its LAN)."""
    found: list[IPv4Net] = []
    for iface in interface_addresses():
        for net in (iface.network, ipaddress.IPv4Network(f"{iface.ip}/32")):
            if not _blocked(net) and net not in found:
                found.append(net)
    return tuple(found)


def host_resolvers(paths: Iterable[str] = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")) -> tuple:
    """The nameservers Docker's embedded DNS forwards to (loopback ones are skipped: those
    are queried from the host's namespace, not the container's)."""
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        ips = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    ip = ipaddress.ip_address(parts[1])
                    if isinstance(ip, IPv4Addr) and not ip.is_loopback:
                        ips.append(ip)
        if ips:
            return tuple(ips)
    return ()


def _address(host: str) -> IPv4Addr | None:
    """An IPv4 literal, or a name resolved here (None for 0.0.0.0: any host address)."""
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        try:
            ip = ipaddress.IPv4Address(socket.gethostbyname(host))
        except (OSError, ValueError) as e:
            raise EgressConfigError(f"cannot resolve {host!r} to an IPv4 address") from e
    return None if ip.is_unspecified else ip


def build_policy(
    s: ZakiSettings,
    host_gateway: Callable[[], str | None],
    host_nets: Callable[[], tuple[IPv4Net, ...]] = host_networks,
    resolvers: Callable[[], tuple] = host_resolvers,
) -> EgressPolicy:
    """The policy from the settings and the host's current addresses and resolvers."""
    allow = list(parse_allow(s.egress_allow))
    if s.telegram_private_network and s.telegram_api_base_for_gateways:
        # The operator pointed the gateways at a Bot API on a private address (a local fake).
        u = urlsplit(s.telegram_api_base_for_gateways)
        host = u.hostname or ""
        ip = host_gateway() if host == "host.docker.internal" else None
        with contextlib.suppress(ValueError):
            ip = ip or str(ipaddress.IPv4Address(host))
        if ip:
            port = u.port or (443 if u.scheme == "https" else 80)
            allow.append(Allow(ipaddress.IPv4Network(f"{ip}/32"), "tcp", port))
    if s.egress_dns.strip():
        try:
            dns = tuple(ipaddress.IPv4Address(d.strip()) for d in s.egress_dns.split(",") if d.strip())
        except ValueError as e:
            raise EgressConfigError(f"ZAKI_EGRESS_DNS: {e}") from None
    else:
        dns = resolvers()
    return EgressPolicy(
        broker_port=s.broker_port,
        broker_ip=_address(s.broker_host),
        dns=dns,
        allow=tuple(allow),
        host_nets=host_nets(),
    )


def docker_host_gateway(client) -> Callable[[], str | None]:
    """Where ``host.docker.internal`` (host-gateway) points: the default bridge's gateway."""

    def read() -> str | None:
        with contextlib.suppress(Exception):
            for cfg in client.networks.get("bridge").attrs.get("IPAM", {}).get("Config") or []:
                if cfg.get("Gateway"):
                    return cfg["Gateway"]
        # Docker often leaves the default bridge's gateway out of IPAM: docker0's address.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            for iface in interface_addresses("docker0"):
                return str(iface.ip)
        return None

    return read


# --- applying -----------------------------------------------------------------------------------


class TenantEgress:
    """Applies the policy to tenant bridges. Every call is idempotent."""

    def __init__(
        self,
        settings: ZakiSettings,
        host_gateway: Callable[[], str | None] = lambda: None,
        iptables: str = "iptables",
    ) -> None:
        self.enabled = settings.egress_policy == "enforce"
        self.settings = settings
        self.host_gateway = host_gateway
        self.iptables = iptables
        parse_allow(settings.egress_allow)  # a bad setting fails at start, not at the first user

    def _run(self, *args: str, stdin: str | None = None, check: bool = True, tool: str = "") -> bool:
        """Runs iptables (or ``iptables<tool>``) with the xtables lock; True when it succeeded."""
        try:
            p = subprocess.run(
                [f"{self.iptables}{tool}", "-w", *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            need = "it is not installed" if isinstance(e, FileNotFoundError) else "root is needed"
            raise EgressError(f"{self.iptables} could not run ({type(e).__name__}): {need}") from e
        if check and p.returncode != 0:
            raise EgressError(f"{self.iptables} {' '.join(args[:3])}: {p.stderr.strip()[:300]}")
        return p.returncode == 0

    def _ensure_base(self) -> None:
        try:
            self._run("-S", DOCKER_USER)
        except EgressError as e:
            raise EgressError(
                f"{e} (the egress policy needs root or CAP_NET_ADMIN, and dockerd managing iptables; "
                "ZAKI_EGRESS_POLICY=off runs tenants without it)"
            ) from None
        for chain, parent in _BASE_JUMPS:
            if not self._run("-S", chain, check=False):
                self._run("-N", chain, check=False)  # a racing replica may have made it
            if not self._run("-C", parent, "-j", chain, check=False):
                self._run("-I", parent, "1", "-j", chain)

    def apply(self, bridge: str, subnet: str, policy: EgressPolicy | None = None) -> None:
        """(Re)builds the tenant's chains and makes sure the jumps to them exist."""
        if self.enabled:
            self._apply({bridge: subnet}, policy or self.policy())

    def _apply(self, networks: Mapping[str, str], policy: EgressPolicy) -> None:
        """One ``iptables-restore`` for all of *networks*: each tenant's chains are emptied
        and refilled in one transaction, and missing jumps are appended to the shared chains."""
        self._ensure_base()
        have = self._jumps()
        chains, rules = [], []
        for bridge, subnet in networks.items():
            for line in tenant_rules(bridge, subnet, policy):
                (chains if line.startswith(":") else rules).append(line)
            for parent, chain in zip((FORWARD_CHAIN, INPUT_CHAIN), chains_for(bridge), strict=True):
                if (parent, bridge) not in have:
                    rules.append(f"-A {parent} -i {bridge} -j {chain}")
        if chains:
            text = "\n".join(["*filter", *chains, *rules, "COMMIT", ""])
            self._run("--noflush", stdin=text, tool="-restore")

    def _jumps(self) -> set[tuple[str, str]]:
        """(shared chain, bridge) of every jump to a tenant chain."""
        found = set()
        for parent in (FORWARD_CHAIN, INPUT_CHAIN):
            found |= {(parent, b) for b in re.findall(rf"-i ({_BRIDGE_NAME}) ", self._list(parent))}
        return found

    def in_place(self, bridge: str) -> bool:
        """Whether the jumps to *bridge*'s chains are in the kernel now (a node guard's health)."""
        return (
            all(self._run("-C", parent, "-j", chain, check=False) for chain, parent in _BASE_JUMPS)
            and {(FORWARD_CHAIN, bridge), (INPUT_CHAIN, bridge)} <= self._jumps()
        )

    def remove(self, bridge: str) -> None:
        if self.enabled:
            self._remove([bridge])

    def _remove(self, bridges: Iterable[str], retry: bool = True) -> None:
        """Drops the jumps to the tenants' chains and the chains, in one transaction."""
        wanted = {b: chains_for(b) for b in bridges}
        existing = set(re.findall(r"^-N (ZK[FI]-[0-9a-f]{12})$", self._list(), re.M))
        lines = []
        for parent in (FORWARD_CHAIN, INPUT_CHAIN):
            for bridge, chain in re.findall(
                rf"-i ({_BRIDGE_NAME}) -j (ZK[FI]-[0-9a-f]{{12}})", self._list(parent)
            ):
                if bridge in wanted:  # every copy: racing replicas may have added it twice
                    lines.append(f"-D {parent} -i {bridge} -j {chain}")
        for chain in (c for pair in wanted.values() for c in pair if c in existing):
            lines += [f"-F {chain}", f"-X {chain}"]
        if not lines:
            return
        try:
            self._run("--noflush", stdin="\n".join(["*filter", *lines, "COMMIT", ""]), tool="-restore")
        except EgressError:
            if not retry:
                raise
            self._remove(wanted, retry=False)  # another replica removed some of them meanwhile

    def _list(self, chain: str = "") -> str:
        p = subprocess.run(
            [self.iptables, "-w", "-S", *([chain] if chain else [])],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return p.stdout

    def sync(self, networks: Mapping[str, str]) -> None:
        """Applies the policy to every bridge in *networks* (bridge -> subnet) at once and
        removes the chains of bridges that no longer exist on this host (any platform's)."""
        if not self.enabled:
            return
        self._apply(networks, self.policy())
        gone = [
            b
            for b in sorted({b for _, b in self._jumps()} - set(networks))
            if not Path("/sys/class/net", b).exists()
        ]
        if gone:
            log.info("removing the egress rules of vanished bridges", extra={"bridges": len(gone)})
            self._remove(gone)

    def policy(self) -> EgressPolicy:
        return build_policy(self.settings, self.host_gateway)
