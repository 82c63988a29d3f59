"""A deleted tenant's folder kept aside when the backup before its delete failed for a reason the
tenant controls (its reader timed out or crashed on what it planted). Refusing the delete would
let a tenant make itself undeletable; purging without a backup would lose its data. So the folder
is kept as a tree of hard links (no data copied, nothing more on the quota, which counts inodes
once) under ``users/.kept/`` (root-only; no user id starts with a dot), without the gateway's
config and its secrets, for ZAKI_DELETE_GRACE_DAYS; the backup sweep removes it after that.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from datetime import UTC, datetime
from pathlib import Path

from shared.settings import ZakiSettings

# Bound to the instance (secrets): never kept, as the delete removes them from the folder too.
SECRET_FILES = (".openclaw/openclaw.json", ".openclaw/openclaw.json.last-good")


def kept_root(s: ZakiSettings) -> Path:
    return s.data_root / "users" / ".kept"


def keep_folder(s: ZakiSettings, user_id: str, folder: Path) -> Path:
    """Links every entry of *folder* into a new ``users/.kept/<user>-<time>`` folder. Walked with
    directory descriptors (os.fwalk, links never followed): a directory swapped for a link
    mid-walk is not entered; symlinks, FIFOs and the like are linked as themselves, never opened."""
    root = kept_root(s)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = root / f"{user_id}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}"
    dest.mkdir(mode=0o700)
    for dirpath, dirnames, filenames, dfd in os.fwalk(folder, follow_symlinks=False):
        rel = os.path.relpath(dirpath, folder)
        out = dest if rel == "." else dest / rel
        for name in (*dirnames, *filenames):
            child = name if rel == "." else f"{rel}/{name}"
            if child in SECRET_FILES:
                continue
            with contextlib.suppress(OSError):  # gone meanwhile, or not linkable: the rest goes on
                if stat.S_ISDIR(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                    (out / name).mkdir(mode=0o700)
                else:
                    os.link(name, out / name, src_dir_fd=dfd, follow_symlinks=False)
    return dest


def sweep_kept(s: ZakiSettings, now: float | None = None) -> int:
    """Removes kept folders older than the delete grace (their mtime is when they were kept)."""
    root = kept_root(s)
    if not root.is_dir():
        return 0
    cutoff = (now or time.time()) - s.delete_grace_days * 86400
    n = 0
    for p in root.iterdir():
        if not p.is_symlink() and p.is_dir() and p.stat().st_mtime < cutoff:
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n
