"""Where gateways run. A small create/start/stop/remove/inspect contract, in the spirit
of JupyterHub's Spawner, so other runtimes and several Docker hosts fit behind it.
``DockerRuntime`` drives one Docker engine with the docker SDK (blocking calls are
moved off the event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import docker
from docker.errors import APIError, NotFound
from docker.utils import parse_bytes

from services.provisioner.capacity import NodeCapacity, engine_capacity
from services.provisioner.egress import TenantEgress, docker_host_gateway
from services.provisioner.networks import (
    INSTANCE_LABEL,
    MANAGED_LABEL,
    USER_LABEL,
    DockerNetworks,
    RuntimeError_,
    require_ours,
)
from shared.gateway import GATEWAY_PORT, container_name, user_of_container
from shared.settings import ZakiSettings, get_settings

log = logging.getLogger("zaki.provisioner")


@dataclass(frozen=True)
class ContainerSpec:
    user_id: str
    instance_id: str
    image: str
    host_port: int
    publish_ip: str
    network: str
    binds: dict[str, str]  # host path -> container path
    env: dict[str, str] = field(default_factory=dict)
    memory: str = "2g"
    cpus: float = 2.0
    pids_limit: int = 512
    read_only: bool = True
    cpu_shares: int = 1024  # Docker's default weight; a pool slot boots at a lower one

    @property
    def name(self) -> str:
        return container_name(self.user_id)


@dataclass(frozen=True)
class ContainerStatus:
    name: str
    exists: bool
    state: str = "missing"  # created | running | restarting | exited | paused | dead | missing
    exit_code: int | None = None
    oom_killed: bool = False
    restart_count: int = 0
    user_id: str | None = None
    instance_id: str | None = None
    container_id: str | None = None
    image: str | None = None
    bind_sources: tuple[str, ...] = ()  # host paths mounted into it

    @property
    def running(self) -> bool:
        return self.state == "running"


class GatewayRuntime(Protocol):
    host_id: str

    async def ensure_network(self, user_id: str, subnet: str | None = None) -> str: ...
    async def remove_network(self, user_id: str) -> None: ...
    async def reconcile_networks(self, expected: Mapping[str, str | None]) -> list[str]: ...
    async def create(self, spec: ContainerSpec) -> str: ...
    async def hand_over(self, slot_id: str, user_id: str) -> None: ...
    async def start(self, name: str) -> None: ...
    async def stop(self, name: str, timeout: int) -> None: ...
    async def freeze(self, name: str, floor: int, limit: int) -> int: ...
    async def thaw(self, name: str, limit: int) -> None: ...
    async def remove(self, name: str) -> None: ...
    async def status(self, name: str) -> ContainerStatus: ...
    async def logs(self, name: str, tail: int = 50, since: float | None = None) -> list[str]: ...
    async def list_managed(self) -> list[ContainerStatus]: ...
    async def port_is_free(self, port: int) -> bool: ...
    async def memory_total(self) -> int: ...
    async def node_capacity(self) -> list[NodeCapacity]: ...  # each node's memory and reservations
    # Where the proxy, the monitor and the provisioner's probes reach *name*'s published port:
    # one address per Docker host; on a Swarm, the node its task runs on.
    async def address(self, name: str) -> str: ...
    # Lets *name* go to another node than *away_from* (None: the one it is on) at its next
    # start; the runtime says where it went (``address``). Only a Swarm has other nodes.
    async def unpin(self, name: str, away_from: str | None = None) -> None: ...

    async def node_id(self, node: str) -> str: ...  # the node an id or hostname names

    has_nodes: bool  # whether unpin can do anything: only a Swarm has other nodes


def _status(c) -> ContainerStatus:
    st = c.attrs.get("State", {})
    labels = c.attrs.get("Config", {}).get("Labels") or {}
    return ContainerStatus(
        name=c.name,
        exists=True,
        state=st.get("Status", "unknown"),
        exit_code=st.get("ExitCode"),
        oom_killed=bool(st.get("OOMKilled")),
        restart_count=int(c.attrs.get("RestartCount", 0)),
        user_id=user_of_container(c.name, labels.get(USER_LABEL)),
        instance_id=labels.get(INSTANCE_LABEL),
        container_id=c.id,
        image=c.attrs.get("Config", {}).get("Image"),
        bind_sources=tuple(
            m.get("Source", "") for m in c.attrs.get("Mounts") or [] if m.get("Type") == "bind"
        ),
    )


def _resident(c) -> int:
    """Memory the container holds in RAM, page cache excluded (what suspend frees)."""
    m = c.stats(stream=False, one_shot=True).get("memory_stats") or {}
    return int(m.get("usage", 0)) - int((m.get("stats") or {}).get("cache", 0))


def _matches(c, spec: ContainerSpec) -> bool:
    """Whether an existing container runs *spec*'s image on its folders and port, with its
    memory limits: a claimed pool slot still mounts the slot's folder paths, so its first
    restart re-creates it; so is a swap sleeper stopped while its limit was lowered."""
    binds = {
        m.get("Source"): m.get("Destination") for m in c.attrs.get("Mounts") or [] if m.get("Type") == "bind"
    }
    ports = (c.attrs.get("HostConfig", {}).get("PortBindings") or {}).get(f"{GATEWAY_PORT}/tcp") or [{}]
    host = c.attrs.get("HostConfig", {})
    memory = parse_bytes(spec.memory)
    return (
        c.attrs.get("Config", {}).get("Image") == spec.image
        and binds == spec.binds
        and str(ports[0].get("HostPort")) == str(spec.host_port)
        # A swap sleeper stopped while squeezed keeps its lowered limit (docker update lasts).
        and host.get("Memory") == memory
        and host.get("MemorySwap") == memory
    )


class DockerRuntime(DockerNetworks):
    def __init__(
        self,
        host_id: str = "local",
        base_url: str | None = None,
        platform_id: str = "zaki",
        settings: ZakiSettings | None = None,
    ) -> None:
        self.host_id = host_id
        self.platform_id = platform_id
        self.client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        settings = settings or get_settings()
        self.publish_ip = settings.gateway_publish_ip
        # The egress policy comes from the settings (ZAKI_EGRESS_*); enforced unless "off".
        self.egress = TenantEgress(settings, docker_host_gateway(self.client))

    def _create(self, spec: ContainerSpec) -> str:
        try:
            existing = self.client.containers.get(spec.name)
            labels = existing.labels or {}
            require_ours("container", spec.name, labels, self.platform_id)
            if labels.get(INSTANCE_LABEL) == spec.instance_id and _matches(existing, spec):
                return existing.id
            existing.remove(force=True)
        except NotFound:
            pass
        tmpfs_opts = "rw,nosuid,nodev,size={},uid=1000,gid=1000,mode=0700"
        container = self.client.containers.create(
            spec.image,
            name=spec.name,
            hostname=f"zaki-{spec.user_id}"[:63],
            labels={
                MANAGED_LABEL: self.platform_id,
                USER_LABEL: spec.user_id,
                INSTANCE_LABEL: spec.instance_id,
            },
            environment=spec.env,
            ports={f"{GATEWAY_PORT}/tcp": (spec.publish_ip, spec.host_port)},
            volumes={host: {"bind": path, "mode": "rw"} for host, path in spec.binds.items()},
            network=spec.network,
            extra_hosts={"host.docker.internal": "host-gateway"},
            mem_limit=spec.memory,
            memswap_limit=spec.memory,  # swap equal to the limit: no swap
            nano_cpus=int(spec.cpus * 1e9),
            cpu_shares=spec.cpu_shares,
            pids_limit=spec.pids_limit,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            user="1000:1000",
            read_only=spec.read_only,
            tmpfs={
                "/tmp": "rw,nosuid,nodev,size=256m,mode=1777",
                "/home/node/.config": tmpfs_opts.format("16m"),
                "/home/node/.cache": tmpfs_opts.format("64m"),
            },
            restart_policy={"Name": "unless-stopped"},
            log_config={"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
            detach=True,
        )
        return container.id

    async def create(self, spec: ContainerSpec) -> str:
        return await self._run(self._create, spec)

    def _get(self, name: str):
        return self.client.containers.get(name)

    async def start(self, name: str) -> None:
        c = await self._run(self._get, name)
        await self._run(c.start)

    async def stop(self, name: str, timeout: int) -> None:
        try:
            c = await self._run(self._get, name)
        except NotFound:
            return
        if c.status == "paused":  # a sleeper in swap (pool.py's "suspend_mode")
            await self._run(c.unpause)
        await self._run(c.stop, timeout=timeout)

    def _freeze(self, name: str, floor: int, limit: int) -> int:
        c = self._get(name)
        if c.status != "paused":
            c.pause()
        # Swap allowed first, then the limit lowered: the kernel pushes the frozen processes'
        # memory to swap. Short of the floor it refuses the limit; what it reclaimed stays out.
        c.update(mem_limit=limit, memswap_limit=2 * limit)
        with contextlib.suppress(APIError):
            c.update(mem_limit=floor, memswap_limit=2 * limit)
        return _resident(c)

    async def freeze(self, name: str, floor: int, limit: int) -> int:
        """Pauses the container (cgroup freezer) and pushes its memory to swap, down to
        *floor* bytes if it can; returns the bytes still resident."""
        return await self._run(self._freeze, name, floor, limit)

    def _thaw(self, name: str, limit: int) -> None:
        c = self._get(name)
        c.update(mem_limit=limit, memswap_limit=limit)  # no swap again; swapped pages fault back in
        if c.status == "paused":
            c.unpause()

    async def thaw(self, name: str, limit: int) -> None:
        await self._run(self._thaw, name, limit)

    async def remove(self, name: str) -> None:
        """Gone when it returns, also when another remover got there first (reconcile finishes
        the removal of a deleting instance's container while its delete command runs)."""
        for _ in range(100):
            try:
                c = await self._run(self._get, name)
                await self._run(c.remove, force=True, v=True)
                return
            except NotFound:
                return
            except RuntimeError_ as e:
                if "already in progress" not in str(e):
                    raise
                await asyncio.sleep(0.1)
        raise RuntimeError_(f"{name}: another removal did not finish")

    async def status(self, name: str) -> ContainerStatus:
        try:
            c = await self._run(self._get, name)
        except NotFound:
            return ContainerStatus(name=name, exists=False)
        return _status(c)

    async def logs(self, name: str, tail: int = 50, since: float | None = None) -> list[str]:
        try:
            c = await self._run(self._get, name)
            raw = await self._run(c.logs, tail=tail, since=since)
        except (NotFound, RuntimeError_):
            return []
        return raw.decode("utf-8", "replace").splitlines()

    def _list_managed(self) -> list[ContainerStatus]:
        return [
            _status(c)
            # ignore_removed: a container removed while listed (a discarded pool slot) is skipped.
            for c in self.client.containers.list(
                all=True, filters={"label": f"{MANAGED_LABEL}={self.platform_id}"}, ignore_removed=True
            )
        ]

    async def list_managed(self) -> list[ContainerStatus]:
        return await self._run(self._list_managed)

    async def memory_total(self) -> int:
        info = await self._run(self.client.info)
        return int(info.get("MemTotal", 0))

    def _node_capacity(self) -> list[NodeCapacity]:
        label = {"label": f"{MANAGED_LABEL}={self.platform_id}"}
        containers = [c.attrs for c in self.client.containers.list(filters=label, ignore_removed=True)]
        memory = int(self.client.info().get("MemTotal", 0))
        return [engine_capacity(self.host_id, memory, containers, self.publish_ip)]

    async def node_capacity(self) -> list[NodeCapacity]:
        return await self._run(self._node_capacity)

    async def address(self, name: str) -> str:
        return self.publish_ip  # every container of this engine publishes on it

    has_nodes = False

    async def unpin(self, name: str, away_from: str | None = None) -> None:
        raise RuntimeError_("moving a gateway to another node needs ZAKI_RUNTIME=swarm")

    async def node_id(self, node: str) -> str:
        raise RuntimeError_("nodes are a Swarm's: ZAKI_RUNTIME=swarm")

    async def port_is_free(self, port: int) -> bool:
        """Whether nothing on this host listens on *port* (another program may hold one in our range)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True
