"""The I/O of commands per node (issue 18, ``ZAKI_SWARM_NODE``): reads the user's record, the
swarm's nodes and which nodes have a replica, asks routing.py where a command belongs, and
forwards it there. Its own replica's node subject is subscribed in app.py."""

from __future__ import annotations

import logging
from typing import Any

from docker.utils import parse_bytes
from nats.js import JetStreamContext

from services.provisioner import metrics
from services.provisioner.routing import choose_node, node_at, node_subject, nodes_with_a_replica, target_node
from shared import subjects
from shared.store import Store

log = logging.getLogger("zaki.provisioner")
HOPS_HEADER = "Zaki-Hops"  # how many times a command was forwarded
MAX_HOPS = 3  # past it, the replica that has it runs it: two replicas disagreeing never loop


class NodeRouter:
    def __init__(self, here: str, store: Store, runtime: Any, js: JetStreamContext, gateway_memory: str):
        self.here = here
        self.store, self.runtime, self.js = store, runtime, js  # runtime: a SwarmRuntime
        self.need_bytes = parse_bytes(gateway_memory)

    async def target(self, subject: str, user_id: str, placed_already: bool = False) -> str:
        """The node whose replica must run *subject* for *user_id*; a new user's node is chosen
        once (*placed_already*: a forwarded request stays where it was sent)."""
        doc = await self.store.get_instance(user_id)
        host = (doc or {}).get("host")
        nodes = await self.runtime.node_capacity()
        where = node_at(nodes)
        placed = None
        if subject == subjects.INSTANCE_REQUESTED and host not in where and not placed_already:
            infos = await self.js.consumers_info(subjects.COMMAND_STREAM)
            replicas = nodes_with_a_replica((i.name or "", bool(i.push_bound)) for i in infos)
            placed = choose_node(nodes, replicas, self.need_bytes)
        return target_node(host, where, placed, self.here)

    async def forward(self, node: str, subject: str, data: bytes, stream_seq: int, hops: int) -> None:
        """Into *node*'s subject; the id makes a redelivered original forwarded twice count once
        (the stream's duplicate window)."""
        await self.js.publish(
            node_subject(node, subject),
            data,
            stream=subjects.COMMAND_STREAM,
            headers={"Nats-Msg-Id": f"fwd-{stream_seq}", HOPS_HEADER: str(hops)},
        )
        metrics.FORWARDED.labels(node).inc()
        log.info("forwarded a command to its node", extra={"subject": subject, "node": node})
