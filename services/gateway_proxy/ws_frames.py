"""WebSocket frames on raw bytes: boundaries, masking, and the rewrite of the client's
first message (OpenClaw's ``connect``), from which client-supplied ``auth`` and ``device``
are dropped: the proxy's identity headers are the only credential a gateway should see.
Both planes use ``sanitize_connect``; the raw plane finds the message with ``FirstMessage``."""

from __future__ import annotations

import json

MAX_FIRST_FRAME = 1 << 20
GOING_AWAY = b"\x88\x02\x03\xe9"  # an unmasked close frame, code 1001 (server to client)
MORE, DONE, REFUSE = 0, 1, 2  # what rewrite_first_message found


def sanitize_connect(frame: str) -> str | None:
    """Drops client-supplied ``auth`` and ``device`` from the WebSocket ``connect`` frame.

    None when the frame cannot be read here: it is then refused, never passed on, since a
    gateway's parser might read what this one could not (a number with more digits than
    Python converts, nesting deeper than its recursion limit)."""
    try:
        obj = json.loads(frame)
    except (ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and obj.get("method") == "connect" and isinstance(obj.get("params"), dict):
        obj["params"].pop("auth", None)
        obj["params"].pop("device", None)
        return json.dumps(obj)
    return frame  # not a connect: the gateway refuses a first message that is not one


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


class FirstMessage:
    """Finds the client's first message in its raw byte stream and rewrites it.

    OpenClaw reads a binary message as text, so the first data message is rewritten
    whatever its opcode, and a fragmented one is reassembled first; control frames before
    it pass as they are. Anything a client cannot legitimately send there (a continuation
    with nothing to continue, a reserved opcode, more than MAX_FIRST_FRAME) is refused."""

    __slots__ = ("key", "opcode", "parts", "size")

    def __init__(self) -> None:
        self.opcode = 0  # of the message being reassembled (0: none started)
        self.parts: list[bytes] = []  # its unmasked payloads so far
        self.size = 0
        self.key = b"\0\0\0\0"

    def feed(self, buf: bytearray) -> tuple[bytes, int]:
        """Consumes whole frames from *buf* (client bytes) up to the end of the first
        message. Returns the bytes to send to the gateway and MORE (wait for more bytes),
        DONE (all later bytes pass as they are) or REFUSE (close the connection)."""
        out: list[bytes] = []
        while True:
            parsed = _frame_header(buf)
            if parsed is None:
                return b"".join(out), REFUSE if len(buf) > MAX_FIRST_FRAME else MORE
            off, length = parsed
            if self.size + length > MAX_FIRST_FRAME:
                return b"".join(out), REFUSE
            if len(buf) < off + length:
                return b"".join(out), MORE
            first, masked = buf[0], buf[1] & 0x80
            opcode = first & 0x0F
            key = bytes(buf[off - 4 : off]) if masked else b"\0\0\0\0"
            payload = _mask(bytes(buf[off : off + length]), key)
            frame = bytes(buf[: off + length])
            del buf[: off + length]
            if 8 <= opcode <= 10:  # close, ping, pong: may come before or in between
                out.append(frame)
                continue
            if (opcode == 0) != bool(self.opcode) or opcode not in (0, 1, 2):
                return b"".join(
                    out
                ), REFUSE  # a stray continuation, a new message mid-message, a reserved opcode
            if opcode:
                self.opcode, self.key = opcode, key
            self.parts.append(payload)
            self.size += length
            if not first & 0x80:
                continue  # not the last fragment
            data = b"".join(self.parts)
            text = data.decode("utf-8", "replace")
            rewritten = sanitize_connect(text)
            if rewritten is None:
                return b"".join(out), REFUSE
            if rewritten is not text:
                data = rewritten.encode()
            # Sent as one whole frame (no reserved bits) with the message's own opcode.
            out.append(_encode_header(0x80 | self.opcode, len(data), self.key) + _mask(data, self.key))
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
