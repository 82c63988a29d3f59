"""Web chat history through the gateway's RPC, as the user themself (the identity their proxied
chats run under, so their sessions are theirs to read). Sending is ``POST /api/chat/completions``
(chat_relay.py, relayed through the proxy); see docs/dashboard-api.md."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.dashboard.gateway_rpc import rpc
from services.dashboard.models import (
    ChatAbortIn,
    ChatHistoryOut,
    ChatHistoryQuery,
    ChatMessage,
    ChatSession,
    ChatSessionsOut,
    OkOut,
)
from services.dashboard.web import API, Ctx

MAX_TEXT = 100_000


def _time(v: Any) -> str | None:
    if isinstance(v, int | float) and v > 0:
        return datetime.fromtimestamp(v / 1000 if v > 1e11 else v, UTC).isoformat()
    return v if isinstance(v, str) else None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content[:MAX_TEXT]
    if isinstance(content, list):
        parts = [
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") in ("text", None)
        ]
        return "".join(str(p) for p in parts)[:MAX_TEXT]
    return ""


@API.route(
    "GET",
    "/api/agent/chat/sessions",
    summary="The agent's conversations",
    tag="chat",
    out=ChatSessionsOut,
    errors=(409, 502),
)
async def chat_sessions(ctx: Ctx) -> ChatSessionsOut:
    (listed,) = await rpc(ctx.deps, ctx.user_id, [("sessions.list", {"limit": 100})])
    rows = listed.get("sessions", []) if isinstance(listed, dict) else []
    out = []
    for r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("key"), str):
            continue
        title = r.get("label") or r.get("displayName") or r.get("derivedTitle")
        out.append(
            ChatSession(
                key=r["key"], title=str(title) if title else None, updated_at=_time(r.get("updatedAt"))
            )
        )
    return ChatSessionsOut(sessions=out)


@API.route(
    "GET",
    "/api/agent/chat/history",
    summary="One conversation's messages",
    tag="chat",
    query=ChatHistoryQuery,
    out=ChatHistoryOut,
    errors=(409, 502),
)
async def chat_history(ctx: Ctx) -> ChatHistoryOut:
    q: ChatHistoryQuery = ctx.query
    (hist,) = await rpc(
        ctx.deps, ctx.user_id, [("chat.history", {"sessionKey": q.session, "limit": q.limit})]
    )
    rows = hist.get("messages", []) if isinstance(hist, dict) else []
    messages = [
        ChatMessage(role=str(m["role"]), text=_text(m.get("content")), at=_time(m.get("timestamp")))
        for m in rows
        if isinstance(m, dict) and m.get("role") in ("user", "assistant")
    ]
    return ChatHistoryOut(messages=messages)


@API.route(
    "POST",
    "/api/agent/chat/abort",
    summary="Stop the agent's current answer in a conversation",
    tag="chat",
    body=ChatAbortIn,
    out=OkOut,
    errors=(409, 502),
)
async def chat_abort(ctx: Ctx) -> OkOut:
    await rpc(ctx.deps, ctx.user_id, [("chat.abort", {"sessionKey": ctx.body.session})])
    return OkOut(ok=True)
