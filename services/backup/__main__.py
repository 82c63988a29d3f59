"""python -m services.backup: scheduled backups, retention and the backup metrics.

Run one replica: two would both back up an instance whose backup is due. With folders on each
swarm node's own disk (``ZAKI_SWARM_NODE``), one on each node: each backs up its node's gateways.
"""

from __future__ import annotations

import asyncio

import nats

from services.backup.ops import Backups
from services.backup.schedule import Scheduler
from shared.bus import ensure_streams, nats_servers, to_json
from shared.events import Event
from shared.runner import run_service
from shared.settings import ZakiSettings
from shared.store import Store


async def main(s: ZakiSettings, stop: asyncio.Event) -> None:
    await ensure_streams(s.nats_url, s.stream_replicas)
    nc = await nats.connect(nats_servers(s.nats_url), max_reconnect_attempts=-1)
    js = nc.jetstream()

    async def publish(subject: str, ev: Event) -> None:
        await js.publish(subject, to_json(ev))

    store = Store(s.mongo_url, s.mongo_db)
    nodes = None
    if s.swarm_node:  # one per node: only the folders on this node's disk (schedule.py)
        from services.provisioner.app import make_runtime

        nodes = make_runtime(s).node_capacity
    try:
        await Scheduler(Backups.from_settings(s, publish), store, nodes).run(stop)
    finally:
        await store.close()
        await nc.drain()


if __name__ == "__main__":
    run_service("backup", main)
