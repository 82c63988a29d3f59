"""The dashboard's own WebSocket RPC line to a user's gateway, in trusted-proxy mode.

It asserts a second identity, ``dashboard.<user id>@zaki.local``, distinct from the one the
gateway proxy asserts for the user's own clients (``<user id>@zaki.local``). The gateway grants
scopes per identity (``gateway.auth.identityScopes``), so ``operator.pairing`` can be granted to
this path only: a user's API key or Control UI session through the proxy never gets it. The
gateway's config must list this identity in ``trustedProxy.allowUsers`` and
``identityScopes``: services/provisioner/config.py writes both (shared/gateway.py names them).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp

from services.dashboard.errors import ApiError
from shared.gateway import (
    DASHBOARD_SCOPES,
    GATEWAY_SCOPES,
    REQUIRED_HEADERS,
    USER_HEADER,
    attributable_ip,
    dashboard_identity,
    gateway_identity,
)

CLIENT = {"id": "gateway-client", "version": "0.1.0", "platform": "linux", "mode": "backend"}
CONNECT_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 15.0


class GatewayError(Exception):
    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def _headers(identity: str) -> dict[str, str]:
    headers = {USER_HEADER: identity, "x-forwarded-for": attributable_ip(None)}
    for h in REQUIRED_HEADERS:
        headers.setdefault(h, "https" if h == "x-forwarded-proto" else "1")
    return headers


async def call(
    http: aiohttp.ClientSession,
    host: str,
    port: int,
    identity: str,
    scopes: tuple[str, ...],
    calls: list[tuple[str, dict[str, Any]]],
) -> list[Any]:
    """Connects, runs the calls in order and returns their payloads; raises GatewayError on the
    first refused one."""
    url = f"ws://{host}:{port}/"
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S + CALL_TIMEOUT_S * len(calls)):
            async with http.ws_connect(
                url, headers=_headers(identity), max_msg_size=32 << 20, autoping=True
            ) as ws:
                hello = await _request(
                    ws,
                    "connect",
                    {
                        "minProtocol": 4,
                        "maxProtocol": 4,
                        "client": CLIENT,
                        "role": "operator",
                        "scopes": list(scopes),
                        "caps": [],
                    },
                )
                granted = set((hello.get("auth") or {}).get("scopes") or ())
                missing = [s for s in scopes if s not in granted]
                if missing:
                    raise GatewayError("MISSING_SCOPE", f"the gateway did not grant {', '.join(missing)}")
                return [await _request(ws, method, params) for method, params in calls]
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        raise GatewayError("UNREACHABLE", f"the gateway did not answer ({type(e).__name__})") from None


async def _request(ws: aiohttp.ClientWebSocketResponse, method: str, params: dict[str, Any]) -> Any:
    rid = uuid.uuid4().hex
    await ws.send_str(json.dumps({"type": "req", "id": rid, "method": method, "params": params}))
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        try:
            frame = json.loads(msg.data)
        except ValueError:
            continue
        if frame.get("type") != "res" or frame.get("id") != rid:
            continue  # events (connect.challenge, tick, health ...) interleave
        if frame.get("ok"):
            return frame.get("payload") or {}
        err = frame.get("error") or {}
        raise GatewayError(str(err.get("code", "ERROR")), str(err.get("message", "")), err.get("details"))
    raise GatewayError("CLOSED", "the gateway closed the connection")


async def rpc(
    deps: Any, user_id: str, calls: list[tuple[str, dict[str, Any]]], pairing: bool = False
) -> list[Any]:
    """Runs *calls* on the user's running gateway; 409 agent_not_running / 502 gateway_error.
    pairing=True: as the dashboard identity (operator.pairing); else as the user themself, the
    identity their own sessions belong to (read and write, like their proxied clients)."""
    doc = await deps.store.get_instance(user_id)
    if doc is None or doc.get("state") != "running" or not doc.get("port"):
        state = doc.get("state") if doc else "absent"
        raise ApiError(409, "agent_not_running", f"your agent is {state}", extra={"state": state})
    try:
        identity, scopes = (
            (dashboard_identity(user_id), DASHBOARD_SCOPES)
            if pairing
            else (gateway_identity(user_id), GATEWAY_SCOPES)
        )
        return await call(deps.http, doc.get("host", "127.0.0.1"), int(doc["port"]), identity, scopes, calls)
    except GatewayError as e:
        raise ApiError(
            502, "gateway_error", f"the gateway refused: {e}"[:300], extra={"gateway_code": e.code}
        ) from None
