"""Operator pages' API and the functions behind ``zaki admin``: every account and instance with
state, health and usage; actions on any; providers (never a key); disabling accounts. Every
action is recorded in the audit collection with actor, time and target before it is answered."""

from __future__ import annotations

from typing import Any

from services.dashboard import accounts, audit, sessions
from services.dashboard.agents import COMMAND_FROM, command, publish, revoke_keys
from services.dashboard.errors import ApiError, not_found
from services.dashboard.models import (
    AdminAccount,
    AdminAccountsOut,
    AdminInstance,
    AdminInstancesOut,
    AdminUser,
    AgentBrief,
    AuditOut,
    AuditQuery,
    AuditRecord,
    OkOut,
    ProviderOut,
    ProvidersOut,
    PurgeQuery,
    RequestOut,
    TempPasswordOut,
    UsageBrief,
)
from services.dashboard.web import API, Ctx
from services.llm_broker.budget import today
from shared import audit as trail
from shared import subjects
from shared.events import InstanceDelete
from shared.store import Store

CLI_ACTOR = "cli"


# --- functions shared by the API and the CLI ----------------------------------------------------


async def create_operator(
    store: Store, username: str, email: str | None, password: str, prefix: str = "u"
) -> dict[str, Any]:
    doc = await accounts.create_account(store, username, email, password, role="operator", prefix=prefix)
    await audit.record(store, CLI_ACTOR, "account.create_operator", doc["_id"], {"username": doc["username"]})
    return doc


async def set_disabled(
    store: Store, actor: str, target: str, disabled: bool, actor_name: str | None = None
) -> dict[str, Any]:
    account = await accounts.resolve(store, target)
    if account is None:
        raise not_found("no such account")
    await audit.record(
        store,
        actor,
        "account.disable" if disabled else "account.enable",
        account["_id"],
        actor_name=actor_name,
    )
    await accounts.set_disabled(store, account["_id"], disabled)
    if disabled:
        await sessions.revoke_all(store, account["_id"])
    return account


async def reset_password(
    store: Store, actor: str, target: str, actor_name: str | None = None
) -> tuple[dict[str, Any], str]:
    """A new random password (shown once); every session of the account ends."""
    account = await accounts.resolve(store, target)
    if account is None:
        raise not_found("no such account")
    temp = accounts.temporary_password()
    await audit.record(store, actor, "account.reset_password", account["_id"], actor_name=actor_name)
    await accounts.set_password(store, account["_id"], temp, "")
    await sessions.revoke_all(store, account["_id"])
    return account, temp


async def _health_map(store: Store) -> dict[str, dict[str, Any]]:
    return {d["_id"]: d async for d in store.db["health"].find({})}


def _health(inst: dict[str, Any], health: dict[str, dict[str, Any]]) -> str:
    h = health.get(inst["_id"]) or {}
    if inst.get("state") != "running" or h.get("instance_id") != inst.get("instance_id"):
        return "unknown"
    return str(h.get("state", "unknown"))


# --- routes -------------------------------------------------------------------------------------


def _actor(ctx: Ctx) -> tuple[str, str]:
    assert ctx.account is not None
    return ctx.account["_id"], ctx.account["username"]


@API.route(
    "GET",
    "/api/admin/accounts",
    summary="Every account with its agent and usage",
    tag="admin",
    auth="operator",
    out=AdminAccountsOut,
)
async def admin_accounts(ctx: Ctx) -> AdminAccountsOut:
    store = ctx.deps.store
    instances = {d["_id"]: d for d in await store.list_instances()}
    health = await _health_map(store)
    day = today()
    usage: dict[str, list[int]] = {}
    async for u in store.usage.find({"month": day[:7]}, {"user_id": 1, "day": 1, "tokens": 1}):
        t = usage.setdefault(u["user_id"], [0, 0])
        t[1] += int(u.get("tokens", 0))
        if u.get("day") == day:
            t[0] += int(u.get("tokens", 0))
    out = []
    for a in await accounts.list_accounts(store):
        inst = instances.get(a["_id"])
        agent = (
            AgentBrief(
                state=inst["state"], health=_health(inst, health), bot_username=inst.get("bot_username")
            )
            if inst
            else None
        )
        today_t, month_t = usage.get(a["_id"], [0, 0])
        out.append(
            AdminAccount(
                user=AdminUser(**accounts.public(a), disabled=bool(a.get("disabled"))),
                agent=agent,
                usage=UsageBrief(today_tokens=today_t, month_tokens=month_t),
            )
        )
    return AdminAccountsOut(accounts=out)


@API.route(
    "GET",
    "/api/admin/instances",
    summary="Every instance, with or without an account",
    tag="admin",
    auth="operator",
    out=AdminInstancesOut,
)
async def admin_instances(ctx: Ctx) -> AdminInstancesOut:
    store = ctx.deps.store
    health = await _health_map(store)
    names = {a["_id"]: a["username"] for a in await accounts.list_accounts(store)}
    return AdminInstancesOut(
        instances=[
            AdminInstance(
                user_id=i["_id"],
                state=i["state"],
                health=_health(i, health),
                bot_username=i.get("bot_username"),
                model=i.get("model"),
                updated_at=i.get("updated_at"),
                account=names.get(i["_id"]),
            )
            for i in await store.list_instances()
        ]
    )


