"""The dashboard's aiohttp application: dependencies, the public routes and the account routes.
The other route groups live in agents.py, pairing.py, chat.py, files.py, apikeys.py, admin.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from services.dashboard import accounts, audit, sessions
from services.dashboard.errors import ApiError
from services.dashboard.models import (
    AuthOut,
    DeletedOut,
    DeleteMeIn,
    HealthOut,
    Links,
    LoginIn,
    MeOut,
    MetaOut,
    PasswordIn,
    SessionInfo,
    SignupIn,
    UserOut,
)
from services.dashboard.throttle import LoginThrottle, Throttle, client_address
from services.dashboard.web import API, MAX_BODY, Ctx, errors_middleware
from services.provisioner.telegram import TelegramClient
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.dashboard")
SWEEP_INTERVAL_S = 3600.0


@dataclass
class Deps:
    settings: ZakiSettings
    store: Store
    jwt: sessions.JwtIssuer
    throttle: LoginThrottle
    telegram: TelegramClient
    nc: Any = None  # nats.aio.client.Client
    hub: Any = None  # events.EventHub
    http: Any = None  # aiohttp.ClientSession for the gateways' WebSocket RPC
    tasks: list[asyncio.Task] = field(default_factory=list)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def file_lock(self, user_id: str) -> asyncio.Lock:
        """Serializes one user's conditional file writes in this process."""
        if len(self.locks) > 10_000:
            self.locks = {k: v for k, v in self.locks.items() if v.locked()}
        return self.locks.setdefault(user_id, asyncio.Lock())

    @property
    def origins(self) -> list[str]:
        """Where the pages are served: the dashboard's own origin(s), never the proxy's (the proxy
        serves content the tenant controls: its gateway's Control UI, /v1 bodies)."""
        return self.settings.dashboard_public_origins()

    def links(self) -> Links:
        proxy = self.settings.proxy_public_origins()
        return Links(control_ui=f"{proxy[0]}/ui/" if proxy else "/ui/")

    def models(self) -> list[str]:
        s = self.settings
        if s.dashboard_models.strip():
            return [m.strip() for m in s.dashboard_models.split(",") if m.strip()]
        extra = [f"{s.llm_provider_name}/{m.strip()}" for m in s.llm_models.split(",") if m.strip()]
        return list(dict.fromkeys([s.default_model, *extra]))

    def address(self, request: web.Request) -> str:
        trusted = [t.strip() for t in self.settings.dashboard_trusted_proxies.split(",") if t.strip()]
        return client_address(request.remote, request.headers.get("X-Forwarded-For"), trusted)


def make_deps(s: ZakiSettings, store: Store) -> Deps:
    from services.dashboard.events import EventHub

    return Deps(
        settings=s,
        store=store,
        jwt=sessions.JwtIssuer(s),
        throttle=LoginThrottle(
            Throttle(s.dashboard_login_account_burst, s.dashboard_login_account_interval_s),
            Throttle(s.dashboard_login_address_burst, s.dashboard_login_address_interval_s),
        ),
        telegram=TelegramClient(s.telegram_api_base, s.telegram_timeout_s),
        hub=EventHub(store),
    )


def auth_out(account: dict[str, Any], session: dict[str, Any]) -> AuthOut:
    return AuthOut(
        user=UserOut(**accounts.public(account)), session=SessionInfo(expires_at=session["expires_at"])
    )


# --- public -------------------------------------------------------------------------------------


@API.route(
    "GET", "/api/meta", summary="What the pages need before log-in", tag="public", auth="none", out=MetaOut
)
async def get_meta(ctx: Ctx) -> MetaOut:
    d = ctx.deps
    return MetaOut(
        signup_open=d.settings.dashboard_signup_open,
        password_min_length=accounts.PASSWORD_MIN,
        models=d.models(),
        default_model=d.settings.default_model,
        public_origins=d.origins,
        links=d.links(),
    )


@API.route(
    "GET", "/api/health", summary="Store and NATS reachability", tag="public", auth="none", out=HealthOut
)
async def get_health(ctx: Ctx) -> HealthOut:
    d = ctx.deps
    store = "ok"
    try:
        await asyncio.wait_for(d.store.ping(), 2)
    except Exception:
        store = "unreachable"
    bus = "ok" if d.nc is not None and d.nc.is_connected else "unreachable"
    ok = store == "ok" and bus == "ok"
    if not ok:
        ctx.status = 503
    return HealthOut(ok=ok, store=store, nats=bus)


# --- accounts and sessions ----------------------------------------------------------------------


async def _start_session(ctx: Ctx, account: dict[str, Any]) -> MeOut:
    old, _ = sessions.presented_token(ctx)
    if old:  # never keep a session id that existed before log-in (no fixation)
        await sessions.revoke(ctx.deps.store, old)
    token, doc = await sessions.create(ctx.deps.store, account["_id"], ctx.deps.settings)
    sessions.set_login_cookies(ctx, token, account["_id"])
    base = auth_out(account, doc)  # with the links: the pages keep this answer as "me"
    return MeOut(user=base.user, session=base.session, links=ctx.deps.links())


@API.route(
    "POST",
    "/api/auth/signup",
    summary="Create an account and log in",
    tag="accounts",
    auth="none",
    body=SignupIn,
    status=201,
    out=MeOut,
    errors=(403, 409),
)
async def signup(ctx: Ctx) -> MeOut:
    """Username (3-32 of A-Za-z0-9_-), optional e-mail, password (at least 10 characters, not a
    common one, not containing the username). Sets the session cookies."""
    d = ctx.deps
    if not d.settings.dashboard_signup_open:
        raise ApiError(403, "signup_closed", "sign-up is closed on this platform; ask the operator")
    b: SignupIn = ctx.body
    account = await accounts.create_account(
        d.store, b.username, b.email, b.password, prefix=d.settings.dashboard_user_prefix
    )
    log.info("account created", extra={"user_id": account["_id"]})
    return await _start_session(ctx, account)


