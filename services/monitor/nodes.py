"""Swarm nodes that are gone (issue 18, ``ZAKI_RUNTIME=swarm``). A gateway that stops answering
on a node the manager no longer sees as ready is reported ``node_down`` and moved to another node
(``instance.move``) instead of restarted: a restart would wait for a node that may never return,
since the gateway is pinned to it. The manager's view is read once per sweep."""

from __future__ import annotations

import logging
from typing import Any

from services.provisioner.networks import RuntimeError_

log = logging.getLogger("zaki.monitor")
NODE_DOWN = "node_down"


class NodeWatch:
    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime  # SwarmRuntime: down_nodes()
        self.down: dict[str, str] = {}  # address as records name it -> node id

    async def refresh(self) -> None:
        try:
            down = await self.runtime.down_nodes()
        except RuntimeError_ as e:  # the manager is away: keep its last answer
            log.warning("cannot read the swarm's nodes", extra={"error": str(e)})
            return
        if down.keys() != self.down.keys():
            log.warning("swarm nodes not ready", extra={"nodes": sorted(down.values())})
        self.down = down

    def node_down(self, host: str) -> str | None:
        """The id of the down node at *host*, if it is one."""
        return self.down.get(host)
