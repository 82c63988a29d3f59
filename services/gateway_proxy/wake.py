"""Requests for a gateway that is asleep or on its way up are held, not refused (issue 16).

A request (HTTP, SSE or WebSocket) for a ``suspended`` instance asks the provisioner for a
wake (``instance.wake``, once per tenant however many requests arrive) and waits until the
instance is routed again (``instance.ready``). One for an instance that is starting, or
whose gateway refuses connections while its record says running (Docker restarting it
after a crash), waits the same way. Bounded: at most ``ZAKI_WAKE_QUEUE_PER_TENANT``
requests wait per tenant and none longer than ``ZAKI_WAKE_TIMEOUT_S``; past either, 503
with the state and ``Retry-After``, never a bare 502 or a hang. A user's own ``stopped``
is never woken: it answers 503 ``stopped`` at once.

``ACTIVITY`` is this process's activity recorder (``shared/activity.py``): every routed
request touches it, every open WebSocket holds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from services.gateway_proxy.route import Route
from shared import audit, subjects
from shared.activity import ActivityRecorder
from shared.bus import to_json
from shared.events import InstanceWake, WakeReason
from shared.settings import ZakiSettings
from shared.store import Store


class RoutingTable(Protocol):
    """What a waiter uses of the routing table (routing.RoutingTable, which imports this
    module: a protocol here keeps the two out of an import cycle)."""

    routes: dict[str, Route]
    store: Store
    gate: WakeGate | None

    def adopt(self, doc: dict) -> Route: ...


log = logging.getLogger("zaki.proxy.wake")

ACTIVITY = ActivityRecorder("proxy")

HELD = Gauge("zaki_proxy_held_requests", "Requests waiting for a gateway to wake or come back")
HOLD_OUTCOMES = Counter(
    "zaki_proxy_hold_total", "Requests held for a waking or restarting gateway, by outcome", ["outcome"]
)
WAKES_ASKED = Counter("zaki_proxy_wakes_requested_total", "Wakes the proxy asked for")
for _o in ("served", "timeout", "queue_full", "gone"):
    HOLD_OUTCOMES.labels(_o)

# States a request waits through. "restarting" is the proxy's own name for a gateway whose
# record says running while it refuses connections. A brand-new instance (requested,
# provisioning) still answers 503 with Retry-After at once: its client asked for a new gateway.
WAKES = "suspended"
HOLDS = frozenset({"suspended", "starting", "restarting"})
RECHECK_S = 1.0  # how often a waiter looks at the record itself (a missed event, a crash-restart)
# A gateway that refuses connections while its record says running comes back only if Docker or
# the monitor restarts it (``docker kill`` is a manual stop to Docker): wait this long at most,
# then 503 "restarting" with Retry-After rather than what looks like a hang to a client.
RESTART_HOLD_S = 10.0

AskWake = Callable[[str], Awaitable[None]]


class Gone(Exception):
    """The instance will not come back for this request: answer 503 with *state*."""

    def __init__(self, state: str | None) -> None:
        super().__init__(state or "absent")
        self.state = state


class WakeGate:
    def __init__(self, timeout_s: float, queue_per_tenant: int, ask_wake: AskWake) -> None:
        self.timeout_s = timeout_s
        self.queue = queue_per_tenant
        self.ask_wake = ask_wake
        self._events: dict[str, asyncio.Event] = {}
        self._held: Tally[str] = Tally()
        self._asked: dict[str, float] = {}

    def ready(self, user_id: str) -> None:
        """The instance is routed again: every waiter goes on (and its next sleep gets a new wake)."""
        self._asked.pop(user_id, None)
        ev = self._events.pop(user_id, None)
        if ev is not None:
            ev.set()

    async def _ask(self, user_id: str) -> None:
        at = self._asked.get(user_id)
        if at is not None and time.monotonic() - at < self.timeout_s:
            return  # asked already; the provisioner boots it once anyway
        self._asked[user_id] = time.monotonic()
        WAKES_ASKED.inc()
        try:
            await self.ask_wake(user_id)
        except Exception as e:  # NATS down: the waiters time out with a 503
            self._asked.pop(user_id, None)
            log.warning("could not ask for a wake", extra={"tenant": user_id, "error": type(e).__name__})

    async def hold(
        self, routes: RoutingTable, user_id: str, state: str | None, stale: Route | None = None
    ) -> Route:
        """Waits until *user_id* has a route that answers; raises Gone when it will not in time.

        *stale* is a route whose gateway refused a connection while its record said running.
        """
        if self._held[user_id] >= self.queue:
            HOLD_OUTCOMES.labels("queue_full").inc()
            raise Gone(state)
        self._held[user_id] += 1
        HELD.inc()
        try:
            return await self._wait(routes, user_id, state, stale)
        finally:
            HELD.dec()
            self._held[user_id] -= 1
            if self._held[user_id] <= 0:
                del self._held[user_id]

    async def _wait(
        self, routes: RoutingTable, user_id: str, state: str | None, stale: Route | None
    ) -> Route:
        deadline = time.monotonic() + (
            self.timeout_s if stale is None else min(self.timeout_s, RESTART_HOLD_S)
        )
        if state == WAKES:
            await self._ask(user_id)
        while True:
            route = routes.routes.get(user_id)
            if route is not None and route != stale:
                HOLD_OUTCOMES.labels("served").inc()
                return route
            if stale is not None and await _listening(stale):
                HOLD_OUTCOMES.labels("served").inc()
                return stale
            left = deadline - time.monotonic()
            if left <= 0:
                HOLD_OUTCOMES.labels("timeout").inc()
                raise Gone(state)
            ev = self._events.setdefault(user_id, asyncio.Event())
            try:
                await asyncio.wait_for(ev.wait(), min(left, RECHECK_S if stale is None else 0.25))
                continue
            except TimeoutError:
                if time.monotonic() >= deadline:
                    continue  # out of time: answered at the top, no last look or ask
            # No event (another replica's, a NATS blip, or a crash-restart): ask the record.
            doc = await routes.store.get_instance(user_id)
            now_state = doc["state"] if doc else None
            if now_state == "running" and doc and doc.get("port"):
                route = routes.adopt(doc)
                if stale is None or route != stale:
                    HOLD_OUTCOMES.labels("served").inc()
                    return route
            elif now_state not in HOLDS:
                HOLD_OUTCOMES.labels("gone").inc()
                raise Gone(now_state)
            elif now_state == WAKES:
                await self._ask(user_id)
            if now_state is not None:
                state = now_state if now_state != "running" else "restarting"


async def _listening(route: Route) -> bool:
    """Whether the gateway answers again (a crash-restart is over). An HTTP /healthz, not a bare
    connect: Docker's port proxy accepts connections before the gateway inside listens."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(route.host, route.port), 0.5)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.0\r\nHost: gateway\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 1.0)
        return line.startswith(b"HTTP/1.") and line[9:12] == b"200"
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


def install(routes: RoutingTable, nc: Any, settings: ZakiSettings) -> asyncio.Task[None]:
    """Wires the hold into *routes* (wakes asked over JetStream on *nc*) and starts the
    activity flusher; returns its task (cancel it at shutdown: it flushes once more)."""
    js = nc.jetstream()

    async def ask_wake(user_id: str) -> None:
        event = InstanceWake(
            user_id=user_id,
            cause=WakeReason.REQUEST,
            reason="proxy: a request arrived",
            actor=audit.platform("proxy", "a request arrived"),
        )
        await js.publish(subjects.INSTANCE_WAKE, to_json(event))

    routes.gate = WakeGate(settings.wake_timeout_s, settings.wake_queue_per_tenant, ask_wake)
    return asyncio.create_task(ACTIVITY.run(routes.store.db, settings.activity_flush_s))
