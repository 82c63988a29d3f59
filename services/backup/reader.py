"""The snapshot reader: ``python -m services.backup.reader FOLDER`` writes FOLDER as an
uncompressed tar stream on stdout and a one-line JSON summary on stderr.

A tenant writes its folder and may plant symlinks, FIFOs or swap files while we read. So this
process chroots into the folder and drops to the gateway's uid before reading anything: every
path, even a symlink that SQLite follows by itself, resolves inside the tenant's own folder, and
nothing it creates (a SQLite -shm) is root-owned. Symlinks, FIFOs, sockets and devices are
skipped (never opened), and so are a second name of a file, a sparse file and whatever would pass
the tenant's disk limit (the quota counts blocks and inodes, a tar names); SQLite databases are copied with SQLite's online backup API (one read
transaction: a consistent snapshot while the gateway writes, never a torn copy), their -wal,
-shm and -journal files left out (the copy already holds every committed page).
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import stat
import sys
import tarfile
import time
from collections.abc import Callable
from typing import BinaryIO
from urllib.parse import quote

from shared.gateway import GATEWAY_UID

SQLITE_MAGIC = b"SQLite format 3\x00"
SIDECARS = ("-wal", "-shm", "-journal")
# Bound to the instance, not to the agent: its config with secrets (re-rendered by the provisioner
# for whoever is restored) and the config journal's key (the target keeps its own), caches, and
# lock files (a stale lock restored would block the gateway).
EXCLUDED = (
    ".openclaw/openclaw.json",
    ".openclaw/openclaw.json.last-good",
    ".openclaw/config-journal-fingerprint.key",
    ".openclaw/cache",
    ".openclaw/tmp",
)
EXCLUDED_PREFIXES = (".openclaw/.openclaw.json.",)
MAX_DEPTH = 64
READ = 1 << 20
MAX_NAMED = 50
# Progress-handler calls (each every 1,000 SQLite VM steps) the tenant's schema may cost a copy:
# ~10^8 steps, seconds; past that the file is kept as bytes (sqlite_raw).
COPY_STEP_BUDGET = 100_000
SPARSE_SLACK = 1 << 20  # a file may hold this much more than it allocates before it counts as sparse


class _Exact:
    """Reads exactly *size* bytes from *fd*: a file that shrinks while read is padded with zeros
    (and reported), one that grows is cut at the size the tar header already announced."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.left, self.short = fd, size, False

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        data = os.read(self.fd, n)
        if not data:
            self.short = True
            data = b"\0" * n
        self.left -= len(data)
        return data


def _excluded(rel: str) -> bool:
    return rel in EXCLUDED or rel.startswith(EXCLUDED_PREFIXES)


O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Swapped(Exception):
    """SQLite opened something other than the file the walk checked (a link swapped in)."""


def _only_inside(expected: os.stat_result, prefix: str, own: set[int]) -> None:
    """Unconfined only: every file this process holds open besides its own must be the checked
    database (or its -wal/-shm) inside the folder. SQLite follows links by itself; this catches a
    swap after the fact, and the copy is then thrown away, never written."""
    seen = False
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in own:
            continue
        try:
            target, st = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
        except OSError:
            continue
        if not target.startswith("/") or target.startswith("/proc/"):
            continue  # pipes, sockets, the listing itself
        if not target.startswith(prefix) or st.st_dev != expected.st_dev:
            raise Swapped(f"SQLite opened a file outside the folder ({target[:200]})")
        seen = seen or (st.st_ino == expected.st_ino)
    if not seen:
        raise Swapped("SQLite did not open the file that was checked")


def limit_steps(con: sqlite3.Connection, budget: int) -> None:
    """Interrupts the connection's statements after *budget* progress calls (1,000 steps each):
    the schema is the tenant's, and a trigger or index expression may loop forever."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 1 if steps > budget else 0

    con.set_progress_handler(tick, 1000)


def _sqlite_image(path: str, guard: Callable[[], None] | None = None) -> bytes:
    src = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, timeout=30, isolation_level=None)
    dst = sqlite3.connect(":memory:")
    try:
        # trusted_schema stays on: OpenClaw's own schema uses json_valid() in its tables, which
        # SQLite refuses to parse with it off. This process defines no SQL function and runs
        # confined (chroot, uid 1000), and the step budget bounds what the schema may cost.
        for con in (src, dst):
            limit_steps(con, COPY_STEP_BUDGET)  # exhausted: sqlite3.Error, the file is kept raw
        src.execute("PRAGMA temp_store=MEMORY")
        src.backup(dst)  # every page in one read transaction
        if guard is not None:
            guard()  # while SQLite still holds what it read
        _drop_leases(dst)
        return dst.serialize()
    finally:
        src.close()
        dst.close()


def _drop_leases(db: sqlite3.Connection) -> None:
    """OpenClaw's ``state_leases`` rows belong to the process that held them (pid, host, expiry):
    a restored copy would carry a live-looking lease of a container that no longer exists, and the
    restored gateway refuses to start ("Another Gateway owner lease is still active") until it
    expires. They are runtime locks, not the agent's data: the copy leaves them out. A trigger
    on the table is the tenant's code (a DELETE trigger could loop): the copy's triggers on it are
    dropped first (the copy only; the folder is never written)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'state_leases'").fetchone():
        triggers = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND lower(tbl_name) = 'state_leases'"
        ).fetchall()
        with db:
            for (name,) in triggers:
                db.execute('DROP TRIGGER "{}"'.format(name.replace('"', '""')))
            db.execute("DELETE FROM state_leases")


