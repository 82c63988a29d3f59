"""Capacity per node (issue 18): each node's memory, what the platform's gateways reserve on it
and how many run there, for the infrastructure dashboard (``zaki_node_*``). One engine is one
node; on a Swarm, the manager's nodes and the tasks of the platform's services. Pure functions
over what the Docker API returns; the runtimes fetch, these count."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Task states that hold their reservation on a node (the scheduler counts them).
_HOLDING = frozenset({"assigned", "accepted", "preparing", "ready", "starting", "running"})


@dataclass(frozen=True)
class NodeCapacity:
    node: str  # the engine's host id, or the swarm node's hostname
    ready: bool  # takes new gateways (a swarm node: ready and active)
    memory_bytes: int
    reserved_bytes: int  # the memory the platform's gateways on it reserve
    gateways: int  # the platform's gateways placed on it
    address: str = ""  # where its gateways' published ports are reached (records' ``host``)
    down: bool = False  # the manager sees it down (not merely drained or paused): nothing runs there


def engine_capacity(
    host_id: str, memory_bytes: int, containers: Iterable[Mapping[str, Any]], address: str = ""
) -> NodeCapacity:
    """One Docker engine: *containers* are the platform's (``docker inspect`` dicts); a running
    one reserves its memory limit."""
    running = [c for c in containers if (c.get("State") or {}).get("Running")]
    reserved = sum(int((c.get("HostConfig") or {}).get("Memory") or 0) for c in running)
    return NodeCapacity(host_id, True, memory_bytes, reserved, len(running), address)


def swarm_capacity(
    nodes: Iterable[Mapping[str, Any]],
    services: Iterable[Mapping[str, Any]],
    tasks: Iterable[Mapping[str, Any]],
    address_of: Callable[[Mapping[str, Any]], str] = lambda n: n["Status"].get("Addr", ""),
) -> list[NodeCapacity]:
    """Every node of the swarm, with the reservations of the tasks of *services* (the platform's)
    that hold a place on it; nodes sorted by hostname."""
    reservation = {
        s["ID"]: int(
            (((s["Spec"].get("TaskTemplate") or {}).get("Resources") or {}).get("Reservations") or {}).get(
                "MemoryBytes"
            )
            or 0
        )
        for s in services
    }
    reserved: dict[str, int] = {}
    placed: dict[str, int] = {}
    for t in tasks:
        sid, node = t.get("ServiceID"), t.get("NodeID")
        holding = t.get("DesiredState") == "running" and t["Status"]["State"] in _HOLDING
        if sid in reservation and node and holding:
            reserved[node] = reserved.get(node, 0) + reservation[sid]
            placed[node] = placed.get(node, 0) + 1
    out = [
        NodeCapacity(
            node=n["Description"]["Hostname"],
            ready=n["Status"]["State"] == "ready" and n["Spec"].get("Availability") == "active",
            memory_bytes=int(n["Description"]["Resources"]["MemoryBytes"]),
            reserved_bytes=reserved.get(n["ID"], 0),
            gateways=placed.get(n["ID"], 0),
            address=address_of(n),
            down=n["Status"]["State"] == "down",
        )
        for n in nodes
    ]
    return sorted(out, key=lambda c: c.node)
