"""python -m services.waker: suspends idle gateways, wakes them on a Telegram message or a due job."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import nats

from services.waker.asks import OUTCOMES
from services.waker.service import Waker
from shared import subjects
from shared.bus import ensure_streams, nats_servers, to_json
from shared.crypto import KeyRing
from shared.runner import run_service
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.waker")


async def main(settings: ZakiSettings, stop: asyncio.Event) -> None:
    await ensure_streams(settings.nats_url, settings.stream_replicas)
    nc = await nats.connect(nats_servers(settings.nats_url), max_reconnect_attempts=-1)
    js = nc.jetstream()

    async def publish(subject: str, event) -> None:
        await js.publish(subject, to_json(event))

    store = Store(settings.mongo_url, settings.mongo_db)
    waker = Waker(settings, store, KeyRing.from_spec(settings.secret_keys.get_secret_value()), publish)
    kick = asyncio.Event()

    async def on_release(msg) -> None:
        try:
            user_id = json.loads(msg.data)["user_id"]
            if not isinstance(user_id, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            await msg.respond(b'{"error":"bad request"}')
            return
        was = await waker.release(user_id)
        await msg.respond(json.dumps({"released": was}).encode())

    async def on_outcome(msg) -> None:
        waker.on_outcome(msg.subject, msg.data)  # ends the asks it answers
        if msg.subject == subjects.INSTANCE_SUSPENDED:
            kick.set()  # start polling the new sleeper's bot now, not at the next sweep

    await nc.subscribe(subjects.WAKER_RELEASE, cb=on_release)
    for subject in OUTCOMES:
        await nc.subscribe(subject, cb=on_outcome)

    async def loop() -> None:
        while True:
            for fn in (waker.sync_suspended, waker.sweep_idle):
                try:
                    await fn()
                except Exception:
                    log.exception("waker sweep failed", extra={"task": fn.__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(kick.wait(), settings.waker_sweep_s)
            kick.clear()

    task = asyncio.create_task(loop())
    try:
        await stop.wait()
    finally:
        task.cancel()
        await waker.close()
        await store.close()
        await nc.close()


if __name__ == "__main__":
    run_service("waker", main)
