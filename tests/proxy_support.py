"""Helpers for the proxy's edge tests: proxy processes on both planes, a recording stand-in
gateway in the test process, and raw HTTP/WebSocket bytes (clients like httpx normalise
paths and frames away, which is exactly what these tests must not do)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from services.gateway_proxy import keys
from shared.state import InstanceState
from shared.store import Store
from tests.conftest import JWT_SECRET, new_user
from zaki.stack import Process, Stack, free_port, wait_for_port


def start_proxy(stack: Stack, service_env: dict[str, str], fastpath: bool, **extra: str) -> Process:
    port = free_port()
    p = stack.start_service(
        "services.gateway_proxy",
        {
            **service_env,
            "ZAKI_PROXY_PORT": str(port),
            "ZAKI_METRICS_PORT": "0",
            "ZAKI_JWT_SECRET": JWT_SECRET,
            "ZAKI_PROXY_FASTPATH": "true" if fastpath else "false",
            **extra,
        },
    )
    wait_for_port("127.0.0.1", port, p.proc, "gateway proxy")
    p.address = f"127.0.0.1:{port}"
    return p


@dataclass
class Recorder:
    """Answers every request 200 with what it received, and echoes each WebSocket message
    back as {"type": "text"|"binary", "data": ...}: what a gateway behind the proxy sees."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        seen = {
            "method": request.method,
            "target": request.raw_path,
            "headers": dict(request.headers),
            "scopes": request.headers.getall("x-openclaw-scopes", []),
        }
        self.requests.append(seen)
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response(seen)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(json.dumps({"type": "text", "data": msg.data}))
            elif msg.type == WSMsgType.BINARY:
                await ws.send_str(json.dumps({"type": "binary", "data": msg.data.decode("utf-8", "replace")}))
        return ws


async def tenant_on(store: Store, recorder: Recorder, scopes: set[str]) -> tuple[str, str]:
    """A user whose running instance is the recorder, and an API key with *scopes*."""
    user = new_user()
    # No container: a record on a docker host no provisioner owns, pointing at the recorder.
    await store.instances.insert_one(
        {
            "_id": user,
            "state": InstanceState.RUNNING.value,
            "instance_id": "rec-" + user,
            "docker_host": "recorder",
            "host": "127.0.0.1",
            "port": recorder.port,
            "version": 1,
        }
    )
    _, key = await keys.create_key(store, user, scopes)
    return user, key


async def raw_http(address: str, request: bytes, limit: int = 1 << 20) -> tuple[int, bytes]:
    """Sends *request* as it is and reads the answer until the proxy closes (status, body)."""
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(limit), 30)
        while data.count(b"\r\n\r\n") == 0 or not _complete(data):
            more = await asyncio.wait_for(reader.read(limit), 30)
            if not more:
                break
            data += more
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def get(target: bytes, key: str, extra: bytes = b"") -> bytes:
    return (
        b"GET " + target + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n" + extra + b"\r\n"
    )


# --- WebSocket frames by hand ---------------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes((0x80 * fin | opcode,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 1 << 16:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def ws_open(
    address: str, key: str, path: bytes = b"/ws"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    nonce = base64.b64encode(os.urandom(16))
    writer.write(
        b"GET " + path + b" HTTP/1.1\r\nHost: proxy\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + nonce + b"\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def ws_next_text_or_end(reader: asyncio.StreamReader) -> str | None:
    """The next text message, or None when the proxy closes the connection (or sends a close)."""
    try:
        while True:
            b0, b1 = await asyncio.wait_for(reader.readexactly(2), 30)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await reader.readexactly(8), "big")
            payload = await reader.readexactly(n)
            if b0 & 0x0F == 8:
                return None
            if b0 & 0x0F == 1:
                return payload.decode()
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None


# --- fixtures shared by the proxy's test modules (imported there by name) -----------------------


@pytest.fixture(scope="module")
async def recorder():
    """A recording stand-in gateway for the module."""
    r = Recorder()
    await r.start()
    yield r
    await r.stop()


@pytest.fixture(scope="module", params=["fastpath", "aiohttp"])
def plane(request, stack, service_env):
    """The proxy on each of its two planes."""
    p = start_proxy(stack, service_env, fastpath=request.param == "fastpath")
    yield p
    p.stop()


async def scoped_tenant(recorder: Recorder, service_env: dict[str, str], scopes: set[str]):
    """A tenant routed to *recorder* with a key of *scopes*: yields (user, key), then removes it."""
    store = Store(service_env["ZAKI_MONGO_URL"], service_env["ZAKI_MONGO_DB"])
    user, key = await tenant_on(store, recorder, scopes)
    yield user, key
    await store.instances.delete_one({"_id": user})
    await store.close()
