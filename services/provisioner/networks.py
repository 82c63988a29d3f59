"""A gateway's network on one Docker engine: one bridge per user, on the subnet its record
names, under the egress policy (egress.py); and the hand-over of a pool slot's container to
its user's network. Part of ``DockerRuntime`` (runtime.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import docker
from docker.errors import APIError, NotFound

from services.provisioner.egress import EgressConfigError, EgressError, TenantEgress
from shared.gateway import container_name, network_name, user_of_container

log = logging.getLogger("zaki.provisioner")

MANAGED_LABEL = "zaki.managed"  # value: the platform id, so several platforms can share an engine
USER_LABEL = "zaki.user"
INSTANCE_LABEL = "zaki.instance"


class RuntimeError_(Exception):
    """A runtime call failed; the message is safe to publish."""


T = TypeVar("T")


def require_ours(
    kind: str,
    name: str,
    labels: Mapping[str, str] | None,
    platform_id: str,
    user_id: str | None = None,
    owner_label: str = MANAGED_LABEL,
) -> None:
    """Refuses to touch a container, service or network of that name that this platform (and,
    when given, this user) does not own: never adopt or remove someone else's. *owner_label*:
    the label that names the owning platform (the node guard has its own)."""
    labels = labels or {}
    if labels.get(owner_label) != platform_id or (user_id is not None and labels.get(USER_LABEL) != user_id):
        raise RuntimeError_(f"{kind} name {name} is taken by something this platform does not manage")


class EngineCalls:
    """The docker SDK's blocking calls, run off the event loop; an API error becomes a
    ``RuntimeError_`` whose message is safe to publish. *engine* names the API in it."""

    engine = "docker"

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except NotFound:
            raise
        except APIError as e:
            raise RuntimeError_(f"{self.engine}: {e.explanation or e}") from e


def _subnet(net) -> str | None:
    """The network's IPv4 subnet, normalised."""
    for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
        with contextlib.suppress(ValueError, KeyError):
            found = ipaddress.ip_network(cfg["Subnet"])
            if found.version == 4:
                return str(found)
    return None


