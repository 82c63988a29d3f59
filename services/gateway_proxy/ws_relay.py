"""WebSocket relay on raw bytes: after the handshake, frames pass through untouched.

The proxy checks the credential, opens the gateway's WebSocket with its own identity
headers, and rewrites exactly one message: the client's first (OpenClaw's ``connect``,
see ``ws_frames``). Everything after that is copied as bytes; a small tracker follows frame
boundaries (headers only, payloads are never copied or unmasked) so the proxy can still say
goodbye with a close frame (1001) when it shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import httptools

from services.gateway_proxy.auth import AuthError, Tenant
from services.gateway_proxy.decision import gateway_ws_headers
from services.gateway_proxy.errors import not_running
from services.gateway_proxy.observe import OPEN_WS, REJECTED, RELAYED
from services.gateway_proxy.raw_request import RawRequest
from services.gateway_proxy.routing import NoRoute, Route
from services.gateway_proxy.state import ProxyState
from services.gateway_proxy.wake import ACTIVITY
from services.gateway_proxy.ws_frames import (
    DONE,
    GOING_AWAY,
    MAX_FIRST_FRAME,
    MORE,
    FirstMessage,
    FrameTracker,
)

log = logging.getLogger("zaki.proxy")


class RelayClient(Protocol):
    """The client connection a relay serves (http_plane.ClientConnection)."""

    state: ProxyState
    transport: asyncio.Transport
    closed: bool
    remote: str

    def ws_refused(
        self,
        status: int,
        code: str,
        message: str,
        req: RawRequest,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None: ...

    def log_websocket(self, req: RawRequest, tenant: Tenant | None, seconds: float) -> None: ...


class WsRelay:
    """One proxied WebSocket: handshake checks, the gateway's handshake, then bytes."""

    def __init__(self, client: RelayClient, req: RawRequest, scope: str, leftover: bytes) -> None:
        self.client = client
        self.req = req
        self.scope = scope
        self.pending = bytearray(leftover)  # client bytes not yet forwarded (before the first message)
        self.early = bytearray()  # gateway bytes that arrived before the client had its 101
        self.up: WsUpstream | None = None
        self.tenant: Tenant | None = None
        self.open = False
        self.sanitized = False
        self.first = FirstMessage()
        self.to_client = FrameTracker()
        self.going_away = False
        self.closed = False
        self.counted = False
        self.opened_at = 0.0

    # --- handshake -----------------------------------------------------------------------------

    def protocols(self) -> list[str]:
        raw = self.req.header(b"sec-websocket-protocol") or ""
        return [p.strip() for p in raw.split(",") if p.strip()]

    async def start(self) -> None:
        state = self.client.state
        req = self.req
        credential, source = req.credential(self.protocols())
        try:
            tenant = await state.tenant(credential, source, "GET", req.header(b"origin"), True, self.scope)
        except AuthError as e:
            REJECTED.labels(e.code).inc()
            self.client.ws_refused(e.status, e.code, str(e), req)
            return
        self.tenant = tenant
        if self.closed:  # the client overflowed or left while its credential was checked
            return
        try:
            route = await state.routes.resolve(tenant.user_id)
        except NoRoute as e:
            REJECTED.labels("instance_not_running").inc()
            message, extra, headers = not_running(e.state)
            self.client.ws_refused(503, "instance_not_running", message, req, extra, headers)
            return
        if self.closed:
            return
        if not state.limits.open_websocket(tenant.user_id):
            REJECTED.labels("too_many_websockets").inc()
            self.client.ws_refused(
                429, "too_many_websockets", "too many open WebSockets", req, headers={"Retry-After": "10"}
            )
            return
        self.counted = True
        try:
            try:
                await self._connect(route)
            except OSError:  # refused: asleep, stopped or restarting; wait for it (bounded), once
                await self._connect(await state.routes.recover(tenant.user_id, route))
        except NoRoute as e:
            message, extra, headers = not_running(e.state)
            self.client.ws_refused(503, "instance_not_running", message, req, extra, headers)
            self._release()
        except (OSError, TimeoutError, ConnectionError):
            if not self.closed:
                self.client.ws_refused(502, "gateway_unreachable", "your gateway did not answer", req)
            self._release()

    async def _connect(self, route: Route) -> None:
        assert self.tenant is not None
        loop = asyncio.get_running_loop()
        _, up = await asyncio.wait_for(
            loop.create_connection(lambda: WsUpstream(self), route.host, route.port), 5
        )
        self.up = up
        if self.closed:
            up.transport.close()
            raise ConnectionError("the client is gone")
        assert self.req.decision is not None
        headers = gateway_ws_headers(
            self.req.decision, self.tenant.user_id, self.client.remote, "http", self.client.state.origin
        )
        lines = [
            "GET / HTTP/1.1",
            f"Host: {route.host}:{route.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self.req.header(b'sec-websocket-key') or ''}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        up.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        status, accept, leftover = await asyncio.wait_for(up.handshake, 10)
        if status != 101 or not accept:
            up.transport.close()
            raise ConnectionError(f"gateway answered {status}")
        # Only the protocol name is echoed: a bearer.<token> subprotocol never comes back.
        chosen = "Sec-WebSocket-Protocol: openclaw\r\n" if "openclaw" in self.protocols() else ""
        self.client.transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n{chosen}X-Request-Id: {self.req.rid}\r\n\r\n"
            ).encode("latin-1")
        )
        self.open = True
        self.opened_at = time.perf_counter()
        OPEN_WS.inc()
        ACTIVITY.opened(self.tenant.user_id)  # an open WebSocket keeps its gateway awake
        self.client.state.raw_websockets.add(self)
        early, self.early = bytes(leftover) + bytes(self.early), bytearray()
        if early:
            self.from_upstream(early)
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()
            self.from_client(data)

    # --- relaying ------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.open:
            self.pending += data
            if len(self.pending) > MAX_FIRST_FRAME:  # bounded while the gateway's 101 is awaited
                REJECTED.labels("early_data_too_large").inc()
                self.client.ws_refused(
                    400, "early_data_too_large", "too much data before the WebSocket opened", self.req
                )
                self.close()
            return
        up = self.up
        if up is None or self.closed:
            return
        RELAYED[0] += len(data)
        if self.sanitized:
            up.transport.write(data)
            return
        self.pending += data
        out, found = self.first.feed(self.pending)
        if out:
            up.transport.write(out)
        if found == DONE:
            self.sanitized = True
        elif found != MORE:
            self.close()

    def from_upstream(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.open:  # frames that beat our 101 to the client wait for it (bounded)
            self.early += data
            if len(self.early) > MAX_FIRST_FRAME:
                self.close()
            return
        RELAYED[1] += len(data)
        self.to_client.feed(data)
        if not self.client.closed:
            self.client.transport.write(data)
        if self.going_away and self.to_client.at_boundary:
            self._say_goodbye()

    # --- ending --------------------------------------------------------------------------------

    def go_away(self) -> None:
        """Shutdown: a close frame (1001) to the client at the next frame boundary."""
        self.going_away = True
        if self.to_client.at_boundary:
            self._say_goodbye()
        else:
            asyncio.get_running_loop().call_later(1.0, self.close)

    def _say_goodbye(self) -> None:
        if not self.client.closed:
            self.client.transport.write(GOING_AWAY)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.up is not None:
            self.up.transport.close()
        if not self.client.closed:
            self.client.transport.close()
        self._release()

    def _release(self) -> None:
        if self.open:
            self.open = False
            OPEN_WS.dec()
            if self.tenant is not None:
                ACTIVITY.closed(self.tenant.user_id)
            self.client.state.raw_websockets.discard(self)
            self.client.log_websocket(self.req, self.tenant, time.perf_counter() - self.opened_at)
        if self.counted and self.tenant is not None:
            self.counted = False
            self.client.state.limits.close_websocket(self.tenant.user_id)


class WsUpstream(asyncio.Protocol):
    """The proxy's connection to a gateway's WebSocket endpoint."""

    def __init__(self, relay: WsRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.handshake: asyncio.Future[tuple[int, str, bytes]] = asyncio.get_running_loop().create_future()
        self.accept = ""
        self.head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-accept":
            self.accept = value.decode("latin-1")

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            self.relay.from_upstream(data)
            return
        self.head_bytes += len(data)
        if self.head_bytes > MAX_FIRST_FRAME:  # a gateway is a tenant's: its handshake is bounded too
            self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            status = self.parser.get_status_code()
            self.parser = None
            if not self.handshake.done():
                self.handshake.set_result((status, self.accept, data[e.args[0] :]))
            return
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        # A 101 is finished by the HttpParserUpgrade that follows (it knows where frames start);
        # any other answer means the gateway refused the upgrade.
        if self.parser is not None and not self.handshake.done() and self.parser.get_status_code() != 101:
            self.handshake.set_result((self.parser.get_status_code(), "", b""))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError("gateway closed during the handshake"))
        self.relay.close()

    def pause_writing(self) -> None:
        if not self.relay.client.closed:
            self.relay.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.relay.client.closed:
            self.relay.client.transport.resume_reading()
