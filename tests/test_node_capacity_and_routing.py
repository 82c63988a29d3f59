"""Capacity per node (services/provisioner/capacity.py): what each node holds, counted from what
the Docker API returns; and where a command goes with one provisioner per node (routing.py).
Driven with the API's own shapes; the lab test (test_swarm_lab.py) and the session's provisioner
(test_provisioner_more.py) read the same figures from real engines and route real commands."""

import pytest
from pydantic import ValidationError

from services.provisioner.capacity import NodeCapacity, engine_capacity, swarm_capacity
from services.provisioner.routing import (
    choose_node,
    command_of,
    has_room,
    node_subject,
    nodes_with_a_replica,
    placement_needed,
    target_node,
)
from shared import subjects
from shared.settings import ZakiSettings

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
        NodeCapacity("c", False, 8 * GIB, 0, 0, down=True),
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


def cap(name: str, reserved_gib: int, ready: bool = True, address: str = "") -> NodeCapacity:
    return NodeCapacity(
        name, ready, 8 * GIB, reserved_gib * GIB, reserved_gib, address or f"10.0.0.{name[-1]}"
    )


def test_a_new_user_goes_to_the_node_with_a_replica_and_the_most_memory_left():
    nodes = [cap("n1", 5), cap("n2", 2), cap("n3", 1), cap("n4", 0, ready=False)]
    assert choose_node(nodes, {"n1", "n2", "n3", "n4"}, GIB) == "n3"
    assert choose_node(nodes, {"n1", "n2"}, GIB) == "n2"  # n3 has no provisioner replica
    assert choose_node(nodes, {"n1", "n2"}, 7 * GIB) is None  # none can hold it: no_capacity
    assert choose_node([cap("n2", 1), cap("n1", 1)], {"n1", "n2"}, GIB) == "n1"  # every replica agrees


def test_a_command_goes_to_the_node_its_gateway_is_on():
    nodes = [cap("n1", 0), cap("n2", 0)]
    on_n2 = {"host": "10.0.0.2"}
    for subject in (subjects.INSTANCE_STOP, subjects.INSTANCE_MOVE, subjects.INSTANCE_REQUESTED):
        assert target_node(subject, on_n2, nodes, None, here="n1") == "n2"
        assert placement_needed(subject, on_n2, nodes, forwarded=False) is None  # never re-placed
    new_user = placement_needed(subjects.INSTANCE_REQUESTED, None, nodes, forwarded=False)
    assert new_user == frozenset()  # chosen among every node
    assert target_node(subjects.INSTANCE_REQUESTED, None, nodes, "n2", here="n1") == "n2"
    assert target_node(subjects.INSTANCE_STOP, {"host": "127.0.0.1"}, nodes, None, here="n1") == "n1"
    # Forwarded: placed already, it stays where it was sent.
    assert placement_needed(subjects.INSTANCE_REQUESTED, None, nodes, forwarded=True) is None


def test_while_a_move_is_under_way_every_command_of_the_user_goes_where_it_lands():
    nodes = [cap("n1", 0), cap("n2", 0)]
    moving = {"host": "10.0.0.1", "move": {"to": "n2", "from": "n1", "backup_id": "b"}}
    for subject in (subjects.INSTANCE_STOP, subjects.INSTANCE_MOVE, subjects.INSTANCE_DELETE):
        assert placement_needed(subject, moving, nodes, forwarded=False) is None
        assert target_node(subject, moving, nodes, None, here="n1") == "n2"


def test_a_move_away_from_a_node_that_is_down_is_placed_elsewhere():
    down = NodeCapacity("n1", False, 8 * GIB, 0, 1, "10.0.0.1", down=True)
    drained = NodeCapacity("n1", False, 8 * GIB, 0, 1, "10.0.0.1")  # up: its replica moves it out
    on_n1 = {"host": "10.0.0.1"}
    assert placement_needed(subjects.INSTANCE_MOVE, on_n1, [down, cap("n2", 0)], False) == {"n1"}
    assert target_node(subjects.INSTANCE_MOVE, on_n1, [down, cap("n2", 0)], "n2", here="n3") == "n2"
    # Forwarded there: it stays (nothing chosen again); no node could take it: here.
    assert placement_needed(subjects.INSTANCE_MOVE, on_n1, [down, cap("n2", 0)], True) is None
    assert target_node(subjects.INSTANCE_MOVE, on_n1, [down, cap("n2", 0)], None, here="n3") == "n3"
    # Other commands still wait for the node; a drained node runs its own move-out.
    assert target_node(subjects.INSTANCE_STOP, on_n1, [down], None, here="n3") == "n1"
    assert placement_needed(subjects.INSTANCE_MOVE, on_n1, [drained], False) is None
    assert target_node(subjects.INSTANCE_MOVE, on_n1, [drained], None, here="n3") == "n1"


def test_swarm_capacity_tells_a_node_that_is_down_from_one_drained():
    caps = swarm_capacity([node("a", "n1", state="down"), node("b", "n2", availability="drain")], [], [])
    assert [(c.node, c.ready, c.down) for c in caps] == [("n1", False, True), ("n2", False, False)]


def test_only_connected_node_replicas_count():
    consumers = [
        ("provisioner-node-n1", True),
        ("provisioner-node-n2", False),  # its replica is gone
        ("provisioner-start", True),  # a shared consumer
    ]
    assert nodes_with_a_replica(consumers) == {"n1"}


def test_node_subjects_carry_the_command_and_refuse_what_is_not_a_node_name():
    assert node_subject("zlab-1-n2", subjects.INSTANCE_STOP) == "zaki.node.zlab-1-n2.stop"
    assert command_of("zaki.node.zlab-1-n2.stop") == subjects.INSTANCE_STOP
    for bad in ("a.b", "x>", "*", "", "-n"):
        with pytest.raises(ValueError):
            node_subject(bad, subjects.INSTANCE_STOP)


def test_swarm_node_is_a_setting_of_the_swarm_runtime_only():
    swarm = {"runtime": "swarm", "swarm_manager_url": "tcp://m:2375", "egress_policy": "off"}
    ok = ZakiSettings(**swarm, swarm_node="n1", backup_dir="/mnt/shared/backups")
    assert ok.swarm_node == "n1"
    assert ZakiSettings(**swarm, swarm_node="n1", backup_target="s3").swarm_node == "n1"
    with pytest.raises(ValidationError, match="ZAKI_SWARM_NODE"):
        ZakiSettings(swarm_node="n1")
    with pytest.raises(ValidationError):
        ZakiSettings(**swarm, swarm_node="a.b", backup_dir="/b")
    # Backups on each node's own disk could not carry a user to another node: refused at start.
    with pytest.raises(ValidationError, match="ZAKI_BACKUP_DIR on a shared mount"):
        ZakiSettings(**swarm, swarm_node="n1")


def test_a_node_counts_the_gateways_its_replica_is_placing_before_it_takes_one_more():
    n = cap("n1", 5)  # 3 GiB left
    assert has_room(n, 0, 3 * GIB)
    assert not has_room(n, GIB, 3 * GIB)  # one being placed right now: not the manager's count yet
    assert not has_room(cap("n1", 0, ready=False), 0, GIB)
    assert not has_room(None, 0, GIB)  # a node the manager does not list
