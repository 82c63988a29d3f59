"""python -m services.gateway_proxy"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import subprocess
import sys

import nats
from aiohttp import web

from services.gateway_proxy import wake
from services.gateway_proxy.aiohttp_app import AiohttpPlane
from services.gateway_proxy.auth import Authenticator, follow_cutoffs
from services.gateway_proxy.http_plane import FastProxyServer
from services.gateway_proxy.routing import RoutingTable
from services.gateway_proxy.state import ProxyState
from shared import subjects
from shared.bus import nats_servers
from shared.runner import run_service
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.proxy")


async def follow_events(nats_url: str, routes: RoutingTable, auth: Authenticator):
    """Keeps the routing table and key cache current from NATS; reloads after a reconnect."""

    async def on_outcome(msg) -> None:
        try:
            body = json.loads(msg.data)
        except ValueError:
            return
        if msg.subject == subjects.INSTANCE_READY:
            routes.on_ready(
                body["user_id"], body["docker_host"], body["host"], body["port"], body["instance_id"]
            )
        elif msg.subject == subjects.INSTANCE_STOPPED:
            routes.on_gone(body["user_id"], "stopped")
        elif msg.subject == subjects.INSTANCE_SUSPENDED:
            routes.on_gone(body["user_id"], "suspended")
        elif msg.subject == subjects.INSTANCE_DELETED:
            routes.on_gone(body["user_id"], None)

    async def on_revoked(msg) -> None:
        auth.forget(msg.data.decode(errors="replace"))

    async def disconnected() -> None:
        # Revocation notices cannot arrive now: keys are checked in the store until we are back.
        auth.bus_down()

    async def reconnected() -> None:
        log.info("NATS reconnected: reloading routes, dropping cached keys")
        auth.bus_up()  # notices sent while we were away were missed
        await routes.load()

    nc = await nats.connect(
        nats_servers(nats_url),
        reconnected_cb=reconnected,
        disconnected_cb=disconnected,
        max_reconnect_attempts=-1,
    )
    outcomes = (subjects.INSTANCE_READY, subjects.INSTANCE_STOPPED, subjects.INSTANCE_DELETED)
    for subject in (*outcomes, subjects.INSTANCE_SUSPENDED):
        await nc.subscribe(subject, cb=on_outcome)
    await nc.subscribe(subjects.APIKEY_REVOKED, cb=on_revoked)
    return nc


async def main(settings: ZakiSettings, stop: asyncio.Event) -> None:
    children = []
    if settings.proxy_workers > 1 and not os.environ.get("ZAKI_PROXY_CHILD"):
        for i in range(1, settings.proxy_workers):
            env = {**os.environ, "ZAKI_PROXY_CHILD": str(i), "ZAKI_METRICS_PORT": "0"}
            children.append(subprocess.Popen([sys.executable, "-m", "services.gateway_proxy"], env=env))
    store = Store(settings.mongo_url, settings.mongo_db)
    routes = RoutingTable(store)
    auth = Authenticator(
        store, settings.jwt_secret.get_secret_value(), settings.jwt_public_key, settings.jwt_audience
    )
    nc = await follow_events(settings.nats_url, routes, auth)
    activity_flusher = wake.install(routes, nc, settings)  # hold requests for sleeping gateways
    await routes.load()
    auth.cutoffs = await store.token_cutoffs()
    cutoffs = asyncio.get_running_loop().create_task(follow_cutoffs(auth))
    state = ProxyState(settings, auth, routes)
    runner = web.AppRunner(
        AiohttpPlane(state).build(), access_log=None, shutdown_timeout=settings.proxy_drain_s
    )
    await runner.setup()
    fast: FastProxyServer | None = None
    if settings.proxy_fastpath:
        # One listener: the raw data plane serves the API routes and hands every other
        # connection (WebSockets, Control UI, health) to the aiohttp application.
        fast = FastProxyServer(state, runner.server)
        await fast.start(settings.proxy_host, settings.proxy_port)
    else:
        site = web.TCPSite(runner, settings.proxy_host, settings.proxy_port, reuse_port=True, backlog=2048)
        await site.start()
    # Everything loaded so far lives as long as the process: keep it out of the cyclic
    # collector's full passes, which otherwise stall requests for milliseconds (tail latency).
    gc.freeze()
    log.info(
        "listening",
        extra={"address": f"http://{settings.proxy_host}:{settings.proxy_port}", "fastpath": bool(fast)},
    )
    try:
        await stop.wait()
    finally:
        if fast is not None:
            await fast.drain(settings.proxy_drain_s)  # no new connections; requests in flight finish
        await runner.cleanup()  # drains open requests and WebSockets of the aiohttp side
        activity_flusher.cancel()
        cutoffs.cancel()
        await nc.close()
        await store.close()
        for child in children:
            child.terminate()
        for child in children:
            child.wait(10)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    run_service("gateway_proxy", main)
