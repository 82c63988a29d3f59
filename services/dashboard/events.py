"""Live agent state for the pages: one core NATS subscription to the platform's instance
events, handed out per user, and the Server-Sent Events stream ``/api/agent/events``.

The provisioner publishes outcomes (ready, failed, stopped, deleted) and the monitor health
changes; the intermediate states (provisioning, starting) exist only in the store, so the stream
reads the agent's view from the store, wakes at once on the user's events and polls twice a
second in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import datetime
from typing import Any

from aiohttp import web

from services.dashboard import accounts
from services.dashboard.agents import agent_view, bot_claims, fresh_account
from services.dashboard.errors import not_found
from services.dashboard.web import API, Ctx, apply_cookies
from shared import subjects
from shared.store import Store, utcnow

POLL_S = 0.5
KEEPALIVE_S = 15.0


class EventHub:
    """One core subscription to the platform's instance events, handed out per user."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.listeners: dict[str, set[asyncio.Queue]] = {}

    async def start(self, nc: Any) -> None:
        await nc.subscribe(f"{subjects.PREFIX}.instance.>", cb=self._on_msg)

    def listen(self, user_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=100)
        self.listeners.setdefault(user_id, set()).add(q)
        return q

    def unlisten(self, user_id: str, q: asyncio.Queue) -> None:
        qs = self.listeners.get(user_id)
        if qs is not None:
            qs.discard(q)
            if not qs:
                del self.listeners[user_id]

    async def _on_msg(self, msg: Any) -> None:
        try:
            body = json.loads(msg.data)
        except ValueError:
            return
        user_id = body.get("user_id") if isinstance(body, dict) else None
        if not isinstance(user_id, str):
            return
        # Failures are kept on the account, so a page loaded later still says why.
        if msg.subject == subjects.INSTANCE_FAILED:
            error = {"reason": str(body.get("reason", "")), "message": str(body.get("message", ""))[:500]}
            await accounts.accounts(self.store).update_one(
                {"_id": user_id}, {"$set": {"agent.error": error, "agent.failed_at": utcnow()}}
            )
        elif msg.subject == subjects.INSTANCE_READY:
            await accounts.accounts(self.store).update_one({"_id": user_id}, {"$unset": {"agent.error": ""}})
        elif msg.subject == subjects.INSTANCE_DELETED:
            # Deleted by an operator or another system: the account has no agent any more (unless
            # it asked for a new one after this deletion), and its bot is free for others.
            try:
                at = datetime.fromisoformat(str(body.get("occurred_at")))
            except ValueError:
                at = utcnow()
            res = await accounts.accounts(self.store).update_one(
                {"_id": user_id, "agent.requested_at": {"$lt": at}}, {"$unset": {"agent": ""}}
            )
            if res.modified_count:
                await bot_claims(self.store).delete_many({"user_id": user_id})
        for q in self.listeners.get(user_id, ()):
            if not q.full():
                q.put_nowait((msg.subject, body))


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


@API.route(
    "GET",
    "/api/agent/events",
    summary="The agent's state changes, live (Server-Sent Events)",
    tag="agent",
    sse=True,
    errors=(404,),
)
async def agent_events(ctx: Ctx) -> web.StreamResponse:
    """Replays the current history, then streams `state`, `ready`, `failed` and `health` events
    until the client closes the connection."""
    d = ctx.deps
    view = await agent_view(d.store, await fresh_account(ctx))
    if view is None:
        raise not_found("there is no agent")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    apply_cookies(ctx, resp)
    await resp.prepare(ctx.request)
    queue = d.hub.listen(ctx.user_id)
    sent: set[tuple[str, str]] = set()
    said: dict[str, Any] = {}
    last_write = time.monotonic()
    try:
        while True:
            account = await accounts.get(d.store, ctx.user_id)
            view = await agent_view(d.store, account) if account else None
            if view is None:
                await resp.write(_sse("state", {"state": "deleted"}))
                break
            for step in view.history:
                key = (step.state, step.at.isoformat())
                if key not in sent:
                    sent.add(key)
                    await resp.write(_sse("state", step.model_dump(mode="json")))
                    last_write = time.monotonic()
            elapsed = view.history[-1].elapsed_s if view.history else 0.0
            if view.state == "running" and said.get("ready") != view.updated_at:
                said["ready"] = view.updated_at
                ready = {
                    "state": "running",
                    "bot_username": view.bot_username,
                    "bot_link": view.bot_link,
                    "elapsed_s": elapsed,
                }
                await resp.write(_sse("ready", ready))
            if view.state == "failed" and view.error and said.get("failed") != view.error:
                said["failed"] = view.error
                await resp.write(_sse("failed", {"state": "failed", **view.error.model_dump()}))
            if said.get("health") != view.health:
                said["health"] = view.health
                await resp.write(_sse("health", {"health": view.health}))
            if time.monotonic() - last_write > KEEPALIVE_S:
                await resp.write(b": keep-alive\n\n")
                last_write = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(queue.get(), POLL_S)
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        d.hub.unlisten(ctx.user_id, queue)
    return resp
