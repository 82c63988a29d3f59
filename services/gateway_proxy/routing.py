"""The routing table: user id -> where that user's gateway answers.

Loaded from MongoDB at start, then kept current from ``instance.ready`` /
``instance.stopped`` / ``instance.deleted`` events, so no request waits on the database.
A miss is looked up once and cached briefly (to say *why* there is no route)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.state import InstanceState
from shared.store import Store

MISS_TTL_S = 2.0


@dataclass(frozen=True)
class Route:
    user_id: str
    host: str
    port: int
    instance_id: str


class NoRoute(Exception):
    def __init__(self, state: str | None) -> None:
        super().__init__(state or "absent")
        self.state = state


class RoutingTable:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.routes: dict[str, Route] = {}
        self._misses: dict[str, tuple[float, str | None]] = {}

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

    def on_gone(self, user_id: str, state: str | None) -> None:
        self.routes.pop(user_id, None)
        self._misses[user_id] = (time.monotonic() + MISS_TTL_S, state)

    async def resolve(self, user_id: str) -> Route:
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
        raise NoRoute(miss[1])
