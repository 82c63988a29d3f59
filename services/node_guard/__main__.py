"""python -m services.node_guard [--check]

Runs on every node of a Swarm (a global service the provisioner deploys, services/provisioner/
swarm_guard.py), in the node's network namespace with CAP_NET_ADMIN. Every overlay task leaves
its node through ``docker_gwbridge``, so one pair of the provisioner's own tenant chains
(services/provisioner/egress.py, the same rules as on a single host) keyed on that bridge fences
in every tenant on the node: no private, link-local or loopback destination (other nodes, their
published ports, the LAN, metadata services), and on the node itself only the broker's port.
The policy is computed here, from the node's own addresses and resolvers. Applied at start and
again every ZAKI_NODE_GUARD_INTERVAL_S (a flushed DOCKER-USER or a dockerd restart is repaired).

Every node's address (``ZAKI_NODE_GUARD_PEERS``, from the provisioner) is blocked like the node's
own: a node with a public address is no less another tenant's or the platform's.

``--check`` (the service's health check) exits 0 only while the jumps are in the kernel and the
last round that applied the chains is at most three intervals old (a policy that no longer
applies is not healthy): the provisioner places tenants only on nodes whose guard has been
healthy (swarm_guard.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from prometheus_client import Counter

from services.provisioner.egress import (
    GWBRIDGE,
    EgressConfigError,
    EgressError,
    TenantEgress,
    interface_addresses,
)
from shared.runner import run_service
from shared.settings import ZakiSettings, get_settings

log = logging.getLogger("zaki.node_guard")
APPLIED = Counter("zaki_node_guard_applied_total", "Egress chains (re)applied on this node", ["outcome"])


def bridge_subnet(iface: str = GWBRIDGE) -> str | None:
    """The IPv4 network of *iface* on this node (None until the engine has made it)."""
    return next((str(a.network) for a in interface_addresses(iface)), None)


LAST_APPLIED = Path("/run/zaki-node-guard.applied")  # tmpfs: gone with the task


def peers(spec: str) -> tuple[ipaddress.IPv4Network, ...]:
    return tuple(ipaddress.IPv4Network(f"{a}/32") for a in spec.split(",") if a)


def apply_once(egress: TenantEgress) -> bool:
    subnet = bridge_subnet()
    if subnet is None:
        log.warning("no docker_gwbridge on this node yet")
        return False
    policy = egress.policy()
    policy = replace(policy, host_nets=(*policy.host_nets, *peers(egress.settings.node_guard_peers)))
    egress.apply(GWBRIDGE, subnet, policy)
    LAST_APPLIED.touch()
    return True


async def main(settings: ZakiSettings, stop: asyncio.Event) -> None:
    egress = TenantEgress(settings)
    while not stop.is_set():
        try:
            outcome = "applied" if await asyncio.to_thread(apply_once, egress) else "waiting"
        except (EgressError, EgressConfigError, OSError, subprocess.SubprocessError) as e:
            outcome = "failed"
            log.error("egress chains not applied", extra={"error": str(e)})
        APPLIED.labels(outcome).inc()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.node_guard_interval_s)


def check() -> int:
    s = get_settings()
    try:
        fresh = time.time() - LAST_APPLIED.stat().st_mtime <= 3 * s.node_guard_interval_s
    except OSError:
        fresh = False
    return 0 if fresh and TenantEgress(s).in_place(GWBRIDGE) else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(check())
    run_service("node_guard", main)
