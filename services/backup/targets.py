"""Where backups are kept, behind one small interface: a local directory (the default) or
S3-compatible object storage (boto3: AWS's own SDK, maintained by AWS, speaks every
S3-compatible store - MinIO, Ceph, R2 - and streams multipart uploads from a reader, so a
large backup never sits in memory; the sync client fits: backups run in a worker thread).

Keys are ``<user>/<backup id>.zbk`` (sealed data) and ``<user>/<backup id>.json`` (manifest).
An object appears whole or not at all: a local file is written under a temporary name, fsynced
and renamed; an S3 object exists only once its (multipart) upload completes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.backup.errors import BackupError, NotFound

READ = 1 << 20
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    mtime: float


class TargetError(BackupError):
    code = "target_error"


class DiskFull(TargetError):
    code = "disk_full"


class Target(Protocol):
    name: str

    def upload(self, key: str, chunks: Iterable[bytes]) -> int: ...
    def download(self, key: str) -> Iterator[bytes]: ...
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> list[Entry]: ...
    def delete(self, key: str) -> None: ...
    def sweep_partial(self, older_than_s: float) -> int: ...


def _oserror(e: OSError, what: str) -> TargetError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"the backup target is full ({what})")
    return TargetError(f"cannot write the backup target ({what}): {e.strerror}")


class LocalTarget:
    """A directory (ZAKI_BACKUP_DIR), folders 0700 and files 0600, owned by the platform."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _write(self, key: str, chunks: Iterable[bytes]) -> int:
        path = self._path(key)
        tmp = path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
        n = 0
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                for c in chunks:
                    f.write(c)
                    n += len(c)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dfd = os.open(path.parent, os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _oserror(e, key) from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return n

    def upload(self, key: str, chunks: Iterable[bytes]) -> int:
        return self._write(key, chunks)

    def put(self, key: str, data: bytes) -> None:
        self._write(key, [data])

    def download(self, key: str) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise NotFound(f"no object {key}") from None
        with f:
            while c := f.read(READ):
                yield c

    def get(self, key: str) -> bytes:
        return b"".join(self.download(key))

    def list(self, prefix: str = "") -> list[Entry]:
        base = self._path(prefix) if prefix else self.root
        out = []
        if not base.is_dir():
            return out
        for dirpath, _, filenames in os.walk(base):
            for n in filenames:
                if n.startswith(TMP_PREFIX):
                    continue
                p = Path(dirpath) / n
                st = p.lstat()
                out.append(Entry(p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def sweep_partial(self, older_than_s: float) -> int:
        """Removes temporary files a killed writer left behind."""
        n = 0
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                p = Path(dirpath) / name
                if name.startswith(TMP_PREFIX) and p.lstat().st_mtime < cutoff:
                    p.unlink(missing_ok=True)
                    n += 1
        return n


class _IterReader:
    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._buf = bytearray()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            try:
                self._buf += next(self._it)
            except StopIteration:
                break
        size = len(self._buf) if size < 0 else min(size, len(self._buf))
        out = bytes(self._buf[:size])
        del self._buf[:size]
        self.n += len(out)
        return out


class S3Target:
    """S3-compatible object storage. Incomplete multipart uploads (a killed writer) are aborted by
    ``sweep_partial``; a bucket lifecycle rule for them is the belt to these braces."""

    name = "s3"

    def __init__(
        self, bucket: str, prefix: str, endpoint: str | None, region: str, access_key: str, secret_key: str
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint or None,
            region_name=region,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60
            ),
        )

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound("no such object") from None
            raise TargetError(f"object storage refused: {code}") from None
        except BotoCoreError as e:
            raise TargetError(f"object storage unreachable: {type(e).__name__}") from None

    def upload(self, key: str, chunks: Iterable[bytes]) -> int:
        from boto3.s3.transfer import TransferConfig

        reader = _IterReader(chunks)
        cfg = TransferConfig(multipart_chunksize=8 << 20, max_concurrency=2, use_threads=True)
        self._call(self.client.upload_fileobj, reader, self.bucket, self._k(key), Config=cfg)
        return reader.n

    def put(self, key: str, data: bytes) -> None:
        self._call(self.client.put_object, Bucket=self.bucket, Key=self._k(key), Body=data)

    def download(self, key: str) -> Iterator[bytes]:
        body = self._call(self.client.get_object, Bucket=self.bucket, Key=self._k(key))["Body"]
        try:
            yield from body.iter_chunks(READ)
        finally:
            body.close()

    def get(self, key: str) -> bytes:
        return b"".join(self.download(key))

    def list(self, prefix: str = "") -> list[Entry]:
        out = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._k(prefix)
        )
        cut = len(self.prefix) + 1 if self.prefix else 0
        for page in self._call(list, pages):
            for o in page.get("Contents", []):
                out.append(Entry(o["Key"][cut:], int(o["Size"]), o["LastModified"].timestamp()))
        return sorted(out, key=lambda e: e.key)

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._k(key))

    def sweep_partial(self, older_than_s: float) -> int:
        ups = self._call(self.client.list_multipart_uploads, Bucket=self.bucket, Prefix=self._k(""))
        n = 0
        cutoff = time.time() - older_than_s
        for u in ups.get("Uploads", []):
            if u["Initiated"].timestamp() < cutoff:
                self._call(
                    self.client.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=u["Key"],
                    UploadId=u["UploadId"],
                )
                n += 1
        return n
