"""The fast paths of issue 16.5 on the real OpenClaw gateway, one platform and one gateway:

1. a new user's gateway is a pre-started pool slot (ZAKI_POOL_SIZE=1) claimed by a config hot
   reload: it answers the user's chat through the proxy and its Telegram bot (a channel the
   slot did not have), and no longer the slot's identity;
2. suspended in swap mode (ZAKI_SUSPEND_MODE=swap), it is frozen with its memory in swap after
   its Telegram channel was turned off; a message sent to the bot meanwhile wakes it (thaw, no
   boot), and the gateway itself answers it once: no 409, no lost update;
3. an HTTP chat through the proxy thaws it and is answered.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceCommand, InstanceRequested
from shared.gateway import container_name, identity_headers
from shared.store import Store
from tests.conftest import REAL_IMAGE, eventually, new_user, outside_world_env, swap_space
from tests.proxy_support import start_proxy
from tests.test_self_healing import start_private_platform
from tests.test_suspend import WAKER_ENV, chat, delete, events_for, suspend
from tests.test_suspend_real import events_since, gateway_rpc
from zaki.stack import free_network_pool, free_port, wait_for_port

pytestmark = [pytest.mark.gateway, pytest.mark.timeout(600)]

MIB = 1 << 20
LEAD_S = 8  # ZAKI_WAKE_LEAD_S here: a thaw, not a boot, has to fit in it


@pytest.fixture(scope="module")
def fast(tmp_path_factory, service_env, fakes, docker_client) -> Iterator[Any]:
    broker_port = free_port(fakes.host)
    with swap_space(3):
        p = start_private_platform(
            tmp_path_factory.mktemp("fast"),
            {**service_env, **outside_world_env(fakes, broker_port)},
            "fast",
            free_network_pool(),
            ZAKI_GATEWAY_IMAGE=REAL_IMAGE,
            ZAKI_POOL_SIZE="1",
            # No refill during this module: it would boot a second real gateway (~13 CPU-s, ~0.9 GiB)
            # beside the thaw tests; refilling is tests/test_pool.py's (stand-ins).
            ZAKI_POOL_REFILL_DELAY_S="3600",
            ZAKI_SUSPEND_MODE="swap",
            ZAKI_READINESS_TIMEOUT_S="300",
            ZAKI_RECONCILE_INTERVAL_S="5",
            ZAKI_WAKE_LEAD_S=str(LEAD_S),
        )
        env = {k: v for k, v in p.env.items() if k != "ZAKI_METRICS_PORT"}
        try:
            broker = p.stack.start_service(
                "services.llm_broker", {**env, "ZAKI_METRICS_PORT": str(free_port())}
            )
            wait_for_port(fakes.host, broker_port, broker.proc, "llm broker")
            wport = free_port()
            waker = p.stack.start_service(
                "services.waker",
                {**env, **WAKER_ENV, "ZAKI_WAKE_LEAD_S": str(LEAD_S), "ZAKI_METRICS_PORT": str(wport)},
            )
            wait_for_port("127.0.0.1", wport, waker.proc, "waker")
            proxy = start_proxy(p.stack, env, fastpath=True, ZAKI_WAKE_TIMEOUT_S="300")
            yield SimpleNamespace(env=env, metrics=p.metrics, proxy=f"http://{proxy.address}")
        finally:
            p.stop()


@pytest.fixture(scope="module")
async def claimed(fast, fakes, docker_client) -> Any:
    """The user whose request claimed the pool's real gateway."""
    platform = await PlatformClient.connect(fast.env["ZAKI_NATS_URL"])
    store = Store(fast.env["ZAKI_MONGO_URL"], "zaki")

    async def slot_ready() -> bool:
        async with httpx.AsyncClient() as http:
            return "zaki_pool_slots_ready 1.0" in (await http.get(fast.metrics)).text

    await eventually(slot_ready, timeout=400, interval=1)
    slot = next(c for c in docker_client.containers.list() if c.name.startswith(container_name("pool.")))
    token = fakes.bot()
    ev = InstanceRequested(
        request_id=new_user("req"),
        user_id=new_user("f"),
        bot_token=token,
        idle_suspend_s=0,
        telegram_allow_from=["4242"],
    )
    t0 = time.monotonic()
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=400)
    assert subject == subjects.INSTANCE_READY, ready
    print(f"\nreal gateway from the pool: requested -> ready {time.monotonic() - t0:.1f} s, {ready.timings}")
    _, key = await keys.create_key(store, ev.user_id, {"chat"})
    yield SimpleNamespace(
        user=ev.user_id, token=token, key=key, slot=slot, port=ready.port, platform=platform, store=store
    )
    await delete(platform, ev.user_id)
    await platform.close()
    await store.close()


