"""Streaming authenticated encryption of a backup under the key ring (AES-256-GCM).

A backup is sealed in chunks so a large folder never sits in memory (the STREAM
construction): each chunk's nonce is a random prefix, the chunk's index and a "last" flag,
and every chunk is bound to the backup's context (user and backup id) and to the header.
A reordered, dropped, truncated or flipped chunk, another user's or another backup's
context, or an unknown key id fails with a typed reason.

    header  = b"ZKB1" | len(kid) | kid | prefix(7)
    chunk   = len(ct) (4 bytes, big endian) | AES-GCM(key, prefix|index(4)|last(1), chunk, aad)
    aad     = context | header
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator

from cryptography.exceptions import InvalidTag

from services.backup.errors import BackupCorrupt, CorruptReason
from shared.crypto import KeyRing

MAGIC = b"ZKB1"
CHUNK = 1 << 20  # 1 MiB of plaintext per chunk
_MAX_CT = CHUNK + 16


def backup_context(user_id: str, backup_id: str) -> str:
    return f"backup:{user_id}:{backup_id}"


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    buf = bytearray()
    for c in chunks:
        buf += c
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    yield bytes(buf)  # the last (perhaps empty) chunk


def encrypt_stream(ring: KeyRing, context: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yields the sealed stream of *chunks* (any sizes) under the ring's primary key."""
    kid, aead = ring.cipher()
    prefix = os.urandom(7)
    header = MAGIC + bytes([len(kid)]) + kid.encode() + prefix
    aad = context.encode() + header
    yield header
    index = 0
    pending: bytes | None = None
    for piece in _rechunk(chunks, CHUNK):
        if pending is not None:
            ct = aead.encrypt(_nonce(prefix, index, False), pending, aad)
            yield struct.pack(">I", len(ct)) + ct
            index += 1
        pending = piece
    assert pending is not None
    ct = aead.encrypt(_nonce(prefix, index, True), pending, aad)
    yield struct.pack(">I", len(ct)) + ct


class _Reader:
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _check_magic(head: bytes) -> None:
    if head[:4] != MAGIC or len(head) < 5 or head[4] == 0:
        raise BackupCorrupt(CorruptReason.BAD_FORMAT, "not a Zaki backup (bad magic)")


def decrypt_stream(ring: KeyRing, context: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yields the plaintext; raises BackupCorrupt (typed reason) at the first bad chunk."""
    r = _Reader(chunks)
    head = r.read(5)
    _check_magic(head)
    rest = r.read(head[4] + 7)
    if len(rest) != head[4] + 7:
        raise BackupCorrupt(CorruptReason.TRUNCATED, "the header is cut short")
    kid = rest[: head[4]].decode("ascii", "replace")
    prefix = rest[-7:]
    try:
        aead = ring.cipher(kid)[1]
    except KeyError:
        raise BackupCorrupt(CorruptReason.UNKNOWN_KEY, f"key id {kid!r} is not in the key ring") from None
    aad = context.encode() + head + rest
    index = 0
    raw = r.read(4)
    while True:
        if len(raw) != 4:
            raise BackupCorrupt(CorruptReason.TRUNCATED, f"the stream ends before its last chunk ({index})")
        (n,) = struct.unpack(">I", raw)
        if n > _MAX_CT or n < 16:
            raise BackupCorrupt(CorruptReason.BAD_FORMAT, f"chunk {index} has an impossible length {n}")
        ct = r.read(n)
        if len(ct) != n:
            raise BackupCorrupt(CorruptReason.TRUNCATED, f"chunk {index} is cut short")
        raw = r.read(4)
        last = not raw
        try:
            yield aead.decrypt(_nonce(prefix, index, last), ct, aad)
        except InvalidTag:
            if last:  # a whole chunk that was not the last one: the stream was cut after it
                try:
                    aead.decrypt(_nonce(prefix, index, False), ct, aad)
                except InvalidTag:
                    pass
                else:
                    raise BackupCorrupt(CorruptReason.TRUNCATED, "chunks are missing at the end") from None
            raise BackupCorrupt(
                CorruptReason.AUTH_FAILED,
                f"chunk {index} does not authenticate (tampered, or another user's or backup's)",
            ) from None
        if last:
            return
        index += 1
