"""Runs a rollout (plan.py) through the provisioner's ``instance.upgrade`` command.

The rollout's whole state is in the store, written before each step: the ``rollouts`` document
(wave reached, state, lease) and one ``rollout_instances`` document per instance (its status), so
parallel upgrades never write the same document (FerretDB rewrites whole documents). A runner
that dies is resumed by ``zaki fleet resume`` (or the admin API): an instance left ``upgrading``
is asked again with the same request id (stored once by JetStream, command.py) unless its record
shows it settled. A runner that stays up through a NATS or provisioner restart finishes by
itself (commands retried until accepted, a lost outcome read from the record). A lease
(``runner``, ``heartbeat_at``) keeps two runners off one rollout. Stopped and suspended
instances are not started: the new image goes on their record, a rollback puts the old one back.
Every step is an event on ``zaki.fleet.<step>`` (kept in the ZAKI_AUDIT stream); every command
carries the actor ``platform:fleet`` with the rollout id as reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from services.fleet import command, watch
from services.fleet.plan import (
    DONE,
    PARKED,
    READY,
    RECORDED,
    Gate,
    Limits,
    Observation,
    PlanError,
    RolloutState,
    Status,
    gate,
    plan,
    settled,
    to_revert,
)
from shared import audit, subjects
from shared.client import OutcomeTimeout, PlatformClient
from shared.events import Actor, InstanceUpgrade
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.fleet")

COLLECTION = "rollouts"
HEARTBEAT_S = 5.0
GATE_POLL_S = 1.0

Progress = Callable[[dict[str, Any], str], None]


class RolloutBusy(Exception):
    """Another rollout is in progress, or another runner holds this one."""


def rollouts(store: Store):
    return store.db[COLLECTION]


def members(store: Store):
    return store.db["rollout_instances"]


async def get(store: Store, rid: str) -> dict[str, Any] | None:
    """The rollout with ``instances``: {user: its entry}."""
    doc = await rollouts(store).find_one({"_id": rid})
    if doc is not None:
        doc["instances"] = {m["user_id"]: m async for m in members(store).find({"rollout": rid})}
    return doc


def _now() -> datetime:
    return datetime.now(UTC)


async def create(
    store: Store,
    image: str,
    canary: float,
    waves: list[float],
    *,
    soak_s: float,
    actor: Actor,
    allowed: list[str],
    max_failures: int = 0,
    parallel: int = 4,
    limits: Limits | None = None,
) -> dict[str, Any]:
    """Plans a rollout of every running, stopped or suspended instance not already on *image*;
    one at a time. *limits*: the gate's error rates (default: ZAKI_FLEET_* settings)."""
    limits = limits or watch.limits_from(ZakiSettings())
    if image not in allowed:
        raise PlanError(f"image {image} is not allowed on this platform (ZAKI_ALLOWED_IMAGES)")
    busy = await rollouts(store).find_one(
        {"state": {"$in": [RolloutState.RUNNING, RolloutState.ROLLING_BACK]}}
    )
    if busy is not None:
        raise RolloutBusy(f"rollout {busy['_id']} is {busy['state']}: resume or abort it first")
    states = ["running", *sorted(PARKED)]
    docs = [d for d in await store.list_instances(states=states) if d.get("image") != image]
    rid = f"r{_now():%Y%m%d%H%M%S}{uuid.uuid4().hex[:6]}"
    groups = plan([d["_id"] for d in docs], canary, waves, seed=rid)
    images = {d["_id"]: d.get("image") for d in docs}
    doc = {
        "_id": rid,
        "image": image,
        "canary": canary,
        "waves": waves,
        "soak_s": soak_s,
        "max_failures": max_failures,
        "limits": {
            "max_proxy_5xx_rate": limits.max_proxy_5xx_rate,
            "max_broker_error_rate": limits.max_broker_error_rate,
            "min_samples": limits.min_samples,
        },
        "parallel": parallel,
        "state": RolloutState.RUNNING.value,
        "wave": 0,
        "groups": [{"users": g} for g in groups],  # FerretDB stores no nested arrays
        "actor": actor.model_dump(mode="json"),
        "reasons": [],
        "created_at": _now(),
        "updated_at": _now(),
    }
    await rollouts(store).insert_one(doc)
    await members(store).insert_many(
        [
            {"_id": f"{rid}:{u}", "rollout": rid, "user_id": u, "status": Status.PENDING.value,
             "from_image": images[u], "wave": i}
            for i, g in enumerate(groups)
            for u in g
        ]
    )  # fmt: skip
    return await get(store, rid) or doc