@API.route(
    "POST",
    "/api/auth/login",
    summary="Log in with username or e-mail",
    tag="accounts",
    auth="none",
    body=LoginIn,
    out=MeOut,
    errors=(401, 403, 429),
)
async def login(ctx: Ctx) -> MeOut:
    """A new session id every time. Throttled per account and per client address (429 with
    Retry-After)."""
    d = ctx.deps
    b: LoginIn = ctx.body
    account = await accounts.find_by_login(d.store, b.login)
    key = account["_id"] if account else f"login:{b.login.lower()}"
    address = d.address(ctx.request)
    d.throttle.attempt(key, address)
    if not await accounts.verify_password(account["password_hash"] if account else None, b.password):
        log.info("log-in failed", extra={"user_id": account["_id"] if account else "-"})
        raise ApiError(401, "invalid_credentials", "wrong username, e-mail or password")
    assert account is not None
    if account.get("disabled"):
        raise ApiError(403, "account_disabled", "this account is disabled; ask the operator")
    d.throttle.succeeded(key, address)
    await accounts.rehash_if_needed(d.store, account, b.password)
    return await _start_session(ctx, account)


@API.route(
    "POST",
    "/api/auth/logout",
    summary="Log out (revokes the session)",
    tag="accounts",
    auth="none",
    status=204,
)
async def logout(ctx: Ctx) -> None:
    token, _ = sessions.presented_token(ctx)
    if token:
        await sessions.revoke(ctx.deps.store, token)
    sessions.clear_cookies(ctx)


@API.route(
    "GET", "/api/me", summary="The logged-in account (renews the proxy cookie)", tag="accounts", out=MeOut
)
async def get_me(ctx: Ctx) -> MeOut:
    assert ctx.account is not None and ctx.session is not None
    base = auth_out(ctx.account, {"expires_at": sessions.idle_expiry(ctx.session, ctx.deps.settings)})
    return MeOut(user=base.user, session=base.session, links=ctx.deps.links())


@API.route(
    "POST",
    "/api/me/password",
    summary="Change the password (other sessions are revoked)",
    tag="accounts",
    body=PasswordIn,
    status=204,
)
async def change_password(ctx: Ctx) -> None:
    d, b = ctx.deps, ctx.body
    assert ctx.account is not None
    if not await accounts.verify_password(ctx.account["password_hash"], b.current_password):
        raise ApiError(401, "invalid_credentials", "the current password is wrong", "current_password")
    await accounts.set_password(d.store, ctx.user_id, b.new_password, ctx.account["username"])
    token, _ = sessions.presented_token(ctx)
    await sessions.revoke_all(d.store, ctx.user_id, keep_token=token)


@API.route(
    "DELETE",
    "/api/me",
    summary="Delete the account, its keys, sessions and agent",
    tag="accounts",
    body=DeleteMeIn,
    status=202,
    out=DeletedOut,
)
async def delete_me(ctx: Ctx) -> DeletedOut:
    """Needs the password and the username typed again. purge=true also erases the agent's
    memory and workspace; false keeps them on disk."""
    from services.dashboard.agents import delete_everything

    d, b = ctx.deps, ctx.body
    assert ctx.account is not None
    if b.confirm.lower() != ctx.account["username"]:
        raise ApiError(400, "confirmation_mismatch", "type your username to confirm", "confirm")
    if not await accounts.verify_password(ctx.account["password_hash"], b.password):
        raise ApiError(401, "invalid_credentials", "the password is wrong", "password")
    request_id = await delete_everything(d, ctx.user_id, b.purge)
    sessions.clear_cookies(ctx)
    return DeletedOut(deleted=True, purge=b.purge, request_id=request_id)


# --- the application ----------------------------------------------------------------------------


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app["openapi"])


def build_app(deps: Deps) -> web.Application:
    # Route modules register themselves on API when imported.
    from services.dashboard import (  # noqa: F401
        admin,
        agents,
        apikeys,
        backups,
        chat,
        chat_relay,
        events,
        files,
        fleet,
        pages,
        pairing,
    )

    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors_middleware])
    app["deps"] = deps
    API.install(app, deps, sessions.authenticate, sessions.check_origin)
    app["openapi"] = API.openapi(
        "Zaki dashboard API",
        "1",
        "Accounts, the user's agent, pairing, files, API keys and operator actions. See docs/dashboard-api.md.",
    )
    app.router.add_get("/api/openapi.json", openapi)
    pages.install(app)
    app.on_startup.append(_startup)
    app.on_cleanup.append(_cleanup)
    return app


async def _startup(app: web.Application) -> None:
    import aiohttp

    deps: Deps = app["deps"]
    deps.http = aiohttp.ClientSession()
    for ensure in (accounts.ensure_indexes, sessions.ensure_indexes, audit.ensure_indexes):
        await ensure(deps.store)
    deps.tasks.append(asyncio.create_task(_sweeper(deps)))


async def _sweeper(deps: Deps) -> None:
    while True:
        with contextlib.suppress(Exception):
            await sessions.sweep(deps.store, deps.settings)
        await asyncio.sleep(SWEEP_INTERVAL_S)


async def _cleanup(app: web.Application) -> None:
    deps: Deps = app["deps"]
    for t in deps.tasks:
        t.cancel()
    await deps.telegram.close()
    if deps.http is not None:
        await deps.http.close()
