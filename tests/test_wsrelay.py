"""The WebSocket relay's byte-level helpers: frame boundaries and masking."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway_proxy.ws_frames import FrameTracker, _encode_header, _frame_header, _mask


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
