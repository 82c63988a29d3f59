"""WebSocket relay on raw bytes: after the handshake, frames pass through untouched.

The proxy checks the credential, opens the gateway's WebSocket with its own identity
headers, and rewrites exactly one frame: the client's first text message (OpenClaw's
``connect``), from which it drops client-supplied ``auth`` and ``device``. Everything
after that is copied as bytes; a small tracker follows frame boundaries (headers only,
payloads are never copied or unmasked) so the proxy can still say goodbye with a close
frame (1001) when it shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import httptools

from services.gateway_proxy.app import BYTES_IN, BYTES_OUT, OPEN_WS, REJECTED, sanitize_connect
from services.gateway_proxy.routing import NoRoute, Route
from shared.gateway import identity_headers

if TYPE_CHECKING:
    from services.gateway_proxy.auth import Tenant
    from services.gateway_proxy.fastpath import ClientConnection, _Request

log = logging.getLogger("zaki.proxy")

MAX_FIRST_FRAME = 1 << 20
# WebSocket bytes relayed (in, out) since the last flush into zaki_proxy_bytes_total: counted
# here per message, added to the Prometheus counter every few seconds (flush_relayed).
RELAYED = [0, 0]


def flush_relayed() -> None:
    if RELAYED[0]:
        BYTES_IN.inc(RELAYED[0])
    if RELAYED[1]:
        BYTES_OUT.inc(RELAYED[1])
    RELAYED[0] = RELAYED[1] = 0


GOING_AWAY = b"\x88\x02\x03\xe9"  # an unmasked close frame, code 1001 (server to client)


def _frame_header(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(header length, payload length) of the frame at the start of *buf*, or None if incomplete."""
    if len(buf) < 2:
        return None
    n = buf[1] & 0x7F
    off = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, off = int.from_bytes(buf[2:4], "big"), 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, off = int.from_bytes(buf[2:10], "big"), 10
    if buf[1] & 0x80:
        off += 4
    return (off, n) if len(buf) >= off else None


