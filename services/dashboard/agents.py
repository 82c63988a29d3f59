"""The account's agent: create it from a bot token, see its state history (live: events.py),
start / stop / restart it, change its model, read its usage, delete it.

Commands go to the provisioner on NATS (``shared.client.PlatformClient``). The state history
is read from the instance record and the store's write journal (each state change is one
claimed version with its time); the live stream is in events.py.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from pymongo.errors import DuplicateKeyError

from services.dashboard import accounts, sessions
from services.dashboard.errors import ApiError, not_found
from services.dashboard.models import (
    AgentEnvelope,
    AgentError,
    AgentOut,
    BudgetOut,
    CreateAgentIn,
    CreatedAgentOut,
    RequestOut,
    StateStep,
    UpdateAgentIn,
    UsageDay,
    UsageMonth,
    UsageOut,
)
from services.dashboard.web import API, Ctx
from services.llm_broker.budget import BudgetPolicy, today
from services.provisioner.telegram import InvalidBotToken, TelegramUnavailable
from shared import subjects
from shared.client import PlatformClient
from shared.events import (
    Actor,
    ActorKind,
    Event,
    InstanceCommand,
    InstanceDelete,
    InstanceRequested,
    InstanceUpdate,
)
from shared.store import Store, utcnow
from shared.validation import BOT_TOKEN_RE

log = logging.getLogger("zaki.dashboard.agents")

HISTORY_MAX = 50
# Which states each command may start from (the provisioner refuses the others anyway).
# A crash-looping instance is left alone by the platform until its user acts (issue 14.3); a
# suspended one is woken by a start (issue 16).
COMMAND_FROM = {
    "start": {"stopped", "failed", "crashlooping", "suspended"},
    "stop": {"starting", "running", "failed", "crashlooping", "suspended"},
    "restart": {"starting", "running", "failed", "crashlooping"},
}
COMMAND_SUBJECT = {
    "start": subjects.INSTANCE_START,
    "stop": subjects.INSTANCE_STOP,
    "restart": subjects.INSTANCE_RESTART,
}


def _me(account_id: str) -> Actor:
    """The account acting on its own agent (the audit trail's actor)."""
    return Actor(kind=ActorKind.DASHBOARD, id=account_id)


def bot_claims(store: Store):
    return store.db["bot_claims"]


def bot_link(username: str | None) -> str | None:
    return f"https://t.me/{username}" if username else None


async def publish(deps: Any, subject: str, event: Event) -> None:
    if deps.nc is None or not deps.nc.is_connected:
        raise ApiError(503, "unavailable", "the platform's message bus is unreachable; retry shortly")
    await PlatformClient(deps.nc).send(subject, event)


# --- the agent as the pages see it --------------------------------------------------------------


async def _health(store: Store, doc: dict[str, Any]) -> str:
    h = await store.db["health"].find_one({"_id": doc["_id"]})
    if h is None or h.get("instance_id") != doc.get("instance_id") or doc.get("state") != "running":
        return "unknown"
    return str(h.get("state", "unknown"))


def _elapsed(at: datetime, anchor: datetime) -> float:
    return round(max(0.0, (at - anchor).total_seconds()), 3)


async def agent_view(store: Store, account: dict[str, Any]) -> AgentOut | None:
    user_id = account["_id"]
    marker = account.get("agent") or {}
    err = marker.get("error")
    error = AgentError(**err) if err else None
    doc = await store.get_instance(user_id)
    if doc is None:
        requested = marker.get("requested_at")
        if requested is None:
            return None
        state = "failed" if error and marker.get("failed_at", requested) >= requested else "requested"
        steps = [StateStep(state="requested", at=requested, elapsed_s=0.0)]
        if state == "failed":
            steps.append(
                StateStep(
                    state="failed", at=marker["failed_at"], elapsed_s=_elapsed(marker["failed_at"], requested)
                )
            )
        return AgentOut(
            state=state, health="unknown", bot_username=marker.get("bot_username"),
            bot_link=None, model=marker.get("model"), created_at=None, updated_at=None,
            history=steps, error=error if state == "failed" else None,
        )  # fmt: skip
    created = doc.get("created_at") or utcnow()
    anchor = max(created, marker.get("command_at") or created)
    steps = [] if anchor > created else [StateStep(state="requested", at=created, elapsed_s=0.0)]
    journal = store.journal.find({"user_id": user_id, "to": {"$exists": True}, "at": {"$gte": anchor}})
    async for j in journal.sort("at", 1).limit(HISTORY_MAX):
        steps.append(StateStep(state=j["to"], at=j["at"], elapsed_s=_elapsed(j["at"], anchor)))
    if not steps or steps[-1].state != doc["state"]:
        at = doc.get("updated_at") or created
        steps.append(StateStep(state=doc["state"], at=at, elapsed_s=_elapsed(at, anchor)))
    running = doc["state"] == "running"
    return AgentOut(
        state=doc["state"],
        health=await _health(store, doc),
        bot_username=doc.get("bot_username"),
        bot_link=bot_link(doc.get("bot_username")) if running else None,
        model=doc.get("model"),
        created_at=doc.get("created_at"),
        updated_at=doc.get("updated_at"),
        history=steps,
        error=error if doc["state"] == "failed" else None,
    )


async def fresh_account(ctx: Ctx) -> dict[str, Any]:
    account = await accounts.get(ctx.deps.store, ctx.user_id)
    if account is None:
        raise ApiError(401, "not_authenticated", "this account no longer exists")
    return account


@API.route(
    "GET",
    "/api/agent",
    summary="The account's agent: state, health, history, bot link",
    tag="agent",
    out=AgentEnvelope,
)
async def get_agent(ctx: Ctx) -> AgentEnvelope:
    return AgentEnvelope(agent=await agent_view(ctx.deps.store, await fresh_account(ctx)))


# --- creating it --------------------------------------------------------------------------------


async def _claim_bot(store: Store, user_id: str, bot_id: str, bot_username: str) -> None:
    """One bot, one account. Refuses without naming the other account."""
    in_use = ApiError(409, "bot_token_in_use", "this bot is already used by another account", "bot_token")
    other = await store.instances.find_one(
        {"bot_username": bot_username, "_id": {"$ne": user_id}}, {"_id": 1}
    )
    if other is not None:
        raise in_use
    try:
        await bot_claims(store).insert_one({"_id": bot_id, "user_id": user_id, "at": utcnow()})
    except DuplicateKeyError:
        claim = await bot_claims(store).find_one({"_id": bot_id})
        if claim is not None and claim["user_id"] != user_id:
            raise in_use from None


@API.route(
    "POST",
    "/api/agent",
    summary="Create the agent from a Telegram bot token",
    tag="agent",
    body=CreateAgentIn,
    status=202,
    out=CreatedAgentOut,
    errors=(409, 502),
)
async def create_agent(ctx: Ctx) -> CreatedAgentOut:
    """The token is checked with Telegram getMe first; it is never stored by the dashboard."""
    d, b = ctx.deps, ctx.body
    token = b.bot_token.strip()
    if not BOT_TOKEN_RE.fullmatch(token):
        raise ApiError(
            400, "invalid_bot_token", "a bot token looks like 123456789:AA... (from @BotFather)", "bot_token"
        )
    model = b.model or d.settings.default_model
    if model not in d.models():
        raise ApiError(400, "model_not_allowed", f"pick one of {', '.join(d.models())}", "model")
    account = await fresh_account(ctx)
    current = await agent_view(d.store, account)
    if current is not None and current.state not in ("failed", "deleted"):
        raise ApiError(
            409, "agent_exists", "this account already has an agent", extra={"state": current.state}
        )
    try:
        username = await d.telegram.get_me(token)
    except InvalidBotToken:
        raise ApiError(
            400, "bot_token_rejected", "Telegram does not accept this bot token", "bot_token"
        ) from None
    except TelegramUnavailable:
        raise ApiError(502, "telegram_unreachable", "Telegram could not be reached; try again") from None
    await _claim_bot(d.store, ctx.user_id, token.split(":", 1)[0], username)
    request_id = uuid.uuid4().hex
    event = InstanceRequested(
        request_id=request_id,
        user_id=ctx.user_id,
        bot_token=token,
        model=model,
        telegram_allow_from=b.telegram_allow_from,
        image=d.settings.dashboard_gateway_image or None,
        actor=_me(ctx.user_id),
    )
    marker = {"request_id": request_id, "requested_at": utcnow(), "bot_username": username, "model": model}
    await accounts.accounts(d.store).update_one({"_id": ctx.user_id}, {"$set": {"agent": marker}})
    await publish(d, subjects.INSTANCE_REQUESTED, event)
    log.info("agent requested", extra={"user_id": ctx.user_id, "request_id": request_id})
    return CreatedAgentOut(request_id=request_id, state="requested", bot_username=username)


# --- running it ---------------------------------------------------------------------------------


async def command(deps: Any, user_id: str, kind: str, actor: Actor | None = None) -> str:
    """Publishes start / stop / restart for *user_id* after checking its state; *actor*: who
    asked (default: the account itself)."""
    doc = await deps.store.get_instance(user_id)
    if doc is None:
        raise not_found("there is no agent")
    if doc["state"] not in COMMAND_FROM[kind]:
        raise ApiError(
            409,
            "illegal_state",
            f"cannot {kind} an agent that is {doc['state']}",
            extra={"state": doc["state"]},
        )
    cmd = InstanceCommand(user_id=user_id, reason=f"dashboard: {kind}", actor=actor or _me(user_id))
    await accounts.accounts(deps.store).update_one({"_id": user_id}, {"$set": {"agent.command_at": utcnow()}})
    await publish(deps, COMMAND_SUBJECT[kind], cmd)
    return cmd.request_id


def _command_route(kind: str):
    async def handler(ctx: Ctx) -> RequestOut:
        return RequestOut(request_id=await command(ctx.deps, ctx.user_id, kind))

    handler.__name__ = f"{kind}_agent"
    handler.__doc__ = (
        f"Publishes instance.{kind}; 409 illegal_state when the agent's state does not allow it."
    )
    API.route(
        "POST", f"/api/agent/{kind}", summary=f"{kind.capitalize()} the agent", tag="agent",
        status=202, out=RequestOut, errors=(404, 409),
    )(handler)  # fmt: skip


for _kind in COMMAND_FROM:
    _command_route(_kind)


@API.route(
    "PATCH",
    "/api/agent",
    summary="Change the agent's model",
    tag="agent",
    body=UpdateAgentIn,
    status=202,
    out=RequestOut,
    errors=(404,),
)
async def update_agent(ctx: Ctx) -> RequestOut:
    d, b = ctx.deps, ctx.body
    if b.model not in d.models():
        raise ApiError(400, "model_not_allowed", f"pick one of {', '.join(d.models())}", "model")
    if await d.store.get_instance(ctx.user_id) is None:
        raise not_found("there is no agent")
    cmd = InstanceUpdate(
        user_id=ctx.user_id, model=b.model, reason="dashboard: model", actor=_me(ctx.user_id)
    )
    await publish(d, subjects.INSTANCE_UPDATE, cmd)
    return RequestOut(request_id=cmd.request_id)


@API.route(
    "GET",
    "/api/agent/usage",
    summary="Tokens today and this month against the budget",
    tag="agent",
    out=UsageOut,
)
async def get_usage(ctx: Ctx) -> UsageOut:
    d = ctx.deps
    day = today()
    totals = {"tokens": 0, "requests": 0}
    day_doc: dict[str, Any] = {}
    async for u in d.store.usage.find({"user_id": ctx.user_id, "month": day[:7]}):
        totals["tokens"] += int(u.get("tokens", 0))
        totals["requests"] += int(u.get("requests", 0))
        if u.get("day") == day:
            day_doc = u
    doc = await d.store.get_instance(ctx.user_id)
    policy = BudgetPolicy.effective((doc or {}).get("budget"), d.settings)
    return UsageOut(
        today=UsageDay(
            day=day,
            **{
                k: int(day_doc.get(k, 0))
                for k in ("tokens", "prompt_tokens", "completion_tokens", "requests")
            },
        ),
        month=UsageMonth(month=day[:7], **totals),
        budget=BudgetOut(
            requests_per_minute=policy.requests_per_minute or None,
            tokens_per_day=policy.tokens_per_day or None,
            tokens_per_month=policy.tokens_per_month or None,
            soft_ratio=policy.soft_ratio,
        ),
    )


# --- deleting everything ------------------------------------------------------------------------


async def revoke_keys(deps: Any, user_id: str) -> int:
    """Every key of the user, and every proxy told at once."""
    ids = await deps.store.revoke_user_keys(user_id)
    if deps.nc is not None and deps.nc.is_connected:
        for key_id in ids:
            await deps.nc.publish(subjects.APIKEY_REVOKED, key_id.encode())
        await deps.nc.flush()
    return len(ids)


async def delete_everything(deps: Any, user_id: str, purge: bool) -> str | None:
    """The account's keys, its agent (kept or erased memory), its sessions, then the account."""
    await revoke_keys(deps, user_id)
    request_id = None
    if await deps.store.get_instance(user_id) is not None:
        cmd = InstanceDelete(
            user_id=user_id, purge=purge, reason="dashboard: account deleted", actor=_me(user_id)
        )
        await publish(deps, subjects.INSTANCE_DELETE, cmd)
        request_id = cmd.request_id
    await sessions.revoke_all(deps.store, user_id)
    await bot_claims(deps.store).delete_many({"user_id": user_id})
    await accounts.delete_account(deps.store, user_id)
    log.info("account deleted", extra={"user_id": user_id, "purge": purge})
    return request_id
