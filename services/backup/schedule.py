"""The backup schedule: one sweep finds each instance's newest good backup, backs up those
older than their interval (ZAKI_BACKUP_INTERVAL_S, or the instance's own backup_interval_s;
0: never), applies retention, removes what dead writers left, and sets the gauges.

Per-user last-success timestamps would be one Prometheus series per user: the project keeps
per-user labels out of Prometheus, so the gauges are aggregates - the worst age of the newest
good backup over all scheduled instances, and how many have none newer than twice their
interval (the alert). ``zaki backup list`` gives the per-user view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge

from services.backup import core
from services.backup.errors import BackupError
from services.backup.keep import sweep_kept
from services.backup.ops import Backups
from services.provisioner.capacity import NodeCapacity
from services.provisioner.routing import housekeeper, node_at, on_node
from shared.store import Store

log = logging.getLogger("zaki.backup")
Nodes = Callable[[], Awaitable[list[NodeCapacity]]]

OLDEST_AGE = Gauge(
    "zaki_backup_oldest_good_age_seconds",
    "Over every scheduled instance: the age of its newest good backup, at its worst (no backup: since its creation)",
)
WITHOUT_RECENT = Gauge(
    "zaki_backup_instances_without_recent_backup",
    "Scheduled instances with no good backup newer than twice their interval",
)
SCHEDULED = Gauge("zaki_backup_instances_scheduled", "Instances with a backup interval")
LAST_SWEEP = Gauge("zaki_backup_last_sweep_timestamp_seconds", "When the backup service last swept")

# States whose data folder is worth a scheduled backup (a deleted one had its pre-delete backup).
SCHEDULED_STATES = ("running", "starting", "suspended", "stopped", "failed", "crashlooping")


def _aware(dt: Any) -> datetime | None:
    if not isinstance(dt, datetime):
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


class Scheduler:
    """*nodes*: with one backup service per swarm node (``ZAKI_SWARM_NODE``, folders on each node's
    own disk), the swarm's nodes (``SwarmRuntime.node_capacity``): it backs up only the gateways
    on its node, as that node's provisioner reconciles only them (``routing.on_node``)."""

    def __init__(self, backups: Backups, store: Store, nodes: Nodes | None = None) -> None:
        self.b = backups
        self.store = store
        self.s = backups.settings
        self.nodes = nodes

    async def _mine(self, instances: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], bool]:
        """The instances whose folders are this service's to back up, and whether it does the
        chores of no node (the retention of deleted users' backups, partial uploads)."""
        here = self.s.swarm_node
        if not here or self.nodes is None:
            return instances, True
        nodes = await self.nodes()
        where = node_at(nodes)
        return {u: d for u, d in instances.items() if on_node(d, where, here)}, housekeeper(nodes) == here

    def interval(self, doc: dict[str, Any]) -> float:
        own = doc.get("backup_interval_s")
        return float(own) if own is not None else self.s.backup_interval_s

    async def sweep(self, now: datetime | None = None) -> dict[str, int]:
        now = now or datetime.now(UTC)
        every_instance = {d["_id"]: d for d in await self.store.list_instances()}
        instances, chores = await self._mine(every_instance)
        by_user: dict[str, list[core.Manifest]] = {}
        for m in await self.b.list():
            by_user.setdefault(m.user_id, []).append(m)
        done = failed = removed = 0
        worst = 0.0
        without = scheduled = 0
        for user_id, doc in sorted(instances.items()):
            every = self.interval(doc)
            if every <= 0 or doc.get("state") not in SCHEDULED_STATES:
                continue
            scheduled += 1
            ms = by_user.get(user_id, [])
            newest = ms[-1].created if ms else None
            if newest is None or (now - newest).total_seconds() >= every:
                try:
                    m = await self.b.create(user_id, doc.get("instance_id"), "scheduled")
                    by_user.setdefault(user_id, []).append(m)
                    newest = m.created
                    done += 1
                except BackupError:
                    failed += 1  # logged and published by Backups.create
            since = newest or _aware(doc.get("created_at")) or now
            age = max(0.0, (now - since).total_seconds())
            worst = max(worst, age)
            if age > 2 * every:
                without += 1
        for user_id, ms in by_user.items():
            if user_id not in instances and (user_id in every_instance or not chores):
                continue  # another node's user, or a deleted one's that the housekeeper sweeps
            for m in core.expired(ms, self.s, user_id in every_instance, now):
                await asyncio.to_thread(core.remove, self.b.target, m)
                removed += 1
        orphans = await asyncio.to_thread(core.sweep_orphans, self.b.target) if chores else 0
        kept = await asyncio.to_thread(sweep_kept, self.s)  # folders kept at a delete, past the grace
        OLDEST_AGE.set(worst)
        WITHOUT_RECENT.set(without)
        SCHEDULED.set(scheduled)
        LAST_SWEEP.set(time.time())
        return {
            "created": done,
            "failed": failed,
            "removed": removed,
            "orphans": orphans,
            "without": without,
            "kept_removed": kept,
        }

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                result = await self.sweep()
                if any(result.values()):
                    # Prefixed: "created" is a LogRecord attribute (logging raises on it).
                    log.info("backup sweep", extra={f"sweep_{k}": v for k, v in result.items()})
            except Exception:
                log.exception("backup sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.s.backup_sweep_s)
