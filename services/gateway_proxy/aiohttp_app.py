"""The gateway proxy's aiohttp plane.

aiohttp serves what the raw data plane (``http_plane``) hands over (the Control UI's pages,
health, unknown paths), and every route when ``ZAKI_PROXY_FASTPATH=false``. The user's
credential is checked and stripped; the proxy then speaks to the gateway in OpenClaw's
trusted-proxy mode (identity headers from the instance network's gateway address), so no
gateway secret ever reaches a client.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from yarl import URL

from services.gateway_proxy import aiohttp_ws
from services.gateway_proxy.aiohttp_ws import is_upgrade, request_tenant
from services.gateway_proxy.auth import AuthError, Tenant
from services.gateway_proxy.decision import (
    STRIPPED_REQUEST,
    STRIPPED_RESPONSE,
    Decision,
    Kind,
    decide,
    gateway_headers,
)
from services.gateway_proxy.errors import error_response, not_running_response
from services.gateway_proxy.observe import (
    BYTES_IN,
    BYTES_OUT,
    LATENCY,
    REJECTED,
    REQUESTS,
    UPSTREAM_LATENCY,
    child,
    next_request_id,
)
from services.gateway_proxy.routing import NoRoute, Route
from services.gateway_proxy.state import ProxyState
from services.gateway_proxy.wake import ACTIVITY

log = logging.getLogger("zaki.proxy")

SMALL_BODY = 64 * 1024


class AiohttpPlane:
    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.s = state.s

    async def start(self, app: web.Application) -> None:
        self.state.access.start()
        self.state.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=self.s.proxy_idle_timeout_s),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def shutdown(self, app: web.Application) -> None:
        # Drain, step 1 (the listener is already closed): tell WebSocket clients we are going
        # away. HTTP requests and SSE streams in flight keep running until they end or the
        # runner's shutdown timeout (ZAKI_PROXY_DRAIN_S) passes.
        for ws in list(self.state.websockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"proxy shutting down")

    async def cleanup(self, app: web.Application) -> None:
        # Step 2, after in-flight requests finished: close upstream connections.
        if self.state.session is not None:
            await self.state.session.close()
        await self.state.access.stop()

    def build(self) -> web.Application:
        app = web.Application(
            client_max_size=self.s.max_body_bytes,
            middlewares=[self.access_middleware],
            handler_args={"max_field_size": 16 * 1024, "max_line_size": 16 * 1024},
        )
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        app.on_startup.append(self.start)
        app.on_shutdown.append(self.shutdown)
        app.on_cleanup.append(self.cleanup)
        return app

    @web.middleware
    async def access_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ):
        request_id = next_request_id()
        request["request_id"] = request_id
        t0 = time.perf_counter()
        try:
            resp = await handler(request)
        except web.HTTPRequestEntityTooLarge:
            REJECTED.labels("body_too_large").inc()
            resp = error_response(
                request, 413, "request_too_large", f"body over {self.s.max_body_bytes} bytes"
            )
        except web.HTTPException as e:
            resp = error_response(request, e.status, "http_error", e.reason)
        except Exception:
            log.exception("proxy error", extra={"request_id": request_id})
            resp = error_response(request, 500, "internal_error", "internal error")
        route = request.get("route", "other")
        child(REQUESTS, route, f"{resp.status // 100}xx").inc()
        child(LATENCY, route).observe(time.perf_counter() - t0)
        tenant: Tenant | None = request.get("tenant")
        if tenant is not None and request.get("routed"):
            # The fleet gate's 5xx rate: answers for a routed gateway only (the proxy's own 503
            # for a stopped agent says nothing of its image).
            ACTIVITY.answered(tenant.user_id, resp.status)
        # An unknown path, which could hold anything, is not logged.
        self.state.access.write(
            request_id=request_id,
            tenant=tenant.user_id if tenant else None,
            credential=tenant.credential_id if tenant else None,
            method=request.method,
            route=route,
            status=resp.status,
            ms=round((time.perf_counter() - t0) * 1000, 2),
        )
        return resp

    @staticmethod
    def _upstream_headers(request: web.Request, tenant: Tenant, d: Decision) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in STRIPPED_REQUEST}
        headers.update(
            gateway_headers(
                d, tenant.user_id, request.remote, request.scheme, request.host, request["request_id"]
            )
        )
        return headers

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        d = decide(request.method, request.raw_path, is_upgrade(request))
        if d.kind is Kind.BAD_PATH:
            REJECTED.labels("bad_path").inc()
            return error_response(request, 400, "invalid_path", d.error)
        if d.kind is Kind.HEALTH:
            return web.json_response({"ok": True, "routes": len(self.state.routes.routes)})
        if d.kind is Kind.NOT_FOUND:
            REJECTED.labels("unknown_route").inc()
            return error_response(request, 404, "not_found", f"no route {request.method} {d.path}")
        request["route"] = d.route
        if d.kind is Kind.WEBSOCKET:
            return await aiohttp_ws.websocket(self.state, request, d)
        try:
            tenant = await request_tenant(self.state, request, d.scope)
        except AuthError as e:
            REJECTED.labels(e.code).inc()
            return error_response(request, e.status, e.code, str(e))
        wait = self.state.limits.take(tenant.user_id)
        if wait:
            REJECTED.labels("rate_limited").inc()
            return error_response(
                request,
                429,
                "rate_limit_exceeded",
                "too many requests",
                **{"Retry-After": str(max(1, round(wait)))},
            )
        try:
            route = await self.state.routes.resolve(tenant.user_id)
        except NoRoute as e:
            return not_running_response(request, e.state)
        request["routed"] = True
        return await self._forward(request, tenant, route, d)

    async def _forward(
        self, request: web.Request, tenant: Tenant, route: Route, d: Decision
    ) -> web.StreamResponse:
        session = self.state.session
        assert session is not None
        body = await request.read()
        BYTES_IN.inc(len(body))
        # The normalised path (and the client's query), sent as it is (encoded=True: no requoting).
        url = URL(f"http://{route.host}:{route.port}{d.target}", encoded=True)
        t0 = time.perf_counter()
        try:
            upstream = await session.request(
                request.method,
                url,
                headers=self._upstream_headers(request, tenant, d),
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectionError, aiohttp.ClientOSError):
            return error_response(request, 502, "gateway_unreachable", "your gateway did not answer")
        except TimeoutError:
            return error_response(request, 504, "gateway_timeout", "your gateway did not answer in time")
        child(UPSTREAM_LATENCY, request["route"]).observe(time.perf_counter() - t0)
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in STRIPPED_RESPONSE}
        headers["X-Request-Id"] = request["request_id"]
        length = upstream.headers.get("Content-Length")
        if length is not None and int(length) <= SMALL_BODY:
            # Small bodies of known length: one read, one write (the common JSON answer).
            try:
                data = await upstream.read()
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                return error_response(
                    request, 502, "gateway_unreachable", "your gateway broke off its answer"
                )
            finally:
                upstream.release()
            BYTES_OUT.inc(len(data))
            return web.Response(status=upstream.status, body=data, headers=headers)
        try:
            resp = web.StreamResponse(status=upstream.status, headers=headers)
            if length is not None:
                resp.content_length = int(length)
            await resp.prepare(request)
            # SSE and large bodies pass through as they arrive, never buffered whole.
            async for chunk in upstream.content.iter_any():
                BYTES_OUT.inc(len(chunk))
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
            log.warning("upstream broke mid-response", extra={"request_id": request["request_id"]})
            return resp
        finally:
            upstream.release()
