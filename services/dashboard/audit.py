"""Every operator action, recorded with actor, time and target: in the store collection ``audit``
and in the platform's audit trail (the ZAKI_AUDIT stream, shared/audit.py), which the admin
audit route reads (the collection only when NATS is unreachable)."""

from __future__ import annotations

from typing import Any

from pymongo import DESCENDING

from shared import audit as trail
from shared.events import Actor, ActorKind
from shared.store import Store, utcnow


def audit(store: Store):
    return store.db["audit"]


async def ensure_indexes(store: Store) -> None:
    await audit(store).create_index([("at", DESCENDING)], name="by_time")


async def record(
    store: Store,
    actor: str,
    action: str,
    target: str,
    detail: dict[str, Any] | None = None,
    actor_name: str | None = None,
) -> None:
    """Written before the action's answer: an action that is not recorded did not happen."""
    await audit(store).insert_one(
        {
            "at": utcnow(),
            "actor": actor,
            "actor_name": actor_name,
            "action": action,
            "target": target,
            "detail": detail or {},
        }
    )
    await trail.action(
        dashboard_actor(actor, actor_name), action, target, {**(detail or {}), "actor_name": actor_name}
    )


def dashboard_actor(account_id: str, name: str | None = None) -> Actor:
    """A dashboard account as an audit actor (``cli`` when the zaki admin command acted)."""
    if account_id == "cli":
        return Actor(kind=ActorKind.CLI, id="zaki-admin")
    return Actor(kind=ActorKind.DASHBOARD, id=account_id, reason=f"operator {name}" if name else None)


async def recent(store: Store, limit: int = 100) -> list[dict[str, Any]]:
    return [d async for d in audit(store).find({}, {"_id": 0}).sort("at", DESCENDING).limit(limit)]