def _mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key (masking and unmasking are the same operation)."""
    n = len(payload)
    if not n:
        return payload
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def _encode_header(first_byte: int, length: int, key: bytes) -> bytes:
    if length < 126:
        return bytes((first_byte, 0x80 | length)) + key
    if length < 1 << 16:
        return bytes((first_byte, 0x80 | 126)) + length.to_bytes(2, "big") + key
    return bytes((first_byte, 0x80 | 127)) + length.to_bytes(8, "big") + key


class FrameTracker:
    """Follows frame boundaries in one direction of a WebSocket stream."""

    __slots__ = ("head", "remaining")

    def __init__(self) -> None:
        self.remaining = 0  # payload bytes of the current frame still to come
        self.head = b""  # a frame header split across reads

    @property
    def at_boundary(self) -> bool:
        return not self.remaining and not self.head

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.remaining:
                take = min(self.remaining, n - i)
                self.remaining -= take
                i += take
                continue
            if not self.head and n - i >= 2 and data[i + 1] & 0x7F < 126:
                # The common case: a short frame whose 2-byte header is here whole.
                off = 2 + (4 if data[i + 1] & 0x80 else 0)
                if n - i >= off:
                    self.remaining = data[i + 1] & 0x7F
                    i += off
                    continue
            buf = self.head + data[i : i + 14]
            parsed = _frame_header(buf)
            if parsed is None:
                self.head = buf
                return
            off, length = parsed
            i += off - len(self.head)
            self.head = b""
            self.remaining = length


class WsRelay:
    """One proxied WebSocket: handshake checks, the gateway's handshake, then bytes."""

    def __init__(self, client: ClientConnection, req: _Request, scope: str, leftover: bytes) -> None:
        self.client = client
        self.req = req
        self.scope = scope
        self.pending = bytearray(leftover)  # client bytes not yet forwarded (before the first text frame)
        self.early = bytearray()  # gateway bytes that arrived before the client had its 101
        self.up: WsUpstream | None = None
        self.tenant: Tenant | None = None
        self.open = False
        self.sanitized = False
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
        from services.gateway_proxy.app import check_cookie_origin, not_running
        from services.gateway_proxy.auth import AuthError

        proxy = self.client.proxy
        req = self.req
        credential, source = req.credential(self.protocols())
        try:
            if source == "cookie":
                check_cookie_origin("GET", req.header(b"origin"), True, proxy.allowed_origins)
            tenant = await proxy.auth.authenticate(credential)
            if self.scope not in tenant.scopes:
                raise AuthError(403, "insufficient_scope", f"this credential lacks the '{self.scope}' scope")
        except AuthError as e:
            REJECTED.labels(e.code).inc()
            self.client.ws_refused(e.status, e.code, str(e), req)
            return
        self.tenant = tenant
        try:
            route = await proxy.routes.resolve(tenant.user_id)
        except NoRoute as e:
            REJECTED.labels("instance_not_running").inc()
            message, extra, headers = not_running(e.state)
            self.client.ws_refused(503, "instance_not_running", message, req, extra, headers)
            return
        if not proxy.limits.open_websocket(tenant.user_id):
            REJECTED.labels("too_many_websockets").inc()
            self.client.ws_refused(
                429, "too_many_websockets", "too many open WebSockets", req, headers={"Retry-After": "10"}
            )
            return
        self.counted = True
        try:
            await self._connect(route)
        except (OSError, TimeoutError, ConnectionError):
            self.client.ws_refused(502, "gateway_unreachable", "your gateway did not answer", req)
            self._release()

    async def _connect(self, route: Route) -> None:
        assert self.tenant is not None
        loop = asyncio.get_running_loop()
        _, up = await asyncio.wait_for(
            loop.create_connection(lambda: WsUpstream(self), route.host, route.port), 5
        )
        self.up = up
        headers = identity_headers(self.tenant.user_id, self.client.remote, proto="http")
        if self.client.proxy.origin:
            headers["Origin"] = self.client.proxy.origin
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
        self.client.proxy.raw_websockets.add(self)
        early, self.early = bytes(leftover) + bytes(self.early), bytearray()
        if early:
            self.from_upstream(early)
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()
            self.from_client(data)

    # --- relaying ------------------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if not self.open:
            self.pending += data
            return
        up = self.up
        if up is None or self.closed:
            return
        RELAYED[0] += len(data)
        if self.sanitized:
            up.transport.write(data)
            return
        self.pending += data
        self._sanitize_first()

    def _sanitize_first(self) -> None:
        """Forwards frames up to and including the first text message, which is rewritten."""
        assert self.up is not None
        buf = self.pending
        while True:
            parsed = _frame_header(buf)
            if parsed is None:
                if len(buf) > MAX_FIRST_FRAME:
                    self.close()
                return
            off, length = parsed
            if len(buf) < off + length:
                if off + length > MAX_FIRST_FRAME:
                    self.close()
                return
            opcode, fin = buf[0] & 0x0F, buf[0] & 0x80
            frame = bytes(buf[: off + length])
            del buf[: off + length]
            if opcode != 1:  # pings and the like pass as they are
                self.up.transport.write(frame)
                continue
            if not fin:
                self.close()  # a fragmented connect frame: not something OpenClaw clients send
                return
            key = frame[off - 4 : off] if frame[1] & 0x80 else b"\0\0\0\0"
            text = _mask(frame[off:], key).decode("utf-8", "replace")
            payload = sanitize_connect(text).encode()
            self.up.transport.write(_encode_header(frame[0], len(payload), key) + _mask(payload, key))
            self.sanitized = True
            if buf:
                self.up.transport.write(bytes(buf))
            self.pending = bytearray()
            return

    def from_upstream(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.open:  # frames that beat our 101 to the client wait for it
            self.early += data
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
            self.client.proxy.raw_websockets.discard(self)
            self.client.log_websocket(self.req, self.tenant, time.perf_counter() - self.opened_at)
        if self.counted and self.tenant is not None:
            self.counted = False
            self.client.proxy.limits.close_websocket(self.tenant.user_id)


class WsUpstream(asyncio.Protocol):
    """The proxy's connection to a gateway's WebSocket endpoint."""

    def __init__(self, relay: WsRelay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.handshake: asyncio.Future[tuple[int, str, bytes]] = asyncio.get_running_loop().create_future()
        self.accept = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"sec-websocket-accept":
            self.accept = value.decode("latin-1")

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            self.relay.from_upstream(data)
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
