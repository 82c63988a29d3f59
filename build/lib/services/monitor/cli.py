"""``zaki health``: every instance's state, last probe, restarts and reason."""

from __future__ import annotations

from shared.store import Store


async def print_health(store: Store) -> int:
    instances = {d["_id"]: d for d in await store.list_instances()}
    health = {d["_id"]: d async for d in store.db["health"].find({})}
    print(
        f"{'USER':<24} {'INSTANCE':<12} {'HEALTH':<13} {'LAST PROBE (UTC)':<20} {'MS':>7} {'RESTARTS':>8}  REASON"
    )
    for user_id, inst in sorted(instances.items()):
        h = health.get(user_id, {})
        if h.get("instance_id") not in (None, inst.get("instance_id")):
            h = {}
        state = h.get("state") or ("unknown" if inst["state"] == "running" else f"({inst['state']})")
        last = h.get("last_probe_at")
        print(
            f"{user_id:<24} {inst['state']:<12} {state:<13} {last.strftime('%Y-%m-%d %H:%M:%S') if last else '-':<20} "
            f"{h.get('last_probe_ms') or '-':>7} {h.get('restarts', 0):>8}  {h.get('reason') or ''}"
        )
    return 0
