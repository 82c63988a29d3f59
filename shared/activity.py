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

Answers are counted too (issue 17.2, the fleet gate's error rates): ``answered(user, status)``
adds one to the user's count and, when ``is_error(status)``, to its errors. Each flush inserts
one document per user counted since the last flush into ``traffic``::

    {user_id, source, first: <first answer counted>, at: <flush>, calls: n, errors: e}

Insert-only (never a shared document updated from several replicas, which FerretDB could
lose); ``traffic_since`` sums them per user and source; documents older than
``TRAFFIC_KEEP_S`` are pruned by the writers.

Hooks (one line each):
    proxy:  ``activity.touch(tenant)`` per request; ``activity.opened(tenant)`` /
            ``activity.closed(tenant)`` around a WebSocket or an SSE stream;
            ``activity.answered(tenant, status)`` per answered request;
            ``tasks.append(asyncio.create_task(activity.run(store.db)))`` at start.
    broker: ``activity.touch(instance_user_id)`` per model call, ``answered`` with the status
            the gateway got for each call forwarded to a provider, the same ``run`` task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from pymongo import UpdateOne

log = logging.getLogger("zaki.activity")

COLLECTION = "activity"
TRAFFIC = "traffic"
TRAFFIC_KEEP_S = 2 * 86400.0  # longer than any rollout's soak
PRUNE_EVERY_S = 600.0


def is_error(status: int) -> bool:
    """The one rule for a failed answer, proxy and broker alike: a 5xx (the gateway's own, the
    proxy's 502/503/504 for it, a provider's, the broker's 502 for an unreachable provider).
    A 4xx is the caller's or a limit's doing, not a broken gateway image."""
    return status >= 500


class Counts(NamedTuple):
    calls: int = 0
    errors: int = 0


class ActivityRecorder:
    """In-memory last-seen per user, flushed in batches. Not thread-safe: one event loop."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._seen: dict[str, float] = {}
        self._open: Counter[str] = Counter()
        self._counts: dict[str, list[float]] = {}  # user -> [first answer at, calls, errors]

    def answered(self, user_id: str, status: int) -> None:
        c = self._counts.get(user_id)
        if c is None:
            self._counts[user_id] = [time.time(), 1, 1 if is_error(status) else 0]
        else:
            c[1] += 1
            if is_error(status):
                c[2] += 1

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
        the batch is kept for the next flush (and the error raised). Last-seen times go first:
        a failed write of the answer counts must never let the waker suspend a gateway in use."""
        pending = self.drain()
        if not pending:
            await self._flush_counts(db)
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
        await self._flush_counts(db)
        return len(ops)

    async def _flush_counts(self, db: Any) -> None:
        counts, self._counts = self._counts, {}
        if not counts:
            return
        at = datetime.now(UTC)
        docs = [
            {"user_id": u, "source": self.source, "first": datetime.fromtimestamp(c[0], UTC), "at": at,
             "calls": int(c[1]), "errors": int(c[2])}
            for u, c in counts.items()
        ]  # fmt: skip
        try:
            await db[TRAFFIC].insert_many(docs, ordered=False)
        except Exception:
            for u, c in counts.items():  # kept for the next flush, merged with what came since
                now = self._counts.setdefault(u, [c[0], 0, 0])
                now[0], now[1], now[2] = min(now[0], c[0]), now[1] + c[1], now[2] + c[2]
            raise

    async def run(self, db: Any, interval_s: float) -> None:
        """Flushes every *interval_s* until cancelled, then once more; prunes old traffic."""
        pruned = 0.0
        try:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.flush(db)
                    if time.monotonic() - pruned > PRUNE_EVERY_S:
                        pruned = time.monotonic()
                        await prune_traffic(db)
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


async def prune_traffic(db: Any, keep_s: float = TRAFFIC_KEEP_S) -> None:
    """Drops answer counts older than *keep_s* (several writers may do it: deletes are idempotent)."""
    await db[TRAFFIC].create_index([("user_id", 1), ("first", 1)], name="by_user_first")
    await db[TRAFFIC].delete_many({"at": {"$lt": datetime.now(UTC) - timedelta(seconds=keep_s)}})


async def traffic_since(db: Any, since: dict[str, datetime]) -> dict[str, dict[str, Counts]]:
    """{user: {source: Counts}} of the answers counted from each user's *since* on (a batch
    begun before it is left out whole: a sample, never the old incarnation's answers)."""
    if not since:
        return {}
    since = {u: t if t.tzinfo else t.replace(tzinfo=UTC) for u, t in since.items()}
    out: dict[str, dict[str, Counts]] = {}
    query = {"user_id": {"$in": list(since)}, "first": {"$gte": min(since.values())}}
    async for doc in db[TRAFFIC].find(query):
        first = doc["first"] if doc["first"].tzinfo else doc["first"].replace(tzinfo=UTC)
        if first < since[doc["user_id"]]:
            continue
        per = out.setdefault(doc["user_id"], {})
        c = per.get(doc["source"], Counts())
        per[doc["source"]] = Counts(c.calls + int(doc["calls"]), c.errors + int(doc["errors"]))
    return out
