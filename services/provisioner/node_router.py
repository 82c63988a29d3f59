"""The I/O of commands per node (issue 18, ``ZAKI_SWARM_NODE``): reads the user's record, the
swarm's nodes and which nodes have a replica, asks routing.py where a command belongs, and
forwards it there. Its own replica's node subject is subscribed in app.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

from docker.utils import parse_bytes
from nats.js import JetStreamContext
from pydantic import BaseModel

from services.provisioner import metrics
from services.provisioner.capacity import NodeCapacity
from services.provisioner.routing import (
    choose_node,
    has_room,
    node_of,
    node_subject,
    nodes_with_a_replica,
    placement_needed,
    target_node,
)
from shared import subjects
from shared.store import Store

log = logging.getLogger("zaki.provisioner")
HOPS_HEADER = "Zaki-Hops"  # how many times a command was forwarded
TRIED_HEADER = "Zaki-Tried"  # nodes a new user was sent to that had no room left
MAX_HOPS = 3  # past it, the replica that has it runs it: two replicas disagreeing never loop


class NodeRouter:
    def __init__(self, here: str, store: Store, runtime: Any, js: JetStreamContext, gateway_memory: str):
        self.here = here
        self.store, self.runtime, self.js = store, runtime, js  # runtime: a SwarmRuntime
        self.need_bytes = parse_bytes(gateway_memory)
        self.pending_bytes = 0  # new gateways this replica is placing right now
        self._admitting = asyncio.Lock()

    async def target(self, subject: str, user_id: str, forwarded: bool = False) -> tuple[str, bool]:
        """The node whose replica must run *subject* for *user_id* (routing.py decides), and
        whether it places a new user (no record on a known node)."""
        doc = await self.store.get_instance(user_id)
        nodes = await self.runtime.node_capacity()
        placed = None
        if (avoid := placement_needed(subject, doc, nodes, forwarded)) is not None:
            placed = await self.choose(nodes, avoid)
        new = subject == subjects.INSTANCE_REQUESTED and node_of(doc or {}, nodes) is None
        return target_node(subject, doc, nodes, placed, self.here), new

    async def choose(self, nodes: list[NodeCapacity], avoid: Iterable[str]) -> str | None:
        """The node a gateway goes to: a ready one with a connected replica and the most memory
        left, none of *avoid*."""
        infos = await self.js.consumers_info(subjects.COMMAND_STREAM)
        replicas = nodes_with_a_replica((i.name or "", bool(i.push_bound)) for i in infos)
        return choose_node(nodes, replicas - set(avoid), self.need_bytes)

    @contextlib.asynccontextmanager
    async def admit(self, tried: set[str]) -> AsyncIterator[str | None]:
        """A new user about to be placed on this node: yields None to place it here (its memory
        counted as pending meanwhile), or the node to send it on to when this one has no room
        left (another replica chose it at the same time) and another has. Nowhere else: here,
        and the runtime's own answer (``no_capacity``) is the truth."""
        async with self._admitting:  # one decision at a time: pending counts every one before
            nodes = await self.runtime.node_capacity()
            mine = next((n for n in nodes if n.node == self.here), None)
            other = None
            if not has_room(mine, self.pending_bytes, self.need_bytes):
                other = await self.choose(nodes, tried | {self.here})
            if other is None:
                self.pending_bytes += self.need_bytes
        if other is not None:
            yield other
            return
        try:
            yield None
        finally:
            self.pending_bytes -= self.need_bytes

    async def send(self, node: str, subject: str, event: BaseModel, msg_id: str) -> None:
        """A command this replica hands to *node*'s (a move's second half), once per *msg_id*."""
        await self._publish(node, subject, event.model_dump_json().encode(), msg_id, 1)

    async def forward(
        self, node: str, subject: str, data: bytes, stream_seq: int, hops: int, tried: set[str] | None = None
    ) -> None:
        """Into *node*'s subject; the id makes a redelivered original forwarded twice count once
        (the stream's duplicate window)."""
        await self._publish(node, subject, data, f"fwd-{stream_seq}", hops, tried)

    async def _publish(
        self, node: str, subject: str, data: bytes, msg_id: str, hops: int, tried: set[str] | None = None
    ) -> None:
        headers = {"Nats-Msg-Id": msg_id, HOPS_HEADER: str(hops)}
        if tried:
            headers[TRIED_HEADER] = ",".join(sorted(tried))
        await self.js.publish(
            node_subject(node, subject), data, stream=subjects.COMMAND_STREAM, headers=headers
        )
        metrics.FORWARDED.labels(node).inc()
        log.info("forwarded a command to its node", extra={"subject": subject, "node": node})
