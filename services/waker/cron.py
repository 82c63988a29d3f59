"""A gateway's next scheduled (cron) job, read from its own state database.

OpenClaw 2026.9.6 keeps cron jobs in ``<state dir>/state/openclaw.sqlite``, table
``cron_jobs`` (``enabled``, ``job_json`` with the schedule, ``state_json`` with
``nextRunAtMs``), the same rows its ``cron.list`` RPC answers from. Reading the file works
while the gateway runs and while it is suspended, and needs no credential.

The file belongs to the tenant and is hostile: every path component is opened without
following symlinks, the database and its WAL are copied (size-capped) into a private
temporary folder and only the copy is opened, with SQLite's defensive settings, a length
limit and a step budget.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path

DB_PARTS = ("state", "openclaw.sqlite")
MAX_DB_BYTES = 64 << 20
MAX_ROWS = 10_000
MAX_VM_STEPS = 50_000_000
# Kinds of schedule that need the gateway up all the time (they watch a running command).
ALWAYS_ON_KINDS = frozenset({"stream"})
# OpenClaw's own recurring heartbeat (every 30 min by default, an agent turn when the owner has a
# route): waking a sleeper for it would keep every gateway up. Left to sleep unless asked.
HEARTBEAT_PAYLOAD = "heartbeat"


class CronUnreadable(Exception):
    """The state database exists but cannot be read safely; the caller keeps the gateway up."""


def _copy_nofollow(dir_fd: int, name: str, dest: Path, budget: int) -> int:
    """Copies a regular file (never a symlink, FIFO or device) at most *budget* bytes long."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CronUnreadable(f"{name} is not a regular file")
        if st.st_size > budget:
            raise CronUnreadable(f"{name} is larger than {budget} bytes")
        with os.fdopen(os.dup(fd), "rb") as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        return st.st_size
    finally:
        os.close(fd)


def _copy_db(state_dir: Path, tmp: Path) -> Path | None:
    """Copies the database (and its WAL) out of the tenant's folder; None when there is none."""
    try:
        root = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            sub = os.open(
                DB_PARTS[0], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root
            )
        except FileNotFoundError:
            return None
        except OSError as e:  # a symlink or a file where the folder should be
            raise CronUnreadable(f"state folder: {e.strerror}") from None
        try:
            dest = tmp / "db.sqlite"
            try:
                used = _copy_nofollow(sub, DB_PARTS[1], dest, MAX_DB_BYTES)
            except FileNotFoundError:
                return None
            except OSError as e:
                raise CronUnreadable(f"database: {e.strerror}") from None
            try:
                _copy_nofollow(sub, DB_PARTS[1] + "-wal", tmp / "db.sqlite-wal", MAX_DB_BYTES - used)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise CronUnreadable(f"database journal: {e.strerror}") from None
            return dest
        finally:
            os.close(sub)
    finally:
        os.close(root)


def _next_of(
    enabled: object, payload: object, job_json: object, state_json: object, now: datetime, heartbeat: bool
) -> datetime | None:
    if not enabled or (payload == HEARTBEAT_PAYLOAD and not heartbeat):
        return None
    try:
        job = json.loads(job_json) if isinstance(job_json, str) else {}
        state = json.loads(state_json) if isinstance(state_json, str) else {}
    except ValueError:
        return None
    schedule = job.get("schedule") if isinstance(job, dict) else None
    kind = schedule.get("kind") if isinstance(schedule, dict) else None
    if kind in ALWAYS_ON_KINDS:
        return now
    ms = state.get("nextRunAtMs") if isinstance(state, dict) else None
    if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 < ms < 2**53:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC)


def next_job_at(state_dir: Path, now: datetime | None = None, heartbeat: bool = False) -> datetime | None:
    """The earliest next run of an enabled job (heartbeats only with *heartbeat*), None when
    there is none; raises CronUnreadable."""
    now = now or datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="zaki-cron-") as tmp:
        copy = _copy_db(state_dir, Path(tmp))
        if copy is None:
            return None
        try:
            conn = sqlite3.connect(copy, isolation_level=None)
        except sqlite3.Error as e:
            raise CronUnreadable(f"cannot open: {e}") from None
        try:
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1 << 20)
            steps = [0]

            def budget() -> int:
                steps[0] += 1
                return 1 if steps[0] * 1000 > MAX_VM_STEPS else 0

            conn.set_progress_handler(budget, 1000)
            conn.execute("PRAGMA trusted_schema=OFF")
            conn.execute("PRAGMA cell_size_check=ON")
            try:
                has = conn.execute(
                    "SELECT 1 FROM sqlite_schema WHERE type='table' AND name='cron_jobs'"
                ).fetchone()
                if not has:
                    return None
                rows = conn.execute(
                    "SELECT enabled, payload_kind, job_json, state_json FROM cron_jobs LIMIT ?", (MAX_ROWS,)
                ).fetchall()
            except sqlite3.Error as e:
                raise CronUnreadable(f"cannot read: {e}") from None
        finally:
            conn.close()
    times = [t for row in rows if (t := _next_of(*row, now, heartbeat)) is not None]
    return min(times) if times else None
