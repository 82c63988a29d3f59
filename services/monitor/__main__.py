"""python -m services.monitor"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats

from services.monitor.memory import MemoryGuard
from services.monitor.monitor import Monitor
from shared.bus import ensure_streams, nats_servers, to_json
from shared.runner import run_service
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.monitor")


async def main(settings: ZakiSettings, stop: asyncio.Event) -> None:
    await ensure_streams(settings.nats_url, settings.stream_replicas)
    nc = await nats.connect(nats_servers(settings.nats_url), max_reconnect_attempts=-1)
    js = nc.jetstream()

    async def publish(subject: str, event) -> None:
        await js.publish(subject, to_json(event))

    store = Store(settings.mongo_url, settings.mongo_db)
    monitor = Monitor(settings, store, publish)
    if settings.runtime == "swarm":  # gateways on other nodes: follow which nodes are gone
        from services.monitor.nodes import NodeWatch
        from services.monitor.tasks import TaskWatch
        from services.provisioner.app import make_runtime

        runtime = make_runtime(settings)
        monitor.nodes = NodeWatch(runtime)
        monitor.tasks = TaskWatch(runtime, settings.platform_id)  # exits on every node
    monitor.start_docker_events(asyncio.get_running_loop())
    memory = MemoryGuard(monitor)  # restarts before memory runs out (issue 17.3)

    async def every(interval: float, fn) -> None:
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await fn()
            except Exception:
                log.exception("monitor task failed", extra={"task": fn.__name__})
            await asyncio.sleep(max(0.05, interval - (asyncio.get_running_loop().time() - started)))

    tasks = [
        asyncio.create_task(every(settings.probe_interval_s / 3, monitor.heartbeat)),
        asyncio.create_task(every(settings.probe_interval_s, monitor.sweep)),
        asyncio.create_task(every(settings.summary_interval_s, monitor.summary)),
        asyncio.create_task(every(settings.memory_sample_s, memory.sweep)),
    ]
    if monitor.tasks is not None:
        tasks.append(asyncio.create_task(every(settings.swarm_task_poll_s, monitor.poll_tasks)))
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await monitor.leave()
        await monitor.close()
        await store.close()
        await nc.close()


if __name__ == "__main__":
    run_service("monitor", main)
