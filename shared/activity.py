"""Last-seen activity per user: recorded cheaply where traffic passes, read by the waker.

An instance is idle when none of these happened for its idle time (issue 16): a request
through the proxy, an open WebSocket or stream, a model call through the LLM broker, a
Telegram update (the waker's own, and every answered message is also a model call).

The hot path is a dict assignment. ``ActivityRecorder.run`` flushes every
``ZAKI_ACTIVITY_FLUSH_S`` with one unordered bulk write of ``$max`` upserts into the
``activity`` collection, one document per user::

    {_id: <user>, last_active_at: <datetime>, last_<source>_at: <datetime>}

It is a collection of its own, not a field of the instance record: the record is written
through versioned claims (see ``shared/store.py``), and FerretDB's SQLite backend rewrites
whole documents, so a concurrent plain update there could undo a state change.

Hooks (one line each):
    proxy:  ``activity.touch(tenant)`` per request; ``activity.opened(tenant)`` /
            ``activity.closed(tenant)`` around a WebSocket or an SSE stream;
            ``tasks.append(asyncio.create_task(activity.run(store.db)))`` at start.
    broker: ``activity.touch(instance_user_id)`` per model call, the same ``run`` task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pymongo import UpdateOne

log = logging.getLogger("zaki.activity")

COLLECTION = "activity"


class ActivityRecorder:
    """In-memory last-seen per user, flushed in batches. Not thread-safe: one event loop."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._seen: dict[str, float] = {}
        self._open: Counter[str] = Counter()

    def touch(self, user_id: str) -> None:
        self._seen[user_id] = time.time()

    def opened(self, user_id: str) -> None:
        """A long-lived connection (WebSocket, SSE) began: the user counts as active until it ends."""
        self._open[user_id] += 1
        self.touch(user_id)

    def closed(self, user_id: str) -> None:
        n = self._open[user_id] - 1
        if n > 0:
            self._open[user_id] = n
        else:
            self._open.pop(user_id, None)
        self.touch(user_id)

    def drain(self) -> dict[str, float]:
        """What to write now: every user seen since the last flush, and every open connection."""
        pending, self._seen = self._seen, {}
        now = time.time()
        for user_id in self._open:
            pending[user_id] = now
        return pending

    def _restore(self, pending: dict[str, float]) -> None:
        for user_id, at in pending.items():
            if at > self._seen.get(user_id, 0.0):
                self._seen[user_id] = at

    async def flush(self, db: Any) -> int:
        """Writes what was seen since the last flush; returns how many users. On a store error
        the batch is kept for the next flush (and the error raised)."""
        pending = self.drain()
        if not pending:
            return 0
        field = f"last_{self.source}_at"
        ops = []
        for user_id, at in pending.items():
            dt = datetime.fromtimestamp(at, UTC)
            ops.append(UpdateOne({"_id": user_id}, {"$max": {"last_active_at": dt, field: dt}}, upsert=True))
        try:
            await db[COLLECTION].bulk_write(ops, ordered=False)
        except Exception:
            self._restore(pending)
            raise
        return len(ops)

    async def run(self, db: Any, interval_s: float) -> None:
        """Flushes every *interval_s* until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.flush(db)
                except Exception as e:  # the store is down: keep counting, try again next time
                    log.warning("activity flush failed", extra={"error": type(e).__name__})
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(db), 2.0)


async def last_active(db: Any, user_ids: Iterable[str]) -> dict[str, datetime]:
    """The last recorded activity of each user that has one."""
    ids = list(user_ids)
    if not ids:
        return {}
    out: dict[str, datetime] = {}
    async for doc in db[COLLECTION].find({"_id": {"$in": ids}}, {"last_active_at": 1}):
        at = doc.get("last_active_at")
        if isinstance(at, datetime):
            out[doc["_id"]] = at if at.tzinfo else at.replace(tzinfo=UTC)
    return out


async def record_now(db: Any, user_id: str, source: str) -> None:
    """One immediate write, for rare events (the waker saw a Telegram update)."""
    dt = datetime.now(UTC)
    await db[COLLECTION].update_one(
        {"_id": user_id}, {"$max": {"last_active_at": dt, f"last_{source}_at": dt}}, upsert=True
    )


async def forget(db: Any, user_id: str) -> None:
    """Drops a deleted user's activity."""
    await db[COLLECTION].delete_one({"_id": user_id})
