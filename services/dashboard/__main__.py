"""python -m services.dashboard: the dashboard's JSON API (and, when present, its pages)."""

from __future__ import annotations

import asyncio
import logging

import nats
from aiohttp import web

from services.dashboard.api import build_app, make_deps
from shared import audit as shared_audit
from shared.bus import ensure_streams, nats_servers
from shared.runner import run_service
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.dashboard")

SHUTDOWN_GRACE_S = 3.0


async def main(s: ZakiSettings, stop: asyncio.Event) -> None:
    store = Store(s.mongo_url, s.mongo_db)
    deps = make_deps(s, store)
    if not deps.jwt.enabled:
        log.warning(
            "no ZAKI_JWT_SECRET or ZAKI_DASHBOARD_JWT_PRIVATE_KEY: no proxy cookie is issued at log-in"
        )
    await ensure_streams(s.nats_url, s.stream_replicas)
    deps.nc = await nats.connect(nats_servers(s.nats_url), max_reconnect_attempts=-1)
    await deps.hub.start(deps.nc)
    shared_audit.install(deps.nc, s.audit_retention_days, s.stream_replicas)  # issue 17.4
    app = build_app(deps)
    # At shutdown, requests in flight get SHUTDOWN_GRACE_S; the live agent streams (SSE) never end
    # by themselves and would hold the process for aiohttp's default 60 s: they are cut, and the
    # pages' EventSource reconnects (to another replica, or to this one restarted).
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    await web.TCPSite(runner, s.dashboard_host, s.dashboard_port).start()
    log.info("listening", extra={"host": s.dashboard_host, "port": s.dashboard_port})
    await stop.wait()
    await runner.cleanup()
    await deps.nc.drain()
    await store.close()


if __name__ == "__main__":
    run_service("dashboard", main)
