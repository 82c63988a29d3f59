"""The account's API keys for the gateway proxy (``/v1/...``, WebSocket, Control UI): created
with scopes and shown once, listed, revoked. The key functions are the proxy's own
(services/gateway_proxy/keys.py); a revocation is announced on NATS so every proxy drops its
cached copy at once."""

from __future__ import annotations

from datetime import timedelta

from services.dashboard.errors import ApiError, not_found
from services.dashboard.models import CreatedKeyOut, CreateKeyIn, KeyOut, KeysOut
from services.dashboard.web import API, Ctx
from services.gateway_proxy import keys as api_keys
from shared import subjects

MAX_ACTIVE_KEYS = 20


def _state(k: api_keys.ApiKey) -> str:
    return "revoked" if k.revoked else ("active" if k.usable() else "expired")


@API.route("GET", "/api/keys", summary="The account's API keys (never the secret)", tag="keys", out=KeysOut)
async def list_keys(ctx: Ctx) -> KeysOut:
    docs = ctx.deps.store.api_keys.find({"user_id": ctx.user_id}).sort("created_at", 1)
    out = []
    async for d in docs:
        k = api_keys._to_key(d)
        out.append(
            KeyOut(
                id=k.key_id,
                scopes=sorted(k.scopes),
                created_at=d.get("created_at"),
                expires_at=k.expires_at,
                state=_state(k),  # type: ignore[arg-type]
            )
        )
    return KeysOut(keys=out)


@API.route(
    "POST",
    "/api/keys",
    summary="Create an API key (shown once)",
    tag="keys",
    body=CreateKeyIn,
    status=201,
    out=CreatedKeyOut,
    errors=(409,),
)
async def create_key(ctx: Ctx) -> CreatedKeyOut:
    d, b = ctx.deps, ctx.body
    active = [k for k in await api_keys.list_keys(d.store, ctx.user_id) if k.usable()]
    if len(active) >= MAX_ACTIVE_KEYS:
        raise ApiError(409, "too_many_keys", f"at most {MAX_ACTIVE_KEYS} active keys; revoke one first")
    expires = timedelta(days=b.expires_days) if b.expires_days else None
    try:
        key_id, key = await api_keys.create_key(d.store, ctx.user_id, set(b.scopes), expires)
    except api_keys.KeyError_ as e:
        raise ApiError(400, "invalid_scopes", str(e), "scopes") from None
    doc = await d.store.api_keys.find_one({"_id": key_id})
    return CreatedKeyOut(
        id=key_id, key=key, scopes=sorted(b.scopes), expires_at=(doc or {}).get("expires_at")
    )


async def revoke(deps, user_id: str | None, key_id: str) -> None:
    """Revokes *key_id* if it belongs to *user_id* (None: any user's, for operators)."""
    doc = await deps.store.api_keys.find_one({"_id": key_id}) if len(key_id) <= 64 else None
    if doc is None or (user_id is not None and doc.get("user_id") != user_id):
        raise not_found("no such key")  # another account's key is "not found", never "forbidden"
    await api_keys.revoke(deps.store, key_id)
    if deps.nc is None or not deps.nc.is_connected:
        raise ApiError(
            503, "unavailable", "revoked, but the proxies could not be told; they drop it within 30 s"
        )
    await deps.nc.publish(subjects.APIKEY_REVOKED, key_id.encode())
    await deps.nc.flush()


@API.route("DELETE", "/api/keys/{key_id}", summary="Revoke an API key", tag="keys", status=204, errors=(404,))
async def revoke_key(ctx: Ctx) -> None:
    await revoke(ctx.deps, ctx.user_id, ctx.request.match_info["key_id"])
