"""Backups as the platform runs them: in a worker thread, with events and metrics; and the
restore, which stops the target instance, swaps its folder atomically and starts it again.

Used by the backup service (schedule), the provisioner (before an upgrade or a delete), the
``zaki backup`` CLI and the dashboard's admin routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

from services.backup import core
from services.backup.archive import chown_tree, exchange
from services.backup.errors import BackupError, InvalidInput
from services.backup.targets import Target
from shared import subjects
from shared.crypto import KeyRing
from shared.events import BackupCompleted, BackupFailed, Event, InstanceCommand
from shared.settings import ZakiSettings
from shared.state import InstanceState as S

log = logging.getLogger("zaki.backup")

Publish = Callable[[str, Event], Awaitable[None]]

RUNS = Counter("zaki_backup_runs_total", "Backups by outcome and reason", ["outcome", "reason"])
SECONDS = Histogram(
    "zaki_backup_duration_seconds",
    "Time to take one good backup",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)
SIZE = Histogram(
    "zaki_backup_size_bytes",
    "Stored size of each good backup",
    buckets=tuple(float(1 << n) for n in range(16, 36, 2)),  # 64 KiB .. 16 GiB
)
RESTORES = Counter("zaki_backup_restores_total", "Restores by outcome", ["outcome"])

# States whose gateway runs (or may wake): stopped for the swap, started again after it.
LIVE = (S.RUNNING, S.STARTING, S.SUSPENDED)
# How long a restore may hold its claim on the instance (Store.claim_restore) if it dies.
RESTORE_LEASE_S = 900.0
AT_REST = (S.STOPPED, S.FAILED, S.CRASHLOOPING)


@dataclass
class Backups:
    settings: ZakiSettings
    ring: KeyRing
    target: Target
    publish: Publish | None = None

    @classmethod
    def from_settings(cls, s: ZakiSettings, publish: Publish | None = None) -> Backups:
        return cls(s, KeyRing.from_spec(s.secret_keys.get_secret_value()), core.make_target(s), publish)

    async def _emit(self, subject: str, ev: Event) -> None:
        if self.publish is None:
            return
        try:
            await self.publish(subject, ev)
        except Exception:  # an event lost must not turn a good backup into a failed one
            log.exception("could not publish a backup event")

    async def create(self, user_id: str, instance_id: str | None, reason: str) -> core.Manifest:
        try:
            try:
                m = await asyncio.to_thread(
                    core.create, self.settings, self.ring, self.target, user_id, instance_id, reason
                )
            except (BackupError, asyncio.CancelledError):
                raise
            except Exception as e:  # an unforeseen failure is still a failed backup, published
                log.exception("backup crashed", extra={"user_id": user_id})
                raise BackupError(f"internal error: {type(e).__name__}", "internal") from None
        except BackupError as e:
            RUNS.labels("failed", reason).inc()
            log.warning("backup failed", extra={"user_id": user_id, "error": e.code, "reason": reason})
            await self._emit(
                subjects.BACKUP_FAILED,
                BackupFailed(
                    user_id=user_id,
                    instance_id=instance_id,
                    reason=reason,
                    error=e.code,
                    message=str(e)[:500],
                ),
            )
            raise
        RUNS.labels("ok", reason).inc()
        SECONDS.observe(m.seconds)
        SIZE.observe(m.stored_bytes)
        log.info(
            "backup completed",
            extra={"user_id": user_id, "backup_id": m.backup_id, "bytes": m.stored_bytes, "reason": reason},
        )
        await self._emit(
            subjects.BACKUP_COMPLETED,
            BackupCompleted(
                user_id=user_id,
                instance_id=instance_id,
                backup_id=m.backup_id,
                reason=reason,
                target=m.target,
                stored_bytes=m.stored_bytes,
                seconds=m.seconds,
                key_id=m.key_id,
            ),
        )
        return m

    async def list(self, user_id: str | None = None) -> list[core.Manifest]:
        return await asyncio.to_thread(core.list_backups, self.target, user_id)

    async def verify(self, user_id: str, backup_id: str | None) -> dict[str, Any]:
        """Decrypts, checks the checksum, unpacks into a temporary folder and runs
        integrity_check on every SQLite file; raises BackupCorrupt with a typed reason."""
        async with self._unpacked(user_id, backup_id, "verify") as (m, _, stats):
            return {"backup_id": m.backup_id, "user_id": m.user_id, **stats}

    @contextlib.asynccontextmanager
    async def _unpacked(
        self, user_id: str, backup_id: str | None, why: str
    ) -> AsyncIterator[tuple[core.Manifest, Path, dict[str, Any]]]:
        """*user_id*'s backup (default: the latest) decrypted, checked and unpacked into a
        scratch folder, bounded like a restore (a crafted or oversized archive cannot fill the
        disk); the folder is removed on the way out (unless renamed away)."""
        m = await asyncio.to_thread(core.get_manifest, self.target, user_id, backup_id)
        scratch = self._scratch(f"{why}-{m.backup_id}")
        try:
            stats = await asyncio.to_thread(
                core.unpack_backup, self.ring, self.target, m, scratch, self.settings.tenant_disk_bytes
            )
            yield m, scratch, stats
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

    def _scratch(self, name: str) -> Path:
        # On the data folder's file system (a restore renames it into place), root-only.
        base = self.settings.data_root / "users" / ".backup-work"
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        return base / f"{name}-{uuid.uuid4().hex[:8]}"

    async def put_in_place(self, user_id: str, backup_id: str | None) -> dict[str, Any]:
        """*user_id*'s backup (default: the latest) becomes its data folder on this host in one
        rename: a move onto this node with per-node disks, its gateway not running here."""
        async with self._unpacked(user_id, backup_id, "move") as (m, staging, stats):
            try:
                await asyncio.to_thread(_swap_in, staging, core.user_folder(self.settings, user_id))
            except OSError as e:
                raise BackupError(
                    f"cannot put the restored folder in place: {e.strerror}", "disk_error"
                ) from None
        RESTORES.labels("ok").inc()
        return {"backup_id": m.backup_id, **stats}

    async def restore(
        self,
        user_id: str,
        backup_id: str | None,
        into: str | None = None,
        command: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Restores *user_id*'s backup into *into* (default: the same user). A running (or
        suspended) instance is stopped, its folder swapped atomically and started again (its
        config re-rendered by the provisioner for the target user); a stopped one stays stopped.
        *command(kind, user)* sends stop/start and waits for the outcome."""
        from shared.store import Store

        target_user = core.check_user(into or user_id)
        t0 = time.monotonic()
        m = await asyncio.to_thread(core.get_manifest, self.target, user_id, backup_id)
        staging = self._scratch(f"restore-{target_user}")
        s = self.settings
        store = Store(s.mongo_url, s.mongo_db)
        try:
            stats = await asyncio.to_thread(
                core.unpack_backup, self.ring, self.target, m, staging, s.tenant_disk_bytes
            )
            # The claim first, then the state: a start between a read and the claim would leave
            # a running gateway that this restore believed stopped. From the claim until the
            # swap the provisioner carries out only a stop for this user (a start would run the
            # gateway on the folder being replaced, its writes going to the copy thrown away).
            token = await store.claim_restore(target_user, RESTORE_LEASE_S)
            doc = await store.get_instance(target_user)
            if doc is not None and token is None:
                raise BackupError(f"a restore of {target_user} is already in progress", "busy")
            state = S(doc["state"]) if doc else None
            live = state in LIVE
            try:
                if state is not None and state not in (*LIVE, *AT_REST):
                    raise BackupError(
                        f"{target_user}'s instance is {state.value}; retry when it settles", "busy"
                    )
                if live and command is None:
                    raise InvalidInput("the instance runs: a restore needs the platform to stop it")
            except (BackupError, InvalidInput):
                if token is not None:
                    await store.release_restore(target_user, token)
                raise
            swap_error: BackupError | None = None
            try:
                if live:
                    assert command is not None
                    await command("stop", target_user)
                try:
                    await asyncio.to_thread(_swap_in, staging, core.user_folder(s, target_user))
                except OSError as e:
                    swap_error = BackupError(
                        f"cannot put the restored folder in place: {e.strerror}", "disk_error"
                    )
            finally:
                if token is not None:
                    await store.release_restore(target_user, token)
            # Restored (or, after a failed swap, the old folder still in place): it runs again.
            if live:
                assert command is not None
                await command("start", target_user)
            if swap_error is not None:
                raise swap_error
        except BackupError:
            RESTORES.labels("failed").inc()
            raise
        finally:
            await store.close()
            await asyncio.to_thread(shutil.rmtree, staging, True)
        RESTORES.labels("ok").inc()
        log.info("restored", extra={"user_id": target_user, "backup_id": m.backup_id, "source": user_id})
        return {
            "backup_id": m.backup_id,
            "source_user": user_id,
            "user_id": target_user,
            "restarted": live,
            "seconds": round(time.monotonic() - t0, 3),
            **stats,
        }


