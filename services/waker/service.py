"""The waker: suspends idle gateways and wakes suspended ones (issue 16).

Every ``ZAKI_WAKER_SWEEP_S`` (and at once when an instance is suspended) it
- asks the provisioner to suspend running gateways idle for their idle time (activity from
  ``shared/activity.py``; a gateway whose next scheduled job is close is left up);
- long-polls the Telegram bot of every suspended gateway (``poller.py``) and asks for a wake
  on the first update;
- asks for a wake when a suspended gateway's scheduled job is due (``wake_at`` in its record,
  set by the provisioner at suspend time from ``cron.py``).
It only ever *asks* (``instance.suspend`` / ``instance.wake`` commands); the provisioner acts
and re-checks. An ask is not repeated while it is pending, that is until the provisioner's
outcome for that user arrives (``asks.py``; at most ``REASK_S`` when the outcome is lost).
Before the provisioner starts or changes a suspended gateway it asks the waker to stop
polling that bot (``zaki.waker.release``), which the waker answers once no poll is in flight.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from services.provisioner.config import user_dirs
from services.waker import cron
from services.waker.asks import SUSPEND, WAKE, Kind, PendingAsks
from services.waker.idle import decide, due_wakes, effective_idle_s
from services.waker.poller import TelegramWakePoller
from shared import activity, audit, subjects
from shared.crypto import DecryptionError, KeyRing, instance_secret_context
from shared.events import Event, InstanceSuspend, InstanceWake, SuspendReason, WakeReason
from shared.settings import ZakiSettings
from shared.state import InstanceState
from shared.store import Store

log = logging.getLogger("zaki.waker")

WAKES = Counter("zaki_waker_wakes_requested_total", "Wakes the waker asked for, by reason", ["reason"])
SUSPENDS = Counter("zaki_waker_suspends_requested_total", "Suspends the waker asked for")
for _r in WakeReason:
    WAKES.labels(_r.value)

Publish = Callable[[str, Event], Awaitable[None]]
SUSPENDED = InstanceState.SUSPENDED.value


class Waker:
    def __init__(
        self,
        settings: ZakiSettings,
        store: Store,
        keyring: KeyRing,
        publish: Publish,
        poller: TelegramWakePoller | None = None,
    ) -> None:
        self.s = settings
        self.store = store
        self.keys = keyring
        self.publish = publish
        self.poller = poller or TelegramWakePoller(
            settings.telegram_api_base,
            self.on_update,
            self.still_suspended,
            settings.waker_poll_timeout_s,
            settings.waker_concurrency,
        )
        self.asks = PendingAsks()

    async def close(self) -> None:
        await self.poller.close()

    def _pending(self, user_id: str, kind: Kind) -> bool:
        return self.asks.pending(user_id, kind, time.monotonic())

    def on_outcome(self, subject: str, data: bytes) -> list[Kind]:
        """An outcome event of the provisioner (NATS): ends the asks it answers."""
        try:
            body = json.loads(data)
            user_id, request_id = body["user_id"], body.get("request_id")
            if not isinstance(user_id, str) or not isinstance(request_id, str | None):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable outcome event", extra={"subject": subject})
            return []
        return self.asks.outcome(subject, user_id, request_id)

    # --- the poller's callbacks ------------------------------------------------------------

    async def still_suspended(self, user_id: str) -> bool:
        doc = await self.store.instances.find_one({"_id": user_id}, {"state": 1, "asleep": 1})
        return doc is not None and _asleep(doc)

    async def on_update(self, user_id: str) -> None:
        try:
            await activity.record_now(self.store.db, user_id, "telegram")
        except Exception as e:  # activity is a hint; the wake is what matters
            log.warning("could not record telegram activity", extra={"error": type(e).__name__})
        await self.wake(user_id, WakeReason.TELEGRAM)

    async def release(self, user_id: str) -> bool:
        """The provisioner is about to start or change this gateway: no poll of its bot may
        remain. Not a wake ask: the next sync polls the bot again if it still sleeps (an update
        of a sleeper), and a poll started once the wake began ends at its first check."""
        return await self.poller.release(user_id)

    # --- asking the provisioner -------------------------------------------------------------

    async def _ask(self, subject: str, kind: Kind, cmd: InstanceWake | InstanceSuspend) -> None:
        # Pending before it is sent: its outcome may arrive before publish() returns.
        self.asks.asked(cmd.user_id, kind, cmd.request_id, time.monotonic())
        try:
            await self.publish(subject, cmd)
        except BaseException:
            self.asks.forget(cmd.user_id, kind)  # never sent: the next sweep asks again
            raise

    async def wake(self, user_id: str, reason: WakeReason) -> None:
        WAKES.labels(reason.value).inc()
        log.info("asking for a wake", extra={"user_id": user_id, "reason": reason.value})
        cmd = InstanceWake(
            user_id=user_id,
            cause=reason,
            reason=f"waker: {reason.value}",
            actor=audit.platform("waker", f"wake: {reason.value}"),
        )
        await self._ask(subjects.INSTANCE_WAKE, WAKE, cmd)

    async def suspend(self, user_id: str, idle_s: float) -> None:
        SUSPENDS.inc()
        log.info("asking for a suspend", extra={"user_id": user_id, "idle_s": round(idle_s)})
        cmd = InstanceSuspend(
            user_id=user_id,
            cause=SuspendReason.IDLE,
            idle_s=round(idle_s, 1),
            reason=f"idle {idle_s:.0f} s",
            actor=audit.platform("waker", f"idle {idle_s:.0f} s"),
        )
        await self._ask(subjects.INSTANCE_SUSPEND, SUSPEND, cmd)

    # --- the sweeps -------------------------------------------------------------------------

    async def sync_suspended(self) -> None:
        """Polls the bot of every suspended gateway; wakes those whose scheduled job is due."""
        docs = await self.store.list_instances(states=[SUSPENDED], docker_host=self.s.docker_host_id)
        now = datetime.now(UTC)
        by_user = {d["_id"]: d for d in docs}
        for user_id in set(self.poller.watching()) - set(by_user):
            await self.poller.release(user_id)
        wake_at = {u: _aware(d.get("wake_at")) for u, d in by_user.items()}
        for user_id in due_wakes(now, wake_at):
            if not self._pending(user_id, WAKE):
                await self.poller.release(user_id)
                await self.wake(user_id, WakeReason.SCHEDULE)
        for user_id, doc in by_user.items():
            if not _asleep(doc) or user_id in self.poller.watching() or self._pending(user_id, WAKE):
                continue  # (a wake is on its way: the provisioner releases the bot before it starts)
            token = self._token(doc)
            if token is not None:
                self.poller.watch(user_id, token)

    def _token(self, doc: dict[str, Any]) -> str | None:
        sealed = doc.get("bot_token_enc")
        if not sealed:
            return None
        try:
            return self.keys.decrypt(sealed, instance_secret_context(doc["_id"], "bot_token"))
        except DecryptionError:
            log.error("cannot open a bot token", extra={"user_id": doc["_id"]})
            return None

    async def sweep_idle(self) -> int:
        """Asks for a suspend of every running gateway idle for its idle time; returns how many."""
        self.asks.prune(time.monotonic())
        docs = await self.store.list_instances(
            states=[InstanceState.RUNNING.value], docker_host=self.s.docker_host_id
        )
        seen = await activity.last_active(self.store.db, [d["_id"] for d in docs])
        now = datetime.now(UTC)
        asked = 0
        for doc in docs:
            user_id = doc["_id"]
            idle_after = effective_idle_s(
                doc.get("idle_suspend_s"), self.s.idle_suspend_s, self.s.activity_flush_s
            )
            floor = _aware(doc.get("updated_at"))
            first = decide(now, idle_after, seen.get(user_id), floor)
            if not first.suspend or self._pending(user_id, SUSPEND):
                continue  # (the cron file is read only for gateways that are idle already)
            try:
                next_job = await asyncio.to_thread(
                    cron.next_job_at,
                    user_dirs(self.s.data_root, user_id).state,
                    now,
                    self.s.wake_for_heartbeat,
                )
            except (cron.CronUnreadable, ValueError) as e:
                log.warning(
                    "scheduled jobs unreadable; not suspending", extra={"user_id": user_id, "error": str(e)}
                )
                continue
            d = decide(now, idle_after, seen.get(user_id), floor, next_job, self.s.wake_lead_s)
            if d.suspend:
                await self.suspend(user_id, d.idle_s)
                asked += 1
        return asked


def _asleep(doc: dict[str, Any]) -> bool:
    """Suspended and its container already stopped: its gateway no longer polls Telegram."""
    return doc.get("state") == SUSPENDED and doc.get("asleep") is True


def _aware(value: object) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
