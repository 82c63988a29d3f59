"""The proxy's HTTP data plane on raw asyncio protocols, parsed by llhttp (httptools).

Measured (``bench/proxy.py``, ``../shared/perf-anchors.md``): a minimal aiohttp proxy
spends most of a small request in per-request objects on both legs and reaches about a
quarter of nginx. Here a request is parsed once, checked against in-memory caches and
written to a pooled upstream connection; the answer is parsed once and written back as
it arrives (SSE included), with backpressure both ways.

This module serves the API routes (``ROUTES``). Anything else (WebSocket upgrades, the
Control UI, health, unknown paths) is handed, connection and all, to the aiohttp
application in ``app.py``, which keeps every rule for those.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from http import HTTPStatus
from typing import Any

import httptools

from services.gateway_proxy.app import (
    BYTES_IN,
    BYTES_OUT,
    LATENCY,
    REJECTED,
    REQUESTS,
    ROUTES,
    STRIPPED_REQUEST,
    STRIPPED_RESPONSE,
    UI_PREFIX,
    UPSTREAM_LATENCY,
    WS_PATHS,
    GatewayProxy,
    _child,
    check_cookie_origin,
    error_body,
    next_request_id,
    not_running,
)
from services.gateway_proxy.auth import SESSION_COOKIE, AuthError, Tenant, credential_from
from services.gateway_proxy.routing import NoRoute, Route
from services.gateway_proxy.wsrelay import WsRelay, flush_relayed
from shared.gateway import identity_headers

log = logging.getLogger("zaki.proxy")

MAX_HEADER_BYTES = 32 * 1024
# Expect is answered here (the whole body is read before the gateway is called).
_STRIPPED_REQUEST = {h.encode() for h in STRIPPED_REQUEST} | {b"expect"}
_STRIPPED_RESPONSE = {h.encode() for h in STRIPPED_RESPONSE}
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _fast_route(method: str, path: str) -> tuple[str, str] | None:
    known = ROUTES.get((method, path))
    if known is None and method == "GET" and path.startswith("/v1/models/"):
        known = ("models", "chat")
    return known


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v or None
    return None


class _Request:
    __slots__ = (
        "body",
        "headers",
        "keep_alive",
        "lower",
        "method",
        "path",
        "rid",
        "route",
        "scope",
        "size",
        "t0",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes, bytes]] = []  # (name, lower-case name, value)
        self.lower: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0

    def header(self, name: bytes) -> str | None:
        v = self.lower.get(name)
        return None if v is None else v.decode("latin-1")

    def credential(self, protocols: list[str] | None = None) -> tuple[str | None, str]:
        """The caller's credential and where it came from, by the aiohttp side's rules."""
        cookie = self.header(b"cookie")
        session = _cookie(cookie, SESSION_COOKIE) if cookie else None
        return credential_from(
            {"Authorization": self.header(b"authorization") or ""},
            {SESSION_COOKIE: session} if session else {},
            protocols,
        )


class FastProxyServer:
    def __init__(self, proxy: GatewayProxy, handoff_factory: Any) -> None:
        self.proxy = proxy
        self.s = proxy.s
        self.handoff_factory = handoff_factory  # aiohttp's web.Server: called, gives a protocol
        self.pools: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self.clients: set[ClientConnection] = set()
        self.in_flight = 0
        self.idle = asyncio.Event()  # set whenever no request is in flight
        self.server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.draining = False

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_port=True, backlog=2048
        )
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Closes keep-alive connections idle too long and requests whose headers trickle in
        (slowloris): no connection holds a slot forever."""
        keepalive, header_timeout = self.s.proxy_keepalive_s, self.s.proxy_header_timeout_s
        while True:
            await asyncio.sleep(min(keepalive, header_timeout, self.s.proxy_idle_timeout_s, 5.0) / 2)
            flush_relayed()
            now, perf = time.monotonic(), time.perf_counter()
            for c in list(self.clients):
                ex = c.exchange
                if ex is not None:
                    # A gateway silent for ZAKI_PROXY_IDLE_TIMEOUT_S ends the request (504, or a cut
                    # stream); checked here rather than with a timer per request.
                    if ex.up is not None and perf - ex.last_data > self.s.proxy_idle_timeout_s:
                        ex.upstream_failed(timeout=True)
                    continue
                if c.ws is not None or c.closed:
                    continue
                if c.req is not None or c.rejecting:
                    if now - c.req_started > header_timeout:
                        c.timed_out()
                elif now - c.last_active > keepalive:
                    c.transport.close()

    async def drain(self, timeout: float) -> None:
        """Stops accepting, lets requests in flight finish (up to *timeout*), then closes idle connections."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for ws in list(self.proxy.raw_websockets):
            ws.go_away()
        flush_relayed()
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), timeout)
        for c in list(self.clients):
            c.transport.close()
        for pool in self.pools.values():
            for up in pool:
                up.transport.close()

    # --- upstream connections ------------------------------------------------------------------

    def idle_upstream(self, route: Route) -> UpstreamConnection | None:
        pool = self.pools.get((route.host, route.port))
        while pool:
            up = pool.pop()
            if not up.closed:
                up.reused, up.got_bytes = True, False
                return up
        return None

    async def upstream(self, route: Route, fresh: bool = False) -> UpstreamConnection:
        up = None if fresh else self.idle_upstream(route)
        if up is not None:
            return up
        loop = asyncio.get_running_loop()
        _, up = await asyncio.wait_for(
            loop.create_connection(
                lambda: UpstreamConnection(self, (route.host, route.port)), route.host, route.port
            ),
            5,
        )
        return up

    def release(self, up: UpstreamConnection) -> None:
        if not up.closed and not self.draining:
            self.pools.setdefault(up.key, []).append(up)
        else:
            up.transport.close()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, serves the API routes, hands over the rest."""

    def __init__(self, server: FastProxyServer) -> None:
        self.server = server
        self.proxy = server.proxy
        self.transport: asyncio.Transport
        self.parser = httptools.HttpRequestParser(self)
        self.buf = bytearray()  # bytes of the request being parsed, kept for a hand-over
        self.req: _Request | None = None
        self.queue: deque[_Request] = deque()
        self.exchange: Exchange | None = None
        self.handoff = False
        self.buffering = True  # until a request is known to be ours
        self.completed_in_chunk = False
        self.pipelined = False
        self.closed = False
        self.rejecting = False  # answered 413: reading (and dropping) the rest of the body
        self.ws: WsRelay | None = None
        self.ws_req: _Request | None = None
        self.ws_scope = "ws"
        self.remote = ""
        self.last_active = self.req_started = time.monotonic()

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if peer else ""
        self.server.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.from_client(data)
            return
        if self.handoff:
            return
        self.last_active = time.monotonic()
        if self.buffering:
            self.buf += data
        self.completed_in_chunk = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # An Upgrade request: on_headers_complete chose between our relay and a hand-over.
            if self.ws_req is not None and not self.handoff:
                self._start_websocket(data[e.args[0] :])
                return
        except httptools.HttpParserError:
            if not self.handoff:
                self._error_and_close(400, "bad_request", "malformed HTTP request")
                return
        if self.handoff:
            self._hand_over()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.clients.discard(self)
        if self.exchange is not None:
            self.exchange.client_gone()
        if self.ws is not None:
            self.ws.close()

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_upstream()
        elif self.ws is not None and self.ws.up is not None:
            self.ws.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.resume_upstream()
        elif self.ws is not None and self.ws.up is not None:
            self.ws.up.transport.resume_reading()

    # --- llhttp callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.completed_in_chunk or self.queue or self.exchange is not None:
            self.pipelined = True
        self.req = _Request()
        self.req_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        req.size += len(name) + len(value) + 4
        lname = name.lower()
        req.headers.append((name, lname, value))
        req.lower[lname] = value

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        if req.size > MAX_HEADER_BYTES:
            self._error_and_close(431, "headers_too_large", "request headers too large")
            return
        req.method = self.parser.get_method().decode()
        try:
            req.path = httptools.parse_url(req.url).path.decode("utf-8", "surrogateescape")
        except httptools.HttpParserInvalidURLError:
            self._error_and_close(400, "bad_request", "malformed URL")
            return
        if req.header(b"upgrade") is not None:
            ui = req.path == UI_PREFIX or req.path.startswith(UI_PREFIX + "/")
            if (req.path in WS_PATHS or ui) and req.method == "GET" and not self.pipelined:
                self.ws_req, self.ws_scope = req, "ui" if ui else "ws"
                return
            known = None
        else:
            known = _fast_route(req.method, req.path)
        if known is None:
            if self.pipelined:
                self._error_and_close(400, "bad_request", "pipelined request cannot be served")
            else:
                self.handoff = True
            return
        req.route, req.scope = known
        self.buffering, self.buf = False, bytearray()
        req.keep_alive = self.parser.should_keep_alive()
        length = req.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.server.s.max_body_bytes:
            REJECTED.labels("body_too_large").inc()
            self._reject_body(req)
            return
        expect = req.header(b"expect")
        if expect is not None and expect.lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for it otherwise

    def on_body(self, body: bytes) -> None:
        req = self.req
        if req is None or self.handoff or self.closed or self.rejecting:
            return
        req.body.append(body)
        req.size += len(body)
        if req.size > self.server.s.max_body_bytes + MAX_HEADER_BYTES:
            REJECTED.labels("body_too_large").inc()
            self._reject_body(req)

    def on_message_complete(self) -> None:
        req, self.req = self.req, None
        if self.rejecting:
            self.transport.close()
            return
        if req is None or self.handoff or self.closed or req is self.ws_req:
            return
        self.completed_in_chunk = True
        self.buffering = True
        self.queue.append(req)
        if self.exchange is None:
            self._next()

    # --- serving ----------------------------------------------------------------------------------

    def _hand_over(self) -> None:
        """The connection now belongs to aiohttp, which sees the request from its first byte."""
        protocol = self.server.handoff_factory()
        self.server.clients.discard(self)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(bytes(self.buf))
        self.buf = bytearray()

    def _next(self) -> None:
        if not self.queue or self.closed:
            return
        req = self.queue.popleft()
        req.rid = next_request_id()
        req.t0 = time.perf_counter()
        self.server.in_flight += 1
        self.server.idle.clear()
        self.exchange = Exchange(self, req)
        self.transport.pause_reading()  # one request at a time; TCP holds the rest
        self.exchange.start()

    def finished(self, keep_alive: bool) -> None:
        self.server.in_flight -= 1
        if not self.server.in_flight:
            self.server.idle.set()
        self.exchange = None
        if self.closed:
            return
        if not keep_alive or self.server.draining:
            self.transport.close()
            return
        if self.queue:
            self._next()
        else:
            self.transport.resume_reading()

    def timed_out(self) -> None:
        self._error_and_close(408, "request_timeout", "the request did not arrive in time")

    def _start_websocket(self, leftover: bytes) -> None:
        req = self.ws_req
        assert req is not None
        req.rid = next_request_id()
        req.route = "control_ui_ws" if self.ws_scope == "ui" else "websocket"
        self.buf = bytearray()
        self.ws = WsRelay(self, req, self.ws_scope, leftover)
        asyncio.get_running_loop().create_task(self.ws.start())

    def ws_refused(
        self,
        status: int,
        code: str,
        message: str,
        req: _Request,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        _child(REQUESTS, req.route, f"{status // 100}xx").inc()
        if not self.closed:
            self.transport.write(
                error_bytes(status, req.path, code, message, req.rid, extra, headers, close=True)
            )
            self.transport.close()
        self.proxy.access.write(
            request_id=req.rid,
            tenant=None,
            credential=None,
            method="GET",
            route=req.route,
            status=status,
            ms=0.0,
        )

    def log_websocket(self, req: _Request, tenant: Tenant | None, seconds: float) -> None:
        _child(REQUESTS, req.route, "1xx").inc()
        self.proxy.access.write(
            request_id=req.rid,
            tenant=tenant.user_id if tenant else None,
            credential=tenant.credential_id if tenant else None,
            method="GET",
            route=req.route,
            status=101,
            ms=round(seconds * 1000, 2),
        )

    def _reject_body(self, req: _Request) -> None:
        """413 at once, then read and drop what the client is still sending before closing
        (closing with unread data would reset the connection before it reads the answer)."""
        limit = self.server.s.max_body_bytes
        self.transport.write(
            error_bytes(
                413, req.path, "request_too_large", f"body over {limit} bytes", next_request_id(), close=True
            )
        )
        self.rejecting = True
        asyncio.get_running_loop().call_later(5, self.transport.close)

    def _error_and_close(self, status: int, code: str, message: str, req: _Request | None = None) -> None:
        path = req.path if req is not None and hasattr(req, "path") else "/"
        self.transport.write(error_bytes(status, path, code, message, next_request_id(), close=True))
        self.transport.close()
        self.closed = True


def error_bytes(
    status: int,
    path: str,
    code: str,
    message: str,
    request_id: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    close: bool = False,
) -> bytes:
    body = json.dumps(error_body(path, code, message, extra)).encode()
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")),
        b"Content-Type: application/json; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"X-Request-Id: " + request_id.encode() + b"\r\n",
    ]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}\r\n".encode("latin-1"))
    if close:
        lines.append(b"Connection: close\r\n")
    return b"".join(lines) + b"\r\n" + body


