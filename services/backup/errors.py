"""Typed errors of backups: each carries a stable reason code (events, CLI exit, API)."""

from __future__ import annotations

from enum import StrEnum


class CorruptReason(StrEnum):
    BAD_FORMAT = "bad_format"
    UNKNOWN_KEY = "unknown_key"
    AUTH_FAILED = "auth_failed"  # a flipped byte, or another user's / backup's ciphertext
    TRUNCATED = "truncated"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    UNPACK_FAILED = "unpack_failed"
    SQLITE_INTEGRITY = "sqlite_integrity"
    MISSING = "missing"  # the manifest names data the target does not hold


class BackupError(Exception):
    """A backup, restore or verify that did not succeed. *code* is stable."""

    code = "backup_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class BackupCorrupt(BackupError):
    def __init__(self, reason: CorruptReason, message: str) -> None:
        super().__init__(message, reason.value)
        self.reason = reason


class NotFound(BackupError):
    code = "not_found"


class InvalidInput(BackupError):
    code = "invalid_input"
