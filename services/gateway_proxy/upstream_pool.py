"""Pooled keep-alive connections from the raw data plane to the gateways."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import httptools

from services.gateway_proxy.routing import Route

MAX_RESPONSE_HEAD = 64 * 1024


class ResponseSink(Protocol):
    """What an upstream connection reports to (the raw plane's Exchange)."""

    def response_head(self, status: int, headers: list[tuple[bytes, bytes]], has_length: bool) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_done(self, upstream_keep_alive: bool) -> None: ...
    def flush(self, out: list[bytes]) -> None: ...
    def upstream_failed(self, timeout: bool = False) -> None: ...


class UpstreamPool:
    def __init__(self) -> None:
        self.pools: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self.draining = False

    def idle(self, route: Route) -> UpstreamConnection | None:
        pool = self.pools.get((route.host, route.port))
        while pool:
            up = pool.pop()
            if not up.closed:
                up.reused, up.got_bytes = True, False
                return up
        return None

    async def get(self, route: Route, fresh: bool = False) -> UpstreamConnection:
        up = None if fresh else self.idle(route)
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

    def discard(self, up: UpstreamConnection) -> None:
        pool = self.pools.get(up.key)
        if pool is not None:
            with contextlib.suppress(ValueError):
                pool.remove(up)

    def close_all(self) -> None:
        self.draining = True
        for pool in self.pools.values():
            for up in pool:
                up.transport.close()


class UpstreamConnection(asyncio.Protocol):
    """A pooled keep-alive connection to one gateway."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: ResponseSink | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.has_length = False
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.out: list[bytes] = []  # what one read produced for the client, written at once
        self.in_head = True  # between answers or inside an answer's head: bytes are counted
        self.head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_RESPONSE_HEAD:  # a gateway is a tenant's: bounded like a client
                self.closed = True
                self.transport.close()
                return
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
        self.pool.discard(self)
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
        self.in_head, self.head_bytes = False, 0
        if self.exchange is not None:
            self.exchange.response_head(self.parser.get_status_code(), self.headers, self.has_length)

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        self.in_head = True
        if self.exchange is not None:
            self.exchange.response_done(self.parser.should_keep_alive())
