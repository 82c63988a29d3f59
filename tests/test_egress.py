"""Tenant egress (services/provisioner/egress.py): the rule set as a pure function, and the
rules applied by the provisioner, tried from inside a real tenant container against host
ports, the platform's services and test hosts in a network namespace this test creates
(a private, a link-local and a public-looking address: no packet leaves this machine)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import shutil
import socket
import subprocess
import time
import uuid
from urllib.parse import urlparse

import pytest

from services.provisioner.egress import (
    BLOCKED,
    Allow,
    EgressConfigError,
    EgressError,
    EgressPolicy,
    TenantEgress,
    build_policy,
    chains_for,
    parse_allow,
    tenant_rules,
)
from shared import subjects
from shared.events import InstanceDelete, InstanceRequested
from shared.gateway import container_name, network_name
from shared.settings import ZakiSettings
from tests.conftest import STANDIN_IMAGE, missing_tool, new_user
from tests.test_isolation import PROBE_JS

BRIDGE = "br-0123456789ab"
POLICY = EgressPolicy(
    broker_port=8090,
    broker_ip=ipaddress.IPv4Address("172.17.0.1"),
    dns=(ipaddress.IPv4Address("10.255.255.53"),),
    allow=(Allow(ipaddress.IPv4Network("10.9.8.0/24"), "tcp", 5432),),
    host_nets=(ipaddress.IPv4Network("192.0.2.0/24"), ipaddress.IPv4Network("192.0.2.2/32")),
)


def verdict(lines: list[str], chain: str, src: str, dst: str, proto: str, port: int) -> str:
    """First-match evaluation of the generated rules for one new packet (only the matches
    tenant_rules emits): RETURN (continue: allowed), DROP or REJECT."""
    for line in lines:
        words = line.split()
        if words[:2] != ["-A", chain] or "--ctstate" in words:
            continue
        opts = dict(zip(words[2::2], words[3::2], strict=False))
        negated_src = "!" in words and words[words.index("!") + 1] == "-s"
        if negated_src and ipaddress.ip_address(src) in ipaddress.ip_network(words[words.index("!") + 2]):
            continue
        if "-d" in opts and ipaddress.ip_address(dst) not in ipaddress.ip_network(opts["-d"]):
            continue
        if "-p" in opts and opts["-p"] != proto:
            continue
        if "--dport" in words and int(words[words.index("--dport") + 1]) != port:
            continue
        return words[words.index("-j") + 1]
    return "RETURN"  # end of the tenant chain: back to Docker's rules


def test_tenant_rules_allow_dns_the_broker_and_the_internet_only():
    lines = tenant_rules(BRIDGE, "10.250.0.8/29", POLICY)
    fwd, inp = chains_for(BRIDGE)
    src = "10.250.0.10"
    assert lines[:2] == [f":{fwd} - [0:0]", f":{inp} - [0:0]"]  # rebuilt from empty
    # Replies always pass first (the proxy and the monitor connect into the container).
    for chain in (fwd, inp):
        first = next(line for line in lines if line.startswith(f"-A {chain} "))
        assert "RELATED,ESTABLISHED -j RETURN" in first
    # Forwarded: the public internet passes, every blocked class and the host's LAN do not.
    assert verdict(lines, fwd, src, "1.1.1.1", "tcp", 443) == "RETURN"
    assert verdict(lines, fwd, src, "203.0.113.7", "udp", 9) == "RETURN"
    for dst in ("169.254.169.254", "10.0.0.1", "172.17.0.2", "192.168.1.1", "100.100.100.200",
                "127.0.0.1", "224.0.0.251", "255.255.255.255", "192.0.2.77", "10.250.0.17"):  # fmt: skip
        assert verdict(lines, fwd, src, dst, "tcp", 80) == "REJECT", dst
    assert {str(n) for n in BLOCKED} <= {w for line in lines for w in line.split()}
    # DNS to the host's resolver only; the operator's allowlist entry, on its port only.
    assert verdict(lines, fwd, src, "10.255.255.53", "udp", 53) == "RETURN"
    assert verdict(lines, fwd, src, "10.0.0.9", "udp", 53) == "REJECT"
    assert verdict(lines, fwd, src, "10.9.8.7", "tcp", 5432) == "RETURN"
    assert verdict(lines, fwd, src, "10.9.8.7", "tcp", 22) == "REJECT"
    # To the host itself: the broker's port on its address, and nothing else.
    assert verdict(lines, inp, src, "172.17.0.1", "tcp", 8090) == "RETURN"
    for dst, port in (("172.17.0.1", 4222), ("10.250.0.9", 9101), ("192.0.2.2", 8090), ("10.250.0.9", 8090)):
        assert verdict(lines, inp, src, dst, "tcp", port) == "REJECT", (dst, port)
    # Forwarded to the broker on another host (a Swarm node's tenants): its port only.
    assert verdict(lines, fwd, src, "172.17.0.1", "tcp", 8090) == "RETURN"
    assert verdict(lines, fwd, src, "172.17.0.1", "tcp", 4222) == "REJECT"
    # A forged source address never passes.
    assert verdict(lines, fwd, "10.250.0.99", "1.1.1.1", "tcp", 443) == "DROP"
    # The broker on 0.0.0.0: its port on any host address.
    anywhere = tenant_rules(BRIDGE, "10.250.0.8/29", EgressPolicy(broker_port=8090))
    assert verdict(anywhere, inp, src, "10.250.0.9", "tcp", 8090) == "RETURN"


def test_egress_settings_are_parsed_or_refused_with_a_clear_error():
    assert parse_allow(" 10.1.0.0/16, 192.168.5.5:443 ,172.17.0.1:udp/514") == (
        Allow(ipaddress.IPv4Network("10.1.0.0/16")),
        Allow(ipaddress.IPv4Network("192.168.5.5/32"), "tcp", 443),
        Allow(ipaddress.IPv4Network("172.17.0.1/32"), "udp", 514),
    )
    for bad in ("10.1.0.0/33", "example.com", "10.0.0.1:0", "10.0.0.1:sctp/5", "::1", "10.0.0.1:70000"):
        with pytest.raises(EgressConfigError, match="ZAKI_EGRESS_ALLOW"):
            parse_allow(bad)
    with pytest.raises(EgressConfigError):
        chains_for("docker0")  # never touches a bridge that is not a tenant's
    # A Swarm node's way out for every overlay task: chains of the same shape, a stable tag.
    assert chains_for("docker_gwbridge") == ("ZKF-f5889a2ac818", "ZKI-f5889a2ac818")


def test_the_policy_follows_the_settings():
    s = ZakiSettings(
        broker_host="172.17.0.1",
        broker_port=8091,
        telegram_private_network=True,
        telegram_api_base_for_gateways="http://host.docker.internal:9011",
        egress_allow="10.1.2.3:5432",
        egress_dns="192.168.0.53",
    )
    p = build_policy(s, lambda: "172.17.0.1", host_nets=lambda: (), resolvers=lambda: ())
    assert (p.broker_ip, p.broker_port) == (ipaddress.IPv4Address("172.17.0.1"), 8091)
    assert p.dns == (ipaddress.IPv4Address("192.168.0.53"),)
    assert Allow(ipaddress.IPv4Network("172.17.0.1/32"), "tcp", 9011) in p.allow  # the Bot API it named
    assert Allow(ipaddress.IPv4Network("10.1.2.3/32"), "tcp", 5432) in p.allow
    # A public Bot API needs no rule; the broker on 0.0.0.0 is its port on any host address.
    public = build_policy(
        ZakiSettings(broker_host="0.0.0.0"), lambda: "172.17.0.1", host_nets=lambda: (), resolvers=lambda: ()
    )
    assert public.allow == () and public.broker_ip is None
    with pytest.raises(EgressConfigError, match="ZAKI_EGRESS_DNS"):
        build_policy(ZakiSettings(egress_dns="resolver.lan"), lambda: None, host_nets=lambda: ())


def test_without_iptables_rights_provisioning_fails_with_a_clear_error(tmp_path):
    # Where iptables cannot run (not root, no binary), no tenant network is left unprotected.
    egress = TenantEgress(ZakiSettings(), iptables=str(tmp_path / "iptables"))
    with pytest.raises(EgressError, match="needs root or CAP_NET_ADMIN"):
        egress.apply(BRIDGE, "10.250.0.8/29", POLICY)
    TenantEgress(ZakiSettings(egress_policy="off"), iptables=str(tmp_path / "iptables")).apply(
        BRIDGE, "10.250.0.8/29", POLICY
    )  # the operator turned it off: nothing runs
    with pytest.raises(EgressConfigError):
        TenantEgress(ZakiSettings(egress_allow="10.0.0.0/8:http"))  # a bad setting fails at start


# --- on this machine, from inside a tenant container -------------------------------------------


def _need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        missing_tool(tool)  # the project's one rule: skipped locally, a failure under CI=true
    return found


class NetnsHosts:
    """A network namespace behind a veth pair, holding a private, a link-local and a
    public-looking address, each routed (a /32) from the host to the veth only."""

    ADDRESSES = {"private": "10.197.213.9", "link-local": "169.254.213.9", "public": "203.0.113.213"}
    HOST_SIDE = "10.197.213.1"

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.vh, self.vn = f"zkt{tag}", f"zkh{tag}", f"zkn{tag}"
        self.listener: subprocess.Popen | None = None

    def sh(self, *args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, timeout=20)

    def up(self, port: int) -> None:
        self.sh("ip", "netns", "add", self.ns)
        self.sh("ip", "link", "add", self.vh, "type", "veth", "peer", "name", self.vn)
        self.sh("ip", "link", "set", self.vn, "netns", self.ns)
        self.sh("ip", "addr", "add", f"{self.HOST_SIDE}/32", "dev", self.vh)
        self.sh("ip", "link", "set", self.vh, "up")
        ns = ("ip", "netns", "exec", self.ns)
        self.sh(*ns, "ip", "link", "set", "lo", "up")
        self.sh(*ns, "ip", "link", "set", self.vn, "up")
        for ip in self.ADDRESSES.values():
            self.sh(*ns, "ip", "addr", "add", f"{ip}/32", "dev", self.vn)
            self.sh("ip", "route", "add", f"{ip}/32", "dev", self.vh)
        self.sh(*ns, "ip", "route", "add", f"{self.HOST_SIDE}/32", "dev", self.vn)
        self.sh(*ns, "ip", "route", "add", "default", "via", self.HOST_SIDE, "dev", self.vn)
        server = (
            "import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('0.0.0.0',{port}));s.listen(16)\nwhile True:\n c,_=s.accept();c.close()"
        )
        self.listener = subprocess.Popen([*ns, "python3", "-c", server])
        # The namespace answers from the host on every address (the routes work).
        for ip in self.ADDRESSES.values():
            for _ in range(50):
                with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=0.5):
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"test host {ip} does not answer")

    def down(self) -> None:
        if self.listener is not None:
            self.listener.kill()
            self.listener.wait(5)
        for ip in self.ADDRESSES.values():
            subprocess.run(["ip", "route", "del", f"{ip}/32", "dev", self.vh], capture_output=True)
        subprocess.run(["ip", "link", "del", self.vh], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


async def _host_listener() -> tuple[asyncio.Server, int]:
    """A host port bound to all interfaces, like the services' metrics ports used to be."""
    server = await asyncio.start_server(lambda r, w: w.close(), "0.0.0.0", 0)
    return server, server.sockets[0].getsockname()[1]