class Runner:
    def __init__(
        self,
        store: Store,
        client: PlatformClient,
        *,
        on_progress: Progress | None = None,
        outcome_timeout: float = 300.0,
        runner_id: str | None = None,
        lease_s: float = 30.0,
    ) -> None:
        self.store = store
        self.client = client
        self.on_progress = on_progress or (lambda doc, line: None)
        self.outcome_timeout = outcome_timeout
        self.runner_id = runner_id or uuid.uuid4().hex[:12]
        self.lease_s = lease_s  # ZAKI_FLEET_LEASE_S: a runner silent this long is gone
        self._lock = asyncio.Lock()

    # --- the document -------------------------------------------------------------------------

    async def load(self, rid: str) -> dict[str, Any]:
        doc = await get(self.store, rid)
        if doc is None:
            raise PlanError(f"no rollout {rid}")
        return doc

    async def _set(self, rid: str, fields: dict[str, Any]) -> None:
        async with self._lock:  # the heartbeat writes the same document
            await rollouts(self.store).update_one({"_id": rid}, {"$set": {**fields, "updated_at": _now()}})

    async def _status(self, rid: str, user: str, status: Status, **extra: Any) -> None:
        fields = {"status": status.value, "at": _now(), **extra}
        await members(self.store).update_one({"_id": f"{rid}:{user}"}, {"$set": fields})

    async def _event(self, doc: dict[str, Any], step: str, **detail: Any) -> None:
        body = {
            "rollout_id": doc["_id"],
            "image": doc["image"],
            "step": step,
            "at": _now().isoformat(),
            **detail,
        }
        try:
            await audit.ensure_stream(self.client.js, 400)
            await self.client.js.publish(f"{subjects.FLEET}.{step}", json.dumps(body, default=str).encode())
        except Exception as e:  # events are for watchers; the document is the state
            log.warning("fleet event not published", extra={"step": step, "error": type(e).__name__})
        self.on_progress(await self.load(doc["_id"]), step)

    async def _claim(self, rid: str) -> None:
        """Takes the rollout's lease; waits out the lease of a runner that just went silent
        (killed, its host restarted) before giving up."""
        for attempt in range(2):
            if await self._try_claim(rid):
                return
            if attempt == 0:
                await asyncio.sleep(self.lease_s + 0.5)
        raise RolloutBusy(f"rollout {rid} is being run by another runner")

    async def _try_claim(self, rid: str) -> bool:
        now = _now()
        res = await rollouts(self.store).update_one(
            {
                "_id": rid,
                "$or": [
                    {"runner": {"$exists": False}},
                    {"runner": self.runner_id},
                    {"heartbeat_at": {"$lt": now - timedelta(seconds=self.lease_s)}},
                ],
            },
            {"$set": {"runner": self.runner_id, "heartbeat_at": now}},
        )
        return res.matched_count == 1

    async def _heartbeat(self, rid: str) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(max(0.5, min(HEARTBEAT_S, self.lease_s / 3)))
                async with self._lock:
                    await rollouts(self.store).update_one(
                        {"_id": rid, "runner": self.runner_id}, {"$set": {"heartbeat_at": _now()}}
                    )

    # --- running ------------------------------------------------------------------------------

    async def run(self, rid: str) -> dict[str, Any]:
        """Runs (or resumes) a rollout to its end; returns the final document."""
        await self._claim(rid)
        beat = asyncio.create_task(self._heartbeat(rid))
        try:
            doc = await self.load(rid)
            if doc["state"] == RolloutState.ROLLING_BACK:
                return await self._revert(doc, RolloutState(doc.get("end_state") or RolloutState.HALTED))
            if doc["state"] in DONE:
                return doc
            await self._event(doc, "started" if doc["wave"] == 0 else "resumed", wave=doc["wave"])
            for i in range(doc["wave"], len(doc["groups"])):
                users = doc["groups"][i]["users"]
                doc = await self.load(rid)
                if doc["state"] != RolloutState.RUNNING:  # aborted meanwhile
                    return await self._revert(doc, RolloutState.ABORTED)
                await self._event(doc, "wave_started", wave=i, size=len(users))
                await self._upgrade_wave(doc, users)
                verdict = await self._soak(await self.load(rid))
                doc = await self.load(rid)
                if doc["state"] != RolloutState.RUNNING:  # aborted during the wave
                    return await self._revert(doc, RolloutState.ABORTED)
                if not verdict.ok:
                    await self._set(rid, {"reasons": verdict.reasons[:50]})
                    await self._event(doc, "gate_failed", wave=i, reasons=verdict.reasons[:20])
                    return await self._revert(await self.load(rid), RolloutState.HALTED)
                await self._set(rid, {"wave": i + 1})
                await self._event(doc, "gate_passed", wave=i)
            await self._set(rid, {"state": RolloutState.COMPLETED.value, "finished_at": _now()})
            doc = await self.load(rid)
            await self._event(doc, "completed")
            return doc
        finally:
            beat.cancel()
            await rollouts(self.store).update_one(
                {"_id": rid, "runner": self.runner_id}, {"$unset": {"runner": ""}}
            )

    async def _upgrade_wave(self, doc: dict[str, Any], users: list[str]) -> None:
        sem = asyncio.Semaphore(max(1, int(doc.get("parallel", 4))))

        async def one(user: str) -> None:
            async with sem:
                await self._upgrade_one(doc, user)

        await asyncio.gather(*(one(u) for u in users))

    async def _upgrade_one(self, doc: dict[str, Any], user: str) -> None:
        rid, target = doc["_id"], doc["image"]
        entry = doc["instances"][user]
        status = Status(entry["status"])
        if status not in (Status.PENDING, Status.UPGRADING):
            return  # done before a restart of the runner
        record = await self.store.get_instance(user)
        end = settled(record, target) if status == Status.UPGRADING else None
        if end is not None:  # it finished while no runner watched
            await self._settled(doc, user, end)
            return
        if status == Status.PENDING and (record is None or record["state"] not in {"running", *PARKED}):
            await self._status(rid, user, Status.SKIPPED, state=record and record["state"])
            return
        request_id = entry.get("request_id") or uuid.uuid4().hex
        await self._status(rid, user, Status.UPGRADING, request_id=request_id)
        cmd = InstanceUpgrade(
            request_id=request_id,
            user_id=user,
            image=target,
            reason=f"fleet rollout {rid}",
            actor=audit.platform("fleet", f"rollout {rid}"),
        )
        try:
            subject, outcome = await command.upgrade(self.client, self.store, cmd, self.outcome_timeout)
        except OutcomeTimeout as e:
            await self._status(rid, user, Status.FAILED, error=str(e))
            await self._event(doc, "instance_failed", user_id=user, error="timeout")
            return
        if subject == RECORDED:
            await self._settled(doc, user, RECORDED)
        elif subject == subjects.INSTANCE_READY and getattr(outcome, "image", target) == target:
            await self._settled(doc, user, READY)
        else:
            why = getattr(outcome, "reason", None) or subject.rsplit(".", 1)[-1]
            await self._status(rid, user, Status.FAILED, error=f"{subject}: {why}"[:300])
            await self._event(doc, "instance_failed", user_id=user, outcome=subject)

    async def _settled(self, doc: dict[str, Any], user: str, end: str) -> None:
        if end == RECORDED:  # parked: starts with the new image next time
            await self._status(doc["_id"], user, Status.RECORDED)
            await self._event(doc, "instance_recorded", user_id=user)
        else:
            await self._status(doc["_id"], user, Status.UPGRADED)
            await self._event(doc, "instance_upgraded", user_id=user)

    async def observe(self, doc: dict[str, Any]) -> dict[str, Observation]:
        return await watch.observe(self.store, doc)

    async def _soak(self, doc: dict[str, Any]) -> Gate:
        """Watches the gate for the soak period; stops early when it fails."""
        deadline = time.monotonic() + float(doc["soak_s"])
        while True:
            doc = await self.load(doc["_id"])
            if doc["state"] != RolloutState.RUNNING:
                return Gate(ok=False, reasons=["aborted"])
            verdict = gate(
                await self.observe(doc), doc["image"], int(doc.get("max_failures", 0)), watch.limits_of(doc)
            )
            if not verdict.ok or time.monotonic() >= deadline:
                return verdict
            await asyncio.sleep(min(GATE_POLL_S, max(0.0, deadline - time.monotonic())))

    async def _revert(self, doc: dict[str, Any], end: RolloutState) -> dict[str, Any]:
        """Every instance that may run the new image goes back to its previous image."""
        rid = doc["_id"]
        await self._set(rid, {"state": RolloutState.ROLLING_BACK.value, "end_state": end.value})
        await self._event(doc, "rolling_back")
        users = to_revert({u: Status(e["status"]) for u, e in doc["instances"].items()})
        for u, e in doc["instances"].items():  # a lost outcome (timeout): the record says
            if e["status"] == Status.FAILED and u not in users:
                record = await self.store.get_instance(u)
                if record is not None and record.get("image") == doc["image"]:
                    users.append(u)
        sem = asyncio.Semaphore(max(1, int(doc.get("parallel", 4))))

        async def one(user: str) -> None:
            entry = doc["instances"][user]
            async with sem:
                cmd = InstanceUpgrade(
                    request_id=entry.get("revert_id") or uuid.uuid4().hex,
                    user_id=user,
                    image=entry["from_image"],
                    reason=f"fleet rollout {rid}: roll back",
                    actor=audit.platform("fleet", f"rollout {rid} rolled back"),
                )
                await self._status(rid, user, Status.REVERTING, revert_id=cmd.request_id)
                try:
                    subject, _ = await command.upgrade(self.client, self.store, cmd, self.outcome_timeout)
                except OutcomeTimeout:
                    subject = "timeout"
                await self._status(rid, user, Status.REVERTED, revert_outcome=subject)
                await self._event(doc, "instance_reverted", user_id=user, outcome=subject)

        await asyncio.gather(*(one(u) for u in users))
        await self._set(rid, {"state": end.value, "finished_at": _now()})
        doc = await self.load(rid)
        await self._event(doc, end.value)
        return doc


async def abort(store: Store, rid: str) -> dict[str, Any]:
    """Marks a rollout aborted: its runner rolls it back before the next wave (or ``resume`` does)."""
    res = await rollouts(store).update_one(
        {"_id": rid, "state": RolloutState.RUNNING.value},
        {"$set": {"state": RolloutState.ROLLING_BACK.value, "end_state": RolloutState.ABORTED.value}},
    )
    doc = await get(store, rid)
    if doc is None:
        raise PlanError(f"no rollout {rid}")
    if res.matched_count != 1 and doc["state"] != RolloutState.ROLLING_BACK:
        raise PlanError(f"rollout {rid} is {doc['state']}: nothing to abort")
    return doc


def group(doc: dict[str, Any], i: int) -> list[str]:
    return list(doc["groups"][i]["users"])


def counts(doc: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in doc["instances"].values():
        out[e["status"]] = out.get(e["status"], 0) + 1
    return out
