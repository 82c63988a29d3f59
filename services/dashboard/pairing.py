"""Pending Telegram pairing requests (strangers who wrote to the bot), approved or dismissed by
the agent's owner from the pages: the gateway's ``channels.pairing.*`` RPC, which needs
``operator.pairing``. Only the dashboard's own identity has that scope (see gateway_rpc.py), and
only an account's owner reaches its agent here (the user id comes from the session)."""

from __future__ import annotations

from typing import Any

from services.dashboard.errors import not_found
from services.dashboard.gateway_rpc import rpc
from services.dashboard.models import OkOut, PairingActionIn, PairingListOut, PairingRequest
from services.dashboard.web import API, Ctx


def _request(r: dict[str, Any]) -> PairingRequest:
    meta = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
    return PairingRequest(
        request_id=str(r.get("requestId", "")),
        channel=str(r.get("channel", "")),
        account_id=str(r.get("accountId", "")),
        sender_id=str(r.get("senderId", "")),
        metadata={str(k): str(v) for k, v in meta.items()},
        created_at=r.get("createdAt"),
        expires_at=r.get("expiresAt"),
    )


async def pending(ctx: Ctx) -> list[dict[str, Any]]:
    (listed,) = await rpc(ctx.deps, ctx.user_id, [("channels.pairing.list", {})], pairing=True)
    return [r for r in listed.get("requests", []) if isinstance(r, dict)]


@API.route(
    "GET",
    "/api/agent/pairing",
    summary="Pending pairing requests of the agent's bot",
    tag="pairing",
    out=PairingListOut,
    errors=(409, 502),
)
async def list_pairing(ctx: Ctx) -> PairingListOut:
    return PairingListOut(requests=[_request(r) for r in await pending(ctx)])


async def _act(ctx: Ctx, method: str) -> OkOut:
    wanted: str = ctx.body.request_id
    match = next((r for r in await pending(ctx) if r.get("requestId") == wanted), None)
    if match is None:
        raise not_found("no such pending pairing request")
    params: dict[str, Any] = {
        "channel": match["channel"],
        "accountId": match["accountId"],
        "requestId": wanted,
    }
    if method == "channels.pairing.approve":
        params["notify"] = True  # the stranger is told they may talk now
    await rpc(ctx.deps, ctx.user_id, [(method, params)], pairing=True)
    return OkOut(ok=True)


@API.route(
    "POST",
    "/api/agent/pairing/approve",
    summary="Let this sender talk to the bot",
    tag="pairing",
    body=PairingActionIn,
    out=OkOut,
    errors=(404, 409, 502),
)
async def approve_pairing(ctx: Ctx) -> OkOut:
    return await _act(ctx, "channels.pairing.approve")


@API.route(
    "POST",
    "/api/agent/pairing/dismiss",
    summary="Dismiss a pairing request",
    tag="pairing",
    body=PairingActionIn,
    out=OkOut,
    errors=(404, 409, 502),
)
async def dismiss_pairing(ctx: Ctx) -> OkOut:
    return await _act(ctx, "channels.pairing.dismiss")
