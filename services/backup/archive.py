"""From a data folder to a compressed tar stream and back.

Compression is gzip (zlib, Python's standard library, level 6): no new dependency, and the
folder is mostly SQLite pages and Markdown, which gzip shrinks 3-6x; zstd would compress
faster but needs a binding outside the standard library on Python 3.11 (bench/backup.py has
the figures). Unpacking takes only regular files and directories with plain relative names,
into a fresh folder: a crafted archive cannot write outside it, nor plant a link.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from services.backup.errors import BackupCorrupt, BackupError, CorruptReason
from services.backup.reader import SQLITE_MAGIC, limit_steps
from shared.gateway import GATEWAY_UID

# Progress-handler calls (each every 1,000 SQLite VM steps) an integrity check may take: ~10^9 steps.
INTEGRITY_STEP_BUDGET = 1_000_000

READ = 1 << 20


class Snapshot:
    """Runs the confined reader (reader.py) and yields its tar stream; ``summary`` once done."""

    def __init__(self, folder: Path, timeout_s: float, max_bytes: int = 0) -> None:
        """*max_bytes* (0: none): files past it are left out and listed (``over_limit``)."""
        self.folder, self.timeout_s, self.max_bytes = folder, timeout_s, max_bytes
        self.summary: dict[str, object] = {}

    def __iter__(self) -> Iterator[bytes]:
        proc = subprocess.Popen(
            # -S: the reader needs only the standard library (and shared.gateway): no site start-up.
            [sys.executable, "-S", "-m", "services.backup.reader", str(self.folder), str(self.max_bytes)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        timer = _Deadline(proc, self.timeout_s)
        try:
            assert proc.stdout is not None and proc.stderr is not None
            while chunk := proc.stdout.read(READ):
                yield chunk
            err = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if timer.fired:
            raise BackupError(f"reading the folder took over {self.timeout_s:.0f} s", "timeout")
        if rc != 0 or not err:
            raise BackupError(f"cannot read the folder: {(err or ['no output'])[-1][:300]}", "read_error")
        self.summary = json.loads(err[-1])


class _Deadline:
    def __init__(self, proc: subprocess.Popen[bytes], seconds: float) -> None:
        import threading

        self.fired = False
        self._t = threading.Timer(seconds, self._fire, args=(proc,))
        self._t.daemon = True
        self._t.start()

    def _fire(self, proc: subprocess.Popen[bytes]) -> None:
        self.fired = True
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)

    def cancel(self) -> None:
        self._t.cancel()


def gzip_stream(chunks: Iterable[bytes], level: int = 6) -> Iterator[bytes]:
    z = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    for c in chunks:
        if out := z.compress(c):
            yield out
    yield z.flush()


class _GunzipReader:
    """A file-like reader over decompressed *chunks* (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._z = zlib.decompressobj(31)
        self._buf = bytearray()
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._buf) < n):
            try:
                c = next(self._it)
            except StopIteration:
                self._buf += self._z.flush()
                if not self._z.eof:
                    raise BackupCorrupt(CorruptReason.UNPACK_FAILED, "the archive ends early") from None
                self._eof = True
                break
            try:
                self._buf += self._z.decompress(c)
            except zlib.error as e:
                raise BackupCorrupt(CorruptReason.UNPACK_FAILED, f"not a gzip stream: {e}") from None
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or "\0" in name:
        raise BackupCorrupt(CorruptReason.UNPACK_FAILED, f"refused member name {name[:100]!r}")
    return p


def unpack(chunks: Iterable[bytes], dest: Path, max_bytes: int = 0) -> dict[str, int]:
    """Unpacks a tar.gz stream into the new, empty folder *dest* (created 0700)."""
    dest.mkdir(mode=0o700)
    files = dirs = total = 0
    try:
        with tarfile.open(fileobj=_GunzipReader(chunks), mode="r|", bufsize=READ) as tar:  # type: ignore[arg-type]
            for m in tar:
                rel = _safe_name(m.name)
                target = dest.joinpath(*rel.parts)
                if m.isdir():
                    target.mkdir(mode=0o700, parents=True, exist_ok=True)
                    os.chmod(target, (m.mode & 0o777) | 0o700)
                    dirs += 1
                elif m.isreg():
                    total += m.size
                    if max_bytes and total > max_bytes:
                        raise BackupCorrupt(
                            CorruptReason.UNPACK_FAILED, "the archive unpacks larger than allowed"
                        )
                    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(target, flags, (m.mode & 0o777) | 0o600)
                    src = tar.extractfile(m)
                    assert src is not None
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, READ)
                    os.utime(target, (m.mtime, m.mtime))
                    files += 1
                else:
                    raise BackupCorrupt(
                        CorruptReason.UNPACK_FAILED, f"refused member type for {m.name[:100]!r}"
                    )
    except tarfile.TarError as e:
        raise BackupCorrupt(CorruptReason.UNPACK_FAILED, f"bad tar stream: {e}") from None
    return {"files": files, "dirs": dirs, "bytes": total}


def sqlite_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                if f.read(16) == SQLITE_MAGIC:
                    out.append(p)
    return out


def check_sqlite(root: Path, raw: frozenset[str] = frozenset()) -> list[str]:
    """PRAGMA integrity_check of every SQLite file under *root* (an unpacked backup), but those
    the backup already found unreadable and kept as bytes (*raw*, relative paths)."""
    checked = []
    for p in sqlite_files(root):
        if str(p.relative_to(root)) in raw:
            continue
        # The name is the tenant's: escaped, or '%2F..', '?' and '#' in it would rewrite the URI
        # (another path, mode=rwc). The schema is the tenant's too: a step budget bounds what a
        # crafted index expression may cost (trusted_schema stays on: OpenClaw's own schema uses
        # json_valid(), which SQLite refuses to parse with it off; no SQL function of ours exists).
        con = sqlite3.connect(f"file:{quote(str(p))}?mode=ro", uri=True)
        limit_steps(con, INTEGRITY_STEP_BUDGET)
        try:
            rows = [r[0] for r in con.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as e:
            rows = [str(e)]
        finally:
            con.close()
        if rows != ["ok"]:
            rel = p.relative_to(root)
            raise BackupCorrupt(CorruptReason.SQLITE_INTEGRITY, f"{rel}: {'; '.join(rows)[:300]}")
        checked.append(str(p.relative_to(root)))
    return checked


def chown_tree(root: Path) -> None:
    """Every entry owned by the gateway's uid (as the provisioner lays folders out)."""
    if os.geteuid() != 0:
        return
    os.lchown(root, GATEWAY_UID, GATEWAY_UID)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, n), GATEWAY_UID, GATEWAY_UID)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> None:
    """Atomically swaps two paths (renameat2 RENAME_EXCHANGE): readers see one folder or the other."""
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))
