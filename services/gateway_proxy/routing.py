"""The routing table: user id -> where that user's gateway answers.

Loaded from MongoDB at start, then kept current from ``instance.ready`` /
``instance.stopped`` / ``instance.deleted`` events, so no request waits on the database.
A miss is looked up once and cached briefly (to say *why* there is no route)."""

from __future__ import annotations

import time

from services.gateway_proxy.route import NoRoute, Route
from services.gateway_proxy.wake import ACTIVITY, HOLDS, Gone, WakeGate
from shared.state import InstanceState
from shared.store import Store

__all__ = ["NoRoute", "Route", "RoutingTable"]

MISS_TTL_S = 2.0


class RoutingTable:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.routes: dict[str, Route] = {}
        self._misses: dict[str, tuple[float, str | None]] = {}
        self.gate: WakeGate | None = None  # holds requests for a sleeping or restarting gateway

    def _route(self, doc: dict) -> Route:
        return Route(doc["_id"], doc.get("host", "127.0.0.1"), int(doc["port"]), doc["instance_id"])

    async def load(self) -> None:
        docs = await self.store.list_instances(states=[InstanceState.RUNNING.value])
        self.routes = {d["_id"]: self._route(d) for d in docs if d.get("port")}
        self._misses.clear()

    def on_ready(self, user_id: str, docker_host: str, host: str, port: int, instance_id: str) -> None:
        self.routes[user_id] = self._route(
            {
                "_id": user_id,
                "docker_host": docker_host,
                "host": host,
                "port": port,
                "instance_id": instance_id,
            }
        )
        self._misses.pop(user_id, None)
        if self.gate is not None:
            self.gate.ready(user_id)

    def adopt(self, doc: dict) -> Route:
        """A running record seen by a waiter: route it (its ready event may have gone elsewhere)."""
        route = self._route(doc)
        self.routes[doc["_id"]] = route
        self._misses.pop(doc["_id"], None)
        return route

    def on_gone(self, user_id: str, state: str | None) -> None:
        self.routes.pop(user_id, None)
        self._misses[user_id] = (time.monotonic() + MISS_TTL_S, state)

    async def resolve(self, user_id: str) -> Route:
        ACTIVITY.touch(user_id)
        route = self.routes.get(user_id)
        if route is not None:
            return route
        now = time.monotonic()
        miss = self._misses.get(user_id)
        if miss is None or miss[0] < now:
            doc = await self.store.get_instance(user_id)
            if doc is not None and doc["state"] == InstanceState.RUNNING and doc.get("port"):
                route = self._route(doc)
                self.routes[user_id] = route
                return route
            miss = (now + MISS_TTL_S, doc["state"] if doc else None)
            self._misses[user_id] = miss
        if self.gate is not None and miss[1] in HOLDS:
            try:
                return await self.gate.hold(self, user_id, miss[1])
            except Gone as e:
                raise NoRoute(e.state) from None
        raise NoRoute(miss[1])

    async def recover(self, user_id: str, route: Route) -> Route:
        """*route*'s gateway refused a connection: a route to retry once it is back (held,
        bounded), or NoRoute with the state to answer."""
        doc = await self.store.get_instance(user_id)
        state = doc["state"] if doc else None
        if state != InstanceState.RUNNING:
            self.on_gone(user_id, state)
        if self.gate is None or (state not in HOLDS and state != InstanceState.RUNNING):
            raise NoRoute(state)
        try:
            if state == InstanceState.RUNNING:  # Docker is restarting it after a crash
                return await self.gate.hold(self, user_id, "restarting", stale=route)
            return await self.gate.hold(self, user_id, state)
        except Gone as e:
            raise NoRoute(e.state) from None
