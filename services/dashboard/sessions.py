"""Dashboard sessions (revocable records in the store) and the proxy's ``zaki_session`` JWT.

The session cookie holds 256 random bits; the store keeps only their SHA-256, so a read of the
database does not hand out live sessions. The JWT is what the gateway proxy understands: short
lived and renewed by any authenticated API call, because the proxy cannot ask the store.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from datetime import timedelta
from typing import Any

import jwt

from services.dashboard.errors import NOT_AUTHENTICATED, ApiError
from services.dashboard.web import Auth, Ctx
from services.gateway_proxy.auth import SESSION_COOKIE as PROXY_COOKIE
from services.gateway_proxy.auth import AuthError, check_cookie_origin
from services.gateway_proxy.keys import SCOPES as PROXY_SCOPES
from shared.settings import ZakiSettings
from shared.store import Store, utcnow

SESSION_COOKIE = "zaki_dash"
TOUCH_EVERY_S = 60.0  # last use is written at most this often per session


def sessions(store: Store):
    return store.db["dashboard_sessions"]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def ensure_indexes(store: Store) -> None:
    await sessions(store).create_index("user_id", name="by_user")


async def create(store: Store, user_id: str, s: ZakiSettings) -> tuple[str, dict[str, Any]]:
    token = secrets.token_urlsafe(32)
    now = utcnow()
    doc = {
        "_id": _digest(token),
        "user_id": user_id,
        "created_at": now,
        "last_seen_at": now,
        "expires_at": now + timedelta(seconds=s.dashboard_session_max_s),
    }
    await sessions(store).insert_one(doc)
    return token, doc


def idle_expiry(doc: dict[str, Any], s: ZakiSettings):
    return min(doc["expires_at"], doc["last_seen_at"] + timedelta(seconds=s.dashboard_session_idle_s))


async def lookup(store: Store, token: str, s: ZakiSettings) -> dict[str, Any] | None:
    if not token or len(token) > 100:
        return None
    doc = await sessions(store).find_one({"_id": _digest(token)})
    if doc is None:
        return None
    now = utcnow()
    if idle_expiry(doc, s) <= now:
        await sessions(store).delete_one({"_id": doc["_id"]})
        return None
    if (now - doc["last_seen_at"]).total_seconds() > TOUCH_EVERY_S:
        await sessions(store).update_one({"_id": doc["_id"]}, {"$set": {"last_seen_at": now}})
        doc["last_seen_at"] = now
    return doc


async def revoke(store: Store, token: str) -> None:
    await sessions(store).delete_one({"_id": _digest(token)})


async def revoke_all(store: Store, user_id: str, keep_token: str | None = None) -> int:
    if not keep_token:
        return await store.revoke_user_sessions(user_id)  # the provisioner's rule on delete, too
    res = await sessions(store).delete_many({"user_id": user_id, "_id": {"$ne": _digest(keep_token)}})
    return res.deleted_count


async def sweep(store: Store, s: ZakiSettings) -> int:
    """Drops sessions past their absolute or idle expiry."""
    now = utcnow()
    idle = now - timedelta(seconds=s.dashboard_session_idle_s)
    res = await sessions(store).delete_many(
        {"$or": [{"expires_at": {"$lte": now}}, {"last_seen_at": {"$lte": idle}}]}
    )
    return res.deleted_count


# --- the proxy's JWT ----------------------------------------------------------------------------


class JwtIssuer:
    """Signs the proxy cookie with the key the proxy verifies: a private key matching
    ``jwt_public_key`` (EdDSA / RS256 / ES256) or the shared ``jwt_secret`` (HS256)."""

    def __init__(self, s: ZakiSettings) -> None:
        self.audience = s.jwt_audience
        self.ttl = s.dashboard_jwt_ttl_s
        private = s.dashboard_jwt_private_key.get_secret_value()
        if private:
            from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            key = load_pem_private_key(private.encode(), password=None)
            if isinstance(key, ed25519.Ed25519PrivateKey):
                self.alg = "EdDSA"
            elif isinstance(key, rsa.RSAPrivateKey):
                self.alg = "RS256"
            elif isinstance(key, ec.EllipticCurvePrivateKey):
                self.alg = "ES256"
            else:
                raise ValueError("dashboard_jwt_private_key: Ed25519, RSA or EC P-256 expected")
            self.key: Any = key
            self.verify_key: Any = key.public_key()
        else:
            secret = s.jwt_secret.get_secret_value()
            self.alg, self.key, self.verify_key = "HS256", secret, secret
        self.enabled = bool(self.key)

    def issue(self, user_id: str, ttl: float | None = None, scopes: frozenset[str] = PROXY_SCOPES) -> str:
        now = int(time.time())
        claims = {
            "sub": user_id,
            "aud": self.audience,
            "iat": now,
            "exp": now + int(self.ttl if ttl is None else ttl),
            "jti": uuid.uuid4().hex,
            "scopes": sorted(scopes),
        }
        return jwt.encode(claims, self.key, algorithm=self.alg)

    def fresh(self, token: str | None, user_id: str) -> bool:
        """True when *token* is ours, for this user, and has more than half its life left."""
        if not token:
            return False
        try:
            claims = jwt.decode(token, self.verify_key, algorithms=[self.alg], audience=self.audience)
        except jwt.PyJWTError:
            return False
        return claims.get("sub") == user_id and claims["exp"] - time.time() > self.ttl / 2


# --- cookies and the per-request rules ----------------------------------------------------------


def _cookie_opts(s: ZakiSettings, max_age: float, proxy: bool = False) -> dict[str, Any]:
    """The cookies are set by the dashboard's own origin: Secure when that is https. The proxy's
    cookie may carry a Domain so that a proxy on another host name receives it; the dashboard's
    own session cookie stays host-only (the proxy and the tenants' content never see it)."""
    secure = s.dashboard_public_origins()[0].startswith("https://")
    opts = {"path": "/", "httponly": True, "samesite": "Lax", "secure": secure, "max_age": int(max_age)}
    if proxy and s.dashboard_cookie_domain:
        opts["domain"] = s.dashboard_cookie_domain
    return opts


def _set_proxy_cookie(ctx: Ctx, user_id: str) -> None:
    deps = ctx.deps
    ctx.set_cookie(PROXY_COOKIE, deps.jwt.issue(user_id), **_cookie_opts(deps.settings, deps.jwt.ttl, True))


def set_login_cookies(ctx: Ctx, token: str, user_id: str) -> None:
    deps = ctx.deps
    ctx.set_cookie(
        SESSION_COOKIE, token, **_cookie_opts(deps.settings, deps.settings.dashboard_session_max_s)
    )
    if deps.jwt.enabled:
        _set_proxy_cookie(ctx, user_id)


def clear_cookies(ctx: Ctx) -> None:
    ctx.set_cookie(SESSION_COOKIE, None)
    ctx.set_cookie(PROXY_COOKIE, None, domain=ctx.deps.settings.dashboard_cookie_domain or None)


def presented_token(ctx: Ctx) -> tuple[str | None, bool]:
    """The session token and whether it came from the cookie (a browser sends that by itself)."""
    auth = ctx.request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), False
    return ctx.request.cookies.get(SESSION_COOKIE), True


