"""Commands per node (issue 18; ``ZAKI_RUNTIME=swarm`` with ``ZAKI_SWARM_NODE``): one provisioner replica
on each node, each the only one to act on the gateways pinned to its node, whose data folders are
on its disk. Whoever publishes a command does not know the nodes: every replica still takes
commands from the shared consumers, and one that gets a command for another node's user forwards
it to that node's own subject (``zaki.node.<node>.<verb>``, same stream) and acks it; a new user
goes to the node with the most unreserved memory among those with a replica. A command on a
node's subject is executed there, never forwarded again (no loops).

Pure decisions here; the app does the I/O (the record, the nodes, the consumers)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from services.provisioner.capacity import NodeCapacity
from shared import subjects
from shared.settings import NODE_NAME_PATTERN

NODE_NAME = re.compile(NODE_NAME_PATTERN)  # the settings refuse any other ZAKI_SWARM_NODE
NODE_DURABLE = f"{subjects.PROVISIONER_DURABLE}-node"


def node_subject(node: str, command_subject: str) -> str:
    """Where *node*'s replica takes *command_subject* (``zaki.instance.<verb>``) from."""
    if not NODE_NAME.match(node):
        raise ValueError(f"not a node name: {node!r}")
    return f"{subjects.PREFIX}.node.{node}.{command_subject.rsplit('.', 1)[-1]}"


def command_of(node_subject_: str) -> str:
    """The command subject a node subject carries (``zaki.node.n1.start`` -> ``zaki.instance.start``)."""
    return f"{subjects.PREFIX}.instance.{node_subject_.rsplit('.', 1)[-1]}"


def durable_for(node: str) -> str:
    return f"{NODE_DURABLE}-{node}"


def nodes_with_a_replica(consumers: Iterable[tuple[str, bool]]) -> set[str]:
    """Nodes whose replica is connected: (consumer name, bound to a live subscriber) pairs."""
    prefix = f"{NODE_DURABLE}-"
    return {name[len(prefix) :] for name, bound in consumers if bound and name.startswith(prefix)}


def choose_node(nodes: Iterable[NodeCapacity], replicas: set[str], need_bytes: int) -> str | None:
    """The ready node with a replica and the most memory not yet reserved, if one can hold
    *need_bytes*; ties go to the first by name (the same answer from every replica)."""
    fits = [
        n for n in nodes if n.ready and n.node in replicas and n.memory_bytes - n.reserved_bytes >= need_bytes
    ]
    if not fits:
        return None
    return min(fits, key=lambda n: (n.reserved_bytes - n.memory_bytes, n.node)).node


def node_at(nodes: Iterable[NodeCapacity]) -> dict[str, str]:
    """Which node an address (a record's ``host``) is."""
    return {n.address: n.node for n in nodes}


def node_of(record: Mapping[str, Any], nodes: Iterable[NodeCapacity]) -> NodeCapacity | None:
    host = record.get("host")
    return next((n for n in nodes if host and n.address == host), None)


def placement_needed(
    subject: str, record: Mapping[str, Any] | None, nodes: Iterable[NodeCapacity], forwarded: bool
) -> frozenset[str] | None:
    """When a command's node is to be chosen now, the nodes it must not go to; else None. A new
    user (no record on a known node) goes where there is room; a move whose node is down cannot
    be carried out there (its data is restored elsewhere from its last backup). A forwarded
    command was placed already: it stays where it was sent."""
    record = record or {}
    if forwarded or record.get("move"):
        return None
    node = node_of(record, nodes)
    if subject == subjects.INSTANCE_REQUESTED and node is None:
        return frozenset()
    if subject == subjects.INSTANCE_MOVE and node is not None and node.down:
        return frozenset({node.node})
    return None


def target_node(
    subject: str,
    record: Mapping[str, Any] | None,
    nodes: Iterable[NodeCapacity],
    placed: str | None,
    here: str,
) -> str:
    """The node that must run a command: while a move is under way, the node it goes to (every
    command of that user waits there until it lands); else the one the user's gateway is on (its
    record's ``host`` is that node's address), but a move away from a node that is down goes to
    the chosen one; a new user goes to the chosen one; else this one (a command for no known
    node: the answer, e.g. ``not_found``, is the same from every replica)."""
    record = record or {}
    if move := record.get("move"):
        return str(move["to"])
    node = node_of(record, nodes)
    if node is None or (subject == subjects.INSTANCE_MOVE and node.down):
        return placed or here
    return node.node


def has_room(node: NodeCapacity | None, pending_bytes: int, need_bytes: int) -> bool:
    """Whether *node* takes one more gateway of *need_bytes*, counting the ones its replica is
    placing right now (*pending_bytes*: not yet tasks the manager counts). Two replicas may choose
    the same node at once; its replica checks again before it places."""
    return (
        node is not None
        and node.ready
        and node.memory_bytes - node.reserved_bytes - pending_bytes >= need_bytes
    )


def on_node(record: Mapping[str, Any], where: Mapping[str, str], node: str) -> bool:
    """Whether *record*'s gateway is on *node* (*where*: ``node_at``): its replica alone starts,
    heals and measures it, and its backup service alone backs it up (its folder is on that
    disk). A moving record is nobody's until it lands (its folder is a backup in transit)."""
    return where.get(record.get("host") or "") == node and not record.get("move")


def housekeeper(nodes: Iterable[NodeCapacity]) -> str | None:
    """The one node whose services do the chores that belong to no node (the retention of
    deleted users' backups): the first ready one by name, the same answer everywhere."""
    return min((n.node for n in nodes if n.ready), default=None)
