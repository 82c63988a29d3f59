"""Budget reservations: a call holds an estimate of its tokens while it runs, in the store, so
that calls in flight at once, in any broker process, cannot all pass a hard limit.

Each reservation is one document ``<user>:<seq>`` with a per-user number. A writer takes the
next number by inserting it; the unique ``_id`` makes a taken number fail (DuplicateKeyError)
and the writer re-reads the highest and tries the next. That is an insert guarded by a unique
index, the one write FerretDB's SQLite backend makes atomic across connections (a conditional
update or ``$inc`` is not: see the README's "Store"). A number read as "highest + 1" is taken
after every reservation numbered below it, so a call that then reads the user's reservations
sees all those ahead of it, and is admitted when the user's usage plus those stays under the
limit: N calls in flight together pass a limit by at most one call's reservation, whichever
processes serve them. (Unless a whole reservation's life, taken and given back, fits between
one process's read of the highest number and its insert of the next, i.e. that process stalls:
then one more reservation may pass.) (A process remembers its last number instead of reading the highest
each time; since others may have taken and given back numbers above it meanwhile, it then
also counts other processes' open reservations numbered above its own: never less safe,
only more cautious.)

The flush that writes a call's real tokens then deletes its reservation (by ``_id``: the
one lookup FerretDB does not answer by scanning the collection), so the collection holds
only the calls in flight. The ledger reads the usage totals after the reservations, so a
call that ended in another process is seen either as a reservation or in the totals.
A reservation whose process died expires after ``ttl_s``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError

from shared.store import Store


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
        self._seq: dict[str, int] = {}  # the last number this process took, per user
        # This process takes a user's numbers one at a time: its own calls never collide.
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure_indexes(self) -> None:
        await self.coll.create_index([("user_id", ASCENDING), ("seq", DESCENDING)], name="by_user_seq")
        await self.coll.create_index([("expires", ASCENDING)], name="by_expiry")

    async def _last(self, user_id: str) -> int:
        doc = await self.coll.find_one({"user_id": user_id}, {"seq": 1}, sort=[("seq", DESCENDING)])
        return int(doc["seq"]) if doc else 0

    async def open(
        self, user_id: str, day: str, tokens: int, skip: Iterable[str] = ()
    ) -> tuple[Reservation, Ahead]:
        """Takes the user's next number for *tokens*, and sums what is reserved ahead of it
        (*skip*: reservations whose usage this process already counts)."""
        now = time.time()
        lock = self._locks.get(user_id)
        if lock is None:
            if len(self._locks) > 100_000:
                self._locks = {u: k for u, k in self._locks.items() if k.locked()}
            lock = self._locks[user_id] = asyncio.Lock()
        async with lock:
            doc, guessed = await self._take(user_id, day, tokens, now)
        seq = doc["seq"]
        skipped = set(skip)
        ahead = Ahead(0, 0)
        query = {"user_id": user_id, "month": day[:7], "expires": {"$gt": now}}
        async for d in self.coll.find(query, {"tokens": 1, "day": 1, "seq": 1, "owner": 1}):
            if d["_id"] in skipped or d["_id"] == doc["_id"]:
                continue  # this process counts those calls' usage itself
            if int(d.get("seq", 0)) > seq and (d.get("owner") == self.owner or not guessed):
                continue  # taken after this one: it counts this one, not the other way round
            ahead.month += int(d.get("tokens", 0))
            if d.get("day") == day:
                ahead.day += int(d.get("tokens", 0))
        return Reservation(doc["_id"], user_id, day, tokens), ahead

    async def _take(self, user_id: str, day: str, tokens: int, now: float) -> tuple[dict, bool]:
        """Inserts the user's next number. *guessed*: the number came from this process's
        memory, not from reading the highest one; another process may since have taken and
        given back the numbers above it, so its open ones with higher numbers are counted."""
        seq = self._seq.get(user_id)
        guessed = seq is not None
        if seq is None:
            seq = await self._last(user_id)
        for _ in range(64):
            seq += 1
            doc = {
                "_id": f"{user_id}:{seq}",
                "user_id": user_id,
                "seq": seq,
                "day": day,
                "month": day[:7],
                "tokens": tokens,
                "owner": self.owner,
                "expires": now + self.ttl_s,
            }
            try:
                await self.coll.insert_one(doc)
            except DuplicateKeyError:
                seq = await self._last(user_id)  # another process took it: go past the highest
                guessed = False
                continue
            self._seq[user_id] = seq
            if len(self._seq) > 100_000:
                self._seq = {user_id: seq}
            return doc, guessed
        raise RuntimeError(f"no reservation number for {user_id} after 64 tries")

    async def settle(self, ids: list[str]) -> None:
        """Deletes these reservations, one ``_id`` at a time (a constant cost on FerretDB)."""
        await asyncio.gather(*(self.coll.delete_one({"_id": i}) for i in ids))

    async def sweep(self) -> None:
        """Deletes the reservations of processes that died (expired)."""
        await self.coll.delete_many({"expires": {"$lt": time.time()}})


class LocalReservationBook:
    """The same reservations in this process's memory (ZAKI_BROKER_RESERVATIONS=process): no
    store round trip, for a platform that runs exactly one broker process."""

    def __init__(self) -> None:
        self._open: dict[str, dict[str, tuple[str, int]]] = {}  # user -> id -> (day, tokens)
        self._n = 0

    async def ensure_indexes(self) -> None:
        return None

    async def open(
        self, user_id: str, day: str, tokens: int, skip: Iterable[str] = ()
    ) -> tuple[Reservation, Ahead]:
        held = self._open.setdefault(user_id, {})
        skipped = set(skip)
        ahead = Ahead(0, 0)
        for rid, (d, n) in held.items():  # all are ahead of this one: taken before it
            if rid not in skipped and d[:7] == day[:7]:
                ahead.month += n
                ahead.day += n if d == day else 0
        self._n += 1
        rid = f"{user_id}:{self._n}"
        held[rid] = (day, tokens)
        return Reservation(rid, user_id, day, tokens), ahead

    async def settle(self, ids: list[str]) -> None:
        for rid in ids:
            user_id = rid.rsplit(":", 1)[0]
            held = self._open.get(user_id)
            if held is not None:
                held.pop(rid, None)
                if not held:
                    del self._open[user_id]

    async def sweep(self) -> None:
        return None
