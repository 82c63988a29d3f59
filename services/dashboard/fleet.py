"""Operator API for fleet upgrades in canary waves (issue 17.2; services/fleet): start one,
follow it, abort or resume it. The runner runs as a task of this dashboard process with its
state in the store, so after a restart of the dashboard (or of a CLI runner) ``resume``
continues it where it stopped. Every action is audited."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Annotated, Any

from pydantic import Field

from services.dashboard import audit
from services.dashboard.errors import ApiError, not_found
from services.dashboard.models import In, Out
from services.dashboard.web import API, Ctx
from services.fleet import plan as fp
from services.fleet import runner as fr
from shared.client import PlatformClient
from shared.events import ImageRef

log = logging.getLogger("zaki.dashboard.fleet")


class FleetStartIn(In):
    image: ImageRef
    canary: Annotated[str, Field(max_length=16)] = "5%"
    waves: Annotated[str, Field(max_length=128)] = "25%,50%,100%"
    soak_s: Annotated[float, Field(ge=0, le=86400)] = 300.0
    max_failures: Annotated[int, Field(ge=0, le=10_000)] = 0
    parallel: Annotated[int, Field(ge=1, le=64)] = 4


class RolloutMember(Out):
    user_id: str
    status: str
    wave: int
    from_image: str | None
    error: str | None = None


class RolloutOut(Out):
    id: str
    state: str
    image: str
    wave: int
    groups: list[int]
    counts: dict[str, int]
    reasons: list[str]
    created_at: datetime
    instances: list[RolloutMember] = Field(default_factory=list)


class RolloutsOut(Out):
    rollouts: list[RolloutOut]


class RolloutStartedOut(Out):
    rollout_id: str


def _out(doc: dict[str, Any], members: bool) -> RolloutOut:
    return RolloutOut(
        id=doc["_id"],
        state=doc["state"],
        image=doc["image"],
        wave=doc["wave"],
        groups=[len(g["users"]) for g in doc["groups"]],
        counts=fr.counts(doc),
        reasons=list(doc.get("reasons") or []),
        created_at=doc["created_at"],
        instances=[
            RolloutMember(
                user_id=u,
                status=e["status"],
                wave=e["wave"],
                from_image=e.get("from_image"),
                error=e.get("error"),
            )
            for u, e in sorted(doc["instances"].items())
        ]
        if members
        else [],
    )


def _spawn(ctx: Ctx, rid: str) -> None:
    deps = ctx.deps

    async def run() -> None:
        client = await PlatformClient.connect(deps.settings.nats_url)
        try:
            await fr.Runner(deps.store, client, lease_s=deps.settings.fleet_lease_s).run(rid)
        except Exception:
            log.exception("fleet rollout runner failed", extra={"rollout": rid})
        finally:
            await client.close()

    deps.tasks.append(asyncio.create_task(run()))


async def _record(ctx: Ctx, action: str, detail: dict[str, Any]) -> None:
    assert ctx.account is not None
    await audit.record(ctx.deps.store, ctx.account["_id"], action, "fleet", detail, ctx.account["username"])


@API.route(
    "POST", "/api/admin/fleet", summary="Upgrade every instance in canary waves", tag="admin",
    auth="operator", body=FleetStartIn, status=202, out=RolloutStartedOut, errors=(400, 409),
)  # fmt: skip
async def start_rollout(ctx: Ctx) -> RolloutStartedOut:
    b, s = ctx.body, ctx.deps.settings
    try:
        doc = await fr.create(
            ctx.deps.store, b.image, fp.parse_share(b.canary), fp.parse_waves(b.waves),
            soak_s=b.soak_s, actor=audit.dashboard_actor(ctx.account["_id"], ctx.account["username"]),
            allowed=s.images(), max_failures=b.max_failures, parallel=b.parallel,
        )  # fmt: skip
    except fp.PlanError as e:
        raise ApiError(400, "invalid_rollout", str(e)) from None
    except fr.RolloutBusy as e:
        raise ApiError(409, "rollout_in_progress", str(e)) from None
    await _record(ctx, "fleet.upgrade", {"rollout": doc["_id"], "image": b.image})
    _spawn(ctx, doc["_id"])
    return RolloutStartedOut(rollout_id=doc["_id"])


@API.route(
    "GET", "/api/admin/fleet", summary="Recent rollouts", tag="admin", auth="operator", out=RolloutsOut
)
async def list_rollouts(ctx: Ctx) -> RolloutsOut:
    store = ctx.deps.store
    ids = [d["_id"] async for d in fr.rollouts(store).find({}, {"_id": 1}).sort("created_at", -1).limit(20)]
    docs = [d for d in [await fr.get(store, i) for i in ids] if d]
    return RolloutsOut(rollouts=[_out(d, False) for d in docs])


async def _existing(ctx: Ctx) -> dict[str, Any]:
    doc = await fr.get(ctx.deps.store, ctx.request.match_info["rollout_id"])
    if doc is None:
        raise not_found("no such rollout")
    return doc


@API.route(
    "GET", "/api/admin/fleet/{rollout_id}", summary="A rollout, instance by instance", tag="admin",
    auth="operator", out=RolloutOut, errors=(404,),
)  # fmt: skip
async def get_rollout(ctx: Ctx) -> RolloutOut:
    return _out(await _existing(ctx), True)


@API.route(
    "POST", "/api/admin/fleet/{rollout_id}/abort", summary="Abort a rollout (upgraded ones are rolled back)",
    tag="admin", auth="operator", status=202, out=RolloutOut, errors=(404, 409),
)  # fmt: skip
async def abort_rollout(ctx: Ctx) -> RolloutOut:
    doc = await _existing(ctx)
    try:
        doc = await fr.abort(ctx.deps.store, doc["_id"])
    except fp.PlanError as e:
        raise ApiError(409, "not_running", str(e)) from None
    await _record(ctx, "fleet.abort", {"rollout": doc["_id"]})
    return _out(doc, False)


@API.route(
    "POST", "/api/admin/fleet/{rollout_id}/resume", summary="Resume a rollout whose runner stopped",
    tag="admin", auth="operator", status=202, out=RolloutOut, errors=(404, 409),
)  # fmt: skip
async def resume_rollout(ctx: Ctx) -> RolloutOut:
    doc = await _existing(ctx)
    if doc["state"] in fp.DONE:
        raise ApiError(409, "finished", f"rollout {doc['_id']} is {doc['state']}")
    await _record(ctx, "fleet.resume", {"rollout": doc["_id"]})
    _spawn(ctx, doc["_id"])
    return _out(doc, False)
