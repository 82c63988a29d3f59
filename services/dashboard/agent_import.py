"""The user's import (issue 17.1): their own export (GET /api/agent/export) brought back into their
own agent. The upload is hostile: it is streamed to a root-only scratch folder under its own size
limit, checked and unpacked by import_check.py in a separate, memory-capped process, and only a
fully checked folder replaces the agent's (stop, atomic swap, start), keeping the instance's own
config. Any refusal answers 400 with a code and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel

from services.backup import core
from services.backup.errors import BackupError
from services.backup.ops import AT_REST, LIVE, _swap_in, platform_commander
from services.dashboard import audit
from services.dashboard.backups import _api_error, _backups
from services.dashboard.errors import ApiError
from services.dashboard.web import API, Ctx
from shared.state import InstanceState as S

# The export's own type, its aliases, and the generic one (an API client that knows no better).
MEDIA_TYPES = ("application/gzip", "application/x-gzip", "application/x-tar+gzip", "application/octet-stream")
CHECK_TIMEOUT_S = 900.0
ROOT = Path(__file__).resolve().parents[2]


class ImportOut(BaseModel):
    user_id: str
    files: int
    bytes: int
    restarted: bool
    seconds: float


async def _receive(request: web.Request, path: Path, limit: int) -> int:
    """The raw body into *path* (0600), refused past *limit* bytes (the app's own cap is for JSON)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "body_too_large", f"the archive is over {limit // (1 << 20)} MiB")
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        async for chunk in request.content.iter_chunked(1 << 16):
            n += len(chunk)
            if n > limit:
                raise ApiError(413, "body_too_large", f"the archive is over {limit // (1 << 20)} MiB")
            f.write(chunk)
    if n == 0:
        raise ApiError(400, "not_gzip", "the body is empty: send the export's .tar.gz")
    return n


async def _check(upload: Path, dest: Path, max_unpacked: int, max_entries: int) -> dict[str, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-S",
        "-m",
        "services.dashboard.import_check",
        str(upload),
        str(dest),
        str(max_unpacked),
        str(max_entries),
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CHECK_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ApiError(400, "too_large", "checking the archive took too long") from None
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if proc.returncode == 0 and result.get("ok"):
        return {"files": int(result["files"]), "bytes": int(result["bytes"])}
    if proc.returncode == 2 and "code" in result:
        raise ApiError(400, str(result["code"]), str(result.get("message", "refused")))
    # Killed by its memory or CPU limit (a crafted header), or crashed: refused all the same.
    raise ApiError(400, "too_large", "the archive could not be checked within the limits")


async def _put_in_place(ctx: Ctx, staging: Path, user: str) -> bool:
    """stop -> swap -> start, as the backup module's restore does; True when restarted."""
    doc = await ctx.deps.store.get_instance(user)
    state = S(doc["state"]) if doc else None
    if state is not None and state not in (*LIVE, *AT_REST):
        raise ApiError(409, "busy", f"your agent is {state.value}; retry when it settles")
    live = state in LIVE
    command = platform_commander(ctx.deps.settings.nats_url)
    try:
        if live:
            await command("stop", user)
        try:
            await asyncio.to_thread(_swap_in, staging, core.user_folder(ctx.deps.settings, user))
        except OSError as e:
            if live:  # the old folder is still in place: the agent runs on as it was
                await command("start", user)
            raise ApiError(
                502, "disk_error", f"cannot put the imported folder in place: {e.strerror}"
            ) from None
        if live:
            await command("start", user)
    except BackupError as e:
        raise _api_error(e) from None
    return live


@API.route(
    "POST",
    "/api/agent/import",
    summary="Bring my agent's data back from an export (.tar.gz as the body)",
    tag="backups",
    raw_body="application/octet-stream",
    out=ImportOut,
    errors=(404, 409, 502),
)
async def import_my_data(ctx: Ctx) -> ImportOut:
    """The body is the file GET /api/agent/export gave (Content-Type application/gzip, or
    application/octet-stream). It
    replaces the agent's memory, workspace and sessions; the agent's config stays its own. A
    running agent is stopped and started again. Refused with 400 and a code (not_gzip,
    bad_archive, unsafe_path, link, special_file, forbidden_file, path_conflict, too_large,
    too_many_entries), 413 body_too_large; nothing changes then."""
    s, user = ctx.deps.settings, ctx.user_id
    if ctx.request.content_type not in MEDIA_TYPES:
        raise ApiError(415, "unsupported_media_type", "send the export as application/gzip")
    if not core.user_folder(s, user).is_dir():  # as the export: an agent that never ran has no data
        raise ApiError(404, "not_found", "your agent has no data yet: create it first")
    t0 = time.monotonic()
    work = _backups(ctx)._scratch(f"import-{user}")  # root-only, on the data folders' file system
    work.mkdir(mode=0o700)
    try:
        upload = work / "upload.tar.gz"
        size = await _receive(ctx.request, upload, s.dashboard_import_max_bytes)
        staging = work / "folder"
        max_unpacked = min(s.dashboard_import_max_unpacked_bytes, s.tenant_disk_bytes or 1 << 62)
        stats = await _check(upload, staging, max_unpacked, s.dashboard_import_max_entries)
        async with ctx.deps.file_lock(user):
            await audit.record(
                ctx.deps.store,
                user,
                "backup.import",
                user,
                {"upload_bytes": size, **stats},
                ctx.account["username"] if ctx.account else None,
            )
            restarted = await _put_in_place(ctx, staging, user)
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(shutil.rmtree, work, True)
    return ImportOut(user_id=user, restarted=restarted, seconds=round(time.monotonic() - t0, 3), **stats)
