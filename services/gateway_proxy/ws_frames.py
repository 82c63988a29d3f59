"""WebSocket frames on raw bytes: boundaries, masking, and the rewrite of the client's
first message (OpenClaw's ``connect``), from which client-supplied ``auth`` and ``device``
are dropped: the proxy's identity headers are the only credential a gateway should see."""

from __future__ import annotations

import json

MAX_FIRST_FRAME = 1 << 20
GOING_AWAY = b"\x88\x02\x03\xe9"  # an unmasked close frame, code 1001 (server to client)
MORE, DONE, REFUSE = 0, 1, 2  # what rewrite_first_message found


def sanitize_connect(frame: str) -> str:
    """Drops client-supplied ``auth`` and ``device`` from the WebSocket ``connect`` frame."""
    try:
        obj = json.loads(frame)
    except ValueError:
        return frame
    if isinstance(obj, dict) and obj.get("method") == "connect" and isinstance(obj.get("params"), dict):
        obj["params"].pop("auth", None)
        obj["params"].pop("device", None)
        return json.dumps(obj)
    return frame


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


def rewrite_first_message(buf: bytearray) -> tuple[bytes, int]:
    """Consumes *buf* (client bytes) up to and including the first text message, which is
    rewritten. Returns the bytes to send to the gateway and MORE (wait for more bytes),
    DONE (all later bytes pass as they are) or REFUSE (close the connection)."""
    out: list[bytes] = []
    while True:
        parsed = _frame_header(buf)
        if parsed is None:
            return b"".join(out), REFUSE if len(buf) > MAX_FIRST_FRAME else MORE
        off, length = parsed
        if len(buf) < off + length:
            return b"".join(out), REFUSE if off + length > MAX_FIRST_FRAME else MORE
        opcode, fin = buf[0] & 0x0F, buf[0] & 0x80
        frame = bytes(buf[: off + length])
        del buf[: off + length]
        if opcode != 1:  # pings and the like pass as they are
            out.append(frame)
            continue
        if not fin:
            return b"".join(out), REFUSE  # a fragmented connect frame: not something OpenClaw clients send
        key = frame[off - 4 : off] if frame[1] & 0x80 else b"\0\0\0\0"
        text = _mask(frame[off:], key).decode("utf-8", "replace")
        payload = sanitize_connect(text).encode()
        out.append(_encode_header(frame[0], len(payload), key) + _mask(payload, key))
        out.append(bytes(buf))
        buf.clear()
        return b"".join(out), DONE


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