class Exchange:
    """One request's life: checks, the upstream call, the answer streamed back."""

    __slots__ = (
        "chunked",
        "client",
        "done",
        "headers_sent",
        "keep_alive",
        "last_data",
        "req",
        "retried",
        "route",
        "status",
        "t_up",
        "tenant",
        "up",
    )

    def __init__(self, client: ClientConnection, req: _Request) -> None:
        self.client = client
        self.req = req
        self.up: UpstreamConnection | None = None
        self.tenant: Tenant | None = None
        self.status = 0
        self.headers_sent = False
        self.chunked = False
        self.done = False
        self.keep_alive = req.keep_alive
        self.last_data = 0.0
        self.t_up = 0.0
        self.route: Route | None = None
        self.retried = False

    # --- checks -------------------------------------------------------------------------------------

    def start(self) -> None:
        proxy = self.client.proxy
        try:
            credential = self._credential()
            tenant = proxy.auth.authenticate_cached(credential)
        except AuthError as e:
            self._refuse(e.status, e.code, str(e))
            return
        if tenant is None:  # not cached: ask the store
            asyncio.get_running_loop().create_task(self._authenticate(credential))
            return
        self._authorized(tenant)

    def _credential(self) -> str | None:
        req = self.req
        credential, source = req.credential()
        if source == "cookie":
            check_cookie_origin(req.method, req.header(b"origin"), False, self.client.proxy.allowed_origins)
        return credential

    async def _authenticate(self, credential: str | None) -> None:
        try:
            tenant = await self.client.proxy.auth.authenticate(credential)
        except AuthError as e:
            self._refuse(e.status, e.code, str(e))
            return
        except Exception:
            log.exception("authentication failed", extra={"request_id": self.req.rid})
            self._answer_error(500, "internal_error", "internal error")
            return
        self._authorized(tenant)

    def _authorized(self, tenant: Tenant) -> None:
        self.tenant = tenant
        proxy = self.client.proxy
        if self.req.scope not in tenant.scopes:
            self._refuse(403, "insufficient_scope", f"this credential lacks the '{self.req.scope}' scope")
            return
        wait = proxy.limits.take(tenant.user_id)
        if wait:
            REJECTED.labels("rate_limited").inc()
            self._answer_error(
                429,
                "rate_limit_exceeded",
                "too many requests",
                headers={"Retry-After": str(max(1, round(wait)))},
            )
            return
        route = proxy.routes.routes.get(tenant.user_id)
        if route is not None:
            up = self.client.server.idle_upstream(route)
            if up is not None:  # the common case, with no task and no await
                self.route = route
                self._send(up, route)
                return
        asyncio.get_running_loop().create_task(self._forward(route))

    def _refuse(self, status: int, code: str, message: str) -> None:
        REJECTED.labels(code).inc()
        self._answer_error(status, code, message)

    def _not_running(self, state: str | None) -> None:
        REJECTED.labels("instance_not_running").inc()
        message, extra, headers = not_running(state)
        self._answer_error(503, "instance_not_running", message, extra, headers)

    def _answer_error(
        self,
        status: int,
        code: str,
        message: str,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        c = self.client
        if not c.closed:
            close = not self.keep_alive
            c.transport.write(
                error_bytes(status, self.req.path, code, message, self.req.rid, extra, headers, close)
            )
        self.status = status
        self._finish()

    # --- the upstream call --------------------------------------------------------------------------

    async def _forward(self, route: Route | None) -> None:
        proxy = self.client.proxy
        assert self.tenant is not None
        if route is None:
            try:
                route = await proxy.routes.resolve(self.tenant.user_id)
            except NoRoute as e:
                self._not_running(e.state)
                return
        self.route = route
        try:
            up = await self.client.server.upstream(route, fresh=self.retried)
        except (OSError, TimeoutError):
            # Perhaps it just stopped and the event is on its way: the record says.
            doc = await proxy.routes.store.get_instance(self.tenant.user_id)
            state = doc["state"] if doc else None
            if state != "running":
                proxy.routes.on_gone(self.tenant.user_id, state)
                self._not_running(state)
            else:
                self._answer_error(502, "gateway_unreachable", "your gateway did not answer")
            return
        if self.client.closed:
            self.client.server.release(up)
            self._finish()
            return
        self._send(up, route)

    def _send(self, up: UpstreamConnection, route: Route) -> None:
        req = self.req
        assert self.tenant is not None
        self.up = up
        up.exchange = self
        body = b"".join(req.body)
        BYTES_IN.inc(len(body))
        lines = [req.method.encode() + b" " + req.url + b" HTTP/1.1\r\n"]
        for k, lk, v in req.headers:
            if lk not in _STRIPPED_REQUEST:
                lines.append(k + b": " + v + b"\r\n")
        ident = identity_headers(self.tenant.user_id, self.client.remote, proto="http")
        host = req.header(b"host") or ""
        ident["x-forwarded-host"] = host
        ident["x-request-id"] = req.rid
        for k, v in ident.items():
            lines.append(f"{k}: {v}\r\n".encode("latin-1"))
        lines.append(
            b"Host: %s:%d\r\nContent-Length: %d\r\n\r\n" % (route.host.encode(), route.port, len(body))
        )
        self.t_up = self.last_data = time.perf_counter()
        up.transport.write(b"".join(lines) + body)

    # --- the answer ----------------------------------------------------------------------------------

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]], has_length: bool) -> None:
        self.last_data = time.perf_counter()
        _child(UPSTREAM_LATENCY, self.req.route).observe(self.last_data - self.t_up)
        self.status = status
        # 1xx, 204 and 304 answers have no body, hence no framing either.
        self.chunked = not has_length and status >= 200 and status not in (204, 304)
        out = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))]
        for k, v in headers:
            lk = k.lower()
            if lk in _STRIPPED_RESPONSE and not (lk == b"content-length" and has_length):
                continue
            out.append(k + b": " + v + b"\r\n")
        out.append(b"X-Request-Id: " + self.req.rid.encode() + b"\r\n")
        if self.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        self.headers_sent = True
        self.up.out.append(b"".join(out))

    def response_body(self, data: bytes) -> None:
        self.last_data = time.perf_counter()
        BYTES_OUT.inc(len(data))
        if self.chunked:
            self.up.out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.up.out.append(data)

    def response_done(self, upstream_keep_alive: bool) -> None:
        up, self.up = self.up, None
        if up is None:
            return
        if self.chunked:
            up.out.append(b"0\r\n\r\n")
        self.flush(up.out)
        if up is not None:
            up.exchange = None
            if upstream_keep_alive:
                self.client.server.release(up)
            else:
                up.transport.close()
        self._finish()

    def flush(self, out: list[bytes]) -> None:
        """One write per upstream read: head, body and end of a small answer in one syscall."""
        if out:
            if not self.client.closed:
                self.client.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def upstream_failed(self, timeout: bool = False) -> None:
        """The gateway broke off (or went silent): an error if nothing was sent yet, else cut."""
        if self.done:
            return
        up, self.up = self.up, None
        if up is not None:
            self.flush(up.out)
        if up is not None:
            up.exchange = None
            up.transport.close()
            if up.reused and not up.got_bytes and not timeout and not self.retried and not self.client.closed:
                # A pooled connection the gateway closed as we wrote (its keep-alive ran out):
                # the request was not read; send it once more on a fresh connection.
                self.retried = True
                asyncio.get_running_loop().create_task(self._forward(self.route))
                return
        if not self.headers_sent:
            if timeout:
                self._answer_error(504, "gateway_timeout", "your gateway did not answer in time")
            else:
                self._answer_error(502, "gateway_unreachable", "your gateway did not answer")
            return
        log.warning("upstream broke mid-response", extra={"request_id": self.req.rid})
        self.keep_alive = False
        if not self.client.closed:
            self.client.transport.close()
        self._finish()

    def client_gone(self) -> None:
        if self.done:
            return
        up, self.up = self.up, None
        if up is not None:
            up.exchange = None
            up.transport.close()
        self._finish()

    def pause_upstream(self) -> None:
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_upstream(self) -> None:
        if self.up is not None:
            self.up.transport.resume_reading()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        req = self.req
        elapsed = time.perf_counter() - req.t0
        status = self.status or 499
        _child(REQUESTS, req.route, f"{status // 100}xx").inc()
        _child(LATENCY, req.route).observe(elapsed)
        tenant = self.tenant
        self.client.proxy.access.write(
            request_id=req.rid,
            tenant=tenant.user_id if tenant else None,
            credential=tenant.credential_id if tenant else None,
            method=req.method,
            route=req.route,
            status=status,
            ms=round(elapsed * 1000, 2),
        )
        self.client.finished(self.keep_alive)


class UpstreamConnection(asyncio.Protocol):
    """A pooled keep-alive connection to one gateway."""

    def __init__(self, server: FastProxyServer, key: tuple[str, int]) -> None:
        self.server = server
        self.key = key
        self.transport: asyncio.Transport
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.has_length = False
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.out: list[bytes] = []  # what one read produced for the client, written at once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.closed = True
            if self.exchange is not None:
                self.exchange.upstream_failed()
            self.transport.close()
            return
        if self.out and self.exchange is not None:
            self.exchange.flush(self.out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pool = self.server.pools.get(self.key)
        if pool is not None:
            with contextlib.suppress(ValueError):
                pool.remove(self)
        if self.exchange is not None:
            self.exchange.upstream_failed()

    def on_message_begin(self) -> None:
        self.headers = []
        self.has_length = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-length":
            self.has_length = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.response_head(self.parser.get_status_code(), self.headers, self.has_length)

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self.exchange is not None:
            self.exchange.response_done(self.parser.should_keep_alive())
