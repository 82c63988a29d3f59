"""Idle suspend and wake (issue 16): ``instance.suspend`` and ``instance.wake``.

Suspend: ``running -> suspended`` is written *before* ``docker stop``, so the monitor sees
the container die as a planned stop (it only watches running instances). The container,
its port, network and data folder stay; its memory is freed. ``asleep`` is set once the
container has stopped: only then does the waker long-poll the bot (never two pollers).

With ``ZAKI_SUSPEND_MODE=swap`` the container is not stopped but frozen (cgroup freezer) and
its memory pushed to the host's swap, after a config hot reload turned its Telegram channel
off; a wake thaws it (memory limit back, unpaused, Telegram on again): seconds, not a boot.

Wake: ``suspended -> starting``, the waker is asked to stop polling the bot, the config
rewritten (Telegram on), ``docker start`` (or the thaw) of the same container, readiness, ``running``,
then ``instance.ready`` (the proxy and the broker route on it) and ``instance.woken``.
Commands for one user run one at a time (the per-user lock), so twenty wake requests boot
the gateway once: the first boots it, the others find it running and answer ready.
A user's own ``stopped`` is never woken: only ``suspended`` is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS

from services.provisioner import metrics
from services.provisioner.base import Phase, ProvisionError, _bytes
from services.provisioner.lifecycle import Lifecycle
from services.provisioner.runtime import RuntimeError_
from services.waker import cron
from services.waker.idle import decide, effective_idle_s, wake_time
from shared import activity, subjects
from shared.bus import nats_servers
from shared.events import (
    FailureReason,
    InstanceCommand,
    InstanceSuspend,
    InstanceSuspended,
    InstanceWake,
    InstanceWoken,
    SuspendReason,
    WakeReason,
)
from shared.gateway import container_name
from shared.logging import redact
from shared.state import IllegalTransition, InstanceState

log = logging.getLogger("zaki.provisioner")
S = InstanceState


class Suspension(Lifecycle):
    _waker_nc: NATS | None = None

    async def release_bot(self, user_id: str) -> None:
        """Asks the waker (core NATS request) to stop polling this user's bot before its gateway
        starts. No waker running answers "no responders" at once; a slow one is given
        ``ZAKI_WAKER_RELEASE_TIMEOUT_S``: starting is right either way."""
        try:
            if self._waker_nc is None:
                self._waker_nc = await nats.connect(
                    nats_servers(self.s.nats_url), connect_timeout=2, max_reconnect_attempts=-1
                )
            await self._waker_nc.request(
                subjects.WAKER_RELEASE,
                json.dumps({"user_id": user_id}).encode(),
                timeout=self.s.waker_release_timeout_s,
            )
        except Exception as e:
            log.info("waker release not confirmed", extra={"user_id": user_id, "error": type(e).__name__})

    async def close(self) -> None:
        await super().close()
        if self._waker_nc is not None:
            await self._waker_nc.close()

    async def handle_command(self, kind: str, cmd: InstanceCommand) -> None:
        if kind not in ("suspend", "wake"):
            doc = await self.store.get_instance(cmd.user_id)
            if doc is not None and doc.get("state") == S.SUSPENDED:
                # start, stop, delete, update of a sleeper: nobody may poll its bot any more.
                await self.release_bot(cmd.user_id)
                if kind == "start":
                    kind, cmd = (
                        "wake",
                        InstanceWake(
                            request_id=cmd.request_id, user_id=cmd.user_id, actor=cmd.actor, reason=cmd.reason
                        ),
                    )
            if kind != "wake":
                await super().handle_command(kind, cmd)  # type: ignore[misc]
                return
        handler = self._suspend if kind == "suspend" else self._wake
        async with self._locks[cmd.user_id]:
            try:
                await self._refuse_while_restoring(kind, cmd.user_id)
                await handler(cmd)  # type: ignore[arg-type]
                metrics.COMMANDS.labels(kind, "ok").inc()
            except ProvisionError as e:
                metrics.COMMANDS.labels(kind, "failed").inc()
                await self.fail(cmd.request_id, cmd.user_id, e)

    async def _answer_current(self, request_id: str, doc: dict[str, Any]) -> None:
        if doc.get("state") == S.SUSPENDED:  # e.g. a budget-only update of a sleeper
            cmd = InstanceSuspend(request_id=request_id, user_id=doc["_id"])
            await self._publish_suspended(cmd, doc, None)
            return
        await super()._answer_current(request_id, doc)

    # --- suspend --------------------------------------------------------------------------------

    async def _next_job(self, user_id: str) -> datetime | None:
        return await asyncio.to_thread(
            cron.next_job_at, self._dirs(user_id).state, None, self.s.wake_for_heartbeat
        )

    async def _suspend(self, cmd: InstanceSuspend) -> None:
        doc = await self._existing(cmd)
        if doc["state"] == S.SUSPENDED:
            await self._publish_suspended(cmd, doc, None)
            return
        if doc["state"] != S.RUNNING:
            raise ProvisionError(
                FailureReason.ILLEGAL_TRANSITION, f"cannot suspend an instance that is {doc['state']}"
            )
        now = datetime.now(UTC)
        try:
            next_job = await self._next_job(cmd.user_id)
        except cron.CronUnreadable as e:
            if cmd.cause == SuspendReason.IDLE:
                log.warning(
                    "scheduled jobs unreadable; not suspending",
                    extra={"user_id": cmd.user_id, "error": str(e)},
                )
                await self._answer_current(cmd.request_id, doc)
                return
            next_job = None
        idle_after = effective_idle_s(
            doc.get("idle_suspend_s"), self.s.idle_suspend_s, self.s.activity_flush_s
        )
        if cmd.cause == SuspendReason.IDLE:
            # The waker decided from a view a few seconds old, and a request that began since
            # reaches the store at the proxy's next flush: wait for that flush, then look again.
            await asyncio.sleep(self.s.activity_flush_s + 0.5)
            now = datetime.now(UTC)
            seen = (await activity.last_active(self.store.db, [cmd.user_id])).get(cmd.user_id)
            floor = doc.get("updated_at")
            d = decide(now, idle_after, seen, floor, next_job, self.s.wake_lead_s)
            if not d.suspend:
                log.info("suspend declined", extra={"user_id": cmd.user_id, "why": d.why})
                await self._answer_current(cmd.request_id, doc)
                return
            wake_at = d.wake_at
        else:
            wake_at = wake_time(next_job, self.s.wake_lead_s)
        doc = await self._transition(
            cmd.request_id,
            cmd.user_id,
            S.SUSPENDED,
            {"suspended_at": now, "suspend_reason": cmd.cause.value, "wake_at": wake_at, "asleep": False},
        )
        name = container_name(cmd.user_id)
        frozen = self.s.suspend_mode == "swap" and await self._freeze(doc, name)
        if not frozen:
            try:
                await self.runtime.stop(name, self.s.stop_timeout_s)
            except RuntimeError_ as e:
                raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        metrics.SUSPENDS.labels("swap" if frozen else "stop").inc()
        await self.store.update_instance(
            cmd.user_id, {"asleep": True, "sleep": "swap" if frozen else "stop"}, doc["instance_id"]
        )
        log.info("suspended", extra={"user_id": cmd.user_id, "cause": cmd.cause.value})
        await self._publish_suspended(cmd, doc, cmd.idle_s)

    async def _freeze(self, doc: dict[str, Any], name: str) -> bool:
        """Swap mode: Telegram off by a hot reload (its long poll ends; the waker's starts once
        ``asleep`` is set), then frozen and pushed to swap. False when the memory did not go
        (no swap left): the caller stops it instead."""
        floor = _bytes(self.s.suspend_swap_floor)
        resident = None
        try:
            since = time.time()
            await self._write_config(doc, doc["gateway_ip"], telegram_enabled=False)
            await self._await_reload(name, since)
            resident = await self.runtime.freeze(name, floor, _bytes(self.s.gateway_memory))
        except (ProvisionError, RuntimeError_, KeyError) as e:
            log.warning("could not freeze a sleeper", extra={"user_id": doc["_id"], "error": str(e)})
        if resident is not None and resident <= 4 * floor:
            return True
        log.warning(
            "a sleeper's memory did not go to swap; stopping it instead",
            extra={"user_id": doc["_id"], "resident": resident},
        )
        return False

    async def _await_reload(self, name: str, since: float, timeout: float = 10.0) -> None:
        """Until the gateway logs that it applied the config written at *since*. A reload of an
        earlier write still pending (deferred while a request ran: the wake's "Telegram on")
        is superseded by ours, which then changes nothing the gateway runs and logs nothing:
        "superseded" and a quiet second after it count as done."""
        deadline = time.monotonic() + timeout
        superseded_at = None
        while time.monotonic() < deadline:
            lines = await self.runtime.logs(name, tail=50, since=since - 1)
            if any("hot reload applied" in line for line in lines):
                return
            if superseded_at is None and any("reload superseded" in line for line in lines):
                superseded_at = time.monotonic()
            if superseded_at is not None and time.monotonic() - superseded_at >= 1.0:
                return
            await asyncio.sleep(0.1)
        recent = await self.runtime.logs(name, tail=8, since=since - 1)
        log.warning(
            "no config reload seen before freezing",
            extra={"container": name, "recent": [redact(line)[:200] for line in recent]},
        )

    async def _publish_suspended(
        self, cmd: InstanceSuspend, doc: dict[str, Any], idle_s: float | None
    ) -> None:
        wake_at = doc.get("wake_at")
        await self.publish(
            subjects.INSTANCE_SUSPENDED,
            InstanceSuspended(
                request_id=cmd.request_id,
                user_id=cmd.user_id,
                instance_id=doc["instance_id"],
                reason=SuspendReason(doc.get("suspend_reason") or cmd.cause.value),
                idle_s=idle_s,
                next_wake_at=wake_at if isinstance(wake_at, datetime) else None,
            ),
        )

    # --- wake -----------------------------------------------------------------------------------

    async def _wake(self, cmd: InstanceWake) -> None:
        doc = await self._existing(cmd)
        state = doc["state"]
        if state != S.SUSPENDED:
            if state in (S.RUNNING, S.REQUESTED, S.PROVISIONING, S.STARTING):
                await self._answer_current(cmd.request_id, doc)  # an earlier wake booted it
                return
            raise ProvisionError(
                FailureReason.ILLEGAL_TRANSITION, f"the instance is {state}; only a suspended one wakes"
            )
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        suspended_at = doc.get("suspended_at")
        slept = (
            (datetime.now(UTC) - suspended_at).total_seconds() if isinstance(suspended_at, datetime) else None
        )
        try:
            doc = await self.store.transition(
                cmd.user_id,
                S.STARTING,
                instance_id=doc["instance_id"],
                set_fields={
                    "woken_at": datetime.now(UTC),
                    "wake_reason": cmd.cause.value,
                    "asleep": False,
                    "wake_at": None,
                },
            )
        except IllegalTransition:
            # Another provisioner replica is waking it (or it was stopped meanwhile): say what is.
            current = await self.store.get_instance(cmd.user_id)
            if current is not None:
                await self._answer_current(cmd.request_id, current)
            return
        with Phase(timings, "wake_release"):
            await self.release_bot(cmd.user_id)
        name = container_name(cmd.user_id)
        status = await self.runtime.status(name)
        if not status.exists or (doc.get("image") and status.image != doc["image"]):
            # The container is gone (removed by hand), or a fleet rollout put a new image on the
            # record while it slept: a full start builds it (anew) from the record.
            await self._provision_and_start(doc, cmd.request_id)
        else:
            try:
                # Telegram back on (a frozen sleeper had it off); the same config otherwise.
                await self._write_config(doc, doc["gateway_ip"])
                frozen = status.state == "paused"
                with Phase(timings, "wake_thaw" if frozen else "wake_start"):
                    # The memory limit back first: a swap sleeper may also have been stopped while
                    # squeezed (a user's stop, reconcile). The thaw unpauses a frozen one.
                    await self.runtime.thaw(name, _bytes(self.s.gateway_memory))
                    if not frozen:
                        await self.runtime.start(name)
                with Phase(timings, "wake_ready"):
                    await self.wait_ready(cmd.user_id, doc["port"], name)
                doc = await self._transition(cmd.request_id, cmd.user_id, S.RUNNING, {"last_error": None})
            except ProvisionError as e:
                # Like a start that fails: no running orphan, the record failed with the reason.
                await self._cleanup_failed(cmd.user_id, doc.get("instance_id"), e)
                raise
            except RuntimeError_ as e:
                err = ProvisionError(FailureReason.DOCKER, str(e))
                await self._cleanup_failed(cmd.user_id, doc.get("instance_id"), err)
                raise err from None
            timings["total"] = round(time.perf_counter() - t0, 3)
            await self.publish(subjects.INSTANCE_READY, self._ready_event(doc, cmd.request_id, timings))
        log.info(
            "woken",
            extra={
                "user_id": cmd.user_id,
                "cause": cmd.cause.value,
                "seconds": round(time.perf_counter() - t0, 2),
            },
        )
        await self.publish(
            subjects.INSTANCE_WOKEN,
            InstanceWoken(
                request_id=cmd.request_id,
                user_id=cmd.user_id,
                instance_id=doc["instance_id"],
                reason=WakeReason(cmd.cause),
                suspended_s=round(slept, 1) if slept is not None else None,
                timings=timings,
            ),
        )
