"""Per-tenant disk limits (issue 13.10), measured: the data root is one filesystem shared by
every tenant and this host has no project quotas, so the provisioner walks each tenant's
folder (in reconcile and before a start) and stops an instance that is over its limit.

The walk runs as root over a tree the tenant controls, so it never follows a symlink: every
directory is opened relative to its parent's descriptor with O_NOFOLLOW (a directory swapped
for a link mid-walk is refused, not followed), it stays on one filesystem, and it stops as
soon as a limit is crossed, so an over-quota folder costs no more than the limit to measure.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 128  # deeper nesting is itself refused: only a hostile tree goes there
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Usage:
    bytes: int  # allocated blocks, like du (a sparse file counts what it occupies)
    files: int  # entries of every kind
    over: str | None = None  # why the folder is over its limits, for humans; None when within


def _limit_message(used: int, files: int, max_bytes: int, max_files: int) -> str | None:
    if max_bytes and used > max_bytes:
        return f"the data folder uses more than {max_bytes} bytes (limit ZAKI_TENANT_DISK_BYTES)"
    if max_files and files > max_files:
        return f"the data folder holds more than {max_files} files (limit ZAKI_TENANT_MAX_FILES)"
    return None


def measure(root: Path, max_bytes: int = 0, max_files: int = 0) -> Usage:
    """Disk use of *root*; stops early once over *max_bytes* or *max_files* (0: no limit)."""
    try:
        top = os.open(root, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return Usage(0, 0)
    device = os.fstat(top).st_dev
    seen: set[tuple[int, int]] = set()  # hard links count once
    totals = [0, 0]

    def walk(fd: int, depth: int) -> str | None:
        subdirs: list[str] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                totals[1] += 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                totals[0] += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode) and st.st_dev == device:
                    subdirs.append(entry.name)
                over = _limit_message(totals[0], totals[1], max_bytes, max_files)
                if over:
                    return over
        for name in subdirs:
            if depth >= MAX_DEPTH:
                return f"the data folder nests directories deeper than {MAX_DEPTH} levels"
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue  # removed, or swapped for a symlink: not followed
            try:
                over = walk(child, depth + 1)
            finally:
                os.close(child)
            if over:
                return over
        return None

    try:
        over = walk(top, 1)
    finally:
        os.close(top)
    return Usage(totals[0], totals[1], over)