def _account_action(action: str, disabled: bool):
    async def handler(ctx: Ctx) -> OkOut:
        actor, name = _actor(ctx)
        target = ctx.request.match_info["user_id"]
        if target == actor and disabled:
            raise ApiError(409, "cannot_disable_self", "an operator cannot disable their own account")
        await set_disabled(ctx.deps.store, actor, target, disabled, name)
        return OkOut(ok=True)

    handler.__name__ = f"admin_{action}_account"
    API.route(
        "POST", f"/api/admin/accounts/{{user_id}}/{action}", summary=f"{action.capitalize()} an account",
        tag="admin", auth="operator", out=OkOut, errors=(404, 409),
    )(handler)  # fmt: skip


_account_action("disable", True)
_account_action("enable", False)


@API.route(
    "POST",
    "/api/admin/accounts/{user_id}/reset-password",
    summary="Reset a password (shown once)",
    tag="admin",
    auth="operator",
    out=TempPasswordOut,
    errors=(404,),
)
async def admin_reset_password(ctx: Ctx) -> TempPasswordOut:
    actor, name = _actor(ctx)
    _, temp = await reset_password(ctx.deps.store, actor, ctx.request.match_info["user_id"], name)
    return TempPasswordOut(temporary_password=temp)


def _instance_action(kind: str):
    async def handler(ctx: Ctx) -> RequestOut:
        actor, name = _actor(ctx)
        target = ctx.request.match_info["user_id"]
        if await ctx.deps.store.get_instance(target) is None:
            raise not_found("no such instance")
        await audit.record(ctx.deps.store, actor, f"instance.{kind}", target, actor_name=name)
        who = audit.dashboard_actor(actor, name)
        return RequestOut(request_id=await command(ctx.deps, target, kind, who))

    handler.__name__ = f"admin_{kind}_instance"
    API.route(
        "POST", f"/api/admin/instances/{{user_id}}/{kind}", summary=f"{kind.capitalize()} any instance",
        tag="admin", auth="operator", status=202, out=RequestOut, errors=(404, 409),
    )(handler)  # fmt: skip


for _kind in COMMAND_FROM:
    _instance_action(_kind)


@API.route(
    "DELETE",
    "/api/admin/instances/{user_id}",
    summary="Delete any instance (purge: erase its memory)",
    tag="admin",
    auth="operator",
    query=PurgeQuery,
    status=202,
    out=RequestOut,
    errors=(404,),
)
async def admin_delete_instance(ctx: Ctx) -> RequestOut:
    actor, name = _actor(ctx)
    target = ctx.request.match_info["user_id"]
    if await ctx.deps.store.get_instance(target) is None:
        raise not_found("no such instance")
    purge = ctx.query.purge
    await audit.record(ctx.deps.store, actor, "instance.delete", target, {"purge": purge}, name)
    cmd = InstanceDelete(
        user_id=target, purge=purge, reason=f"operator {name}", actor=audit.dashboard_actor(actor, name)
    )
    await publish(ctx.deps, subjects.INSTANCE_DELETE, cmd)
    return RequestOut(request_id=cmd.request_id)


@API.route(
    "POST",
    "/api/admin/accounts/{user_id}/revoke-keys",
    summary="Revoke every API key of an account",
    tag="admin",
    auth="operator",
    out=OkOut,
    errors=(404,),
)
async def admin_revoke_keys(ctx: Ctx) -> OkOut:
    actor, name = _actor(ctx)
    account = await accounts.resolve(ctx.deps.store, ctx.request.match_info["user_id"])
    if account is None:
        raise not_found("no such account")
    await audit.record(ctx.deps.store, actor, "account.revoke_keys", account["_id"], actor_name=name)
    await revoke_keys(ctx.deps, account["_id"])
    return OkOut(ok=True)


@API.route(
    "GET",
    "/api/admin/providers",
    summary="Model providers (never a key)",
    tag="admin",
    auth="operator",
    out=ProvidersOut,
)
async def admin_providers(ctx: Ctx) -> ProvidersOut:
    return ProvidersOut(
        providers=[
            ProviderOut(
                name=p["_id"],
                base_url=p.get("base_url"),
                api=p.get("api"),
                models=[str(m) for m in p.get("models") or []],
                state=p.get("state"),
            )
            for p in await ctx.deps.store.list_providers()
        ]
    )


@API.route(
    "GET",
    "/api/admin/audit",
    summary="Recent operator actions",
    tag="admin",
    auth="operator",
    query=AuditQuery,
    out=AuditOut,
)
async def admin_audit(ctx: Ctx) -> AuditOut:
    """The platform's audit trail (ZAKI_AUDIT: commands with their actor, outcomes, operator
    actions), newest first; the dashboard's own collection when NATS is unreachable."""
    nc = ctx.deps.nc
    if nc is not None and nc.is_connected:
        rows = await trail.read(nc.jetstream(), limit=ctx.query.limit, tail=True)
        return AuditOut(records=[_trail_row(r) for r in reversed(rows)])
    rows = await audit.recent(ctx.deps.store, ctx.query.limit)
    return AuditOut(records=[AuditRecord(**r) for r in rows])


def _trail_row(r: dict[str, Any]) -> AuditRecord:
    """A trail record as the page shows it: an operator action as before (account id as actor);
    commands and outcomes as ``command:<subject>`` with ``kind:id`` actors."""
    a = r.get("actor") or {}
    detail = dict(r.get("detail") or {})
    name = detail.pop("actor_name", None)
    actor = a["id"] if a.get("kind") == "dashboard" else f"{a.get('kind')}:{a.get('id')}" if a else ""
    return AuditRecord(
        at=r["at"],
        actor=actor,
        actor_name=name,
        action=r["subject"] if r["kind"] == "action" else f"{r['kind']}:{r['subject']}",
        target=r.get("user_id") or "",
        detail={**detail, "request_id": r.get("request_id")} if r.get("request_id") else detail,
    )
