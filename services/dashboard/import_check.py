"""Checks and unpacks a user's uploaded export (hostile): ``python -S -m services.dashboard.import_check
ARCHIVE DEST MAX_UNPACKED MAX_ENTRIES`` prints one JSON line: the unpacked folder's figures, or a
refusal ``{"code": ..., "message": ...}`` (exit 2) with DEST left for the caller to remove.

It runs in its own process with an address-space and CPU limit: tarfile holds a pax or GNU long-name
header in memory whole, and a crafted one can be as large as the stream; here that ends this
process (``too_large``), never the dashboard. A first pass reads every header without writing
anything and refuses what an export never holds; only then does the backup module's own unpack
(plain relative names, regular files and directories only) write the files.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from services.backup.archive import _safe_name, unpack
from services.backup.errors import BackupCorrupt
from services.backup.reader import _excluded

READ = 1 << 20
MEMORY_LIMIT = 768 << 20
CPU_LIMIT_S = 600
HEADER_SLACK = 4096  # decompressed bytes allowed per entry besides its data (headers, padding)


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def forbidden(rel: PurePosixPath) -> bool:
    """What an export never holds: the gateway's config and its keys (the target keeps its own)."""
    return _excluded(str(rel)) or rel.name == "openclaw.json" or rel.name.endswith(".key")


class _Gunzip:
    """A gzip file decompressed with a ceiling: a small input cannot expand past *budget* bytes,
    and no single step produces more than READ bytes (zlib's max_length)."""

    def __init__(self, path: Path, budget: int) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 (closed by close())
        if self.f.read(2) != b"\x1f\x8b":
            raise Refused("not_gzip", "the file is not a gzip archive (export a .tar.gz first)")
        self.f.seek(0)
        self.z = zlib.decompressobj(31)
        self.budget, self.out = budget, 0
        self.buf = bytearray()
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        n = READ if n < 0 else n
        while not self.eof and len(self.buf) < n:
            data = self.z.unconsumed_tail or self.f.read(READ)
            if not data:
                if not self.z.eof:
                    raise Refused("bad_archive", "the archive ends early")
                self.eof = True
                break
            try:
                piece = self.z.decompress(data, READ)
            except zlib.error as e:
                raise Refused("not_gzip", f"not a gzip stream: {e}") from None
            self.out += len(piece)
            if self.out > self.budget:
                raise Refused("too_large", "the archive unpacks larger than allowed")
            self.buf += piece
            if self.z.eof:
                self.eof = True
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def close(self) -> None:
        self.f.close()


def inspect(archive: Path, max_unpacked: int, max_entries: int) -> dict[str, int]:
    """Reads every header (and skips the data) of the archive; raises Refused with a code."""
    budget = max_unpacked + HEADER_SLACK * (max_entries + 1)
    src = _Gunzip(archive, budget)
    seen: dict[PurePosixPath, bool] = {}  # path -> is a directory
    total = count = 0
    try:
        with tarfile.open(fileobj=src, mode="r|", bufsize=READ) as tar:  # type: ignore[arg-type]
            for m in tar:
                count += 1
                if count > max_entries:
                    raise Refused("too_many_entries", f"the archive holds over {max_entries} entries")
                try:
                    rel = _safe_name(m.name)
                except BackupCorrupt:
                    raise Refused("unsafe_path", f"refused path {m.name[:100]!r}") from None
                if m.issym() or m.islnk():
                    raise Refused("link", f"refused link {m.name[:100]!r}")
                if not (m.isreg() or m.isdir()):
                    raise Refused(
                        "special_file", f"refused device, FIFO or other special file {m.name[:100]!r}"
                    )
                if forbidden(rel):
                    raise Refused("forbidden_file", f"an export never holds {m.name[:100]!r}")
                if rel in seen or any(seen.get(p) is False for p in rel.parents):
                    raise Refused("path_conflict", f"{m.name[:100]!r} appears twice or under a file")
                seen[rel] = m.isdir()
                total += m.size if m.isreg() else 0
                if total > max_unpacked:
                    raise Refused("too_large", "the archive unpacks larger than allowed")
    except tarfile.TarError as e:
        raise Refused("bad_archive", f"not a tar archive: {e}") from None
    except MemoryError:
        raise Refused("too_large", "the archive's headers are larger than allowed") from None
    finally:
        src.close()
    if count == 0:
        raise Refused("bad_archive", "the archive is empty")
    return {"entries": count, "bytes": total}


def _chunks(path: Path):  # type: ignore[no-untyped-def]
    with open(path, "rb") as f:
        while c := f.read(READ):
            yield c


def check_and_unpack(archive: Path, dest: Path, max_unpacked: int, max_entries: int) -> dict[str, object]:
    inspect(archive, max_unpacked, max_entries)
    try:
        # No SQLite integrity check: an export carries a database it could not read as raw bytes,
        # and the user's own files are theirs to bring back as they were (SQLite is never run here).
        stats: dict[str, object] = dict(unpack(_chunks(archive), dest, max_unpacked))
    except BackupCorrupt as e:
        raise Refused(e.code, str(e)) from None
    except OSError as e:
        raise Refused("bad_archive", f"cannot unpack: {e.strerror}") from None
    return stats


def main() -> int:
    archive, dest, max_unpacked, max_entries = sys.argv[1:5]
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S))
    try:
        stats = check_and_unpack(Path(archive), Path(dest), int(max_unpacked), int(max_entries))
    except Refused as e:
        print(json.dumps({"code": e.code, "message": str(e)[:300]}), flush=True)
        return 2
    except MemoryError:
        print(json.dumps({"code": "too_large", "message": "the archive needs too much memory"}))
        return 2
    print(json.dumps({"ok": True, **stats}), flush=True)
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