class Walker:
    """Walks with directory file descriptors (openat, O_NOFOLLOW at every level): a directory or
    file swapped for a link mid-walk is refused, never followed."""

    def __init__(
        self, tar: tarfile.TarFile, base: str = "/", confined: bool = True, max_bytes: int = 0
    ) -> None:
        self.tar, self.base, self.confined, self.max_bytes = tar, base, confined, max_bytes
        self.open_dirs: set[int] = set()
        self.counts: dict[str, int] = {}
        self.seen: set[tuple[int, int]] = set()  # (st_dev, st_ino) of every file taken
        # Every database kept as bytes, uncut: verify and restore must not integrity-check them.
        # Bounded by the entry count, which the tenant's file limit bounds.
        self.raw: list[str] = []
        self.summary: dict[str, object] = {"files": 0, "dirs": 0, "sqlite": [], "bytes": 0}
        self.skipped: dict[str, list[str]] = {
            "symlink": [],
            "special": [],
            "unreadable": [],
            "changed": [],
            "sqlite_raw": [],
            "hardlink": [],
            "sparse": [],
            "over_limit": [],
        }

    def skip(self, kind: str, rel: str) -> None:
        """Named in the manifest up to MAX_NAMED a kind (a tenant may plant millions), all counted."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.skipped[kind]) < MAX_NAMED:
            self.skipped[kind].append(rel[:200])

    def walk_root(self) -> None:
        dfd = os.open(self.base, O_DIR)
        try:
            self.walk("", dfd, 0)
        finally:
            os.close(dfd)

    def walk(self, rel: str, dfd: int, depth: int) -> None:
        self.open_dirs.add(dfd)
        try:
            entries = sorted(os.scandir(dfd), key=lambda e: e.name)
        except OSError:
            self.skip("unreadable", rel)
            return
        names = {e.name for e in entries}
        for e in entries:
            child = f"{rel}/{e.name}" if rel else e.name
            if _excluded(child):
                continue
            try:
                st = os.stat(e.name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                self.skip("unreadable", child)
                continue
            if stat.S_ISLNK(st.st_mode):
                self.skip("symlink", child)
            elif stat.S_ISDIR(st.st_mode):
                self._dir(child, e.name, dfd, depth)
            elif stat.S_ISREG(st.st_mode):
                base = e.name.rsplit("-", 1)[0]
                if e.name.endswith(SIDECARS) and base in names and self._is_sqlite(base, dfd):
                    continue
                self.add_file(child, e.name, dfd)
            else:
                self.skip("special", child)
        self.open_dirs.discard(dfd)

    def _dir(self, child: str, name: str, dfd: int, depth: int) -> None:
        try:
            cfd = os.open(name, O_DIR, dir_fd=dfd)
        except OSError:  # swapped for a link (ELOOP / ENOTDIR) or unreadable
            self.skip("unreadable", child)
            return
        try:
            if depth >= MAX_DEPTH:
                self.skip("unreadable", child)
                return
            st = os.fstat(cfd)
            info = tarfile.TarInfo(child)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, st.st_mode & 0o777, int(st.st_mtime)
            self.tar.addfile(info)
            self.summary["dirs"] = int(self.summary["dirs"]) + 1  # type: ignore[call-overload]
            self.walk(child, cfd, depth + 1)
        finally:
            os.close(cfd)

    def _is_sqlite(self, name: str, dfd: int) -> bool:
        try:
            fd = os.open(name, O_FILE, dir_fd=dfd)
        except OSError:
            return False
        try:
            return stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 16, 0) == SQLITE_MAGIC
        finally:
            os.close(fd)

    def _over(self, size: int) -> bool:
        return bool(self.max_bytes) and int(self.summary["bytes"]) + size > self.max_bytes  # type: ignore[call-overload]

    def _too_big(self, st: os.stat_result) -> str | None:
        """The disk quota counts allocated blocks, and an inode once; a tar copies every name in
        full. A second name of an inode, a file far larger than what it allocates (sparse), and
        whatever would take the archive past the tenant's disk limit are left out, and listed."""
        key = (st.st_dev, st.st_ino)
        if key in self.seen:
            return "hardlink"
        if st.st_size > 2 * st.st_blocks * 512 + SPARSE_SLACK:
            return "sparse"
        if self._over(st.st_size):
            return "over_limit"
        self.seen.add(key)
        return None

    def add_file(self, rel: str, name: str, dfd: int) -> None:
        # O_NOFOLLOW | O_NONBLOCK, then fstat: a file swapped for a symlink or FIFO since lstat is skipped.
        try:
            fd = os.open(name, O_FILE, dir_fd=dfd)
        except OSError:
            self.skip("unreadable", rel)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.skip("special", rel)
                return
            if why := self._too_big(st):
                self.skip(why, rel)
                return
            info = tarfile.TarInfo(rel)
            info.mode, info.mtime = st.st_mode & 0o777, int(st.st_mtime)
            if os.pread(fd, 16, 0) == SQLITE_MAGIC:
                guard = None
                if not self.confined:
                    own = {*self.open_dirs, fd}
                    guard = lambda: _only_inside(st, self.base, own)  # noqa: E731
                try:
                    data: bytes | None = _sqlite_image(self.base + rel, guard)
                except Swapped:
                    self.skip("symlink", rel)  # a link swapped in: left out, the rest goes on
                    return
                except sqlite3.Error:
                    # SQLite cannot read it (corrupt, or a hot journal it may not roll back read-only):
                    # copied as bytes and reported, so a tenant's broken file never blocks a backup
                    # (and with it an upgrade or a delete).
                    data = None
                    self.skip("sqlite_raw", rel)
                    self.raw.append(rel)
            else:
                data = None
            if data is not None and self._over(len(data)):
                self.skip("over_limit", rel)  # the copy outgrew the file (and the limit)
                return
            if data is not None:
                info.size = len(data)
                self.tar.addfile(info, io.BytesIO(data))
                self.summary["sqlite"].append(rel)  # type: ignore[attr-defined]
            else:
                info.size = st.st_size
                src = _Exact(fd, st.st_size)
                self.tar.addfile(info, src)  # type: ignore[arg-type]
                if src.short:
                    self.skip("changed", rel)
            self.summary["files"] = int(self.summary["files"]) + 1  # type: ignore[call-overload]
            self.summary["bytes"] = int(self.summary["bytes"]) + info.size  # type: ignore[call-overload]
        finally:
            os.close(fd)


