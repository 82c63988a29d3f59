"""The proxy's HTTP data plane on raw asyncio protocols, parsed by llhttp (httptools).

Measured (``bench/proxy.py``, ``../shared/perf-anchors.md``): a minimal aiohttp proxy
spends most of a small request in per-request objects on both legs and reaches about a
quarter of nginx. Here a request is parsed once, checked against in-memory caches and
written to a pooled upstream connection (``exchange``, ``upstream_pool``); the answer is
parsed once and written back as it arrives (SSE included), with backpressure both ways.

This module serves the API routes and WebSockets (``ws_relay``). Anything else (the Control
UI's pages, health, unknown paths) is handed, connection and all, to the aiohttp plane
(``aiohttp_app``), which keeps every rule for those.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import httptools

from services.gateway_proxy.auth import Tenant
from services.gateway_proxy.decision import MAX_TARGET, Kind, decide
from services.gateway_proxy.errors import error_bytes, linger, linger_more
from services.gateway_proxy.exchange import Exchange
from services.gateway_proxy.observe import REJECTED, REQUESTS, child, flush_relayed, next_request_id
from services.gateway_proxy.raw_request import RawRequest
from services.gateway_proxy.state import ProxyState
from services.gateway_proxy.upstream_pool import UpstreamPool
from services.gateway_proxy.ws_relay import WsRelay

MAX_HEADER_BYTES = 32 * 1024
# Bytes a request head may take on the wire (URL and headers) before it is refused: counted
# as they arrive, since llhttp's bindings keep a header value in memory until it ends.
MAX_HEAD_BYTES = MAX_TARGET + MAX_HEADER_BYTES


class _TooLarge(Exception):
    """Raised from a parser callback: stops the parse at once."""


class FastProxyServer:
    def __init__(self, state: ProxyState, handoff_factory: Any) -> None:
        self.state = state
        self.s = state.s
        self.handoff_factory = handoff_factory  # aiohttp's web.Server: called, gives a protocol
        self.pool = UpstreamPool()
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
        self.draining = self.pool.draining = True
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for ws in list(self.state.raw_websockets):
            ws.go_away()
        flush_relayed()
        if self.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), timeout)
        for c in list(self.clients):
            c.transport.close()
        self.pool.close_all()


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, serves the API routes, hands over the rest."""

    def __init__(self, server: FastProxyServer) -> None:
        self.server = server
        self.state = server.state
        self.pool = server.pool
        self.transport: asyncio.Transport
        self.parser = httptools.HttpRequestParser(self)
        self.buf = bytearray()  # bytes of the request being parsed, kept for a hand-over
        self.req: RawRequest | None = None
        self.queue: deque[RawRequest] = deque()
        self.exchange: Exchange | None = None
        self.handoff = False
        self.buffering = True  # until a request is known to be ours
        self.completed_in_chunk = False
        self.pipelined = False
        self.closed = False
        self.rejecting = False  # answered 413: reading (and dropping) the rest of the body
        self.ws: WsRelay | None = None
        self.ws_req: RawRequest | None = None
        self.in_head = True  # between requests or inside a request's head: bytes are counted
        self.head_bytes = 0
        self.too_large = 0  # 414 or 431 once a limit is passed
        self.linger_bytes = -1  # >= 0 while lingering after an error answer
        self.remote = ""
        self.last_active = self.req_started = time.monotonic()

    # --- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if peer else ""
        self.server.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self.linger_bytes >= 0:  # after an error answer (errors.linger)
            self.linger_bytes = linger_more(self.transport, self.linger_bytes, len(data))
            return
        if self.ws is not None:
            self.ws.from_client(data)
            return
        if self.handoff:
            return
        self.last_active = time.monotonic()
        if self.in_head:
            # Bytes a head has taken so far (at most one read more than its own: a read that
            # ends one request's body and starts the next head is not counted).
            self.head_bytes += len(data)
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
            if self.too_large:
                self._head_too_large()
                return
            if not self.handoff:
                self._error_and_close(400, "bad_request", "malformed HTTP request")
                return
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES and not self.closed:
            self._head_too_large()
            return
        if self.handoff:
            self._hand_over()

    def _head_too_large(self) -> None:
        req = self.req
        if self.too_large == 414 or (req is not None and not req.headers and len(req.url) > MAX_TARGET):
            REJECTED.labels("uri_too_long").inc()
            self._error_and_close(414, "uri_too_long", f"request target over {MAX_TARGET} bytes")
        else:
            REJECTED.labels("headers_too_large").inc()
            self._error_and_close(431, "headers_too_large", "request headers too large")

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
        self.req = RawRequest()
        self.req_started = time.monotonic()

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        if len(req.url) > MAX_TARGET:
            self.too_large = 414
            raise _TooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        req.size += len(name) + len(value) + 4
        if req.size > MAX_HEADER_BYTES:
            self.too_large = 431
            raise _TooLarge
        lname = name.lower()
        req.headers.append((name, lname, value))
        req.lower[lname] = value

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        self.in_head, self.head_bytes = False, 0
        req.method = self.parser.get_method().decode()
        upgrade = req.header(b"upgrade") is not None
        d = decide(req.method, req.url.decode("latin-1"), upgrade)
        req.path = d.path
        if d.kind is Kind.BAD_PATH:
            REJECTED.labels("bad_path").inc()
            self._error_and_close(400, "invalid_path", d.error)
            return
        if upgrade:
            if d.kind is Kind.WEBSOCKET and req.method == "GET" and not self.pipelined:
                self.ws_req, req.decision = req, d
                return
            ours = False
        else:
            ours = d.kind is Kind.API
        if not ours:
            if self.pipelined:
                self._error_and_close(400, "bad_request", "pipelined request cannot be served")
            else:
                self.handoff = True
            return
        req.decision, req.route, req.scope = d, d.route, d.scope
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
        self.in_head = True
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
        assert req is not None and req.decision is not None
        req.rid = next_request_id()
        req.route = req.decision.route
        self.buf = bytearray()
        self.ws = WsRelay(self, req, req.decision.scope, leftover)
        asyncio.get_running_loop().create_task(self.ws.start())

    def ws_refused(
        self,
        status: int,
        code: str,
        message: str,
        req: RawRequest,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        child(REQUESTS, req.route, f"{status // 100}xx").inc()
        if not self.closed:
            self.transport.write(
                error_bytes(status, req.path, code, message, req.rid, extra, headers, close=True)
            )
            self.transport.close()
        self.state.access.write(
            request_id=req.rid,
            tenant=None,
            credential=None,
            method="GET",
            route=req.route,
            status=status,
            ms=0.0,
        )

    def log_websocket(self, req: RawRequest, tenant: Tenant | None, seconds: float) -> None:
        child(REQUESTS, req.route, "1xx").inc()
        self.state.access.write(
            request_id=req.rid,
            tenant=tenant.user_id if tenant else None,
            credential=tenant.credential_id if tenant else None,
            method="GET",
            route=req.route,
            status=101,
            ms=round(seconds * 1000, 2),
        )

    def _reject_body(self, req: RawRequest) -> None:
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

    def _error_and_close(self, status: int, code: str, message: str, req: RawRequest | None = None) -> None:
        path = req.path if req is not None else "/"
        self.transport.write(error_bytes(status, path, code, message, next_request_id(), close=True))
        self.closed = True
        self.linger_bytes = linger(self.transport)
