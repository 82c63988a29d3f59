"""What both planes of the proxy share: settings, credentials, routes, limits, logs."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from services.gateway_proxy.auth import Authenticator, AuthError, Tenant, check_cookie_origin
from services.gateway_proxy.limits import TenantLimits
from services.gateway_proxy.observe import AccessLog
from services.gateway_proxy.routing import RoutingTable
from shared.settings import ZakiSettings


class ProxyState:
    def __init__(self, settings: ZakiSettings, authenticator: Authenticator, routes: RoutingTable) -> None:
        self.s = settings
        self.auth = authenticator
        self.routes = routes
        self.limits = TenantLimits(
            settings.rate_limit_rps, settings.rate_limit_burst, settings.max_websockets_per_tenant
        )
        self.allowed_origins = settings.proxy_public_origins()
        self.origin = (self.allowed_origins or [None])[0]
        self.access = AccessLog()
        self.session: aiohttp.ClientSession | None = None  # the aiohttp plane's upstream client
        self.websockets: set[web.WebSocketResponse] = set()  # the aiohttp plane's
        self.raw_websockets: set[Any] = set()  # the raw plane's relays (ws_relay.WsRelay)

    async def tenant(
        self,
        credential: str | None,
        source: str,
        method: str,
        origin: str | None,
        upgrade: bool,
        scope: str,
    ) -> Tenant:
        """Who is calling, if they may use *scope*: raises AuthError otherwise."""
        if source == "cookie":
            check_cookie_origin(method, origin, upgrade, self.allowed_origins)
        tenant = await self.auth.authenticate(credential)
        if scope not in tenant.scopes:
            raise AuthError(403, "insufficient_scope", f"this credential lacks the '{scope}' scope")
        return tenant
