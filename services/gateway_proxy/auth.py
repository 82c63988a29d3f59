"""Who is calling: a Zaki API key or a dashboard's signed session token (JWT).

The credential alone decides the tenant; nothing in the URL, headers or host name can.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import jwt

from services.gateway_proxy import keys
from shared.store import Store
from shared.validation import USER_ID_RE

log = logging.getLogger("zaki.proxy")

KEY_CACHE_TTL_S = 30.0


@dataclass(frozen=True)
class Tenant:
    user_id: str
    scopes: frozenset[str]
    credential_id: str  # key id or "jwt:<jti or sub>": safe to log


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _unauthorized(message: str = "missing or invalid credential") -> AuthError:
    return AuthError(401, "invalid_api_key", message)


class Authenticator:
    def __init__(
        self,
        store: Store,
        jwt_secret: str = "",
        jwt_public_key: str = "",
        audience: str = "zaki",
    ) -> None:
        self.store = store
        self.jwt_secret = jwt_secret
        self.jwt_public_key = jwt_public_key
        self.audience = audience
        self._cache: dict[str, tuple[float, keys.ApiKey | None, str]] = {}
        self._tenants: dict[str, Tenant] = {}
        # Bumped by every revocation notice and bus outage: a store lookup that was in flight
        # meanwhile may have read the key before it was revoked, so its answer is not cached.
        self.generation = 0
        # False while the bus is down (revocation notices would be missed): keys are then
        # checked in the store on every use instead of from the cache.
        self.trust_cache = True
        # user id -> epoch s: a session token (JWT) issued before it is refused (a deleted
        # instance, a disabled account, a user's sessions ended). Refreshed by follow_cutoffs.
        self.cutoffs: dict[str, int] = {}

    def forget(self, key_id: str) -> None:
        """A revocation notice (``subjects.APIKEY_REVOKED``)."""
        self.generation += 1
        self._cache.pop(key_id, None)
        self._tenants.pop(key_id, None)

    def forget_all(self) -> None:
        """Drops every cached key: the next use of each is checked in the store again."""
        self.generation += 1
        self._cache.clear()
        self._tenants.clear()

    def bus_down(self) -> None:
        self.trust_cache = False
        self.forget_all()

    def bus_up(self) -> None:
        """After a reconnect: notices sent while the bus was down were missed, so nothing
        cached before counts (a key revoked meanwhile is refused at its next use)."""
        self.forget_all()
        self.trust_cache = True

    async def authenticate(self, credential: str | None) -> Tenant:
        if not credential:
            raise _unauthorized()
        parsed = keys.parse_key(credential)
        if parsed is not None:
            return await self._api_key(*parsed)
        if credential.count(".") == 2:
            return self._jwt(credential)
        raise _unauthorized()

    async def _api_key(self, key_id: str, secret: str) -> Tenant:
        hit = self._cache.get(key_id)
        if hit is not None and hit[0] >= time.monotonic() and hit[2] == secret and self.trust_cache:
            return self._tenant_of(hit[1])
        for _ in range(3):
            generation = self.generation
            key = await keys.lookup(self.store, key_id, secret)
            if generation == self.generation:
                break
            # A revocation (of any key) arrived while the store was asked: ask again, since
            # the answer may predate it.
        else:
            return self._tenant_of(key)  # revocations keep coming: answer, cache nothing
        if self.trust_cache:
            if len(self._cache) >= 100_000:
                self.forget_all()
            self._cache[key_id] = (time.monotonic() + KEY_CACHE_TTL_S, key, secret)
            self._tenants.pop(key_id, None)
        return self._tenant_of(key)

    @staticmethod
    def _tenant_of(key: keys.ApiKey | None) -> Tenant:
        if key is None:
            raise _unauthorized()
        if key.revoked:
            raise _unauthorized("this API key was revoked")
        if not key.usable():
            raise _unauthorized("this API key has expired")
        return Tenant(key.user_id, key.scopes, key.key_id)

    def authenticate_cached(self, credential: str | None) -> Tenant | None:
        """The answer without I/O when it is known (a cached API key, any JWT), or None when
        the store must be asked (then call ``authenticate``). Raises AuthError like it."""
        if not credential:
            raise _unauthorized()
        parsed = keys.parse_key(credential)
        if parsed is not None:
            hit = self._cache.get(parsed[0])
            if hit is None or hit[0] < time.monotonic() or hit[2] != parsed[1] or not self.trust_cache:
                return None
            key = hit[1]
            if key is not None and not key.revoked and key.usable():
                tenant = self._tenants.get(key.key_id)
                if tenant is None:  # one Tenant per key, not one per request
                    tenant = self._tenants[key.key_id] = self._tenant_of(key)
                return tenant
            return self._tenant_of(key)
        if credential.count(".") == 2:
            return self._jwt(credential)
        raise _unauthorized()

    def _jwt(self, token: str) -> Tenant:
        # Algorithms are pinned by the key type we hold: "none" and alg confusion never pass.
        if self.jwt_public_key:
            key, algorithms = self.jwt_public_key, ["RS256", "ES256", "EdDSA"]
        elif self.jwt_secret:
            key, algorithms = self.jwt_secret, ["HS256"]
        else:
            raise _unauthorized()
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                options={"require": ["exp", "sub", "aud"]},
                leeway=30,
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("session token expired") from None
        except jwt.PyJWTError:
            raise _unauthorized() from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not USER_ID_RE.fullmatch(sub):
            raise _unauthorized()
        iat = claims.get("iat")
        if sub in self.cutoffs and (not isinstance(iat, int) or iat < self.cutoffs[sub]):
            raise _unauthorized("this session was ended")
        scopes = claims.get("scopes", ["chat", "tools", "ws", "ui"])
        if isinstance(scopes, str):
            scopes = scopes.split()
        return Tenant(sub, frozenset(s for s in scopes if s in keys.SCOPES), f"jwt:{claims.get('jti', sub)}")


async def follow_cutoffs(auth: Authenticator, interval: float = 0.5) -> None:
    """Keeps the session-token cutoffs current from the store (one small read per interval):
    a token of a deleted or disabled user is refused by every proxy process within a second."""
    while True:
        try:
            auth.cutoffs = await auth.store.token_cutoffs()
        except Exception:  # the store is away: keep the last known cutoffs
            log.warning("reading session cutoffs failed")
        await asyncio.sleep(interval)


SESSION_COOKIE = "zaki_session"


def credential_from(headers, cookies, protocols: list[str] | None = None) -> tuple[str | None, str]:
    """The credential and where it came from: a Bearer header, the dashboard's session
    cookie ("cookie": a browser sends it by itself, so the caller must check the Origin),
    or (browsers' WebSockets) a ``bearer.<token>`` subprotocol. Never the query string:
    URLs end up in logs."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), "header"
    if cookies.get(SESSION_COOKIE):
        return cookies[SESSION_COOKIE], "cookie"
    for proto in protocols or ():
        if proto.startswith("bearer."):
            return proto[7:], "subprotocol"
    return None, "none"


def check_cookie_origin(method: str, origin: str | None, upgrade: bool, allowed: list[str]) -> None:
    """A cookie rides along on any cross-site request a browser makes: only our own pages
    may use it (no cross-site request forgery, no cross-site WebSocket hijacking). A browser
    always sends Origin on WebSockets and on POSTs; a GET navigation may carry none, which
    is safe for the read-only routes."""
    if origin is None:
        if method in ("GET", "HEAD") and not upgrade:
            return
        raise AuthError(403, "origin_not_allowed", "a session cookie needs an Origin header")
    if origin not in allowed:
        raise AuthError(403, "origin_not_allowed", "this origin may not use the session cookie")
