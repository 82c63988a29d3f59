"""Per-user budgets: requests per minute and tokens per day and month.

The ledger keeps each active user's totals in memory: what MongoDB said at the last
refresh plus what this process has counted since. Counted usage is written back by
group commit: the calls that end together share one atomic ``$inc`` per user and day,
written before their last byte goes out, so a busy broker does not write once per call
and a crash never loses a completed call.

Before a call with a token limit goes out it reserves an estimate of its tokens in the
store (services/llm_broker/reservations.py); the flush that writes its real usage settles
the reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.llm_broker.reservations import LocalReservationBook, Reservation, ReservationBook
from shared.events import BudgetLimit
from shared.ratelimit import TokenBucket
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.broker.budget")

REFRESH_S = 2.0  # how stale another process's usage may be in this one's view
RESERVED_RETRY_S = 2  # Retry-After when only the calls in flight fill a limit
SWEEP_S = 60.0  # how often the reservations of dead processes are deleted


@dataclass(frozen=True)
class BudgetPolicy:
    requests_per_minute: int = 0  # 0: unlimited
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    soft_ratio: float = 0.8

    @classmethod
    def effective(cls, own: dict[str, Any] | None, s: ZakiSettings) -> BudgetPolicy:
        """The instance's own budget where it sets a field, the platform default elsewhere."""
        own = own or {}
        return cls(
            requests_per_minute=int(own.get("requests_per_minute") or s.budget_requests_per_minute),
            tokens_per_day=int(own.get("tokens_per_day") or s.budget_tokens_per_day),
            tokens_per_month=int(own.get("tokens_per_month") or s.budget_tokens_per_month),
            soft_ratio=float(own.get("soft_ratio") or s.budget_soft_ratio),
        )


@dataclass(frozen=True)
class Verdict:
    limit: BudgetLimit
    used: int
    allowed: int
    period: str
    retry_after_s: int


