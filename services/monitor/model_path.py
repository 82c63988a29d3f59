"""The model path as the monitor sees it: the broker marks an instance whose gateway's model
calls it refuses (services/llm_broker/model_path.py); such an instance answers its probes
but cannot work, so it is unhealthy with this reason until a call passes or its container
starts afresh (a new start may be on a corrected network)."""

from __future__ import annotations

from typing import Any

from shared.store import Store

REASON = "model_path_refused"


async def refused(store: Store) -> dict[str, dict[str, Any]]:
    """user id -> the broker's mark, for every instance whose model calls are refused."""
    return {d["_id"]: d async for d in store.model_path.find({"state": "refused"})}


def detail(mark: dict[str, Any]) -> str:
    return (
        f"the LLM broker refuses this gateway's model calls: they come from {mark.get('source')}, "
        f"outside the instance's network {mark.get('subnet')}"
    )


async def forget(store: Store, user_id: str, instance_id: str) -> None:
    await store.model_path.delete_one({"_id": user_id, "instance_id": instance_id})
