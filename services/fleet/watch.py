"""What the gate looks at (plan.Observation), read from the store: each touched instance's
record, the monitor's health for its current incarnation, and the proxy's and broker's answer
counts since it got ready on the new image (shared/activity.py ``traffic``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.fleet.plan import NONE, Limits, Observation, Status
from shared.activity import traffic_since
from shared.settings import ZakiSettings
from shared.store import Store


def limits_from(s: ZakiSettings) -> Limits:
    return Limits(s.fleet_max_proxy_5xx_rate, s.fleet_max_broker_error_rate, s.fleet_min_samples)


def limits_of(doc: dict[str, Any]) -> Limits:
    """The rollout's limits, fixed when it was created (a resumed one keeps them)."""
    return Limits(**doc["limits"]) if doc.get("limits") else Limits()


def _aware(at: Any) -> datetime | None:
    if not isinstance(at, datetime):
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


async def observe(store: Store, doc: dict[str, Any]) -> dict[str, Observation]:
    """What the platform records now about every instance the rollout touched."""
    out = {}
    upgraded_at: dict[str, datetime] = {}
    for user, entry in doc["instances"].items():
        status = Status(entry["status"])
        if status == Status.PENDING:
            continue
        record = await store.get_instance(user)
        health = None
        at = _aware(entry.get("at"))
        if record is not None:
            h = await store.db["health"].find_one({"_id": user})
            fresh = h and at and _aware(h.get("updated_at")) and _aware(h["updated_at"]) >= at
            if h and h.get("instance_id") == record.get("instance_id") and fresh:
                health = h.get("state")
        if status == Status.UPGRADED and at is not None:
            upgraded_at[user] = at  # answers from then on are the new image's
        out[user] = Observation(status, record and record["state"], record and record.get("image"), health)
    counts = await traffic_since(store.db, upgraded_at)
    for user, per in counts.items():
        o = out[user]
        out[user] = Observation(
            o.status, o.state, o.image, o.health, per.get("proxy", NONE), per.get("broker", NONE)
        )
    return out
