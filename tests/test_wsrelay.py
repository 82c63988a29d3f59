"""The WebSocket relay's byte-level helpers: frame boundaries and masking."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway_proxy.ws_frames import (
    DONE,
    MORE,
    REFUSE,
    FirstMessage,
    FrameTracker,
    _encode_header,
    _frame_header,
    _mask,
)


def frame(n: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((0x81, bit | n))
    elif n < 1 << 16:
        head = bytes((0x81, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, bit | 127)) + n.to_bytes(8, "big")
    return head + (os.urandom(4) if masked else b"") + os.urandom(n)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 5, 125, 126, 300, 65535, 65536, 70000]), min_size=1, max_size=6),
    masked=st.booleans(),
    cuts=st.lists(st.integers(min_value=1, max_value=10_000_000), max_size=8),
)
def test_tracker_finds_every_boundary_however_the_stream_is_cut(sizes, masked, cuts):
    data = b"".join(frame(n, masked) for n in sizes)
    points = [*sorted({c % len(data) for c in cuts} - {0}), len(data)]
    ends, pos = set(), 0
    for _ in sizes:
        off, length = _frame_header(data[pos : pos + 14])
        pos += off + length
        ends.add(pos)
    tracker, prev = FrameTracker(), 0
    for point in points:
        tracker.feed(data[prev:point])
        prev = point
        # Mid-stream, the tracker is at a boundary exactly where a frame really ends.
        assert tracker.at_boundary == (point in ends)


def test_masking_round_trips_and_headers_encode_lengths():
    key = b"\x01\x02\x03\x04"
    payload = os.urandom(1000)
    assert _mask(_mask(payload, key), key) == payload
    for n in (0, 125, 126, 65535, 65536):
        head = _encode_header(0x81, n, key)
        assert _frame_header(head + b"\0" * n) == (len(head), n)


CONNECT = json.dumps(
    {
        "type": "req",
        "id": "1",
        "method": "connect",
        "params": {"auth": {"token": "t"}, "device": {"id": "d"}, "x": 1},
    }
).encode()


def client_frame(opcode: int, payload: bytes, fin: bool, key: bytes) -> bytes:
    return _encode_header((0x80 if fin else 0) | opcode, len(payload), key) + _mask(payload, key)


def messages(stream: bytes) -> list[tuple[int, bytes]]:
    """(opcode, unmasked payload) of each frame in *stream*."""
    out, pos = [], 0
    while pos < len(stream):
        off, length = _frame_header(stream[pos : pos + 14])
        key = stream[pos + off - 4 : pos + off]
        out.append((stream[pos] & 0x0F, _mask(stream[pos + off : pos + off + length], key)))
        pos += off + length
    return out


@settings(max_examples=500, deadline=None)
@given(
    opcode=st.sampled_from([1, 2]),
    pieces=st.integers(min_value=1, max_value=6),
    pings=st.lists(st.integers(min_value=0, max_value=6), max_size=3),
    cuts=st.lists(st.integers(min_value=1, max_value=10_000), max_size=6),
)
def test_first_message_loses_auth_however_it_is_framed_and_cut(opcode, pieces, pings, cuts):
    """Issue 13.5: text or binary, whole or in fragments with pings in between, however the
    byte stream is cut: the gateway gets the connect without auth and device, the pings as
    they were, and what follows untouched."""
    key = os.urandom(4)
    size = -(-len(CONNECT) // pieces)
    chunks = [CONNECT[i : i + size] for i in range(0, len(CONNECT), size)]
    frames = []
    for i, chunk in enumerate(chunks):
        frames += [client_frame(9, b"p%d" % n, True, key) for n in pings if n == i]
        frames.append(client_frame(opcode if i == 0 else 0, chunk, i == len(chunks) - 1, key))
    after = client_frame(1, b"after", True, key)
    stream = b"".join(frames) + after
    points = [*sorted({c % len(stream) for c in cuts} - {0}), len(stream)]
    first, pending, sent, prev, state = FirstMessage(), bytearray(), b"", 0, MORE
    for point in points:
        if state == DONE:
            sent += stream[prev:point]
        else:
            pending += stream[prev:point]
            out, state = first.feed(pending)
            sent += out
            assert state != REFUSE
        prev = point
    assert state == DONE
    got = messages(sent)
    data = [(op, p) for op, p in got if op < 8]
    assert data[0][0] == opcode and data[1] == (1, b"after") and len(data) == 2
    params = json.loads(data[0][1])["params"]
    assert params == {"x": 1}
    assert sorted(p for op, p in got if op == 9) == sorted(b"p%d" % n for n in pings if n < len(chunks))
