"""Operator routes for backups (issue 17.1): list, create, verify and restore any user's, and
the user's own "download my data" export (their folder as a tar.gz, never encrypted with the
platform's key, never including the gateway's config with its secrets). Every operator action
is audited before it is answered. They run in the dashboard process, which then needs root on
the host of the data folders (the confined reader chroots) and the backup target's settings.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from services.backup import core
from services.backup.errors import BackupCorrupt, BackupError, InvalidInput, NotFound
from services.backup.ops import Backups, platform_commander
from services.dashboard import audit
from services.dashboard.errors import ApiError
from services.dashboard.web import API, Ctx

UserIdStr = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]


class BackupOut(BaseModel):
    backup_id: str
    user_id: str
    instance_id: str | None = None
    created_at: str
    reason: str
    target: str
    key_id: str
    stored_bytes: int
    plaintext_bytes: int
    files: int
    sqlite: list[str]
    skipped: dict[str, list[str]]
    expires_at: str | None = None


class BackupsOut(BaseModel):
    backups: list[BackupOut]


class BackupsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: UserIdStr | None = None


class VerifyOut(BaseModel):
    ok: bool
    backup_id: str
    user_id: str
    files: int
    bytes: int
    sqlite_checked: list[str]


BackupIdStr = Annotated[str, Field(pattern=r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")]


class VerifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backup_id: BackupIdStr | None = None  # default: the newest good backup


class RestoreIn(VerifyIn):
    into: UserIdStr | None = None  # default: the same user


class RestoreOut(BaseModel):
    backup_id: str
    source_user: str
    user_id: str
    restarted: bool
    seconds: float
    files: int


def _backups(ctx: Ctx) -> Backups:
    d = ctx.deps
    if getattr(d, "backups", None) is None:
        try:
            d.backups = Backups.from_settings(d.settings, _publisher(d))
        except (BackupError, ValueError) as e:
            raise ApiError(503, "backups_unavailable", f"backups are not set up: {e}") from None
    return d.backups


def _publisher(d: Any):  # type: ignore[no-untyped-def]
    async def publish(subject: str, ev: Any) -> None:
        if d.nc is not None and d.nc.is_connected:
            from shared.client import PlatformClient

            await PlatformClient(d.nc).send(subject, ev)

    return publish


def _api_error(e: BackupError) -> ApiError:
    if isinstance(e, InvalidInput):
        return ApiError(400, e.code, str(e))
    if isinstance(e, NotFound):
        return ApiError(404, "not_found", str(e))
    if isinstance(e, BackupCorrupt):
        return ApiError(422, e.code, str(e))
    return ApiError(409 if e.code == "busy" else 502, e.code, str(e))


def _out(m: core.Manifest) -> BackupOut:
    return BackupOut(**{k: v for k, v in asdict(m).items() if k in BackupOut.model_fields})


def _operator(ctx: Ctx) -> tuple[str, str]:
    assert ctx.account is not None
    return ctx.account["_id"], ctx.account["username"]


@API.route(
    "GET",
    "/api/admin/backups",
    summary="Good backups (all users, or one)",
    tag="backups",
    auth="operator",
    query=BackupsQuery,
    out=BackupsOut,
    errors=(502,),
)
async def admin_list_backups(ctx: Ctx) -> BackupsOut:
    try:
        return BackupsOut(backups=[_out(m) for m in await _backups(ctx).list(ctx.query.user)])
    except BackupError as e:
        raise _api_error(e) from None


@API.route(
    "POST",
    "/api/admin/backups/{user_id}",
    summary="Back up a user's data folder now",
    tag="backups",
    auth="operator",
    status=201,
    out=BackupOut,
    errors=(404, 502),
)
async def admin_create_backup(ctx: Ctx) -> BackupOut:
    actor, name = _operator(ctx)
    user = ctx.request.match_info["user_id"]
    try:
        core.check_user(user)
        await audit.record(ctx.deps.store, actor, "backup.create", user, actor_name=name)
        doc = await ctx.deps.store.get_instance(user)
        return _out(await _backups(ctx).create(user, (doc or {}).get("instance_id"), "manual"))
    except BackupError as e:
        raise _api_error(e) from None


@API.route(
    "POST",
    "/api/admin/backups/{user_id}/verify",
    summary="Prove a backup decrypts, matches its checksum and unpacks (SQLite integrity_check)",
    tag="backups",
    auth="operator",
    body=VerifyIn,
    out=VerifyOut,
    errors=(404, 422, 502),
)
async def admin_verify_backup(ctx: Ctx) -> VerifyOut:
    user, bid = ctx.request.match_info["user_id"], ctx.body.backup_id
    try:
        r = await _backups(ctx).verify(user, bid)
    except BackupError as e:
        raise _api_error(e) from None
    return VerifyOut(
        ok=True, **{k: r[k] for k in ("backup_id", "user_id", "files", "bytes", "sqlite_checked")}
    )


@API.route(
    "POST",
    "/api/admin/backups/{user_id}/restore",
    summary="Restore a backup into its user or another (a running agent is stopped and started)",
    tag="backups",
    auth="operator",
    body=RestoreIn,
    out=RestoreOut,
    errors=(404, 409, 422, 502),
)
async def admin_restore_backup(ctx: Ctx) -> RestoreOut:
    actor, name = _operator(ctx)
    user, bid = ctx.request.match_info["user_id"], ctx.body.backup_id
    into = ctx.body.into or user
    try:
        core.check_user(user)
        await audit.record(
            ctx.deps.store,
            actor,
            "backup.restore",
            into,
            {"backup_id": bid or "newest", "source": user},
            name,
        )
        commander = platform_commander(ctx.deps.settings.nats_url)
        r = await _backups(ctx).restore(user, bid, into, commander)
    except BackupError as e:
        raise _api_error(e) from None
    return RestoreOut(**{k: r[k] for k in RestoreOut.model_fields})


@API.route(
    "GET",
    "/api/agent/export",
    summary="Download my agent's data (memory, workspace, sessions) as a tar.gz",
    tag="backups",
    errors=(404, 409),
)
async def export_my_data(ctx: Ctx) -> web.StreamResponse:
    """A fresh, consistent snapshot of the account's own data folder, streamed; the gateway's
    config (secrets bound to the instance) is left out. One at a time per user (409
    export_in_progress), bounded like a backup (files past the disk limit left out)."""
    from services.backup.exports import ExportBusy, export_slot

    folder = core.user_folder(ctx.deps.settings, ctx.user_id)
    if not folder.is_dir():
        raise ApiError(404, "not_found", "your agent has no data yet")
    try:
        with export_slot(ctx.user_id):
            return await _export(ctx, folder)
    except ExportBusy as e:
        raise ApiError(409, e.code, str(e)) from None


async def _export(ctx: Ctx, folder: Any) -> web.StreamResponse:
    import asyncio

    from services.backup.archive import Snapshot, gzip_stream

    resp = web.StreamResponse(
        headers={
            "Content-Type": "application/gzip",
            "Content-Disposition": f'attachment; filename="{ctx.user_id}-agent.tar.gz"',
            "Cache-Control": "no-store",
        }
    )
    s = ctx.deps.settings
    chunks = gzip_stream(Snapshot(folder, s.backup_timeout_s, s.tenant_disk_bytes))
    try:
        first = await asyncio.to_thread(next, chunks, None)  # a read failure still answers an error
        await resp.prepare(ctx.request)
        while first is not None:
            await resp.write(first)
            first = await asyncio.to_thread(next, chunks, None)
        await resp.write_eof()
    finally:
        chunks.close()  # a client gone mid-stream: the reader is killed now, not at garbage collection
    return resp


# The user's import registers its route with the others (kept apart: it takes a hostile upload).
from services.dashboard import agent_import  # noqa: E402, F401
