"""The gateway proxy: one authenticated front door for every user's gateway.

aiohttp serves clients and pools upstream connections (chosen by measurement, see
``bench/proxy.py``). The user's credential is checked and stripped; the proxy then
speaks to the gateway in OpenClaw's trusted-proxy mode (identity headers from the
instance network's gateway address), so no gateway secret ever reaches a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from prometheus_client import Counter, Gauge, Histogram

from services.gateway_proxy.auth import Authenticator, AuthError, Tenant, credential_from
from services.gateway_proxy.limits import TenantLimits
from services.gateway_proxy.routing import NoRoute, Route, RoutingTable
from shared.gateway import CONTROL_UI_BASE_PATH, identity_headers
from shared.http import HOP_BY_HOP
from shared.settings import ZakiSettings

log = logging.getLogger("zaki.proxy")
access_log = logging.getLogger("zaki.proxy.access")

REQUESTS = Counter("zaki_proxy_requests_total", "Proxied requests", ["route", "status_class"])
LATENCY = Histogram(
    "zaki_proxy_request_seconds",
    "Time to response headers",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPSTREAM_LATENCY = Histogram(
    "zaki_proxy_upstream_seconds",
    "Upstream time to response headers",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
OPEN_WS = Gauge("zaki_proxy_open_websockets", "Open client WebSockets")
BYTES = Counter("zaki_proxy_bytes_total", "Bytes relayed", ["direction"])
REJECTED = Counter("zaki_proxy_rejected_total", "Requests refused by the proxy", ["reason"])
BYTES_IN, BYTES_OUT = BYTES.labels("in"), BYTES.labels("out")
_children: dict[tuple, Any] = {}


def _child(metric, *labels: str):
    """Labelled metric children, looked up once (labels() costs a lock and a dict build)."""
    key = (id(metric), *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


_RID_PREFIX = uuid.uuid4().hex[:6]
_rid_counter = itertools.count(1)


def next_request_id() -> str:
    """Unique per process start and cheap: a random prefix and a counter."""
    return f"{_RID_PREFIX}{next(_rid_counter):010x}"


# (method, path) -> (route label, scope). Anything else is a 404: the proxy is an allowlist.
ROUTES: dict[tuple[str, str], tuple[str, str]] = {
    ("POST", "/v1/chat/completions"): ("chat_completions", "chat"),
    ("GET", "/v1/models"): ("models", "chat"),
    ("POST", "/v1/responses"): ("responses", "chat"),
    ("POST", "/v1/embeddings"): ("embeddings", "chat"),
    ("POST", "/tools/invoke"): ("tools_invoke", "tools"),
}
WS_PATHS = ("/ws", "/v1/ws")
UI_PREFIX = CONTROL_UI_BASE_PATH  # the Control UI, for browsers with a session cookie
SMALL_BODY = 64 * 1024

# Client headers the proxy owns: credentials and anything that claims an identity or origin.
STRIPPED_REQUEST = HOP_BY_HOP | {
    "authorization",
    "cookie",
    "host",
    "content-length",
    "forwarded",
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-user",
    "x-request-id",
    "origin",
    "x-openclaw-scopes",
}
STRIPPED_RESPONSE = HOP_BY_HOP | {"content-length", "set-cookie", "server"}


def error_response(
    request: web.Request,
    status: int,
    code: str,
    message: str,
    extra: dict[str, Any] | None = None,
    **extra_headers: str,
) -> web.Response:
    """JSON errors; in the OpenAI error shape on /v1/*. *extra* adds top-level fields."""
    return web.json_response(
        error_body(request.path, code, message, extra), status=status, headers=extra_headers
    )


class GatewayProxy:
    def __init__(self, settings: ZakiSettings, authenticator: Authenticator, routes: RoutingTable) -> None:
        self.s = settings
        self.auth = authenticator
        self.routes = routes
        self.limits = TenantLimits(
            settings.rate_limit_rps, settings.rate_limit_burst, settings.max_websockets_per_tenant
        )
        self.session: aiohttp.ClientSession | None = None
        self.websockets: set[web.WebSocketResponse] = set()
        self.raw_websockets: set[Any] = set()  # the fast path's relays (wsrelay.WsRelay)
        self.allowed_origins = settings.proxy_public_origins()
        self.origin = (self.allowed_origins or [None])[0]
        self.access = AccessLog()

    async def start(self, app: web.Application) -> None:
        self.access.start()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=self.s.proxy_idle_timeout_s),
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def shutdown(self, app: web.Application) -> None:
        # Drain, step 1 (the listener is already closed): tell WebSocket clients we are going
        # away. HTTP requests and SSE streams in flight keep running until they end or the
        # runner's shutdown timeout (ZAKI_PROXY_DRAIN_S) passes.
        for ws in list(self.websockets):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"proxy shutting down")

    async def cleanup(self, app: web.Application) -> None:
        # Step 2, after in-flight requests finished: close upstream connections.
        if self.session is not None:
            await self.session.close()
        await self.access.stop()

    def build(self) -> web.Application:
        app = web.Application(
            client_max_size=self.s.max_body_bytes,
            middlewares=[self.access_middleware],
            handler_args={"max_field_size": 16 * 1024, "max_line_size": 16 * 1024},
        )
        app.router.add_get("/healthz", self.healthz)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        app.on_startup.append(self.start)
        app.on_shutdown.append(self.shutdown)
        app.on_cleanup.append(self.cleanup)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "routes": len(self.routes.routes)})

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
        _child(REQUESTS, route, f"{resp.status // 100}xx").inc()
        _child(LATENCY, route).observe(time.perf_counter() - t0)
        tenant: Tenant | None = request.get("tenant")
        # Only fields that cannot carry a secret (validated ids, the route's label, the status),
        # so the line needs no redaction: an unknown path, which could hold anything, is not logged.
        self.access.write(
            request_id=request_id,
            tenant=tenant.user_id if tenant else None,
            credential=tenant.credential_id if tenant else None,
            method=request.method,
            route=route,
            status=resp.status,
            ms=round((time.perf_counter() - t0) * 1000, 2),
        )
        return resp

    async def _tenant(self, request: web.Request, scope: str, protocols: list[str] | None = None) -> Tenant:
        credential, source = credential_from(request.headers, request.cookies, protocols)
        if source == "cookie":
            self._check_browser_origin(request)
        tenant = await self.auth.authenticate(credential)
        request["tenant"] = tenant
        if scope not in tenant.scopes:
            raise AuthError(403, "insufficient_scope", f"this credential lacks the '{scope}' scope")
        return tenant

    def _check_browser_origin(self, request: web.Request) -> None:
        check_cookie_origin(
            request.method, request.headers.get("Origin"), self._is_upgrade(request), self.allowed_origins
        )

    @staticmethod
    def _is_upgrade(request: web.Request) -> bool:
        return request.headers.get("Upgrade", "").lower() == "websocket"

    def _upstream_headers(self, request: web.Request, tenant: Tenant) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in STRIPPED_REQUEST}
        headers.update(identity_headers(tenant.user_id, request.remote, proto=request.scheme))
        headers["x-forwarded-host"] = request.host
        headers["x-request-id"] = request["request_id"]
        return headers

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        ui = path == UI_PREFIX or path.startswith(UI_PREFIX + "/")
        if path in WS_PATHS or (ui and self._is_upgrade(request)):
            request["route"] = "control_ui_ws" if ui else "websocket"
            return await self.websocket(request, "ui" if ui else "ws")
        known = ROUTES.get((request.method, path))
        if known is None and request.method == "GET" and path.startswith("/v1/models/"):
            known = ("models", "chat")
        if known is None and ui and request.method in ("GET", "HEAD"):
            # The gateway's Control UI (served under gateway.controlUi.basePath = UI_PREFIX).
            known = ("control_ui", "ui")
        if known is None:
            REJECTED.labels("unknown_route").inc()
            return error_response(request, 404, "not_found", f"no route {request.method} {path}")
        request["route"], scope = known
        try:
            tenant = await self._tenant(request, scope)
        except AuthError as e:
            REJECTED.labels(e.code).inc()
            return error_response(request, e.status, e.code, str(e))
        wait = self.limits.take(tenant.user_id)
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
            route = await self.routes.resolve(tenant.user_id)
        except NoRoute as e:
            return self._not_running(request, e.state)
        return await self._forward(request, tenant, route)

    def _not_running(self, request: web.Request, state: str | None) -> web.Response:
        REJECTED.labels("instance_not_running").inc()
        message, extra, headers = not_running(state)
        return error_response(request, 503, "instance_not_running", message, extra, **headers)

    async def _forward(self, request: web.Request, tenant: Tenant, route: Route) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        BYTES_IN.inc(len(body))
        url = f"http://{route.host}:{route.port}{request.rel_url.raw_path_qs}"
        t0 = time.perf_counter()
        try:
            upstream = await self.session.request(
                request.method,
                url,
                headers=self._upstream_headers(request, tenant),
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectionError, aiohttp.ClientOSError):
            return error_response(request, 502, "gateway_unreachable", "your gateway did not answer")
        except TimeoutError:
            return error_response(request, 504, "gateway_timeout", "your gateway did not answer in time")
        _child(UPSTREAM_LATENCY, request["route"]).observe(time.perf_counter() - t0)
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
            resp = web.StreamResponse(
                status=upstream.status,
                headers=headers,
            )
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

    async def websocket(self, request: web.Request, scope: str = "ws") -> web.StreamResponse:
        protocols = [
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
        ]
        try:
            tenant = await self._tenant(request, scope, protocols)
        except AuthError as e:
            REJECTED.labels(e.code).inc()
            return error_response(request, e.status, e.code, str(e))
        try:
            route = await self.routes.resolve(tenant.user_id)
        except NoRoute as e:
            return self._not_running(request, e.state)
        if not self.limits.open_websocket(tenant.user_id):
            REJECTED.labels("too_many_websockets").inc()
            return error_response(
                request, 429, "too_many_websockets", "too many open WebSockets", **{"Retry-After": "10"}
            )
        try:
            return await self._relay(request, tenant, route, protocols)
        finally:
            self.limits.close_websocket(tenant.user_id)

    async def _relay(
        self, request: web.Request, tenant: Tenant, route: Route, protocols: list[str]
    ) -> web.StreamResponse:
        assert self.session is not None
        headers = identity_headers(
            tenant.user_id, request.remote, proto="https" if request.secure else "http"
        )
        if self.origin:
            headers["Origin"] = self.origin
        try:
            upstream = await self.session.ws_connect(
                f"http://{route.host}:{route.port}/",
                headers=headers,
                max_msg_size=32 << 20,
                autoping=True,
                heartbeat=30,
            )
        except (aiohttp.ClientError, TimeoutError):
            return error_response(request, 502, "gateway_unreachable", "your gateway did not answer")
        # Echo a bearer.* subprotocol back only as the protocol name, never the token itself.
        client = web.WebSocketResponse(max_msg_size=32 << 20, heartbeat=30, protocols=("openclaw",))
        await client.prepare(request)
        self.websockets.add(client)
        OPEN_WS.inc()
        first = True

        async def client_to_upstream() -> None:
            nonlocal first
            async for msg in client:
                if msg.type == WSMsgType.TEXT:
                    data = msg.data
                    if first:
                        data, first = sanitize_connect(data), False
                    BYTES_IN.inc(len(data))
                    await upstream.send_str(data)
                elif msg.type == WSMsgType.BINARY:
                    await upstream.send_bytes(msg.data)
                else:
                    break

        async def upstream_to_client() -> None:
            async for msg in upstream:
                if msg.type == WSMsgType.TEXT:
                    BYTES_OUT.inc(len(msg.data))
                    await client.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await client.send_bytes(msg.data)
                else:
                    break

        tasks = [asyncio.create_task(client_to_upstream()), asyncio.create_task(upstream_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await upstream.close()
            await client.close()
            self.websockets.discard(client)
            OPEN_WS.dec()
        return client


_PLAIN = re.compile(r"[A-Za-z0-9_.:@-]*")


def _json_str(value: str | None) -> str:
    if value is None:
        return "null"
    return f'"{value}"' if _PLAIN.fullmatch(value) else json.dumps(value)


class AccessLog:
    """Access log lines (JSON, same shape as the service's other logs) written in batches:
    one write every 200 ms instead of a logging record and a syscall per request."""

    def __init__(self, stream=None, interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.lines: list[str] = []
        self.task: asyncio.Task | None = None
        self.enabled = access_log.isEnabledFor(logging.INFO)

    def write(
        self,
        request_id: str,
        tenant: str | None,
        credential: str | None,
        method: str,
        route: str,
        status: int,
        ms: float,
    ) -> None:
        if not self.enabled:
            return
        # Formatted by hand (json.dumps per request cost a tenth of the proxy's time); only
        # the two fields that may hold arbitrary text go through the JSON encoder.
        self.lines.append(
            f'{{"ts": "{datetime.now(UTC).isoformat(timespec="milliseconds")}", "level": "info", '
            f'"service": "gateway_proxy", "logger": "zaki.proxy.access", "msg": "request", '
            f'"request_id": "{request_id}", "tenant": {_json_str(tenant)}, '
            f'"credential": {_json_str(credential)}, "method": "{method}", "route": "{route}", '
            f'"status": {status}, "ms": {ms}}}'
        )
        if len(self.lines) >= 1000:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            lines, self.lines = self.lines, []
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.flush()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.flush()


def not_running(state: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The 503 for an instance that is not running: message, body fields, headers
    (``Retry-After`` while it is on its way up)."""
    headers = {"Retry-After": "5"} if state in ("requested", "provisioning", "starting") else {}
    return f"your gateway is {state or 'not provisioned'}", {"state": state or "absent"}, headers


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


def error_body(path: str, code: str, message: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON of an error answer: the OpenAI error shape on /v1/*."""
    if path.startswith("/v1/"):
        body: dict[str, Any] = {"error": {"message": message, "type": code, "code": code, "param": None}}
    else:
        body = {"ok": False, "error": {"type": code, "message": message}}
    return {**body, **(extra or {})}


def sanitize_connect(frame: str) -> str:
    """Drops client-supplied ``auth`` and ``device`` from the WebSocket ``connect`` frame:
    the proxy's identity headers are the only credential the gateway should see."""
    try:
        obj = json.loads(frame)
    except ValueError:
        return frame
    if isinstance(obj, dict) and obj.get("method") == "connect" and isinstance(obj.get("params"), dict):
        obj["params"].pop("auth", None)
        obj["params"].pop("device", None)
        return json.dumps(obj)
    return frame