async def authenticate(ctx: Ctx, level: Auth) -> None:
    """Loads the caller's session and account; refuses when *level* needs one."""
    deps = ctx.deps
    token, via_cookie = presented_token(ctx)
    ctx.via_cookie = via_cookie and bool(token)
    if level == "none":
        return
    doc = await lookup(deps.store, token or "", deps.settings)
    account = await deps.store.db["accounts"].find_one({"_id": doc["user_id"]}) if doc else None
    if doc is None or account is None:
        if ctx.via_cookie:  # a stale cookie is dropped; a bearer client's jar is not ours to touch
            clear_cookies(ctx)
        raise ApiError(401, *NOT_AUTHENTICATED)
    if account.get("disabled"):
        await revoke_all(deps.store, account["_id"])
        clear_cookies(ctx)
        raise ApiError(403, "account_disabled", "this account is disabled; ask the operator")
    if level == "operator" and account.get("role") != "operator":
        raise ApiError(403, "forbidden", "this needs the operator role")
    ctx.account, ctx.session = account, doc
    # Keep the proxy's cookie alive while the pages are in use.
    if (
        ctx.via_cookie
        and deps.jwt.enabled
        and not deps.jwt.fresh(ctx.request.cookies.get(PROXY_COOKIE), account["_id"])
    ):
        _set_proxy_cookie(ctx, account["_id"])


def check_origin(ctx: Ctx) -> None:
    """Unsafe requests: a browser's Origin must be one of ours; with the cookie it must be there
    at all (the proxy's rule, one place for it)."""
    origin = ctx.request.headers.get("Origin")
    if not ctx.via_cookie and origin is None:
        return  # not a browser (browsers send Origin on every POST), and no ambient credential
    try:
        check_cookie_origin(ctx.request.method, origin, False, ctx.deps.origins)
    except AuthError as e:
        raise ApiError(e.status, e.code, str(e)) from None
