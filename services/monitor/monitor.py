"""The monitor's edges: Docker events and HTTP probes in, health events and restart
requests out. It never touches a container itself: the provisioner is the single
writer to Docker, the monitor only asks (``instance.restart``)."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from pymongo.errors import DuplicateKeyError

from services.monitor import model_path
from services.monitor.health import HealthTracker, RestartPolicy, jitter_offset, owner
from services.monitor.nodes import NODE_DOWN, NodeWatch
from services.monitor.tasks import TaskWatch
from shared import audit, subjects
from shared.events import HealthState, HealthSummary, InstanceCommand, InstanceHealthChanged, InstanceMove
from shared.gateway import container_name, user_of_container
from shared.probe import AioProber, ProbeResult
from shared.settings import ZakiSettings
from shared.state import InstanceState
from shared.store import Store

log = logging.getLogger("zaki.monitor")
H = HealthState

BY_STATE = Gauge("zaki_monitor_instances", "Instances watched by this replica, by health state", ["state"])
PROBE_SECONDS = Histogram(
    "zaki_monitor_probe_seconds",
    "Readiness probe latency",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
PROBE_FAILURES = Counter("zaki_monitor_probe_failures_total", "Failed probes", ["reason"])
RESTARTS = Counter("zaki_monitor_restarts_requested_total", "instance.restart requests sent", ["reason"])
SWEEP_SECONDS = Histogram(
    "zaki_monitor_sweep_seconds", "Wall time of one probe sweep", buckets=(0.1, 0.5, 1, 2, 5, 10, 30)
)
LAST_SWEEP = Gauge("zaki_monitor_last_sweep_timestamp_seconds", "When the last sweep finished")
DIE_LAG = Histogram(
    "zaki_monitor_die_to_event_seconds",
    "Docker die event to published health event",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
)
EVENTS = Counter("zaki_monitor_health_events_total", "Health state changes published", ["state"])

# Known label values exist from the start (at zero), so dashboards and alerts see them.
for _reason in ("timeout", "refused", "exited", "oom", "removed", "http_503", "memory_growth"):
    PROBE_FAILURES.labels(_reason)
    RESTARTS.labels(_reason)
for _state in HealthState:
    BY_STATE.labels(_state.value)

# Only these are probed or restarted; provisioning, stopping, stopped and deleted never are.
WATCHED = (InstanceState.RUNNING.value,)
KEPT = (InstanceState.RUNNING.value, InstanceState.STARTING.value)


@dataclass
class Watch:
    user_id: str
    instance_id: str
    host: str
    port: int
    version: int
    tracker: HealthTracker
    policy: RestartPolicy
    last_probe: ProbeResult | None = None
    last_probe_at: float = 0.0
    last_written: float = 0.0
    oom: bool = False
    pending_restart: bool = False
    docker_grace_until: float = 0.0  # after a die, Docker's own restart policy goes first
    model_path: str = ""  # why the broker refuses its model calls ("": it does not)


class Monitor:
    def __init__(self, settings: ZakiSettings, store: Store, publish) -> None:
        self.s = settings
        self.store = store
        self.publish = publish
        self.replica_id = settings.replica_id
        self.watches: dict[str, Watch] = {}
        self.prober: AioProber | None = None
        self.sem = asyncio.Semaphore(settings.probe_concurrency)
        self.replicas: list[str] = [self.replica_id]
        self.nodes: NodeWatch | None = None  # on a Swarm: which nodes are gone (nodes.py)
        self.tasks: TaskWatch | None = None  # on a Swarm: gateways that exit on any node (tasks.py)

    # --- replicas ------------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        now = datetime.now(UTC)
        await self.store.leases.update_one(
            {"_id": f"monitor:{self.replica_id}"},
            {"$set": {"kind": "monitor", "expires_at": now + timedelta(seconds=self.s.probe_interval_s)}},
            upsert=True,
        )

    async def live_replicas(self) -> list[str]:
        now = datetime.now(UTC)
        docs = self.store.leases.find({"kind": "monitor", "expires_at": {"$gt": now}})
        live = sorted([d["_id"].split(":", 1)[1] async for d in docs])
        return live if self.replica_id in live else sorted([*live, self.replica_id])

    async def leave(self) -> None:
        await self.store.leases.delete_one({"_id": f"monitor:{self.replica_id}"})

    # --- sweep ---------------------------------------------------------------------------------

    def _watch_for(self, doc: dict[str, Any]) -> Watch:
        w = self.watches.get(doc["_id"])
        if w is None or w.instance_id != doc["instance_id"]:
            w = Watch(
                doc["_id"],
                doc["instance_id"],
                doc.get("host") or "127.0.0.1",
                int(doc.get("port") or 0),
                int(doc.get("version", 0)),
                HealthTracker(self.s.unhealthy_after, self.s.healthy_after, self.s.slow_probe_s),
                RestartPolicy(
                    self.s.restart_backoff_base_s,
                    self.s.restart_backoff_max_s,
                    self.s.crashloop_restarts,
                    self.s.crashloop_window_s,
                ),
            )
            self.watches[doc["_id"]] = w
        w.host, w.port, w.version = (
            doc.get("host") or w.host,
            int(doc.get("port") or w.port),
            int(doc.get("version", 0)),
        )
        return w

    async def refresh(self) -> list[Watch]:
        """Re-reads which instances this replica watches; returns those to probe now."""
        self.replicas = await self.live_replicas()
        docs = await self.store.list_instances(states=KEPT)
        mine = {
            d["_id"]: d for d in docs if owner(d["_id"], self.replicas) == self.replica_id and d.get("port")
        }
        for user_id in list(self.watches):
            if user_id not in mine:
                del self.watches[user_id]  # stopped, deleted, or now another replica's
        marks = await model_path.refused(self.store)
        due = []
        for doc in mine.values():
            w = self._watch_for(doc)
            mark = marks.get(w.user_id)
            w.model_path = (
                model_path.detail(mark) if mark and mark.get("instance_id") == w.instance_id else ""
            )
            if doc["state"] in WATCHED:
                w.pending_restart = False
                due.append(w)
        return due

    async def sweep(self) -> float:
        t0 = time.perf_counter()
        due = await self.refresh()
        if self.nodes is not None:
            await self.nodes.refresh()
        await asyncio.gather(
            *(
                self._probe_one(w, jitter_offset(w.user_id, self.s.probe_interval_s, self.s.probe_spread))
                for w in due
            )
        )
        elapsed = time.perf_counter() - t0
        SWEEP_SECONDS.observe(elapsed)
        LAST_SWEEP.set_to_current_time()
        counts = self.counts()
        for state in H:
            BY_STATE.labels(state.value).set(counts.get(state, 0))
        return elapsed

    async def _probe_one(self, w: Watch, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self.prober is None:
            self.prober = AioProber(self.s.probe_concurrency)
        async with self.sem:
            result = await self.prober.probe(w.host, w.port, w.user_id, "/readyz", self.s.probe_timeout_s)
        PROBE_SECONDS.observe(result.latency_s)
        if not result.ok:
            PROBE_FAILURES.labels(result.error).inc()
        w.last_probe, w.last_probe_at = result, time.time()
        ok, error = result.ok, result.error
        if not ok and self.nodes is not None and self.nodes.node_down(w.host):
            error = NODE_DOWN  # not the gateway's fault: it is moved, not restarted
        if ok and w.model_path:
            ok, error = False, model_path.REASON  # answers, but cannot call a model
        changed = w.tracker.observe(ok, result.latency_s, error)
        if changed is not None:
            await self._changed(w, changed, w.model_path if error == model_path.REASON else "")
        elif time.time() - w.last_written > self.s.health_write_interval_s:
            await self._persist(w)
        # A restart does not mend a model path (reconcile recreates a stale network).
        if w.tracker.state in (H.UNHEALTHY, H.UNREACHABLE) and w.tracker.reason != model_path.REASON:
            await self.maybe_restart(w, w.tracker.reason or "probe_failed")

    def counts(self) -> dict[HealthState, int]:
        out: dict[HealthState, int] = {}
        for w in self.watches.values():
            out[w.tracker.state] = out.get(w.tracker.state, 0) + 1
        return out

    # --- decisions -----------------------------------------------------------------------------

    async def _changed(
        self, w: Watch, state: HealthState, detail: str = "", previous: HealthState | None = None
    ) -> None:
        EVENTS.labels(state.value).inc()
        prev = previous or H.UNKNOWN
        await self.publish(
            subjects.health_subject(w.user_id),
            InstanceHealthChanged(
                user_id=w.user_id,
                instance_id=w.instance_id,
                previous=prev,
                state=state,
                reason=w.tracker.reason,
                detail=detail,
            ),
        )
        log.info(
            "health changed", extra={"user_id": w.user_id, "state": state.value, "reason": w.tracker.reason}
        )
        await self._persist(w)

    async def _persist(self, w: Watch) -> None:
        w.last_written = time.time()
        lp = w.last_probe
        await self.store.db["health"].update_one(
            {"_id": w.user_id},
            {
                "$set": {
                    "instance_id": w.instance_id,
                    "state": w.tracker.state.value,
                    "reason": w.tracker.reason,
                    "replica": self.replica_id,
                    "restarts": len(w.policy.history),
                    "last_probe_at": datetime.fromtimestamp(w.last_probe_at, UTC)
                    if w.last_probe_at
                    else None,
                    "last_probe_ok": lp.ok if lp else None,
                    "last_probe_ms": round(lp.latency_s * 1000, 1) if lp else None,
                    "updated_at": datetime.now(UTC),
                }
            },
            upsert=True,
        )

    async def _still_running(self, w: Watch) -> dict[str, Any] | None:
        """The instance record, when it still says this incarnation should be running."""
        doc = await self.store.get_instance(w.user_id)
        if doc is None or doc.get("instance_id") != w.instance_id or doc["state"] not in WATCHED:
            return None
        return doc

    async def maybe_restart(self, w: Watch, reason: str) -> None:
        if w.pending_restart:
            return
        doc = await self._still_running(w)
        if doc is None:
            return  # stopping, stopped, deleted or being restarted: never ours to restart
        w.version = int(doc.get("version", 0))
        decision = w.policy.decide(time.monotonic())
        if decision == "crashloop":
            await self._crashloop(w)
            return
        if decision == "wait" or time.monotonic() < w.docker_grace_until:
            return
        if await self.container_state(w.user_id) == "restarting":
            return  # Docker's restart policy is at it; its restarts count through the die events
        # One restart per failure of one incarnation, whichever replica sees it first.
        try:
            await self.store.db["restart_claims"].insert_one(
                {
                    "_id": f"{w.user_id}:{w.instance_id}:{w.version}",
                    "by": self.replica_id,
                    "reason": reason,
                    "at": datetime.now(UTC),
                }
            )
        except DuplicateKeyError:
            return
        w.policy.record(time.monotonic())
        w.pending_restart = True
        RESTARTS.labels(reason).inc()
        actor = audit.platform("monitor", reason)
        gone = self.nodes.node_down(w.host) if self.nodes is not None else None
        if gone:
            log.warning("moving off a node that is down", extra={"user_id": w.user_id, "node": gone})
            move = InstanceMove(user_id=w.user_id, reason=f"monitor: {reason}", actor=actor, away_from=gone)
            await self.publish(subjects.INSTANCE_MOVE, move)
            return
        log.warning("requesting a restart", extra={"user_id": w.user_id, "reason": reason})
        await self.publish(
            subjects.INSTANCE_RESTART,
            InstanceCommand(user_id=w.user_id, reason=f"monitor: {reason}", actor=actor),
        )

    async def _crashloop(self, w: Watch) -> None:
        previous = w.tracker.state
        if (
            w.tracker.force(
                H.CRASHLOOPING, f"{len(w.policy.history)} restarts in {self.s.crashloop_window_s:.0f} s"
            )
            is not None
        ):
            await self._changed(w, H.CRASHLOOPING, "no more restarts will be requested", previous)

    # --- Docker events -------------------------------------------------------------------------

    async def on_container_event(self, event: dict[str, Any], received: float) -> None:
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        user_id = user_of_container(attrs.get("name"), attrs.get("zaki.user"))
        action = event.get("Action", "")
        w = self.watches.get(user_id or "")
        if w is None or attrs.get("zaki.instance") != w.instance_id:
            return
        if action == "start" and w.model_path:
            # A fresh start may be on a corrected network: refused again on its next call if not.
            await model_path.forget(self.store, w.user_id, w.instance_id)
            w.model_path = ""
            return
        if action == "oom":
            # Reported whatever the record's state (even mid-restart): operators must see
            # "raise the memory limit", not a string of anonymous restarts.
            w.oom = True
            previous = w.tracker.state
            w.tracker.force(H.UNREACHABLE, "oom")
            await self._changed(w, H.UNREACHABLE, "killed by the kernel: out of memory", previous)
            DIE_LAG.observe(time.time() - received)
            return
        if action in ("die", "destroy") or action.startswith("health_status: unhealthy"):
            if await self._still_running(w) is None:
                return  # the provisioner stopped or is restarting it
            if action == "die":
                reason = "oom" if w.oom else "exited"
                detail = f"exit code {attrs.get('exitCode')}"
            elif action == "destroy":
                reason, detail = "removed", "container removed"
            else:
                reason, detail = "docker_unhealthy", action
            previous = w.tracker.state
            w.tracker.force(H.UNREACHABLE if reason != "docker_unhealthy" else H.UNHEALTHY, reason)
            if previous != w.tracker.state or reason == "oom":
                await self._changed(w, w.tracker.state, detail, previous)
                DIE_LAG.observe(time.time() - received)
            if action == "die":
                w.docker_grace_until = time.monotonic() + self.s.die_grace_s
                asyncio.get_running_loop().call_later(
                    self.s.die_grace_s, lambda: asyncio.ensure_future(self._after_die(w, reason))
                )

    async def _after_die(self, w: Watch, reason: str) -> None:
        """Docker's own restart policy restarts a crashed gateway; a stopped one needs us."""
        w.oom = False
        status = await self.container_state(w.user_id)
        if status in ("running", "restarting"):
            # Docker restarted it: that counts towards crash-loop detection all the same.
            decision = w.policy.decide(time.monotonic())
            if decision == "crashloop":
                await self._crashloop(w)
            else:
                w.policy.record(time.monotonic())
            return
        await self.maybe_restart(w, reason)

    async def poll_tasks(self) -> None:
        assert self.tasks is not None
        for event in await self.tasks.poll():
            await self.on_container_event(event, time.time())

    async def container_state(self, user_id: str) -> str:
        if self.tasks is not None:
            return await self.tasks.state(user_id)
        return await asyncio.to_thread(self._inspect_state, user_id)

    def _inspect_state(self, user_id: str) -> str:
        import docker

        try:
            c = self.docker.containers.get(container_name(user_id))
        except docker.errors.NotFound:
            return "missing"
        return c.attrs["State"]["Status"]

    def start_docker_events(self, loop: asyncio.AbstractEventLoop) -> threading.Thread:
        """Reads the Docker event stream in a thread (the SDK blocks) and hands events to the loop."""
        import docker

        self.docker = (
            docker.DockerClient(base_url=self.s.docker_url) if self.s.docker_url else docker.from_env()
        )

        def run() -> None:
            while True:
                try:
                    stream = self.docker.events(
                        decode=True,
                        filters={"type": "container", "label": f"zaki.managed={self.s.platform_id}"},
                    )
                    for event in stream:
                        received = time.time()
                        asyncio.run_coroutine_threadsafe(self.on_container_event(event, received), loop)
                except Exception:
                    log.exception("docker event stream broke; reconnecting")
                    time.sleep(1 + random.random())

        t = threading.Thread(target=run, name="docker-events", daemon=True)
        t.start()
        return t

    async def summary(self) -> None:
        await self.publish(
            subjects.HEALTH_SUMMARY, HealthSummary(replica_id=self.replica_id, counts=self.counts())
        )

    async def close(self) -> None:
        if self.prober is not None:
            await self.prober.close()