async def test_a_new_user_gets_the_pools_real_gateway(claimed, fast, fakes, docker_client) -> None:
    tg = fakes.telegram
    c = docker_client.containers.get(container_name(claimed.user))
    assert c.id == claimed.slot.id, "the user's gateway is the slot that was booted before the request"
    async with httpx.AsyncClient(base_url=fast.proxy, timeout=120) as http:
        auth = {"Authorization": f"Bearer {claimed.key}"}
        r = await http.post("/v1/chat/completions", json=chat("first words"), headers=auth)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: first words", (
        r.text
    )
    slot_id = claimed.slot.name.removeprefix(container_name(""))
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(f"http://127.0.0.1:{claimed.port}/v1/models", headers=identity_headers(slot_id))
    assert r.status_code == 401, "the slot's own identity is no longer served"
    # Its Telegram channel, absent from the slot's config, started with the claim.
    tg.inject_message(claimed.token, "hello new agent", chat_id=4242)
    await eventually(
        lambda: [m for m in tg.answers(claimed.token) if "hello new agent" in m["text"]], timeout=120
    )
    assert tg.conflicts_for(claimed.token) == 0


async def test_a_frozen_real_gateway_is_woken_by_telegram_and_answers_once(
    claimed, fast, fakes, docker_client
) -> None:
    tg, user, token = fakes.telegram, claimed.user, claimed.token
    await eventually(lambda: tg.polling(token), timeout=60)  # the gateway's own long poll
    since = len(claimed.platform.seen)
    await suspend(claimed.platform, user)
    c = docker_client.containers.get(container_name(user))
    assert c.status == "paused"
    stats = c.stats(stream=False)["memory_stats"]
    resident = stats["usage"] - stats["stats"].get("cache", 0)
    assert resident < 256 * MIB, f"{resident / MIB:.0f} MiB still resident"
    await eventually(lambda: tg.polling(token), timeout=30)  # now the waker's
    uid = tg.inject_message(token, "hello frozen", chat_id=4242)
    t0 = time.monotonic()
    await eventually(lambda: [m for m in tg.answers(token) if "hello frozen" in m["text"]], timeout=120)
    took = time.monotonic() - t0
    await asyncio.sleep(8)  # time for a duplicate answer, if there were one
    assert len([m for m in tg.answers(token) if "hello frozen" in m["text"]]) == 1
    woken = [
        b for s, b in claimed.platform.seen[since:] if s == subjects.INSTANCE_WOKEN and b["user_id"] == user
    ]
    assert [w["reason"] for w in woken] == ["telegram"] and "wake_thaw" in woken[0]["timings"], woken
    assert docker_client.containers.get(container_name(user)).id == c.id, "thawed, not booted"
    assert tg.conflicts_for(token) == 0
    assert [d for d in tg.delivered if d[1] == uid and d[2] != "zaki-waker"], "the gateway read that update"
    await eventually(lambda: uid not in tg.unconfirmed(token), timeout=60)
    print(
        f"\nreal gateway frozen in swap ({resident / MIB:.0f} MiB resident): Telegram answered after {took:.1f} s"
    )


async def test_an_http_chat_thaws_the_real_gateway(claimed, fast, docker_client) -> None:
    await suspend(claimed.platform, claimed.user)
    assert docker_client.containers.get(container_name(claimed.user)).status == "paused"
    since = len(claimed.platform.seen)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=fast.proxy, timeout=300) as http:
        auth = {"Authorization": f"Bearer {claimed.key}"}
        r = await http.post("/v1/chat/completions", json=chat("thaw by http"), headers=auth)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: thaw by http", (
        r.text
    )
    took = time.monotonic() - t0
    woken = [
        b
        for s, b in claimed.platform.seen[since:]
        if s == subjects.INSTANCE_WOKEN and b["user_id"] == claimed.user
    ]
    assert [w["reason"] for w in woken] == ["request"], woken
    print(f"\nreal gateway thawed by an HTTP chat: answered after {took:.1f} s, {woken[0]['timings']}")
    assert events_for(claimed.platform, subjects.INSTANCE_WOKEN, claimed.user)


