"""Issue 13.7: the raw plane bounds what a client can make it hold, as the bytes arrive.

Endless header lines, an endless header value and an endless URL are answered 431/414
after a bounded number of bytes (the proxy used to buffer them until the header timeout);
a WebSocket client cannot fill the proxy's memory while its gateway has not answered the
handshake. Bounds are in bytes and in the proxy process's memory, never in seconds."""

from __future__ import annotations

import asyncio
import select
import socket
from pathlib import Path

import pytest

from tests.proxy_support import start_proxy, tenant_on

# What a client may have sent before it sees the answer: what the proxy read (its limits plus
# one read) and what sat in the two sockets' buffers (kernel autotuning: a few MiB at most).
SENT_BOUND = 12 << 20
TRY_UP_TO = 96 << 20  # the old proxy read all of this without answering


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def fast(stack, service_env):
    p = start_proxy(stack, service_env, fastpath=True)
    yield p
    p.stop()


def _flood(address: str, head: bytes, filler: bytes) -> tuple[bytes, int]:
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        s.sendall(head)
        sent = len(head)
        while sent < TRY_UP_TO:
            readable, _, _ = select.select([s], [s], [], 60)
            if readable:
                break  # the answer: stop sending, as a client reading its socket would
            try:
                sent += s.send(filler)
            except (ConnectionResetError, BrokenPipeError):
                break  # the proxy answered and closed while we were still sending
        # The answer stays readable after a reset: the kernel keeps what arrived before it.
        return s.recv(65536), sent


async def flood(address: str, head: bytes, filler: bytes) -> tuple[bytes, int]:
    """Sends *head*, then *filler* over and over until the proxy answers (or TRY_UP_TO).
    Returns the answer and how many bytes had been sent when it came. A plain socket, not
    asyncio's streams: those drop unread received bytes when a write fails, and stop noticing
    the answer while their write buffer drains."""
    return await asyncio.to_thread(_flood, address, head, filler)


@pytest.mark.parametrize(
    ("head", "filler", "status"),
    [
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", b"X-Filler: " + b"a" * 50 + b"\r\n", 431),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Endless: ", b"b" * 4096, 431),
        (b"GET /v1/models/", b"c" * 4096, 414),
    ],
    ids=["endless_header_lines", "endless_header_value", "endless_url"],
)
async def test_an_endless_head_is_refused_after_bounded_bytes(fast, head, filler, status):
    before = rss(fast.proc.pid)
    data, sent = await flood(fast.address, head, filler * 64)
    grown = rss(fast.proc.pid) - before
    print(f"answered after {sent} bytes sent; proxy RSS grew {grown} bytes")
    assert data.startswith(b"HTTP/1.1 %d" % status), data[:200]
    assert sent < SENT_BOUND
    assert grown < 16 << 20  # the old proxy held everything it read (tens of MiB here)
    # And the proxy still serves everyone else.
    host, port = fast.address.split(":")
    r, w = await asyncio.open_connection(host, int(port))
    w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(r.read(), 30)).startswith(b"HTTP/1.1 200")
    w.close()


class SilentGateway:
    """Accepts the proxy's WebSocket handshake and never answers it."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(65536):
                pass
            writer.close()

        self.server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


async def test_websocket_bytes_before_the_gateways_101_are_bounded(fast, service_env):
    from shared.store import Store

    gateway = SilentGateway()
    await gateway.start()
    store = Store(service_env["ZAKI_MONGO_URL"], service_env["ZAKI_MONGO_DB"])
    user, key = await tenant_on(store, gateway, {"ws"})  # type: ignore[arg-type]
    try:
        upgrade = (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n\r\n"
        )
        before = rss(fast.proc.pid)
        data, sent = await flood(fast.address, upgrade, b"\x82\x7e\xff\xff" + b"\0" * 4 + b"d" * 65535)
        grown = rss(fast.proc.pid) - before
        print(f"answered after {sent} bytes sent; proxy RSS grew {grown} bytes")
        assert data.startswith(b"HTTP/1.1 400") and b"early_data_too_large" in data, data[:300]
        assert sent < SENT_BOUND and grown < 16 << 20
    finally:
        await store.instances.delete_one({"_id": user})
        await store.close()
        assert gateway.server is not None
        gateway.server.close()


async def test_a_refused_head_is_answered_even_while_the_client_keeps_sending(fast):
    """The proxy answers 431 and lingers (reads and drops what still comes, briefly) instead of
    closing with the client's bytes unread: such a close sends a reset, which destroys the
    answer in the client's receive buffer before it is read."""
    host, port = fast.address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 40_000)
    await writer.drain()
    await asyncio.sleep(0.5)  # the proxy has answered 431 by now
    writer.write(b"b" * 256 * 1024)  # and the client, not reading yet, sends more
    await writer.drain()
    await asyncio.sleep(0.2)
    data = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    assert data.startswith(b"HTTP/1.1 431"), data[:80]
