"""The waker: suspends idle gateways and wakes suspended ones (issue 16).

Every ``ZAKI_WAKER_SWEEP_S`` (and at once when an instance is suspended) it
- asks the provisioner to suspend running gateways idle for their idle time (activity from
  ``shared/activity.py``; a gateway whose next scheduled job is close is left up);
- long-polls the Telegram bot of every suspended gateway (``poller.py``) and asks for a wake
  on the first update;
- asks for a wake when a suspended gateway's scheduled job is due (``wake_at`` in its record,
  set by the provisioner at suspend time from ``cron.py``).
It only ever *asks* (``instance.suspend`` / ``instance.wake`` commands); the provisioner acts
and re-checks. Before the provisioner starts a suspended gateway it asks the waker to stop
polling that bot (``zaki.waker.release``), which the waker answers once no poll is in flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter

from services.provisioner.config import user_dirs
from services.waker import cron
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
# After asking for a suspend or a wake, do not ask again for this long (the provisioner is on it).
REASK_S = 60.0
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
        self._asked: dict[tuple[str, str], float] = {}  # (user, "suspend"|"wake") -> monotonic

    async def close(self) -> None:
        await self.poller.close()

    def _recently_asked(self, user_id: str, what: str) -> bool:
        at = self._asked.get((user_id, what))
        return at is not None and time.monotonic() - at < REASK_S

    def _mark(self, user_id: str, what: str) -> None:
        self._asked[(user_id, what)] = time.monotonic()

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
        """The provisioner is about to start this gateway: no poll of its bot may remain."""
        self._mark(user_id, "wake")  # and do not start polling it again at the next sync
        return await self.poller.release(user_id)

    # --- asking the provisioner -------------------------------------------------------------

    async def wake(self, user_id: str, reason: WakeReason) -> None:
        self._mark(user_id, "wake")
        WAKES.labels(reason.value).inc()
        log.info("asking for a wake", extra={"user_id": user_id, "reason": reason.value})
        await self.publish(
            subjects.INSTANCE_WAKE,
            InstanceWake(
                user_id=user_id,
                cause=reason,
                reason=f"waker: {reason.value}",
                actor=audit.platform("waker", f"wake: {reason.value}"),
            ),
        )

    async def suspend(self, user_id: str, idle_s: float) -> None:
        self._mark(user_id, "suspend")
        SUSPENDS.inc()
        log.info("asking for a suspend", extra={"user_id": user_id, "idle_s": round(idle_s)})
        await self.publish(
            subjects.INSTANCE_SUSPEND,
            InstanceSuspend(
                user_id=user_id,
                cause=SuspendReason.IDLE,
                idle_s=round(idle_s, 1),
                reason=f"idle {idle_s:.0f} s",
                actor=audit.platform("waker", f"idle {idle_s:.0f} s"),
            ),
        )

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
            if not self._recently_asked(user_id, "wake"):
                await self.poller.release(user_id)
                await self.wake(user_id, WakeReason.SCHEDULE)
        for user_id, doc in by_user.items():
            if not _asleep(doc) or user_id in self.poller.watching() or self._recently_asked(user_id, "wake"):
                continue
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
            if not first.suspend or self._recently_asked(user_id, "suspend"):
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
