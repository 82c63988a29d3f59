"""Docker brought in line with the records of this Docker host: orphans removed, missing
containers recreated, failed instances retried with backoff (healing.py), tenants over
their disk limits stopped (quota.py); and the host's capacity metrics. Runs periodically on
every replica; safe to run concurrently (per-user locks here, versioned writes in the store).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from services.provisioner import healing, metrics
from services.provisioner.base import ProvisionError, S, _bytes, log
from services.provisioner.capacity import NodeCapacity
from services.provisioner.commands import Commands
from services.provisioner.routing import node_at, on_node
from services.provisioner.runtime import RuntimeError_
from shared import audit, subjects
from shared.events import FailureReason, InstanceCommand, StopReason
from shared.gateway import container_name, is_pool_slot
from shared.state import InstanceState
from shared.store import utcnow

# Marks an attempt reconcile started itself (no command will redeliver it); cleared by its end.
AUTO = "auto_attempt_at"
ABANDONED_AFTER_S = 120.0  # on top of the readiness timeout


class Reconciler(Commands):
    async def reconcile(self) -> dict[str, int]:
        """Brings Docker in line with the records of this Docker host. Safe to run concurrently."""
        actions = dict.fromkeys(metrics.RECONCILE_ACTION_NAMES, 0)
        every = {d["_id"]: d for d in await self.store.list_instances(docker_host=self.runtime.host_id)}
        for c in await self.runtime.list_managed():
            if is_pool_slot(c.user_id):
                continue  # the pool's own (pool.py)
            doc = every.get(c.user_id or "")  # an orphan has no record on any node
            if doc is None or doc.get("instance_id") != c.instance_id or doc["state"] == S.DELETING:
                if doc is not None and doc["state"] in (S.REQUESTED, S.PROVISIONING, S.STARTING):
                    continue  # being provisioned right now
                log.info("removing orphan container", extra={"container": c.name})
                await self.runtime.remove(c.name)
                actions["removed_orphan"] += 1
        nodes = await self._nodes()  # once a round: the routing and the metrics below
        records = self._on_this_node(every, nodes)
        await self._recreate_missing(records, actions)
        await self._put_sleepers_back(records, actions)
        await self._reconcile_networks(records, actions)
        await self._fail_abandoned(records, actions)
        await self._heal(records, actions)
        await self._enforce_disk_limits(records, actions)
        for action, n in actions.items():
            metrics.RECONCILE_ACTIONS.labels(action).inc(n)
        by_state = {s.value: 0 for s in InstanceState}
        for doc in await self.store.list_instances(docker_host=self.runtime.host_id):
            by_state[doc["state"]] = by_state.get(doc["state"], 0) + 1
        for state, n in by_state.items():
            metrics.INSTANCES.labels(state).set(n)
        await self._capacity_metrics(sum(by_state.values()) - by_state[S.DELETED.value], nodes)
        self.kick_pool()
        return actions

    async def _nodes(self) -> list[NodeCapacity] | None:
        try:
            return await self.runtime.node_capacity()
        except Exception as e:  # the engine or manager away: the last figures stay
            log.warning("cannot read the nodes' capacity", extra={"error": str(e)})
            return None

    def _on_this_node(
        self, records: dict[str, dict[str, Any]], nodes: list[NodeCapacity] | None
    ) -> dict[str, dict[str, Any]]:
        """With one provisioner per swarm node (ZAKI_SWARM_NODE), the records of the gateways on
        this replica's node: it alone starts, heals and measures them (their folders are on its
        disk). A record on no known node is left to the replica its next command goes to."""
        if not self.s.swarm_node:
            return records
        where = node_at(nodes or [])  # the manager away: nothing is known to be this node's
        return {u: d for u, d in records.items() if on_node(d, where, self.s.swarm_node)}

    async def _recreate_missing(self, records: dict[str, dict[str, Any]], actions: dict[str, int]) -> None:
        containers = {c.name for c in await self.runtime.list_managed()}
        for user_id, doc in records.items():
            if doc["state"] != S.RUNNING or container_name(user_id) in containers:
                continue
            async with self._locks[user_id]:
                log.info("recreating a missing container", extra={"user_id": user_id})
                why = "reconcile: container missing"
                cmd = InstanceCommand(user_id=user_id, reason=why, actor=audit.platform("reconcile", why))
                await audit.command(subjects.INSTANCE_START, cmd)
                try:
                    fresh = await self._transition(
                        cmd.request_id, user_id, S.STARTING, {AUTO: utcnow()}, instance_id=doc["instance_id"]
                    )
                    await self._provision_and_start(fresh, cmd.request_id, heal=True)
                    actions["recreated"] += 1
                except ProvisionError as e:
                    await self.fail(cmd.request_id, user_id, e)

    async def _put_sleepers_back(self, records: dict[str, dict[str, Any]], actions: dict[str, int]) -> None:
        """A sleeper whose container runs again by itself (swap mode: Docker restarts a paused
        container after a host reboot) would poll its bot next to the waker: stopped; its
        next wake starts it."""
        for c in await self.runtime.list_managed():
            doc = records.get(c.user_id or "")
            if doc is None or doc["state"] != S.SUSPENDED or not doc.get("asleep") or c.state != "running":
                continue
            async with self._locks[doc["_id"]]:
                fresh = await self.store.get_instance(doc["_id"])
                if fresh is None or fresh["state"] != S.SUSPENDED or not fresh.get("asleep"):
                    continue
                if (await self.runtime.status(c.name)).state != "running":
                    continue  # frozen (or stopped) since the list was taken
                log.warning("stopping a sleeper that runs again", extra={"user_id": doc["_id"]})
                with contextlib.suppress(RuntimeError_):
                    await self.runtime.stop(c.name, self.s.stop_timeout_s)
                    actions["sleeper_stopped"] += 1

    async def _reconcile_networks(self, records: dict[str, dict[str, Any]], actions: dict[str, int]) -> None:
        """Egress rules back after a dockerd, provisioner or host restart, and every running
        instance's network in agreement with its record (issue 13.2, 13.9): a network with another
        subnet is recreated by restarting the instance."""
        expected = {u: d.get("subnet") for u, d in records.items() if d["state"] == S.RUNNING}
        try:
            differ = await self.runtime.reconcile_networks(expected)
        except RuntimeError_ as e:
            log.error("egress policy not applied", extra={"error": str(e)})
            return
        for user_id in differ:
            reason = "reconcile: network subnet differs from the record"
            cmd = InstanceCommand(user_id=user_id, reason=reason, actor=audit.platform("reconcile", reason))
            await audit.command(subjects.INSTANCE_RESTART, cmd)
            await self.handle_command("restart", cmd)
            actions["network_replaced"] += 1

    async def _fail_abandoned(self, records: dict[str, dict[str, Any]], actions: dict[str, int]) -> None:
        """An attempt of reconcile's own (a recreate, a retry) has no command to redeliver it: if
        its provisioner died mid-way, the record would stay provisioning/starting for good. Once
        far older than any attempt lasts, it is failed (and so retried by _heal)."""
        deadline = self.s.readiness_timeout_s + ABANDONED_AFTER_S
        for user_id, doc in records.items():
            started = doc.get(AUTO)
            if doc["state"] not in (S.PROVISIONING, S.STARTING) or started is None:
                continue
            if self._locks[user_id].locked() or (utcnow() - started).total_seconds() < deadline:
                continue  # still ours and running, or young enough to be alive elsewhere
            async with self._locks[user_id]:
                fresh = await self.store.get_instance(user_id)
                if fresh is None or fresh.get("version") != doc.get("version"):
                    continue  # it moved meanwhile: alive
                log.warning("failing an abandoned attempt", extra={"user_id": user_id, "state": doc["state"]})
                err = ProvisionError(
                    FailureReason.INTERNAL, "the provisioner stopped in the middle of an attempt"
                )
                await self._cleanup_failed(user_id, doc["instance_id"], err, heal=True)
                await self.fail(InstanceCommand(user_id=user_id).request_id, user_id, err)
                actions["abandoned"] += 1

    async def _heal(self, records: dict[str, dict[str, Any]], actions: dict[str, int]) -> None:
        """Failed instances the platform may retry (healing.py): retried when their backoff is
        over; after heal_max_attempts retries, `crashlooping` with an instance.failed event."""
        for user_id, doc in records.items():
            if doc["state"] != S.FAILED or healing.decide(doc.get("heal"), utcnow(), self.s) is None:
                continue
            async with self._locks[user_id]:
                fresh = await self.store.get_instance(user_id)  # another command may have run
                if fresh is None or fresh["state"] != S.FAILED:
                    continue
                decision = healing.decide(fresh.get("heal"), utcnow(), self.s)
                if decision == "give_up":
                    await self._give_up(fresh)
                    actions["crashlooping"] += 1
                elif decision == "retry":
                    await self._retry(fresh)
                    actions["healed"] += 1

    async def _retry(self, doc: dict[str, Any]) -> None:
        user_id, heal = doc["_id"], doc["heal"]
        attempt = int(heal.get("attempts", 0)) + 1
        why = f"reconcile: retry {attempt} after {heal.get('reason')}"
        cmd = InstanceCommand(user_id=user_id, reason=why, actor=audit.platform("reconcile", why))
        await audit.command(subjects.INSTANCE_START, cmd)
        log.info("retrying a failed instance", extra={"user_id": user_id, "attempt": attempt})
        try:
            # Counted before the attempt: a crash mid-way does not make retries free.
            fresh = await self._transition(
                cmd.request_id,
                user_id,
                S.PROVISIONING,
                {"heal": {**heal, "attempts": attempt}, AUTO: utcnow()},
                instance_id=doc["instance_id"],
            )
        except ProvisionError:
            return  # another replica got there first
        try:
            await self._refuse_over_quota(user_id)
            await self._provision_and_start(fresh, cmd.request_id, heal=True)
        except ProvisionError as e:
            if e.reason == FailureReason.DISK_QUOTA:
                await self._cleanup_failed(user_id, doc["instance_id"], e)
            await self.fail(cmd.request_id, user_id, e)

    async def _give_up(self, doc: dict[str, Any]) -> None:
        user_id, heal = doc["_id"], doc["heal"]
        cmd = InstanceCommand(user_id=user_id, reason="reconcile: retries used up")
        message = (
            f"gave up after {heal.get('attempts', 0)} retries (last failure: {doc.get('last_error') or heal.get('reason')}); "
            "a start, restart or upgrade command tries again"
        )
        try:
            await self._transition(
                cmd.request_id,
                user_id,
                S.CRASHLOOPING,
                {"last_error": message[:600]},
                instance_id=doc["instance_id"],
            )
        except ProvisionError:
            return
        log.warning("instance crash-looping: no more retries", extra={"user_id": user_id})
        await self.fail(cmd.request_id, user_id, ProvisionError(FailureReason.CRASHLOOPING, message))

    async def _enforce_disk_limits(self, records: dict[str, dict[str, Any]], actions: dict[str, int]) -> None:
        """Stops a live instance whose data folder is over ZAKI_TENANT_DISK_BYTES or _MAX_FILES."""
        if not (self.s.tenant_disk_bytes or self.s.tenant_max_files):
            return
        t0 = time.perf_counter()
        for user_id, doc in records.items():
            if doc["state"] not in (S.RUNNING, S.STARTING):
                continue
            usage = await self.disk_usage(user_id)
            if usage is None or not usage.over:
                continue
            async with self._locks[user_id]:
                cmd = InstanceCommand(
                    user_id=user_id,
                    reason=StopReason.DISK_QUOTA.value,
                    actor=audit.platform("reconcile", StopReason.DISK_QUOTA.value),
                )
                await audit.command(subjects.INSTANCE_STOP, cmd)
                log.warning("stopping an instance over its disk limits", extra={"user_id": user_id})
                message = f"{usage.over}: stopped; free space in the workspace or ask the operator"
                try:
                    await self._stop_instance(cmd, StopReason.DISK_QUOTA, message)
                except ProvisionError as e:
                    await self.fail(cmd.request_id, user_id, e)
                    continue
                actions["over_quota"] += 1
        metrics.DISK_SCAN_SECONDS.set(time.perf_counter() - t0)

    @staticmethod
    def _node_metrics(nodes: list[NodeCapacity]) -> None:
        """A node that left the swarm leaves the dashboard too: the series are replaced."""
        for gauge in metrics.NODE_GAUGES:
            gauge.clear()
        for n in nodes:
            metrics.NODE_MEMORY.labels(n.node).set(n.memory_bytes)
            metrics.NODE_RESERVED.labels(n.node).set(n.reserved_bytes)
            metrics.NODE_GATEWAYS.labels(n.node).set(n.gateways)
            metrics.NODE_READY.labels(n.node).set(int(n.ready))

    async def _capacity_metrics(self, instances: int, nodes: list[NodeCapacity] | None) -> None:
        """Docker host capacity (ports, memory) and store latency, for the infrastructure dashboard."""
        metrics.PORTS_CAPACITY.set(self.s.port_range_end - self.s.port_range_start + 1)
        metrics.PORTS_USED.set(await self.store.ports.count_documents({"docker_host": self.runtime.host_id}))
        with contextlib.suppress(Exception):
            metrics.HOST_MEMORY.set(await self.runtime.memory_total())
        metrics.MEMORY_RESERVED.set(instances * _bytes(self.s.gateway_memory))
        if nodes is not None:
            self._node_metrics(nodes)
        t0 = time.perf_counter()
        await self.store.ping()
        metrics.STORE_PING.set(time.perf_counter() - t0)