class DockerNetworks(EngineCalls):
    client: docker.DockerClient
    egress: TenantEgress
    platform_id: str

    # Networks: one bridge per user, so tenants cannot reach each other's containers.
    # The network must have the subnet the record names: the broker honours an instance's
    # credential only from that subnet, and egress rules are keyed on the bridge.
    def _ensure_network(self, user_id: str, subnet: str | None) -> str:
        name = network_name(user_id)
        try:
            net = self.client.networks.get(name)
        except NotFound:
            net = None
        if net is not None:
            require_ours("network", name, net.attrs.get("Labels"), self.platform_id, user_id)
            actual = _subnet(net)
            if subnet and actual != str(ipaddress.ip_network(subnet)):
                # Left by a failed provisioning or an older platform state: adopting it would
                # put the gateway outside the subnet its record (and so the broker) expects.
                log.warning(
                    "network subnet differs from the record: recreating it",
                    extra={"user_id": user_id, "network_subnet": actual, "record_subnet": subnet},
                )
                self._drop_network(net, user_id)
                net = None
        if net is None:
            net = self._create_network(name, user_id, subnet)
        bridge, actual = f"br-{net.id[:12]}", _subnet(net)
        if actual is None:
            raise RuntimeError_(f"network {name} has no IPv4 subnet")
        try:
            self.egress.apply(bridge, actual)
        except (EgressError, EgressConfigError) as e:
            raise RuntimeError_(f"egress policy: {e}") from e
        configs = (net.attrs.get("IPAM") or {}).get("Config") or []
        for cfg in configs:
            if cfg.get("Gateway"):
                return cfg["Gateway"]
        raise RuntimeError_(f"network {name} has no gateway address")

    def _create_network(self, name: str, user_id: str, subnet: str | None, retry: bool = True):
        ipam = None
        if subnet:
            net_ = ipaddress.ip_network(subnet)
            gateway = str(next(net_.hosts()))
            ipam = docker.types.IPAMConfig(
                pool_configs=[docker.types.IPAMPool(subnet=subnet, gateway=gateway)]
            )
        try:
            net = self.client.networks.create(
                name,
                driver="bridge",
                ipam=ipam,
                labels={MANAGED_LABEL: self.platform_id, USER_LABEL: user_id},
                options={"com.docker.network.bridge.enable_icc": "false"},
                check_duplicate=True,
            )
        except APIError as e:
            if e.status_code == 409:  # created by a racing replica
                net = self.client.networks.get(name)
            elif subnet and retry and "overlap" in str(e.explanation or e).lower():
                # Ports (and so subnets) are unique per host: a network on this subnet is stale.
                self._drop_overlapping(subnet)
                return self._create_network(name, user_id, subnet, retry=False)
            else:
                raise
        net.reload()
        return net

    def _drop_network(self, net, user_id: str) -> None:
        """Removes a stale network of *user_id*, with the user's own (stopped or running)
        containers on it: the provisioner creates the container again right after."""
        for c in self.client.containers.list(all=True, filters={"network": net.name}):
            labels = c.labels or {}
            owner = user_of_container(c.name, labels.get(USER_LABEL))  # a claimed slot keeps its labels
            if labels.get(MANAGED_LABEL) != self.platform_id or owner != user_id:
                raise RuntimeError_(f"network {net.name} is in use by {c.name}: not removing it")
        for c in self.client.containers.list(all=True, filters={"network": net.name}):
            c.remove(force=True)
        net.remove()
        with contextlib.suppress(EgressError):
            self.egress.remove(f"br-{net.id[:12]}")

    def _drop_overlapping(self, subnet: str) -> None:
        want = ipaddress.ip_network(subnet)
        for net in self.client.networks.list(filters={"label": f"{MANAGED_LABEL}={self.platform_id}"}):
            have = _subnet(net)
            if have is None or not ipaddress.ip_network(have).overlaps(want):
                continue
            if self.client.containers.list(all=True, filters={"network": net.name}):
                raise RuntimeError_(f"subnet {subnet} is held by network {net.name}, which is in use")
            log.warning("removing a stale network on a subnet now allocated", extra={"network": net.name})
            net.remove()
            with contextlib.suppress(EgressError):
                self.egress.remove(f"br-{net.id[:12]}")

    async def ensure_network(self, user_id: str, subnet: str | None = None) -> str:
        """Creates the user's network if needed (on *subnet* when given: Docker's default
        pools run out after ~30 bridge networks), recreates one whose subnet differs, and
        applies the egress policy to it; returns its gateway IP, the address the gateway
        sees the proxy come from."""
        return await self._run(self._ensure_network, user_id, subnet)

    def _remove_network(self, user_id: str) -> None:
        try:
            net = self.client.networks.get(network_name(user_id))
        except NotFound:
            return
        net.remove()
        try:
            self.egress.remove(f"br-{net.id[:12]}")
        except EgressError as e:
            raise RuntimeError_(f"egress policy: {e}") from e

    async def remove_network(self, user_id: str) -> None:
        await self._run(self._remove_network, user_id)

    def _reconcile_networks(self, expected: Mapping[str, str | None]) -> list[str]:
        nets = self.client.networks.list(filters={"label": f"{MANAGED_LABEL}={self.platform_id}"})
        bridges, differ = {}, []
        for net in nets:
            subnet = _subnet(net)
            user_id = (net.attrs.get("Labels") or {}).get(USER_LABEL, "")
            if subnet is not None:
                bridges[f"br-{net.id[:12]}"] = subnet
            want = expected.get(user_id)
            if want and subnet != str(ipaddress.ip_network(want)):
                differ.append(user_id)
        try:
            self.egress.sync(bridges)
        except (EgressError, EgressConfigError) as e:
            raise RuntimeError_(f"egress policy: {e}") from e
        return sorted(differ)

    async def reconcile_networks(self, expected: Mapping[str, str | None]) -> list[str]:
        """Re-applies the egress policy to every network of this platform (after a dockerd
        or provisioner restart), drops the rules of vanished bridges, and returns the users
        in *expected* (user id -> the record's subnet) whose network has another subnet:
        restarting those instances recreates their network (``ensure_network``)."""
        return await self._run(self._reconcile_networks, expected)

    def _hand_over(self, slot_id: str, user_id: str) -> None:
        c = self.client.containers.get(container_name(slot_id))
        self.client.networks.get(network_name(user_id)).connect(c)
        # The published port moves with the default route: to the user's network.
        self.client.networks.get(network_name(slot_id)).disconnect(c)
        c.rename(container_name(user_id))
        c.update(cpu_shares=1024)  # a slot boots at a low weight (pool.py); its user's is the default
        self._remove_network(slot_id)

    async def hand_over(self, slot_id: str, user_id: str) -> None:
        """Gives the running pool slot *slot_id* to *user_id*: onto the user's network (which
        must exist), off the slot's (removed with its egress rules), under the user's name."""
        await self._run(self._hand_over, slot_id, user_id)
