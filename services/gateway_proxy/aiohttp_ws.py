"""WebSockets on the aiohttp plane: the handshake's checks, then messages both ways."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web

from services.gateway_proxy.auth import AuthError, Tenant, credential_from
from services.gateway_proxy.decision import Decision, gateway_ws_headers
from services.gateway_proxy.errors import error_response, not_running_response
from services.gateway_proxy.observe import BYTES_IN, BYTES_OUT, OPEN_WS, REJECTED
from services.gateway_proxy.routing import NoRoute, Route
from services.gateway_proxy.state import ProxyState
from services.gateway_proxy.wake import ACTIVITY
from services.gateway_proxy.ws_frames import sanitize_connect


def is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def request_tenant(
    state: ProxyState, request: web.Request, scope: str, protocols: list[str] | None = None
) -> Tenant:
    credential, source = credential_from(request.headers, request.cookies, protocols)
    tenant = await state.tenant(
        credential, source, request.method, request.headers.get("Origin"), is_upgrade(request), scope
    )
    request["tenant"] = tenant
    return tenant


async def websocket(state: ProxyState, request: web.Request, d: Decision) -> web.StreamResponse:
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        tenant = await request_tenant(state, request, d.scope, protocols)
    except AuthError as e:
        REJECTED.labels(e.code).inc()
        return error_response(request, e.status, e.code, str(e))
    try:
        route = await state.routes.resolve(tenant.user_id)
    except NoRoute as e:
        return not_running_response(request, e.state)
    if not state.limits.open_websocket(tenant.user_id):
        REJECTED.labels("too_many_websockets").inc()
        return error_response(
            request, 429, "too_many_websockets", "too many open WebSockets", **{"Retry-After": "10"}
        )
    try:
        return await _relay(state, request, tenant, route, d)
    finally:
        state.limits.close_websocket(tenant.user_id)


async def _relay(
    state: ProxyState, request: web.Request, tenant: Tenant, route: Route, d: Decision
) -> web.StreamResponse:
    assert state.session is not None
    proto = "https" if request.secure else "http"
    headers = gateway_ws_headers(d, tenant.user_id, request.remote, proto, state.origin)
    try:
        upstream = await state.session.ws_connect(
            f"http://{route.host}:{route.port}/",
            headers=headers,
            max_msg_size=32 << 20,
            autoping=True,
            heartbeat=30,
        )
    except (aiohttp.ClientError, TimeoutError):
        return error_response(request, 502, "gateway_unreachable", "your gateway did not answer")
    # Echo a bearer.* subprotocol back only as the protocol name, never the token itself.
    client = web.WebSocketResponse(max_msg_size=32 << 20, heartbeat=30, protocols=("openclaw",))
    await client.prepare(request)
    state.websockets.add(client)
    OPEN_WS.inc()
    ACTIVITY.opened(tenant.user_id)  # an open WebSocket keeps its gateway awake
    first = True

    async def client_to_upstream() -> None:
        nonlocal first
        async for msg in client:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            data = msg.data
            if first:
                # OpenClaw reads a binary message as text: the first is rewritten either way.
                first = False
                text = data if msg.type == WSMsgType.TEXT else data.decode("utf-8", "replace")
                rewritten = sanitize_connect(text)
                if rewritten is None:
                    await client.close(code=1008, message=b"unreadable first message")
                    break
                if rewritten is not text:
                    data = rewritten if msg.type == WSMsgType.TEXT else rewritten.encode()
            BYTES_IN.inc(len(data))
            if msg.type == WSMsgType.TEXT:
                await upstream.send_str(data)
            else:
                await upstream.send_bytes(data)

    async def upstream_to_client() -> None:
        async for msg in upstream:
            if msg.type == WSMsgType.TEXT:
                BYTES_OUT.inc(len(msg.data))
                await client.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await client.send_bytes(msg.data)
            else:
                break

    tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await upstream.close()
        await client.close()
        state.websockets.discard(client)
        OPEN_WS.dec()
        ACTIVITY.closed(tenant.user_id)
    return client
