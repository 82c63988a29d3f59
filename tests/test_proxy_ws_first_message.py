"""Issue 13.5: the client's first WebSocket message (OpenClaw's ``connect``) loses its
``auth`` and ``device`` whatever its opcode and however it is fragmented, on both planes.

OpenClaw parses a binary message as text; the proxy used to rewrite only text frames, so a
binary ``connect`` carried the client's own credentials to the gateway. The stand-in
gateway here (tests/proxy_support.Recorder) echoes every message it receives."""

from __future__ import annotations

import json

import pytest

from tests.proxy_support import (
    scoped_tenant,
    ws_frame,
    ws_next_text_or_end,
    ws_open,
)

CONNECT = {
    "type": "req",
    "id": "c1",
    "method": "connect",
    "params": {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {"id": "cli", "mode": "cli"},
        "auth": {"token": "client-made-up", "password": "guess"},
        "device": {"id": "dev", "publicKey": "k", "signature": "s"},
    },
}
PAYLOAD = json.dumps(CONNECT).encode()
TEXT, BINARY, CONT, PING = 1, 2, 0, 9


def fragmented(opcode: int, payload: bytes, pieces: int = 3, ping_between: bool = True) -> bytes:
    size = len(payload) // pieces + 1
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
    frames = []
    for i, chunk in enumerate(chunks):
        frames.append(ws_frame(opcode if i == 0 else CONT, chunk, fin=i == len(chunks) - 1))
        if ping_between and i == 0:
            frames.append(ws_frame(PING, b"hi"))
    return b"".join(frames)


@pytest.fixture(scope="module")
async def ws_key(recorder, service_env):
    async for _, key in scoped_tenant(recorder, service_env, {"ws"}):
        yield key


@pytest.mark.parametrize(
    "how",
    ["text", "binary", "text_fragmented", "binary_fragmented", "ping_then_binary"],
)
async def test_connect_reaches_the_gateway_without_auth_or_device(plane, ws_key, how):
    frames = {
        "text": ws_frame(TEXT, PAYLOAD),
        "binary": ws_frame(BINARY, PAYLOAD),
        "text_fragmented": fragmented(TEXT, PAYLOAD),
        "binary_fragmented": fragmented(BINARY, PAYLOAD, pieces=4),
        "ping_then_binary": ws_frame(PING, b"x") + ws_frame(BINARY, PAYLOAD),
    }[how]
    reader, writer = await ws_open(plane.address, ws_key)
    try:
        writer.write(frames + ws_frame(TEXT, b'{"type":"req","id":"2","method":"health","params":{}}'))
        echo = json.loads(await ws_next_text_or_end(reader) or "null")
        assert echo is not None, "the proxy closed a legitimate connect"
        assert echo["type"] == ("binary" if "binary" in how else "text")  # the opcode is kept
        seen = json.loads(echo["data"])
        assert seen["method"] == "connect" and seen["params"]["client"] == CONNECT["params"]["client"]
        assert "auth" not in seen["params"] and "device" not in seen["params"], seen
        later = json.loads(await ws_next_text_or_end(reader) or "null")
        assert json.loads(later["data"])["method"] == "health"  # and later messages pass untouched
    finally:
        writer.close()


@pytest.mark.parametrize(
    "first",
    [
        ws_frame(CONT, PAYLOAD),  # a continuation with nothing to continue
        ws_frame(3, PAYLOAD),  # a reserved opcode
        # What the gateway's parser reads but Python's refuses: never passed on unread.
        ws_frame(BINARY, PAYLOAD[:-1] + b', "n": ' + b"9" * 5000 + b"}"),
        ws_frame(TEXT, PAYLOAD[:-1] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ],
    ids=["stray_continuation", "reserved_opcode", "huge_number", "deep_nesting"],
)
async def test_a_first_message_the_proxy_cannot_rewrite_is_refused(plane, ws_key, first):
    reader, writer = await ws_open(plane.address, ws_key)
    try:
        writer.write(first)
        echo = await ws_next_text_or_end(reader)
        assert echo is None or b"client-made-up" not in echo.encode(), echo
        assert echo is None  # closed, nothing echoed
    finally:
        writer.close()
