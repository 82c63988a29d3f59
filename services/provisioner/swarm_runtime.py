"""Gateways on a Docker Swarm (issue #18): the ``GatewayRuntime`` contract (runtime.py) over a
swarm manager's Docker API. One service per user (``container_name(user)``, one replica; stop
scales to 0, start to 1), endpoint mode dnsrr (no IPVS needed), the gateway port published in
host mode on the task's node, memory reserved equal to its limit so the scheduler places by
memory and refuses what no node holds (``no_capacity``), pinned to its node once placed (the
data folder lives there). Findings and what is missing: docs/swarm.md."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import docker
from docker.errors import APIError, NotFound
from docker.types import (
    ContainerSpec as SwarmContainerSpec,
)
from docker.types import (
    DriverConfig,
    EndpointSpec,
    Mount,
    Placement,
    Resources,
    RestartPolicy,
    ServiceMode,
    TaskTemplate,
)
from docker.utils import parse_bytes

from services.provisioner.capacity import NodeCapacity, swarm_capacity
from services.provisioner.networks import (
    INSTANCE_LABEL,
    MANAGED_LABEL,
    USER_LABEL,
    RuntimeError_,
    require_ours,
)
from services.provisioner.runtime import ContainerSpec, ContainerStatus
from services.provisioner.swarm_guard import GuardSpec, ensure_guard, guarded_constraint, label_guarded_nodes
from services.provisioner.swarm_networks import SwarmNetworks
from shared.gateway import GATEWAY_PORT, user_of_container

NODE_LABEL = "zaki.node-id"  # the node a service is pinned to, also in its placement constraint

# Task state -> ContainerStatus.state. "starting": the container runs, its image's healthcheck
# has not passed yet (swarm waits for it; the provisioner probes /readyz itself). A failed task
# of a service that should run is replaced (restart policy "any"): it reads as "restarting".
_TASK_STATES = {
    **dict.fromkeys(("running", "starting"), "running"),
    **dict.fromkeys(("new", "pending", "assigned", "accepted", "preparing", "ready"), "created"),
    **dict.fromkeys(("complete", "shutdown"), "exited"),
    **dict.fromkeys(("rejected", "orphaned", "remove"), "dead"),
}


def _newest(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(tasks, key=lambda t: (t.get("CreatedAt", ""), t["Version"]["Index"]), default=None)


def _replicas(svc: dict[str, Any]) -> int:
    return int(((svc["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas", 0))


def _status(svc: dict[str, Any], tasks: list[dict[str, Any]]) -> ContainerStatus:
    spec = svc["Spec"]
    labels = spec.get("Labels") or {}
    cspec = spec["TaskTemplate"]["ContainerSpec"]
    task, want = _newest(tasks), _replicas(svc)
    ts = (task or {}).get("Status") or {}
    cs = ts.get("ContainerStatus") or {}
    if task is None:  # never started, or stopped and its tasks reaped (swarm drops them at 0)
        state = "exited" if labels.get(NODE_LABEL) else "created"  # pinned: it was placed once
    else:
        state = _TASK_STATES.get(ts.get("State", ""), "unknown")
    if task is not None and ts.get("State") == "failed":
        state = "restarting" if want else "exited"
    if task is not None and want == 0 and state in ("created", "running"):
        state = "exited"  # scaled to 0: its task is on the way out
    return ContainerStatus(
        name=spec["Name"],
        exists=True,
        state=state,
        exit_code=cs.get("ExitCode"),
        restart_count=sum(1 for t in tasks if t["Status"]["State"] in ("failed", "rejected")),
        user_id=user_of_container(spec["Name"], labels.get(USER_LABEL)),
        instance_id=labels.get(INSTANCE_LABEL),
        container_id=cs.get("ContainerID"),
        image=cspec.get("Image", "").split("@")[0],
        bind_sources=tuple(m["Source"] for m in cspec.get("Mounts") or [] if m.get("Type") == "bind"),
    )


class SwarmRuntime(SwarmNetworks):
    """Drives the swarm through its manager at *base_url* (``tcp://manager:2376`` with TLS in
    production). *node_addresses* maps a node's hostname to where the proxy reaches its published
    ports, when not its swarm address. *proxy_address* is what a gateway sees the proxy come
    from (host-mode publishing keeps the source address), returned by ``ensure_network``.
    *admission_s*: how long a task may stay pending for lack of resources before ``start`` says
    ``no_capacity``; *start_timeout_s*: how long ``start`` waits for a running task."""

    has_nodes = True

    def __init__(
        self,
        base_url: str,
        host_id: str = "swarm",
        platform_id: str = "zaki",
        node_addresses: Mapping[str, str] | None = None,
        proxy_address: str | None = None,
        admission_s: float = 3.0,
        start_timeout_s: float = 60.0,
        guard: GuardSpec | None = None,
        node: str | None = None,
    ) -> None:
        self.host_id = host_id
        self.node = node  # this replica's node (ZAKI_SWARM_NODE): new gateways go there
        self.platform_id = platform_id
        # A fixed API version (1.41: Docker 20.10, the first with a service's pids limit and
        # capabilities): no round trip to the manager at construction, which may be down then.
        self.client = docker.DockerClient(base_url=base_url, version="1.41", timeout=60)
        self.node_addresses = dict(node_addresses or {})
        self.proxy_address = proxy_address
        self.admission_s = admission_s
        self.start_timeout_s = start_timeout_s
        self.guard = guard  # None: egress policy off, tenants go on any node

    # Services
    def _service(self, name: str) -> dict[str, Any]:
        svc = self.client.api.inspect_service(name)
        if svc["Spec"]["Name"] != name:  # the API also matches an id prefix
            raise NotFound(f"service {name}")
        return svc

    def _tasks(self, svc: dict[str, Any]) -> list[dict[str, Any]]:
        return self.client.api.tasks(filters={"service": svc["ID"]})

    def _create(self, spec: ContainerSpec) -> str:
        labels = {MANAGED_LABEL: self.platform_id, USER_LABEL: spec.user_id, INSTANCE_LABEL: spec.instance_id}
        try:
            old = self._service(spec.name)
            have = old["Spec"].get("Labels") or {}
            require_ours("service", spec.name, have, self.platform_id)
            if have.get(INSTANCE_LABEL) == spec.instance_id and _matches(old, spec):
                return old["ID"]
            self._remove(spec.name)  # waits for its task: it holds memory and the port
            if have.get(NODE_LABEL):  # its data folder is on that node: the new one goes there too
                labels[NODE_LABEL] = have[NODE_LABEL]
        except NotFound:
            pass
        memory = parse_bytes(spec.memory)
        resources = Resources(cpu_limit=int(spec.cpus * 1e9), mem_limit=memory, mem_reservation=memory)
        resources["Limits"]["Pids"] = spec.pids_limit  # API 1.41; no field in docker-py's type
        tmpfs = [("/tmp", "256m"), ("/home/node/.config", "16m"), ("/home/node/.cache", "64m")]
        container = SwarmContainerSpec(
            spec.image,
            hostname=f"zaki-{spec.user_id}"[:63],
            env=spec.env,
            user="1000:1000",
            labels=labels,
            read_only=spec.read_only,
            cap_drop=["ALL"],  # no-new-privileges: dockerd --no-new-privileges on every node
            mounts=[Mount(path, host, type="bind") for host, path in spec.binds.items()]
            + [
                Mount(path, None, type="tmpfs", tmpfs_size=parse_bytes(size), tmpfs_mode=0o1777)
                for path, size in tmpfs
            ],
        )
        template = TaskTemplate(
            container,
            resources=resources,
            restart_policy=RestartPolicy(condition="any", delay=1_000_000_000),
            log_driver=DriverConfig("json-file", {"max-size": "10m", "max-file": "3"}),
            networks=[spec.network],
            placement=Placement(self._constraints(labels.get(NODE_LABEL), new=True)),
        )
        svc = self.client.api.create_service(
            template,
            name=spec.name,
            labels=labels,
            mode=ServiceMode("replicated", replicas=0),  # created, not started: start places it
            endpoint_spec=EndpointSpec(mode="dnsrr", ports={spec.host_port: (GATEWAY_PORT, "tcp", "host")}),
        )
        return svc["ID"]

    async def create(self, spec: ContainerSpec) -> str:
        """Creates the user's service with no replica (``start`` places it)."""
        return await self._run(self._create, spec)

    def _update(self, name: str, edit: Callable[[dict[str, Any]], None]) -> None:
        for _ in range(5):  # another writer bumped the version: read again
            svc = self._service(name)
            spec = svc["Spec"]
            require_ours("service", name, spec.get("Labels"), self.platform_id)
            edit(spec)
            try:
                self.client.api.update_service(
                    svc["ID"], svc["Version"]["Index"], task_template=spec["TaskTemplate"],
                    name=name, labels=spec.get("Labels"), mode=spec["Mode"],
                    endpoint_spec=spec.get("EndpointSpec"), fetch_current_spec=True,
                )  # fmt: skip
                return
            except APIError as e:
                if "out of sequence" not in str(e):
                    raise
        raise RuntimeError_(f"service {name}: concurrent updates, gave up")

    def _scale(self, name: str, replicas: int, grace_s: int | None = None) -> None:
        def edit(spec: dict[str, Any]) -> None:
            spec["Mode"] = {"Replicated": {"Replicas": replicas}}
            if grace_s is not None:  # docker stop's timeout: SIGTERM, then SIGKILL after it
                spec["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"] = grace_s * 10**9

        self._update(name, edit)

    def _start(self, name: str) -> None:
        self._guard_nodes()  # a node whose guard just got healthy can take it
        self._scale(name, 1)
        deadline, starved = time.monotonic() + self.start_timeout_s, None
        while True:
            svc = self._service(name)
            task = _newest([t for t in self._tasks(svc) if t["DesiredState"] == "running"])
            st = (task or {}).get("Status") or {}
            state, err = st.get("State"), st.get("Err") or st.get("Message") or ""
            if task and task.get("NodeID") and self._pinned_to(svc) is None:
                self._pin(name, task["NodeID"])
            if state in ("starting", "running"):  # the container runs (not yet healthy: see above)
                return
            if state == "pending" and self.guard and "constraints not satisfied" in err:
                label_guarded_nodes(self.client, self.platform_id)  # a guard may have got healthy since
            if state == "pending" and "insufficient resources" in err:
                starved = starved or time.monotonic()
                if time.monotonic() - starved >= self.admission_s:
                    self._scale(name, 0)  # never left pending: it would be placed whenever room appears
                    raise RuntimeError_(f"no_capacity: no node can hold {name} ({err})")
            else:
                starved = None
            if time.monotonic() > deadline:
                self._scale(name, 0)
                raise RuntimeError_(
                    f"{name} did not start within {self.start_timeout_s:.0f} s: {state} {err}"
                )
            time.sleep(0.25)

    def _constraints(self, node_id: str | None, new: bool = False) -> list[str]:
        """Its node once placed; a new one on this replica's node, when it has one (its data
        folder is made on this node's disk); only nodes whose guard fenced their tenants in."""
        return [
            *([f"node.id=={node_id}"] if node_id else []),
            *([f"node.hostname=={self.node}"] if new and self.node and not node_id else []),
            *([guarded_constraint(self.platform_id)] if self.guard else []),
        ]

    def _guard_nodes(self) -> None:
        """The guard service as the settings say, and every node where it runs healthy labelled."""
        if self.guard:
            peers = [self._node_address(n) for n in self.client.api.nodes()]
            ensure_guard(self.client, self.guard.with_peers(peers), self.platform_id)
            label_guarded_nodes(self.client, self.platform_id)

    def _pinned_to(self, svc: dict[str, Any]) -> str | None:
        return (svc["Spec"].get("Labels") or {}).get(NODE_LABEL)

    def _pin(self, name: str, node_id: str) -> None:
        """Keeps the service on the node it was first placed on (where its data folder is).
        Swarm does not restart a task whose node still satisfies the new constraints."""

        def edit(spec: dict[str, Any]) -> None:
            spec.setdefault("Labels", {})[NODE_LABEL] = node_id
            spec["TaskTemplate"]["Placement"] = {"Constraints": self._constraints(node_id)}

        self._update(name, edit)

    def _node_id(self, node: str) -> str:
        found = [n for n in self.client.api.nodes() if node in (n["ID"], n["Description"]["Hostname"])]
        if len(found) > 1:  # a node that left and joined again is listed twice under its hostname
            found = [n for n in found if n["Status"]["State"] != "down"] or found
        if len(found) != 1:
            raise RuntimeError_(f"{'no node' if not found else 'more than one node'} {node!r} in this swarm")
        return found[0]["ID"]

    async def node_id(self, node: str) -> str:
        """The id of the node *node* (an id or a hostname) names; refused when none or several."""
        return await self._run(self._node_id, node)

    def _unpin(self, name: str, away_from: str | None) -> None:
        node = away_from or self._pinned_to(self._service(name))
        node_id = self._node_id(node) if node else None

        def edit(spec: dict[str, Any]) -> None:
            spec.setdefault("Labels", {}).pop(NODE_LABEL, None)
            away = [f"node.id!={node_id}"] if node_id else []
            spec["TaskTemplate"]["Placement"] = {"Constraints": away + self._constraints(None)}

        self._update(name, edit)

    def _drain(self, node: str) -> list[str]:
        node_id = self._node_id(node)
        n = self.client.api.inspect_node(node_id)
        spec = {**n["Spec"], "Availability": "drain"}
        self.client.api.update_node(node_id, n["Version"]["Index"], spec)
        svcs = self.client.api.services(filters={"label": f"{MANAGED_LABEL}={self.platform_id}"})
        return sorted(
            user_of_container(s["Spec"]["Name"], s["Spec"]["Labels"].get(USER_LABEL))
            for s in svcs
            if (s["Spec"].get("Labels") or {}).get(NODE_LABEL) == node_id
        )

    async def drain(self, node: str) -> list[str]:
        """Marks *node* (id or hostname) drained, so the swarm places nothing there and stops
        what runs there; returns the users pinned to it, each to be moved (``instance.move``)."""
        return await self._run(self._drain, node)

    async def unpin(self, name: str, away_from: str | None = None) -> None:
        """Lets a stopped service go anywhere but *away_from* (a node id or hostname; default:
        the node it is pinned to) at its next start, which pins it where it lands."""
        await self._run(self._unpin, name, away_from)

    async def start(self, name: str) -> None:
        """Scales to one replica and waits until its task runs; ``no_capacity`` when it stays
        pending for lack of resources for *admission_s* (then scaled back to 0)."""
        await self._run(self._start, name)

    def _stop(self, name: str, timeout: int) -> None:
        try:
            self._scale(name, 0, grace_s=timeout)
        except NotFound:
            return
        deadline = time.monotonic() + timeout + 15
        while time.monotonic() < deadline:
            svc = self._service(name)
            running = [t for t in self._tasks(svc) if t["Status"]["State"] in ("running", "starting")]
            # A task on a node that is down never reports its end: nothing there to wait for.
            # (The node list is read only while something still runs.)
            if not running or {t.get("NodeID") for t in running} <= set(self._down_nodes().values()):
                return
            time.sleep(0.25)

    async def stop(self, name: str, timeout: int) -> None:
        await self._run(self._stop, name, timeout)

    async def freeze(self, name: str, floor: int, limit: int) -> int:
        raise RuntimeError_("not supported on Swarm")  # a service update would replace the task

    async def thaw(self, name: str, limit: int) -> None:
        raise RuntimeError_("not supported on Swarm")

    async def hand_over(self, slot_id: str, user_id: str) -> None:
        raise RuntimeError_("not supported on Swarm")  # --network-add replaces the task

    def _remove(self, name: str) -> None:
        try:
            svc = self._service(name)
        except NotFound:
            return
        # Like ``docker rm -f``: no grace period (its task would hold its memory and port for it).
        self._scale(name, 0, grace_s=0)  # with no replica, this update starts nothing
        self.client.api.remove_service(svc["ID"])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = {t.get("NodeID") for t in self.client.api.tasks() if t["ServiceID"] == svc["ID"]}
            # A task on a node that is down never reports its end (a move away from that node).
            if not left or left <= set(self._down_nodes().values()):
                return
            time.sleep(0.25)  # its containers go a moment later; the network waits for them

    async def remove(self, name: str) -> None:
        await self._run(self._remove, name)

    def _status(self, name: str) -> ContainerStatus:
        try:
            svc = self._service(name)
        except NotFound:
            return ContainerStatus(name=name, exists=False)
        return _status(svc, self._tasks(svc))

    async def status(self, name: str) -> ContainerStatus:
        return await self._run(self._status, name)

    def _logs(self, name: str, tail: int, since: float | None) -> list[str]:
        raw = self.client.api.service_logs(
            name, stdout=True, stderr=True, tail=tail, since=int(since) if since else None
        )
        return b"".join(raw).decode("utf-8", "replace").splitlines()

    async def logs(self, name: str, tail: int = 50, since: float | None = None) -> list[str]:
        try:
            return await self._run(self._logs, name, tail, since)
        except (NotFound, RuntimeError_):
            return []

    def _list_managed(self) -> list[ContainerStatus]:
        svcs = self.client.api.services(filters={"label": f"{MANAGED_LABEL}={self.platform_id}"})
        by_svc: dict[str, list[dict[str, Any]]] = {}
        for t in self.client.api.tasks():
            by_svc.setdefault(t["ServiceID"], []).append(t)
        return [_status(s, by_svc.get(s["ID"], [])) for s in svcs]

    async def list_managed(self) -> list[ContainerStatus]:
        return await self._run(self._list_managed)

    def _published_ports(self) -> set[int]:
        ports = set()
        for s in self.client.api.services():
            for p in (s["Spec"].get("EndpointSpec") or {}).get("Ports") or []:
                ports.add(int(p.get("PublishedPort", 0)))
        return ports

    async def port_is_free(self, port: int) -> bool:
        """Whether no service in the swarm publishes *port*: a service may land on any node
        before it is pinned, so ports are kept unique across the swarm."""
        return port not in await self._run(self._published_ports)

    def _ready_nodes(self) -> list[dict[str, Any]]:
        return [
            n
            for n in self.client.api.nodes()
            if n["Status"]["State"] == "ready" and n["Spec"].get("Availability") == "active"
        ]

    async def memory_total(self) -> int:
        """All ready, active nodes' memory (what the scheduler places reservations against)."""
        nodes = await self._run(self._ready_nodes)
        return sum(int(n["Description"]["Resources"]["MemoryBytes"]) for n in nodes)

    def _node_capacity(self) -> list[NodeCapacity]:
        api = self.client.api
        svcs = api.services(filters={"label": f"{MANAGED_LABEL}={self.platform_id}"})
        tasks = api.tasks(filters={"desired-state": "running"})
        return swarm_capacity(api.nodes(), svcs, tasks, self._node_address)

    async def node_capacity(self) -> list[NodeCapacity]:
        return await self._run(self._node_capacity)

    async def task_list(self) -> list[dict[str, Any]]:
        """Every task the manager knows (the monitor finds the gateways that failed in it)."""
        return await self._run(self.client.api.tasks)

    def _address(self, name: str) -> str:
        svc = self._service(name)
        node_id = self._pinned_to(svc)
        running = [t for t in self._tasks(svc) if t["Status"]["State"] in ("starting", "running")]
        if running:
            node_id = running[0]["NodeID"]
        if node_id is None:
            raise RuntimeError_(f"{name} is not placed on a node")
        return self._node_address(self.client.api.inspect_node(node_id))

    def _node_address(self, node: dict[str, Any]) -> str:
        host = node["Description"]["Hostname"]
        addr = node["Status"].get("Addr", "")
        if addr in ("", "0.0.0.0"):  # a manager may report this; its manager address is right
            addr = (node.get("ManagerStatus") or {}).get("Addr", "").rsplit(":", 1)[0]
        return self.node_addresses.get(host, addr)

    def _down_nodes(self) -> dict[str, str]:
        """Only "down": "unknown" follows every change of leader and "disconnected" may be a
        node cut off from the manager but still running its tasks (a move would run a second
        gateway on the same bot and folder). An address a ready node also has (a node that left
        and joined again) is not down."""
        nodes = self.client.api.nodes()
        ready = {self._node_address(n) for n in nodes if n["Status"]["State"] == "ready"}
        return {
            addr: n["ID"]
            for n in nodes
            if n["Status"]["State"] == "down" and (addr := self._node_address(n)) not in ready
        }

    async def down_nodes(self) -> dict[str, str]:
        """Nodes the manager sees as down: their address
        as records name it (``host``) -> their id. The monitor moves their users away."""
        return await self._run(self._down_nodes)

    async def address(self, name: str) -> str:
        """The address of the node that runs (or last ran) *name*: the proxy and the monitor
        reach the gateway at this address and the record's port."""
        return await self._run(self._address, name)


def _matches(svc: dict[str, Any], spec: ContainerSpec) -> bool:
    """Whether an existing service runs *spec*'s image on its folders and port."""
    cspec = svc["Spec"]["TaskTemplate"]["ContainerSpec"]
    binds = {m["Source"]: m["Target"] for m in cspec.get("Mounts") or [] if m.get("Type") == "bind"}
    ports = [p.get("PublishedPort") for p in (svc["Spec"].get("EndpointSpec") or {}).get("Ports") or []]
    return (
        cspec.get("Image", "").split("@")[0] == spec.image
        and binds == spec.binds
        and ports == [spec.host_port]
    )
