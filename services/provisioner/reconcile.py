"""Docker brought in line with the records of this Docker host, and the host's capacity
metrics. Runs periodically on every replica; safe to run concurrently."""

from __future__ import annotations

import contextlib
import time

from services.provisioner import metrics
from services.provisioner.base import ProvisionError, S, _bytes, log
from services.provisioner.commands import Commands
from shared.events import InstanceCommand
from shared.gateway import container_name
from shared.state import InstanceState


class Reconciler(Commands):
    async def reconcile(self) -> dict[str, int]:
        """Brings Docker in line with the records of this Docker host. Safe to run concurrently."""
        actions = {"removed_orphan": 0, "recreated": 0}
        records = {d["_id"]: d for d in await self.store.list_instances(docker_host=self.runtime.host_id)}
        for c in await self.runtime.list_managed():
            doc = records.get(c.user_id or "")
            if doc is None or doc.get("instance_id") != c.instance_id or doc["state"] == S.DELETING:
                if doc is not None and doc["state"] in (S.REQUESTED, S.PROVISIONING, S.STARTING):
                    continue  # being provisioned right now
                log.info("removing orphan container", extra={"container": c.name})
                await self.runtime.remove(c.name)
                actions["removed_orphan"] += 1
        containers = {c.name: c for c in await self.runtime.list_managed()}
        for user_id, doc in records.items():
            if doc["state"] == S.RUNNING and container_name(user_id) not in containers:
                async with self._locks[user_id]:
                    log.info("recreating a missing container", extra={"user_id": user_id})
                    cmd = InstanceCommand(user_id=user_id, reason="reconcile: container missing")
                    try:
                        await self._transition(cmd.request_id, user_id, S.STARTING)
                        fresh = await self.store.get_instance(user_id)
                        if fresh is not None:
                            await self._provision_and_start(fresh, cmd.request_id)
                            actions["recreated"] += 1
                    except ProvisionError as e:
                        await self.fail(cmd.request_id, user_id, e)
        for action, n in actions.items():
            metrics.RECONCILE_ACTIONS.labels(action).inc(n)
        by_state = {s.value: 0 for s in InstanceState}
        for doc in await self.store.list_instances(docker_host=self.runtime.host_id):
            by_state[doc["state"]] = by_state.get(doc["state"], 0) + 1
        for state, n in by_state.items():
            metrics.INSTANCES.labels(state).set(n)
        await self._capacity_metrics(sum(by_state.values()) - by_state[S.DELETED.value])
        return actions

    async def _capacity_metrics(self, instances: int) -> None:
        """Docker host capacity (ports, memory) and store latency, for the infrastructure dashboard."""
        metrics.PORTS_CAPACITY.set(self.s.port_range_end - self.s.port_range_start + 1)
        metrics.PORTS_USED.set(await self.store.ports.count_documents({"docker_host": self.runtime.host_id}))
        with contextlib.suppress(Exception):
            metrics.HOST_MEMORY.set(await self.runtime.memory_total())
        metrics.MEMORY_RESERVED.set(instances * _bytes(self.s.gateway_memory))
        t0 = time.perf_counter()
        await self.store.ping()
        metrics.STORE_PING.set(time.perf_counter() - t0)
