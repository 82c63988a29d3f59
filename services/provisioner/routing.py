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


def target_node(record_host: str | None, node_at: Mapping[str, str], placed: str | None, here: str) -> str:
    """The node that must run a command: the one the user's gateway is on (its record's ``host``
    is that node's address), else for a new user the chosen one, else this one (a command for
    no known node: the answer, e.g. ``not_found``, is the same from every replica)."""
    if record_host and record_host in node_at:
        return node_at[record_host]
    return placed or here
