"""Budget reservations: a call holds an estimate of its tokens while it runs, in the store, so
that calls in flight at once, in any broker process, cannot all pass a hard limit.

Each reservation is one document ``<user>:<seq>`` with a per-user sequence number. A writer
takes the next number by inserting it; the unique ``_id`` makes a taken number fail
(DuplicateKeyError) and the writer re-reads the highest and tries the next. That is an insert
guarded by a unique index, the one write FerretDB's SQLite backend makes atomic across
connections (a conditional update or ``$inc`` is not: see the README's "Store"). So the
numbers a user's calls hold are taken in order, and when a call reads the reservations
numbered below its own it sees every one of them. A call is admitted when the user's usage
plus the open reservations before it stay under the limit: N calls in flight together pass
a limit by at most the last one's reservation, whichever processes serve them.

A call's reservation is settled (``open: false``) by the usage flush that writes its real
tokens; one whose process died expires after ``ttl_s``. Another process keeps counting a
settled reservation until its own view of the usage totals is newer than the settlement.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError

from shared.store import Store

SEQ_TRUST_S = 30.0  # how long this process trusts its own idea of a user's last number
KEEP_SETTLED_S = 600.0  # settled reservations are deleted after this (far over SEQ_TRUST_S)


@dataclass
class Reservation:
    id: str
    user_id: str
    day: str
    tokens: int
    done: bool = False  # settled or handed to the usage flush


@dataclass
class Ahead:
    day: int
    month: int


class ReservationBook:
    def __init__(self, store: Store, ttl_s: float) -> None:
        self.coll = store.db["budget_reservations"]
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex  # this process
        self._seq: dict[str, tuple[int, float]] = {}

    async def ensure_indexes(self) -> None:
        await self.coll.create_index([("user_id", ASCENDING), ("seq", DESCENDING)], name="by_user_seq")
        await self.coll.create_index([("open", ASCENDING), ("expires", ASCENDING)], name="by_state")

    async def _last(self, user_id: str) -> int:
        doc = await self.coll.find_one({"user_id": user_id}, {"seq": 1}, sort=[("seq", DESCENDING)])
        return int(doc["seq"]) if doc else 0

    async def open(
        self, user_id: str, day: str, tokens: int, seen_at: float, skip: Iterable[str] = ()
    ) -> tuple[Reservation, Ahead]:
        """Takes the user's next number for *tokens*, and sums what is reserved ahead of it
        (and what other processes settled after *seen_at*, the wall time of this process's
        last read of the usage totals)."""
        now = time.time()
        hit = self._seq.get(user_id)
        seq = hit[0] if hit and time.monotonic() - hit[1] < SEQ_TRUST_S else await self._last(user_id)
        for _ in range(64):
            seq += 1
            doc = {
                "_id": f"{user_id}:{seq}",
                "user_id": user_id,
                "seq": seq,
                "day": day,
                "month": day[:7],
                "tokens": tokens,
                "open": True,
                "owner": self.owner,
                "expires": now + self.ttl_s,
            }
            try:
                await self.coll.insert_one(doc)
                break
            except DuplicateKeyError:
                seq = await self._last(user_id)  # another call took it: go past the highest
        else:
            raise RuntimeError(f"no reservation number for {user_id} after 64 tries")
        self._seq[user_id] = (seq, time.monotonic())
        skipped = set(skip)
        ahead = Ahead(0, 0)
        query = {
            "user_id": user_id,
            "month": day[:7],
            "$or": [
                {"open": True, "seq": {"$lt": seq}, "expires": {"$gt": now}},
                {"open": False, "owner": {"$ne": self.owner}, "settled": {"$gt": seen_at}},
            ],
        }
        async for d in self.coll.find(query, {"tokens": 1, "day": 1}):
            if d["_id"] in skipped:
                continue  # this process counts those itself
            ahead.month += int(d.get("tokens", 0))
            if d.get("day") == day:
                ahead.day += int(d.get("tokens", 0))
        return Reservation(doc["_id"], user_id, day, tokens), ahead

    async def settle(self, ids: list[str]) -> None:
        if ids:
            await self.coll.update_many(
                {"_id": {"$in": ids}}, {"$set": {"open": False, "settled": time.time()}}
            )

    async def sweep(self) -> None:
        """Deletes long-settled and expired reservations."""
        cutoff = time.time() - KEEP_SETTLED_S
        await self.coll.delete_many(
            {"$or": [{"open": False, "settled": {"$lt": cutoff}}, {"expires": {"$lt": cutoff}}]}
        )