def confine(folder: str) -> None:
    """chroot into *folder* and become the gateway's uid: from here on nothing outside it exists."""
    # SQLite seeds its PRNG from /dev/urandom once per process: do it now, before a tenant's
    # "/dev/urandom" (a FIFO, say) is the only one there is.
    sqlite3.connect(":memory:").execute("SELECT randomblob(16)").fetchone()
    os.chroot(folder)
    os.chdir("/")
    os.setgroups([])
    os.setgid(GATEWAY_UID)
    os.setuid(GATEWAY_UID)


def run(folder: str, out: BinaryIO, max_bytes: int = 0) -> dict[str, object]:
    """Confined when run as root (the platform's case). Without root (a developer's machine) it
    cannot chroot: it reads from the folder with the same lstat / O_NOFOLLOW checks, and the
    summary says ``confined: false`` - a link swapped in after a check is then SQLite's to follow."""
    t0 = time.monotonic()
    confined = os.geteuid() == 0
    if confined:
        confine(folder)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, bufsize=READ) as tar:
        base = "/" if confined else os.path.realpath(folder).rstrip("/") + "/"
        w = Walker(tar, base, confined, max_bytes)
        w.walk_root()
    return {
        **w.summary,
        "skipped": w.skipped,
        "skipped_counts": w.counts,
        "sqlite_raw": w.raw,
        "confined": confined,
        "seconds": round(time.monotonic() - t0, 3),
    }


def main() -> int:
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and not sys.argv[2].isdigit()):
        print("usage: python -m services.backup.reader FOLDER [MAX_BYTES]", file=sys.stderr)
        return 2
    summary = run(sys.argv[1], sys.stdout.buffer, int(sys.argv[2]) if len(sys.argv) == 3 else 0)
    sys.stdout.buffer.flush()
    os.close(1)  # EOF for the reader of the tar stream before the summary goes to stderr
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
