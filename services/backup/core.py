"""Backups of one user's data folder: create, list, verify, unpack for a restore, retention.

The pipeline streams: the confined reader's tar -> gzip -> sha256 -> AES-256-GCM chunks ->
the target. A backup is *good* once its manifest exists, and the manifest is written last,
after the sealed data is complete on the target and read back with the same checksum; a
process killed at any point before that leaves no manifest, hence no backup anyone lists.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.backup.archive import Snapshot, check_sqlite, gzip_stream, unpack
from services.backup.crypt import backup_context, decrypt_stream, encrypt_stream
from services.backup.errors import BackupCorrupt, BackupError, CorruptReason, InvalidInput, NotFound
from services.backup.targets import LocalTarget, S3Target, Target
from shared.crypto import KeyRing
from shared.settings import ZakiSettings
from shared.validation import USER_ID_RE

BACKUP_ID_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")
REASONS = ("scheduled", "manual", "pre_upgrade", "pre_delete", "pre_move")
PARTIAL_AGE_S = 3600.0  # a temporary object older than this is a dead writer's


@dataclass
class Manifest:
    backup_id: str
    user_id: str
    instance_id: str | None
    created_at: str
    reason: str
    key_id: str
    target: str
    compression: str = "gzip"
    format: int = 1
    tar_bytes: int = 0  # the folder as an uncompressed tar
    plaintext_bytes: int = 0  # compressed, before encryption
    plaintext_sha256: str = ""
    stored_bytes: int = 0
    stored_sha256: str = ""
    files: int = 0
    sqlite: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # the first 50 paths of each kind
    skipped_counts: dict[str, int] = field(default_factory=dict)
    sqlite_raw: list[str] = field(default_factory=list)  # every database kept as bytes (uncut)
    seconds: float = 0.0
    confined: bool = True  # read inside a chroot as the gateway's uid (false: the reader was not root)
    expires_at: str | None = None  # set on pre-delete backups: kept until then (ZAKI_DELETE_GRACE_DAYS)

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        d = json.loads(raw)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def check_user(user_id: str) -> str:
    if not isinstance(user_id, str) or not USER_ID_RE.fullmatch(user_id):
        raise InvalidInput(f"invalid user id {str(user_id)[:70]!r}")
    return user_id


def check_backup_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not BACKUP_ID_RE.fullmatch(backup_id):
        raise InvalidInput(f"invalid backup id {str(backup_id)[:70]!r}")
    return backup_id


def new_backup_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def data_key(user_id: str, backup_id: str) -> str:
    return f"{user_id}/{backup_id}.zbk"


def manifest_key(user_id: str, backup_id: str) -> str:
    return f"{user_id}/{backup_id}.json"


def make_target(s: ZakiSettings) -> Target:
    if s.backup_target == "s3":
        if not s.backup_s3_bucket:
            raise BackupError("ZAKI_BACKUP_S3_BUCKET is not set", "config")
        return S3Target(
            s.backup_s3_bucket,
            s.backup_s3_prefix,
            s.backup_s3_endpoint or None,
            s.backup_s3_region,
            s.backup_s3_access_key.get_secret_value(),
            s.backup_s3_secret_key.get_secret_value(),
        )
    return LocalTarget(s.backup_dir or s.data_root / "backups")


def user_folder(s: ZakiSettings, user_id: str) -> Path:
    return s.data_root / "users" / check_user(user_id)


class _Tap:
    """Counts and hashes the bytes flowing through."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks, self.n, self.h = chunks, 0, hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        for c in self.chunks:
            self.n += len(c)
            self.h.update(c)
            yield c


def create(
    s: ZakiSettings,
    ring: KeyRing,
    target: Target,
    user_id: str,
    instance_id: str | None,
    reason: str,
    now: datetime | None = None,
) -> Manifest:
    """Backs up the user's folder; returns the manifest of a good backup or raises BackupError."""
    if reason not in REASONS:
        raise InvalidInput(f"unknown backup reason {reason!r}")
    folder = user_folder(s, user_id)
    if not folder.is_dir() or folder.is_symlink():
        raise NotFound(f"{user_id} has no data folder")
    t0 = time.monotonic()
    now = now or datetime.now(UTC)
    bid = new_backup_id(now)
    snap = Snapshot(folder, s.backup_timeout_s, s.tenant_disk_bytes)
    raw = _Tap(snap)
    plain = _Tap(gzip_stream(raw))
    sealed = _Tap(encrypt_stream(ring, backup_context(user_id, bid), plain))
    key = data_key(user_id, bid)
    target.upload(key, sealed)
    # Read back: what the target holds is what was written, before anyone may call it good.
    check = hashlib.sha256()
    for c in target.download(key):
        check.update(c)
    if check.hexdigest() != sealed.h.hexdigest():
        target.delete(key)
        raise BackupError("the target does not hold what was written", "target_error")
    summary = snap.summary
    m = Manifest(
        backup_id=bid,
        user_id=user_id,
        instance_id=instance_id,
        created_at=now.isoformat(),
        reason=reason,
        key_id=ring.primary_kid,
        target=target.name,
        tar_bytes=raw.n,
        plaintext_bytes=plain.n,
        plaintext_sha256=plain.h.hexdigest(),
        stored_bytes=sealed.n,
        stored_sha256=sealed.h.hexdigest(),
        files=int(summary.get("files", 0)),  # type: ignore[call-overload]
        sqlite=list(summary.get("sqlite", [])),  # type: ignore[call-overload]
        skipped={k: v for k, v in dict(summary.get("skipped", {})).items() if v},  # type: ignore[call-overload]
        skipped_counts=dict(summary.get("skipped_counts", {})),  # type: ignore[call-overload]
        sqlite_raw=list(summary.get("sqlite_raw", [])),  # type: ignore[call-overload]
        seconds=round(time.monotonic() - t0, 3),
        confined=bool(summary.get("confined", True)),
        expires_at=(now + timedelta(days=s.delete_grace_days)).isoformat()
        if reason == "pre_delete"
        else None,
    )
    try:
        target.put(manifest_key(user_id, bid), m.to_json())
    except BaseException:
        target.delete(key)
        raise
    return m


