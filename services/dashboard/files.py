"""SOUL.md and MEMORY.md, read and written by the platform in the user's workspace
(``<data_root>/users/<user id>/workspace/``): works while the gateway is stopped and needs no
gateway scope.

The workspace is writable by the tenant's container, so everything in it is hostile: a file may
be a symlink to a host file, a FIFO that blocks a reader, or huge. Files are opened relative to
a descriptor of the workspace directory with O_NOFOLLOW (and O_NONBLOCK), must be regular
files, are read up to the size limit only, and are replaced atomically (a new file under a
random name, fsync, rename over the old one), owned by the gateway's uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import stat
from datetime import UTC, datetime
from pathlib import Path

from services.dashboard.errors import ApiError, not_found
from services.dashboard.models import FileIn, FileOut
from services.dashboard.web import API, Ctx
from shared.gateway import GATEWAY_UID
from shared.validation import check_user_id

NAMES = ("SOUL.md", "MEMORY.md")


def workspace(data_root: Path, user_id: str) -> Path:
    check_user_id(user_id)
    return data_root / "users" / user_id / "workspace"


def _open_dir(path: Path) -> int:
    # Every component under the data root is the platform's; the workspace itself must not be a link.
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)


def etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(ws: Path, name: str, limit: int) -> tuple[bytes, datetime | None]:
    """The file's bytes (b"" when absent) and modification time; refuses what is not a plain file."""
    dfd = _open_dir(ws)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        except FileNotFoundError:
            return b"", None
        except OSError as e:  # ELOOP: a symlink
            raise ApiError(409, "file_unreadable", f"{name} is not a regular file") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ApiError(409, "file_unreadable", f"{name} is not a regular file")
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    if len(data) > limit:
        raise ApiError(413, "file_too_large", f"{name} is over {limit} bytes; edit it in the Control UI")
    return data, datetime.fromtimestamp(st.st_mtime, UTC)


def write_file(ws: Path, name: str, data: bytes) -> None:
    dfd = _open_dir(ws)
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            os.write(fd, data)
            os.fsync(fd)
            if os.geteuid() == 0:
                os.fchown(fd, GATEWAY_UID, GATEWAY_UID)
        finally:
            os.close(fd)
        # rename replaces a symlink at the name itself, never the file it points to.
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    finally:
        os.close(dfd)


async def _workspace_of(ctx: Ctx, name: str) -> Path:
    if name not in NAMES:
        raise not_found(f"only {' and '.join(NAMES)} can be edited here")
    if await ctx.deps.store.get_instance(ctx.user_id) is None:
        raise not_found("there is no agent")
    ws = workspace(ctx.deps.settings.data_root, ctx.user_id)
    if not ws.is_dir():
        raise ApiError(409, "agent_not_ready", "the agent's workspace does not exist yet; try again shortly")
    return ws


def _out(name: str, data: bytes, mtime: datetime | None) -> FileOut:
    return FileOut(
        name=name, content=data.decode("utf-8", "replace"), size=len(data), etag=etag(data), updated_at=mtime
    )


@API.route(
    "GET",
    "/api/agent/files/{name}",
    summary="Read SOUL.md or MEMORY.md",
    tag="files",
    out=FileOut,
    errors=(404, 409),
)
async def get_file(ctx: Ctx) -> FileOut:
    name = ctx.request.match_info["name"]
    ws = await _workspace_of(ctx, name)
    data, mtime = await asyncio.to_thread(read_file, ws, name, ctx.deps.settings.dashboard_file_max_bytes)
    return _out(name, data, mtime)


@API.route(
    "PUT",
    "/api/agent/files/{name}",
    summary="Replace SOUL.md or MEMORY.md",
    tag="files",
    body=FileIn,
    out=FileOut,
    errors=(404, 409),
)
async def put_file(ctx: Ctx) -> FileOut:
    """etag (from a read) makes the write conditional: 409 edit_conflict when the file changed."""
    name = ctx.request.match_info["name"]
    b: FileIn = ctx.body
    limit = ctx.deps.settings.dashboard_file_max_bytes
    if "\x00" in b.content:
        raise ApiError(400, "invalid_input", "the text contains a NUL character", "content")
    data = b.content.encode("utf-8", "surrogatepass")
    if len(data) > limit:
        raise ApiError(413, "file_too_large", f"the text is over {limit} bytes (UTF-8)", "content")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_input", "the text is not valid Unicode", "content") from None
    ws = await _workspace_of(ctx, name)
    async with ctx.deps.file_lock(ctx.user_id):
        if b.etag is not None:
            current, _ = await asyncio.to_thread(read_file, ws, name, limit)
            if etag(current) != b.etag:
                raise ApiError(
                    409, "edit_conflict", f"{name} changed since you read it", "etag", {"etag": etag(current)}
                )
        await asyncio.to_thread(write_file, ws, name, data)
        data, mtime = await asyncio.to_thread(read_file, ws, name, limit)
    return _out(name, data, mtime)