def _swap_in(staging: Path, folder: Path) -> None:
    """The unpacked backup becomes *folder* in one rename; the target's own config (rendered for
    it, never taken from the backup) is carried over until the next start re-renders it."""
    for name in ("openclaw.json", "config-journal-fingerprint.key"):
        old = folder / ".openclaw" / name
        if old.is_file() and not old.is_symlink():
            (staging / ".openclaw").mkdir(mode=0o700, exist_ok=True)
            shutil.copy2(old, staging / ".openclaw" / name, follow_symlinks=False)
    for sub in (staging / ".openclaw", staging / "workspace"):
        sub.mkdir(mode=0o700, exist_ok=True)
    os.chmod(staging, 0o700)
    chown_tree(staging)
    if folder.exists():
        exchange(staging, folder)  # staging now holds the old folder, removed by the caller
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, folder)


def platform_commander(nats_url: str, timeout: float = 300.0) -> Callable[[str, str], Awaitable[None]]:
    """stop/start through the provisioner (its per-user lock, state and config writer)."""

    async def command(kind: str, user_id: str) -> None:
        from shared.client import PlatformClient

        client = await PlatformClient.connect(nats_url)
        try:
            cmd = InstanceCommand(user_id=user_id, reason="backup restore")
            subject, outcome = await client.call(f"{subjects.PREFIX}.instance.{kind}", cmd, timeout=timeout)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        if subject.endswith(".failed"):
            raise BackupError(
                f"{kind} of {user_id} failed: {getattr(outcome, 'message', '')[:300]}", "instance"
            )

    return command