async def test_a_storm_of_requests_thaws_the_real_gateway_once(claimed, fast, docker_client) -> None:
    """20 requests at once for the frozen gateway: one wake, every request answered."""
    await suspend(claimed.platform, claimed.user)
    since = len(claimed.platform.seen)
    auth = {"Authorization": f"Bearer {claimed.key}"}
    async with httpx.AsyncClient(base_url=fast.proxy, timeout=300) as http:
        answers = await asyncio.gather(*(http.get("/v1/models", headers=auth) for _ in range(20)))
    assert [r.status_code for r in answers] == [200] * 20
    woken = [
        b
        for s, b in claimed.platform.seen[since:]
        if s == subjects.INSTANCE_WOKEN and b["user_id"] == claimed.user
    ]
    assert len(woken) == 1, woken


async def test_a_cron_job_set_through_rpc_thaws_it_in_time(claimed, fast, fakes, docker_client) -> None:
    """cron.add on the gateway; suspended (frozen); the wake, reason schedule, begins
    ZAKI_WAKE_LEAD_S before the job (short here: a thaw takes about a second), and the thawed
    gateway runs the job itself. (Stop mode: the same decision, on stand-ins in test_suspend.py.)"""
    user = claimed.user
    job_at = datetime.now(UTC) + timedelta(seconds=LEAD_S + 12)
    job = {
        "name": "wake-test",
        "schedule": {"kind": "at", "at": job_at.isoformat().replace("+00:00", "Z")},
        "sessionTarget": "isolated",
        "wakeMode": "now",
        "payload": {"kind": "agentTurn", "message": "scheduled hello"},
        "deleteAfterRun": False,
    }
    added = await asyncio.to_thread(gateway_rpc, docker_client, user, "cron.add", job)
    job_id = added.get("id") or added["job"]["id"]
    since = len(claimed.platform.seen)
    ev = await suspend(claimed.platform, user)
    assert docker_client.containers.get(container_name(user)).status == "paused"
    expected = job_at - timedelta(seconds=LEAD_S)
    assert ev["next_wake_at"] is not None, ev  # read from the gateway's own state database
    assert abs((ev["next_wake_at"] - expected).total_seconds()) < 1.5, (ev["next_wake_at"], expected)
    woken = await eventually(
        lambda: events_since(claimed.platform, since, subjects.INSTANCE_WOKEN, user), timeout=LEAD_S + 120
    )
    assert [w["reason"] for w in woken] == ["schedule"] and "wake_thaw" in woken[0]["timings"], woken
    ready_at = datetime.fromisoformat(woken[0]["occurred_at"])
    began = ready_at - timedelta(seconds=woken[0]["timings"]["total"])
    assert expected - timedelta(seconds=1) <= began < job_at  # not early, and before the job

    def ran() -> bool:
        jobs = gateway_rpc(docker_client, user, "cron.list", {"includeDisabled": True})["jobs"]
        last = [
            j.get("lastRunAtMs") or j.get("state", {}).get("lastRunAtMs") for j in jobs if j["id"] == job_id
        ]
        return any(last) or any("scheduled hello" in json.dumps(c) for c in fakes.llm.calls)

    async def ran_async() -> bool:
        return await asyncio.to_thread(ran)

    await eventually(ran_async, timeout=(job_at - datetime.now(UTC)).total_seconds() + 90, interval=2)
    print(
        f"\nreal gateway (swap): the wake for a cron job began {(job_at - began).total_seconds():.1f} s before "
        f"the job (ZAKI_WAKE_LEAD_S {LEAD_S}), ready {(job_at - ready_at).total_seconds():.1f} s before it; it ran"
    )


async def test_a_users_stop_is_never_woken_by_traffic(claimed, fast, docker_client) -> None:
    subject, body = await claimed.platform.call(
        subjects.INSTANCE_STOP, InstanceCommand(user_id=claimed.user), timeout=120
    )
    assert subject == subjects.INSTANCE_STOPPED, body
    auth = {"Authorization": f"Bearer {claimed.key}"}
    async with httpx.AsyncClient(base_url=fast.proxy, timeout=30) as http:
        t0 = time.monotonic()
        r = await http.post("/v1/chat/completions", json=chat("are you there"), headers=auth)
    assert r.status_code == 503 and r.json()["state"] == "stopped", r.text
    assert time.monotonic() - t0 < 5, "answered at once, not held for a wake"
    await asyncio.sleep(2)
    assert docker_client.containers.get(container_name(claimed.user)).status == "exited"
    assert (await claimed.store.get_instance(claimed.user))["state"] == "stopped"