def list_backups(target: Target, user_id: str | None = None) -> list[Manifest]:
    """Good backups (those with a manifest), oldest first."""
    prefix = f"{check_user(user_id)}/" if user_id else ""
    out = []
    for e in target.list(prefix):
        if e.key.endswith(".json") and BACKUP_ID_RE.fullmatch(e.key.rsplit("/", 1)[-1][:-5]):
            try:
                out.append(Manifest.from_json(target.get(e.key)))
            except (NotFound, ValueError, TypeError):
                continue  # deleted meanwhile, or not ours
    return sorted(out, key=lambda m: (m.created_at, m.backup_id))


def get_manifest(target: Target, user_id: str, backup_id: str | None) -> Manifest:
    check_user(user_id)
    if backup_id is None:
        found = list_backups(target, user_id)
        if not found:
            raise NotFound(f"{user_id} has no backup")
        return found[-1]
    try:
        return Manifest.from_json(target.get(manifest_key(user_id, check_backup_id(backup_id))))
    except NotFound:
        raise NotFound(f"no backup {backup_id} of {user_id}") from None


def _plaintext(ring: KeyRing, target: Target, m: Manifest) -> Iterator[bytes]:
    """The decrypted archive, checked against the manifest's checksum at its end."""
    h = hashlib.sha256()
    n = 0
    try:
        stored = target.download(data_key(m.user_id, m.backup_id))
        for c in decrypt_stream(ring, backup_context(m.user_id, m.backup_id), stored):
            h.update(c)
            n += len(c)
            yield c
    except NotFound:
        raise BackupCorrupt(CorruptReason.MISSING, "the backup's data is gone from the target") from None
    if n != m.plaintext_bytes or h.hexdigest() != m.plaintext_sha256:
        raise BackupCorrupt(CorruptReason.CHECKSUM_MISMATCH, "the archive does not match its manifest")


def unpack_backup(
    ring: KeyRing, target: Target, m: Manifest, dest: Path, max_bytes: int = 0
) -> dict[str, Any]:
    """Decrypts, checks and unpacks into the new folder *dest*; SQLite files pass integrity_check."""
    stats = unpack(_plaintext(ring, target, m), dest, max_bytes)
    # Older manifests named only the first 50 (cut to 200 characters): the full list when there is one.
    raw = frozenset(m.sqlite_raw or m.skipped.get("sqlite_raw", []))
    stats["sqlite_checked"] = check_sqlite(dest, raw)  # type: ignore[assignment]
    return stats


def expired(ms: list[Manifest], s: ZakiSettings, has_instance: bool, now: datetime) -> list[Manifest]:
    """Retention of one user's good backups (oldest first). With an instance: the newest
    keep_count stay unless older than keep_days (the newest one always stays); pre-delete
    backups stay until their expiry. A deleted user's backups all go once the newest is older
    than the delete grace."""
    if not ms:
        return []
    if not has_instance:
        newest = ms[-1].created
        return list(ms) if now - newest > timedelta(days=s.delete_grace_days) else []
    out = []
    keep_from = max(0, len(ms) - s.backup_keep_count)
    max_age = timedelta(days=s.backup_keep_days)
    for i, m in enumerate(ms[:-1]):
        if m.expires_at and datetime.fromisoformat(m.expires_at) > now:
            continue
        if i < keep_from or now - m.created > max_age:
            out.append(m)
    return out


def remove(target: Target, m: Manifest) -> None:
    target.delete(manifest_key(m.user_id, m.backup_id))  # no longer good before its data goes
    target.delete(data_key(m.user_id, m.backup_id))


def sweep_orphans(target: Target, older_than_s: float = PARTIAL_AGE_S) -> int:
    """Data without a manifest (a writer killed between the two) and partial uploads."""
    n = target.sweep_partial(older_than_s)
    entries = target.list()
    manifests = {e.key[:-5] for e in entries if e.key.endswith(".json")}
    cutoff = time.time() - older_than_s
    for e in entries:
        if e.key.endswith(".zbk") and e.key[:-4] not in manifests and e.mtime < cutoff:
            target.delete(e.key)
            n += 1
    return n
