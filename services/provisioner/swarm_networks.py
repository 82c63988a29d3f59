"""A gateway's network on a Docker Swarm: one overlay per user, on the subnet its record names
(not attachable: only the user's service joins it). Part of ``SwarmRuntime`` (swarm_runtime.py).
Tenant egress rules live inside every node, on ``docker_gwbridge``: the node guard (swarm_guard.py)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from typing import Any

import docker
from docker.errors import APIError, NotFound
from docker.types import IPAMConfig, IPAMPool

from services.provisioner.networks import MANAGED_LABEL, USER_LABEL, EngineCalls, RuntimeError_, require_ours
from shared.gateway import network_name


def _subnet(attrs: Mapping[str, Any]) -> str | None:
    for cfg in (attrs.get("IPAM") or {}).get("Config") or []:
        try:
            net = ipaddress.ip_network(cfg["Subnet"])
        except (KeyError, ValueError):
            continue
        if net.version == 4:
            return str(net)
    return None


class SwarmNetworks(EngineCalls):
    client: docker.DockerClient
    platform_id: str
    proxy_address: str | None
    engine = "docker swarm"

    # Networks: one overlay per user (a /28 of the swarm's pool or the record's subnet).
    # Tenant egress rules: inside every node on docker_gwbridge, by the node guard (swarm_guard.py).
    def _ensure_network(self, user_id: str, subnet: str | None) -> str:
        name = network_name(user_id)
        try:
            net = self.client.networks.get(name)
            require_ours("network", name, net.attrs.get("Labels"), self.platform_id, user_id)
            if subnet and _subnet(net.attrs) != str(ipaddress.ip_network(subnet)):
                net.remove()  # a stale one: the record (and so the broker) expects *subnet*
                raise NotFound("stale")
        except NotFound:
            ipam = None
            if subnet:
                gw = str(next(ipaddress.ip_network(subnet).hosts()))
                ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=subnet, gateway=gw)])
            net = self.client.networks.create(
                name, driver="overlay", ipam=ipam, attachable=False, scope="swarm",
                labels={MANAGED_LABEL: self.platform_id, USER_LABEL: user_id},
            )  # fmt: skip
            net.reload()
        if self.proxy_address:
            return self.proxy_address
        found = _subnet(net.attrs)  # the swarm allocator fills in the gateway a moment later
        if found is None:
            raise RuntimeError_(f"network {name} has no IPv4 subnet")
        return str(next(ipaddress.ip_network(found).hosts()))

    async def ensure_network(self, user_id: str, subnet: str | None = None) -> str:
        """Creates the user's overlay (on *subnet* when given); returns the address the
        gateway sees the proxy come from (*proxy_address*, else the overlay's gateway)."""
        return await self._run(self._ensure_network, user_id, subnet)

    def _remove_network(self, user_id: str) -> None:
        deadline = time.monotonic() + 15
        while True:  # the tasks of a just-removed service release the network in a moment
            try:
                self.client.networks.get(network_name(user_id)).remove()
                return
            except NotFound:
                return
            except APIError as e:
                if "in use" not in str(e).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    async def remove_network(self, user_id: str) -> None:
        await self._run(self._remove_network, user_id)

    def _guard_nodes(self) -> None: ...  # SwarmRuntime: the node guard (swarm_guard.py)

    def _reconcile_networks(self, expected: Mapping[str, str | None]) -> list[str]:
        self._guard_nodes()  # the tenants' egress chains on every node (a new node, a changed setting)
        differ = []
        for net in self.client.api.networks(filters={"label": f"{MANAGED_LABEL}={self.platform_id}"}):
            want = expected.get((net.get("Labels") or {}).get(USER_LABEL, ""))
            if want and _subnet(net) != str(ipaddress.ip_network(want)):
                differ.append(net["Labels"][USER_LABEL])
        return sorted(differ)

    async def reconcile_networks(self, expected: Mapping[str, str | None]) -> list[str]:
        """Keeps the node guard in place; the users in *expected* whose overlay has another
        subnet than their record's."""
        return await self._run(self._reconcile_networks, expected)
