"""Long-polls the Telegram bots of suspended gateways and asks for a wake on the first update.

Rules that keep every message for the gateway (issue 16, item 3):
- ``getUpdates`` is called without ``offset``: Telegram then answers from the first
  unconfirmed update and confirms nothing, so the update that wakes the gateway is still
  there when the gateway polls. Without ``allowed_updates`` too: Telegram remembers that
  parameter for later calls, and it is the gateway's to set.
- On the first update the bot's task ends *before* the wake is asked for: no second long
  poll of this bot is ever in flight when its gateway starts (two get 409 Conflict).
  ``release`` (the provisioner asks before it starts a gateway for any reason) cancels a
  poll in flight.
- One process, many bots: one task per bot, at most ``concurrency`` long polls in flight,
  exponential backoff with jitter on errors, Telegram's ``retry_after`` honoured on 429.
Tokens are never logged: an HTTP error is reported by its type only (its text holds the URL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client import Counter, Gauge

from shared.logging import redact

log = logging.getLogger("zaki.waker.telegram")

POLLS = Counter("zaki_waker_polls_total", "getUpdates long polls of suspended bots, by outcome", ["outcome"])
WATCHED = Gauge("zaki_waker_bots_watched", "Bots of suspended gateways being long-polled")
for _o in ("updates", "empty", "rate_limited", "conflict", "refused", "error"):
    POLLS.labels(_o)

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0


def backoff_s(failures: int, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter (between half and all of base * 2^(n-1), capped)."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))
    return ceiling * (0.5 + 0.5 * rand())


def retry_after_s(body: object, default: float) -> float:
    """Telegram's ``parameters.retry_after`` (seconds), bounded; *default* when absent."""
    params = body.get("parameters") if isinstance(body, dict) else None
    value = params.get("retry_after") if isinstance(params, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return min(float(value), 3600.0)
    return default


OnUpdate = Callable[[str], Awaitable[None]]
StillSuspended = Callable[[str], Awaitable[bool]]


class TelegramWakePoller:
    def __init__(
        self,
        api_base: str,
        on_update: OnUpdate,
        still_suspended: StillSuspended,
        poll_timeout_s: int = 25,
        concurrency: int = 500,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self.on_update = on_update
        self.still_suspended = still_suspended
        self.poll_timeout_s = poll_timeout_s
        self._sem = asyncio.Semaphore(concurrency)
        self.http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(poll_timeout_s + 15.0, connect=10.0),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            headers={"User-Agent": "zaki-waker"},
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def watching(self) -> set[str]:
        return set(self._tasks)

    def watch(self, user_id: str, token: str) -> bool:
        """Starts polling this user's bot unless it already is; True when it started."""
        if user_id in self._tasks:
            return False
        redact.register(token)
        task = asyncio.create_task(self._run(user_id, token), name=f"waker:{user_id}")
        self._tasks[user_id] = task
        WATCHED.set(len(self._tasks))
        task.add_done_callback(lambda t, u=user_id: self._done(u, t))
        return True

    def _done(self, user_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(user_id) is task:
            del self._tasks[user_id]
        WATCHED.set(len(self._tasks))
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "bot poller crashed", extra={"user_id": user_id, "error": type(task.exception()).__name__}
            )

    async def release(self, user_id: str) -> bool:
        """Stops polling this user's bot now (a poll in flight is abandoned); True if it was polled."""
        task = self._tasks.pop(user_id, None)
        WATCHED.set(len(self._tasks))
        if task is None:
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return True

    async def close(self) -> None:
        for user_id in list(self._tasks):
            await self.release(user_id)
        await self.http.aclose()

    async def _poll_once(self, token: str) -> tuple[int, object]:
        async with self._sem:
            r = await self.http.post(
                f"{self.api_base}/bot{token}/getUpdates",
                json={"timeout": self.poll_timeout_s, "limit": 1},
            )
        try:
            body: object = r.json()
        except ValueError:
            body = None
        return r.status_code, body

    async def _run(self, user_id: str, token: str) -> None:
        failures = 0
        while True:
            if not await self.still_suspended(user_id):
                return
            try:
                status, body = await self._poll_once(token)
            except httpx.HTTPError as e:
                failures += 1
                POLLS.labels("error").inc()
                log.warning("getUpdates failed", extra={"user_id": user_id, "error": type(e).__name__})
                await asyncio.sleep(backoff_s(failures))
                continue
            ok = isinstance(body, dict) and body.get("ok") is True
            if status == 200 and ok:
                failures = 0
                result = body.get("result") if isinstance(body, dict) else None
                if isinstance(result, list) and result:
                    POLLS.labels("updates").inc()
                    # Stop polling first (this task ends), then ask for the wake.
                    self._tasks.pop(user_id, None)
                    WATCHED.set(len(self._tasks))
                    log.info("telegram update for a suspended gateway", extra={"user_id": user_id})
                    await self.on_update(user_id)
                    return
                POLLS.labels("empty").inc()
                continue
            failures += 1
            if status == 429:
                POLLS.labels("rate_limited").inc()
                await asyncio.sleep(retry_after_s(body, backoff_s(failures)))
            elif status == 409:
                # Someone else polls this bot (its gateway still running, or a second waker).
                POLLS.labels("conflict").inc()
                log.warning("getUpdates conflict", extra={"user_id": user_id})
                await asyncio.sleep(backoff_s(failures))
            elif status in (401, 403, 404):
                POLLS.labels("refused").inc()
                log.warning("Telegram refused the bot token; not polling it", extra={"user_id": user_id})
                return
            else:
                POLLS.labels("error").inc()
                log.warning("getUpdates answered an error", extra={"user_id": user_id, "status": status})
                await asyncio.sleep(retry_after_s(body, backoff_s(failures)))