def today(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y-%m-%d")


def seconds_to_next(period: str, now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    if len(period) == 10:  # a day
        end = now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() + 86400
    else:  # a month
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        end = now.replace(
            year=year, month=month, day=1, hour=0, minute=0, second=0, microsecond=0
        ).timestamp()
    return max(1, int(end - now.timestamp()))


@dataclass
class _Totals:
    day: str
    day_tokens: int = 0  # from the database at the last refresh
    month_tokens: int = 0
    fetched: float = 0.0


@dataclass
class _Pending:
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    reservations: list[str] = field(default_factory=list)


class UsageLedger:
    def __init__(
        self,
        store: Store,
        flush_interval_s: float = 1.0,
        reservation_ttl_s: float = 660.0,
        shared_reservations: bool = True,
    ) -> None:
        self.store = store
        self.shared = shared_reservations
        self.reservations: ReservationBook | LocalReservationBook = (
            ReservationBook(store, reservation_ttl_s) if shared_reservations else LocalReservationBook()
        )
        # Reservations whose usage this process has counted but not yet settled in the store.
        self.counted: set[str] = set()
        self.flush_interval_s = flush_interval_s
        self.totals: dict[str, _Totals] = {}
        # Counted but not yet written, per (user, day); unflushed: written, not yet re-read.
        self.pending: dict[tuple[str, str], _Pending] = defaultdict(_Pending)
        self.unflushed: dict[tuple[str, str], int] = defaultdict(int)
        self.buckets: dict[str, TokenBucket] = {}
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._unsettled: list[str] = []
        self._writing: dict[tuple[str, str], _Pending] = {}
        self._swept = time.monotonic()
        self._batch: asyncio.Future[None]
        self._wake: asyncio.Event

    # --- reading ----------------------------------------------------------------------------

    async def used(self, user_id: str, day: str, fresh: bool = False) -> tuple[int, int]:
        """Tokens used today and this month, as this process best knows them (*fresh*: the
        database's totals read now, not up to REFRESH_S ago)."""
        t = self.totals.get(user_id)
        if fresh or t is None or t.day != day or time.monotonic() - t.fetched > REFRESH_S:
            day_tokens, month_tokens = await self.store.usage_totals(user_id, day)
            t = self.totals[user_id] = _Totals(day, day_tokens, month_tokens, time.monotonic())
            # What this process wrote since is now part of the database's numbers.
            for key in [k for k in self.unflushed if k[0] == user_id]:
                del self.unflushed[key]
        local_day = self._local(user_id, day)
        local_month = sum(
            self._local(user_id, d)
            for (u, d) in {*self.pending, *self._writing, *self.unflushed}
            if u == user_id and d[:7] == day[:7]
        )
        return t.day_tokens + local_day, t.month_tokens + local_month

    def _local(self, user_id: str, day: str) -> int:
        n = self.unflushed.get((user_id, day), 0)
        for batch in (self.pending, self._writing):
            p = batch.get((user_id, day))
            n += p.prompt + p.completion if p else 0
        return n

    async def check(self, user_id: str, policy: BudgetPolicy, now: datetime | None = None) -> Verdict | None:
        """The first hard limit this call would break, or None."""
        now = now or datetime.now(UTC)
        if policy.requests_per_minute:
            bucket = self.buckets.get(user_id)
            if bucket is None or bucket.burst != policy.requests_per_minute:
                bucket = self.buckets[user_id] = TokenBucket(
                    policy.requests_per_minute / 60.0, policy.requests_per_minute
                )
            wait = bucket.take()
            if wait:
                return Verdict(
                    BudgetLimit.REQUESTS_PER_MINUTE,
                    policy.requests_per_minute,
                    policy.requests_per_minute,
                    now.strftime("%Y-%m-%dT%H:%M"),
                    max(1, round(wait)),
                )
        if not (policy.tokens_per_day or policy.tokens_per_month):
            return None
        day = today(now)
        day_used, month_used = await self.used(user_id, day)
        if policy.tokens_per_day and day_used >= policy.tokens_per_day:
            return Verdict(
                BudgetLimit.TOKENS_PER_DAY, day_used, policy.tokens_per_day, day, seconds_to_next(day, now)
            )
        if policy.tokens_per_month and month_used >= policy.tokens_per_month:
            month = day[:7]
            return Verdict(
                BudgetLimit.TOKENS_PER_MONTH,
                month_used,
                policy.tokens_per_month,
                month,
                seconds_to_next(month, now),
            )
        return None

    async def reserve(
        self, user_id: str, policy: BudgetPolicy, tokens: int, now: datetime | None = None
    ) -> Reservation | Verdict:
        """Holds *tokens* for a call about to go out, or the limit that the reservations of
        the calls ahead of it (in any process) already fill."""
        now = now or datetime.now(UTC)
        day = today(now)
        r, ahead = await self.reservations.open(user_id, day, tokens, self.counted)
        # After the reservations: a call that ended meanwhile (in any process) wrote its usage
        # before giving its reservation back, so it is counted one way or the other.
        day_used, month_used = await self.used(user_id, day, fresh=self.shared)
        for limit, used, allowed, period in (
            (BudgetLimit.TOKENS_PER_DAY, day_used + ahead.day, policy.tokens_per_day, day),
            (BudgetLimit.TOKENS_PER_MONTH, month_used + ahead.month, policy.tokens_per_month, day[:7]),
        ):
            if allowed and used >= allowed:
                await self.release(r)
                # The calls in flight may use less than they hold: worth a retry soon.
                return Verdict(limit, used, allowed, period, RESERVED_RETRY_S)
        return r

    async def release(self, r: Reservation) -> None:
        """Gives back the reservation of a call that was refused, failed or not counted."""
        if not r.done:
            r.done = True
            try:
                await self.reservations.settle([r.id])
            except Exception:
                log.warning("reservation release failed; it expires", extra={"user_id": r.user_id})

    async def soft_crossed(
        self, user_id: str, policy: BudgetPolicy, now: datetime | None = None
    ) -> Verdict | None:
        """A token limit whose soft share is now reached (checked after a call is counted)."""
        day = today(now)
        day_used, month_used = await self.used(user_id, day)
        for limit, used, allowed, period in (
            (BudgetLimit.TOKENS_PER_DAY, day_used, policy.tokens_per_day, day),
            (BudgetLimit.TOKENS_PER_MONTH, month_used, policy.tokens_per_month, day[:7]),
        ):
            if allowed and used >= allowed * policy.soft_ratio:
                return Verdict(limit, used, allowed, period, 0)
        return None

    # --- writing ----------------------------------------------------------------------------

    def record(
        self,
        user_id: str,
        prompt: int,
        completion: int,
        now: datetime | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        p = self.pending[(user_id, today(now))]
        p.requests += 1
        p.prompt += prompt
        p.completion += completion
        if reservation is not None and not reservation.done:
            reservation.done = True  # settled by the flush that writes this usage
            p.reservations.append(reservation.id)
            self.counted.add(reservation.id)

    async def flush(self) -> None:
        await self.write_usage()
        await self.settle()

    async def write_usage(self) -> None:
        async with self._lock:  # one writer per process: increments never race each other here
            batch, self.pending = self.pending, defaultdict(_Pending)
            self._writing = dict(batch)  # still counted while the write is on its way
            for (user_id, day), p in batch.items():
                try:
                    await self.store.add_usage(user_id, day, p.requests, p.prompt, p.completion)
                except Exception:
                    # Keep it for the next flush: usage is never dropped for a database hiccup.
                    log.warning("usage flush failed; will retry", extra={"user_id": user_id})
                    q = self.pending[(user_id, day)]
                    q.requests += p.requests
                    q.prompt += p.prompt
                    q.completion += p.completion
                    q.reservations += p.reservations
                    del self._writing[(user_id, day)]
                    continue
                self.unflushed[(user_id, day)] += p.prompt + p.completion
                del self._writing[(user_id, day)]
                self._unsettled += p.reservations

    async def settle(self) -> None:
        """Settles the reservations whose usage is written (never before: until then they hold
        their tokens for the other processes; this one skips them, it counts their usage)."""
        ids, self._unsettled = self._unsettled, []
        try:
            await self.reservations.settle(ids)
            self.counted.difference_update(ids)
        except Exception:
            log.warning("settling reservations failed; will retry")
            self._unsettled = ids + self._unsettled
        if time.monotonic() - self._swept > SWEEP_S:
            self._swept = time.monotonic()
            with contextlib.suppress(Exception):
                await self.reservations.sweep()

    async def record_durably(
        self,
        user_id: str,
        prompt: int,
        completion: int,
        wait_s: float = 2.0,
        reservation: Reservation | None = None,
    ) -> bool:
        """Counts a call and waits until its usage is in the database (group commit: calls
        that end together share one write per user). The broker awaits this before the last
        byte of an answer, so a completed call is never lost to a crash of the broker. A
        database that does not answer within *wait_s* only delays the write, not the answer."""
        self.record(user_id, prompt, completion, reservation=reservation)
        done = self._batch
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(done), wait_s)
        except TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            done, self._batch = self._batch, asyncio.get_running_loop().create_future()
            await self.write_usage()
            done.set_result(None)  # the answers may end: their usage is written
            await self.settle()

    def start(self) -> None:
        self._batch = asyncio.get_running_loop().create_future()
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()
