"""Capacity per node (services/provisioner/capacity.py): what each node holds, counted from what
the Docker API returns. Driven with the API's own shapes; the lab test (test_swarm_lab.py) and the
session's provisioner (test_provisioner_more.py) read the same figures from real engines."""

from services.provisioner.capacity import NodeCapacity, engine_capacity, swarm_capacity

GIB = 1 << 30


def node(nid: str, host: str, state: str = "ready", availability: str = "active") -> dict:
    return {
        "ID": nid,
        "Description": {"Hostname": host, "Resources": {"MemoryBytes": 8 * GIB}},
        "Status": {"State": state},
        "Spec": {"Availability": availability},
    }


def service(sid: str, reserved: int | None) -> dict:
    resources = {"Reservations": {"MemoryBytes": reserved}} if reserved is not None else {}
    return {"ID": sid, "Spec": {"TaskTemplate": {"Resources": resources}}}


def task(sid: str, nid: str | None, state: str, desired: str = "running") -> dict:
    return {"ServiceID": sid, "NodeID": nid, "DesiredState": desired, "Status": {"State": state}}


def test_swarm_capacity_counts_only_tasks_that_hold_a_place_of_the_platforms_services():
    nodes = [
        node("n2", "b"),
        node("n1", "a"),
        node("n3", "c", state="down"),
        node("n4", "d", availability="drain"),
    ]
    services = [service("s1", GIB), service("s2", 2 * GIB), service("s3", None)]
    tasks = [
        task("s1", "n1", "running"),
        task("s2", "n1", "starting"),
        task("s1", "n2", "shutdown", desired="shutdown"),  # an old task of s1: freed its place
        task("s2", "n2", "failed"),  # failed: no longer holds a place
        task("s3", "n2", "running"),  # no reservation
        task("other", "n2", "running"),  # another platform's (or the node guard's) service
        task("s1", None, "pending"),  # not placed yet
    ]
    assert swarm_capacity(nodes, services, tasks) == [
        NodeCapacity("a", True, 8 * GIB, 3 * GIB, 2),
        NodeCapacity("b", True, 8 * GIB, 0, 1),
        NodeCapacity("c", False, 8 * GIB, 0, 0),
        NodeCapacity("d", False, 8 * GIB, 0, 0),
    ]


def test_an_engine_counts_the_memory_limits_of_its_running_gateways():
    containers = [
        {"State": {"Running": True}, "HostConfig": {"Memory": GIB}},
        {"State": {"Running": True}, "HostConfig": {"Memory": 2 * GIB}},
        {"State": {"Running": False}, "HostConfig": {"Memory": GIB}},  # stopped: holds nothing
        {"State": {"Running": True}, "HostConfig": {}},
    ]
    assert engine_capacity("h1", 16 * GIB, containers) == NodeCapacity("h1", True, 16 * GIB, 3 * GIB, 3)
