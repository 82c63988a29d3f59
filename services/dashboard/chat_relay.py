"""The pages' chat: ``POST /api/chat/completions`` on the dashboard's own origin, relayed to the
user's gateway THROUGH the gateway proxy (which enforces scopes, limits and wake-on-request),
never to the gateway directly. The dashboard authenticates to the proxy with a short-lived JWT it
mints for the session's user (scope ``chat`` only), so the pages never need the proxy's origin
(security review H4: the proxy serves tenant-controlled content; the dashboard trusts only its
own origin). The answer streams back unbuffered; the upstream request ends when the client goes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import aiohttp
from aiohttp import web

from services.dashboard.errors import ApiError, not_found
from services.dashboard.models import ChatCompletionIn
from services.dashboard.web import API, Ctx, apply_cookies

log = logging.getLogger("zaki.dashboard")

CHAT_JWT_TTL_S = 60  # only has to outlive the proxy's check at the start of the request
CHAT_SCOPES = frozenset({"chat"})
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
DISCONNECT_POLL_S = 0.2


def _client_gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


async def _pump(request: web.Request, up: aiohttp.ClientResponse, resp: web.StreamResponse) -> None:
    """Copies the answer chunk by chunk; stops (and drops the upstream connection, so the proxy
    and the gateway see the abort) as soon as the client is gone."""

    async def copy() -> None:
        async for chunk in up.content.iter_any():
            await resp.write(chunk)

    task = asyncio.ensure_future(copy())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and _client_gone(request):
                task.cancel()
                break
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, aiohttp.ClientError):
            await task
    finally:
        if not task.done():
            task.cancel()
    if task.cancelled() or _client_gone(request):
        up.close()  # not released to the pool: the connection is closed, the request aborted
        return
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()


@API.route(
    "POST",
    "/api/chat/completions",
    summary="Chat with the agent (OpenAI chat completions, relayed through the gateway proxy)",
    tag="chat",
    body=ChatCompletionIn,
    sse=True,
    errors=(404, 409, 429, 502, 504),
)
async def chat_completions(ctx: Ctx) -> web.StreamResponse:
    """The body is an OpenAI chat-completions request (at most 256 KiB); with
    "stream": true the answer is Server-Sent Events, streamed as the agent writes. The proxy's
    status and content type are passed through (e.g. 503 with {"state": …} while the agent is
    stopped or starting). Needs the session and this dashboard's Origin, like every POST."""
    d, request = ctx.deps, ctx.request
    payload = json.dumps(ctx.body.model_dump(exclude_unset=True)).encode()
    if not d.jwt.enabled:
        raise ApiError(503, "chat_unavailable", "no proxy credential is configured (ZAKI_JWT_SECRET)")
    if await d.store.get_instance(ctx.user_id) is None:  # answered here: no trip to the proxy
        raise not_found("you have no agent yet: create one first")
    token = d.jwt.issue(ctx.user_id, ttl=CHAT_JWT_TTL_S, scopes=CHAT_SCOPES)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": request.headers.get("Accept", "application/json")[:200],
    }
    url = f"{d.settings.dashboard_proxy_base()}/v1/chat/completions"
    try:
        up = await d.http.post(url, data=payload, headers=headers, timeout=UPSTREAM_TIMEOUT)
    except (aiohttp.ClientError, TimeoutError):
        log.warning("proxy unreachable for chat", extra={"user_id": ctx.user_id})
        raise ApiError(
            502, "proxy_unreachable", "the platform's proxy is unreachable; retry shortly"
        ) from None
    try:
        resp = web.StreamResponse(status=up.status)
        resp.content_type = up.content_type or "application/octet-stream"
        resp.headers["Cache-Control"] = "no-store"
        apply_cookies(ctx, resp)  # a renewed proxy cookie, set before the headers go out
        await resp.prepare(request)
        await _pump(request, up, resp)
        return resp
    finally:
        up.release()
