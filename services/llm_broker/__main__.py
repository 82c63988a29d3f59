"""python -m services.llm_broker"""

from __future__ import annotations

import asyncio
import json
import logging

import nats
from aiohttp import web

from services.llm_broker import model_path
from services.llm_broker.app import LLMBroker
from services.llm_broker.budget import UsageLedger
from services.llm_broker.directory import Directory
from services.llm_broker.events import BudgetEvents
from services.llm_broker.providers import seed_default_provider
from shared import subjects
from shared.bus import ensure_streams, nats_servers
from shared.crypto import KeyRing
from shared.runner import run_service
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.broker")


async def follow_events(nats_url: str, directory: Directory):
    """Drops cached instances and provider keys the moment they change."""

    async def on_instance(msg) -> None:
        try:
            directory.forget_user(json.loads(msg.data)["user_id"])
        except (ValueError, KeyError, TypeError):
            return

    async def on_provider(msg) -> None:
        directory.forget_provider(msg.data.decode(errors="replace") or None)

    async def reconnected() -> None:
        log.info("NATS reconnected: dropping caches")
        directory.forget_all()

    nc = await nats.connect(nats_servers(nats_url), reconnected_cb=reconnected, max_reconnect_attempts=-1)
    for subject in (subjects.INSTANCE_READY, subjects.INSTANCE_STOPPED, subjects.INSTANCE_DELETED):
        await nc.subscribe(subject, cb=on_instance)
    await nc.subscribe(subjects.PROVIDER_CHANGED, cb=on_provider)
    return nc


async def main(settings: ZakiSettings, stop: asyncio.Event) -> None:
    keys = KeyRing.from_spec(settings.secret_keys.get_secret_value())
    store = Store(settings.mongo_url, settings.mongo_db)
    await store.ensure_indexes()
    await seed_default_provider(store, keys, settings)
    await ensure_streams(settings.nats_url, settings.stream_replicas)
    directory = Directory(store, keys)
    nc = await follow_events(settings.nats_url, directory)
    model_path.TRACKER.attach(store, nc, settings.network_pool)  # wrong_network refusals -> health
    ledger = UsageLedger(
        store,
        reservation_ttl_s=settings.broker_timeout_s + 60,
        shared_reservations=settings.broker_reservations == "store",
    )
    await ledger.reservations.ensure_indexes()
    broker = LLMBroker(settings, directory, ledger, BudgetEvents(store, nc.jetstream()))
    runner = web.AppRunner(broker.build(), access_log=None, shutdown_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, settings.broker_host, settings.broker_port, reuse_port=True)
    await site.start()
    log.info("listening", extra={"address": f"http://{settings.broker_host}:{settings.broker_port}"})
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # drains streams in flight, flushes counted usage
        await nc.close()
        await store.close()


if __name__ == "__main__":
    run_service("llm_broker", main)