def _host_address() -> str:
    """This host's address on its LAN interface (the default route's source)."""
    out = subprocess.run(["ip", "-4", "-o", "route", "get", "203.0.113.250"], capture_output=True, text=True)
    words = out.stdout.split()
    return words[words.index("src") + 1] if "src" in words else "127.0.0.1"


def iptables(*args: str) -> str:
    return subprocess.run(["iptables", "-w", *args], check=True, capture_output=True, text=True).stdout


async def probe(container, targets: list[tuple[str, str, int]]) -> dict[str, str]:
    res = await asyncio.to_thread(
        container.exec_run, ["node", "-e", PROBE_JS, json.dumps(targets)], user="1000:1000"
    )
    return json.loads(res.output.decode().strip().splitlines()[-1])


async def test_a_tenant_reaches_the_broker_and_the_internet_but_no_host_or_private_address(
    provisioner, platform, fakes, docker_client, service_env, settings, store
):
    _need("ip")
    _need("iptables")
    hosts = NetnsHosts()
    server, host_port = await _host_listener()
    user = new_user("egr")
    try:
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
        )
        subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
        assert subject == subjects.INSTANCE_READY
        listen_port = 18000 + int(uuid.uuid4().int % 1000)
        await asyncio.to_thread(hosts.up, listen_port)
        c = docker_client.containers.get(container_name(user))
        gateway = next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["Gateway"]
        nats_port = urlparse(service_env["ZAKI_NATS_URL"]).port
        mongo_port = urlparse(service_env["ZAKI_MONGO_URL"]).port
        metrics_port = urlparse(provisioner.address).port
        blocked = [
            ("all-interfaces host port via the tenant gateway", gateway, host_port),
            ("all-interfaces host port via docker0", fakes.host, host_port),
            ("all-interfaces host port via the LAN address", _host_address(), host_port),
            ("provisioner metrics via docker0", fakes.host, metrics_port),
            ("NATS via the tenant gateway", gateway, nats_port),
            ("FerretDB via docker0", fakes.host, mongo_port),
            ("the model provider itself (only the broker may call it)", fakes.host, fakes.llm_port),
            ("private test host", NetnsHosts.ADDRESSES["private"], listen_port),
            ("link-local test host", NetnsHosts.ADDRESSES["link-local"], listen_port),
        ]
        allowed = [
            ("broker", fakes.host, int(service_env["ZAKI_BROKER_PORT"])),
            ("the Bot API the operator named for gateways", fakes.host, fakes.tg_port),
            ("public-looking test host", NetnsHosts.ADDRESSES["public"], listen_port),
        ]
        reached = await probe(c, blocked + allowed)
        assert {name: reached[name] for name, _, _ in allowed} == {name: "open" for name, _, _ in allowed}
        refused = {name: reached[name] for name, _, _ in blocked}
        assert all(v != "open" for v in refused.values()), refused
        # Refused by the policy with an ICMP "administratively prohibited" (rate-limited by the
        # kernel, so some of these parallel probes see a timeout instead).
        assert "EHOSTUNREACH" in refused.values(), refused

        # The policy outlives a lost jump (dockerd re-creating its chains): the provisioner's
        # periodic reconcile (every 5 s here) puts it back by itself.
        bridge = f"br-{docker_client.networks.get(network_name(user)).id[:12]}"
        await asyncio.to_thread(iptables, "-D", "DOCKER-USER", "-j", "ZAKI-EGRESS")
        deadline = time.monotonic() + 30
        while "-j ZAKI-EGRESS" not in await asyncio.to_thread(iptables, "-S", "DOCKER-USER"):
            assert time.monotonic() < deadline, "reconcile did not restore the egress jump"
            await asyncio.sleep(0.5)
        assert (await probe(c, blocked[-1:]))[blocked[-1][0]] != "open"

        # Deleting the instance removes its chains and jumps.
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))
        rules = await asyncio.to_thread(iptables, "-S")
        assert bridge not in rules and f"ZKF-{bridge[3:]}" not in rules
    finally:
        server.close()
        await asyncio.to_thread(hosts.down)
        with contextlib.suppress(Exception):
            await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


async def test_service_metrics_listen_on_loopback_only(provisioner, fakes):
    port = urlparse(provisioner.address).port
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    for address in (fakes.host, _host_address()):
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass
