"""Idle suspend and wake end to end (issue 16) on the real platform processes, with stand-in
gateways: suspended after idle, woken by an HTTP chat, an SSE stream, a WebSocket RPC call
or a Telegram message, one boot for a storm of requests, a user's stop never woken, the
monitor quiet about a sleeper, and a crash-restart held instead of a 502. The real gateway's
wakes (Telegram included) are in test_suspend_real.py."""

from __future__ import annotations

import asyncio
import json
import time

import docker
import httpx
import pytest
import websockets

from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.events import (
    InstanceCommand,
    InstanceDelete,
    InstanceRequested,
    InstanceSuspend,
    InstanceUpdate,
)
from shared.state import InstanceState
from shared.store import Store
from tests.conftest import STANDIN_IMAGE, eventually, new_user
from tests.test_audit import replay
from zaki.stack import Process, free_port, wait_for_port

WAKER_ENV = {"ZAKI_WAKER_SWEEP_S": "1", "ZAKI_WAKER_POLL_TIMEOUT_S": "2", "ZAKI_WAKE_LEAD_S": "5"}


@pytest.fixture(scope="module")
def waker(stack, service_env, provisioner) -> Process:
    """The waker, for this module only (it would suspend other tests' idle gateways)."""
    port = free_port()
    p = stack.start_service("services.waker", {**service_env, **WAKER_ENV, "ZAKI_METRICS_PORT": str(port)})
    wait_for_port("127.0.0.1", port, p.proc, "waker")
    p.address = f"http://127.0.0.1:{port}/metrics"
    yield p
    p.stop()


async def make(platform: PlatformClient, fakes, idle_s: int | None = None) -> tuple[str, str, int]:
    token = fakes.bot()
    ev = InstanceRequested(
        request_id=new_user("req"),
        user_id=new_user("z"),
        bot_token=token,
        image=STANDIN_IMAGE,
        idle_suspend_s=idle_s,
    )
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY, ready
    return ev.user_id, token, ready.port  # type: ignore[attr-defined]


async def suspend(platform: PlatformClient, user: str) -> dict:
    subject, ev = await platform.call(subjects.INSTANCE_SUSPEND, InstanceSuspend(user_id=user), timeout=60)
    assert subject == subjects.INSTANCE_SUSPENDED, ev
    return ev.model_dump()


def events_for(platform: PlatformClient, subject: str, user: str) -> list[dict]:
    return [b for s, b in platform.seen if s == subject and b.get("user_id") == user]


def container_running(docker_client: docker.DockerClient, user: str) -> bool:
    return docker_client.containers.get(f"zaki-user-{user}").attrs["State"]["Running"]


async def delete(platform: PlatformClient, user: str) -> None:
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60)


def chat(text: str, **kw) -> dict:
    return {"model": "openclaw", "messages": [{"role": "user", "content": text}], **kw}


async def test_idle_gateway_is_suspended_and_a_chat_wakes_it(
    waker, proxy, platform, fakes, store, docker_client, service_env
):
    user, _, port = await make(platform, fakes, idle_s=3)
    _, key = await keys.create_key(store, user, {"chat"})
    try:
        await eventually(lambda: events_for(platform, subjects.INSTANCE_SUSPENDED, user), timeout=40)
        [ev] = events_for(platform, subjects.INSTANCE_SUSPENDED, user)
        assert ev["reason"] == "idle" and ev["idle_s"] >= 3 and ev["next_wake_at"] is None
        doc = await store.get_instance(user)
        assert doc["state"] == InstanceState.SUSPENDED and doc["asleep"] is True
        assert doc["port"] == port and not container_running(docker_client, user)  # memory freed, port kept
        docker_client.networks.get(f"zaki-net-{user}")  # network kept
        # Keep it awake from now on (an update of idle time alone restarts nothing).
        await platform.send(subjects.INSTANCE_UPDATE, InstanceUpdate(user_id=user, idle_suspend_s=0))
        await eventually(lambda: _field(store, user, "idle_suspend_s", 0), timeout=10)
        async with httpx.AsyncClient(base_url=proxy.address, timeout=90) as http:
            t0 = time.monotonic()
            r = await http.post(
                "/v1/chat/completions", json=chat("wake up"), headers={"Authorization": f"Bearer {key}"}
            )
            took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: wake up"
        # instance.ready (the proxy routes on it) comes first, instance.woken right after.
        woken = await eventually(lambda: events_for(platform, subjects.INSTANCE_WOKEN, user), timeout=10)
        assert [w["reason"] for w in woken] == ["request"] and woken[0]["suspended_s"] > 0
        assert (await store.get_instance(user))["state"] == InstanceState.RUNNING

        async def proxy_saw_it():  # the proxy's request is activity, flushed within ZAKI_ACTIVITY_FLUSH_S
            return await store.db["activity"].find_one({"_id": user, "last_proxy_at": {"$exists": True}})

        await eventually(proxy_saw_it, timeout=15)
        # The audit trail names who asked (issue 17.4): the waker for the suspend, the proxy for the wake.
        rows = await asyncio.to_thread(replay, service_env, "--user", user)
        asked = {(r["subject"], r["actor"]["id"]) for r in rows if r["kind"] == "command" and r["actor"]}
        assert {(subjects.INSTANCE_SUSPEND, "waker"), (subjects.INSTANCE_WAKE, "proxy")} <= asked, rows
        print(f"\nwake by request: first answer after {took:.2f} s, timings {woken[0]['timings']}")
    finally:
        await delete(platform, user)


async def _field(store: Store, user: str, name: str, value) -> bool:
    doc = await store.get_instance(user)
    return doc is not None and doc.get(name) == value


async def test_a_storm_of_requests_boots_it_once(waker, proxy, platform, fakes, store, docker_client):
    user, _, _ = await make(platform, fakes)
    _, key = await keys.create_key(store, user, {"chat"})
    try:
        await suspend(platform, user)
        since_ns = time.time_ns()
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=proxy.address, timeout=90) as http:
            answers = await asyncio.gather(
                *(http.post("/v1/chat/completions", json=chat(f"n{i}"), headers=auth) for i in range(20))
            )
        assert [r.status_code for r in answers] == [200] * 20, [
            r.text for r in answers if r.status_code != 200
        ]
        assert sorted(r.json()["choices"][0]["message"]["content"] for r in answers) == sorted(
            f"echo: n{i}" for i in range(20)
        )
        starts = docker_client.api.events(
            since=since_ns // 10**9,
            until=int(time.time()) + 1,
            filters={"container": f"zaki-user-{user}", "event": "start"},
            decode=True,
        )
        assert len([e for e in starts if e["timeNano"] > since_ns]) == 1  # one boot
        await eventually(lambda: events_for(platform, subjects.INSTANCE_WOKEN, user), timeout=10)
        await asyncio.sleep(1)
        assert len(events_for(platform, subjects.INSTANCE_WOKEN, user)) == 1
    finally:
        await delete(platform, user)


async def test_sse_and_websocket_wake_it_too(waker, proxy, platform, fakes, store):
    user, _, _ = await make(platform, fakes)
    _, key = await keys.create_key(store, user, {"chat", "ws"})
    auth = {"Authorization": f"Bearer {key}"}
    try:
        await suspend(platform, user)
        async with httpx.AsyncClient(base_url=proxy.address, timeout=90) as http:
            async with http.stream(
                "POST", "/v1/chat/completions", json=chat("streamed", stream=True), headers=auth
            ) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                text = "".join([c async for c in r.aiter_text()])
        assert text.rstrip().endswith("data: [DONE]")
        deltas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        assert "".join(d["choices"][0]["delta"].get("content", "") for d in deltas) == "echo: streamed"
        await suspend(platform, user)
        url = proxy.address.replace("http://", "ws://") + "/ws"
        async with websockets.connect(url, additional_headers=auth, open_timeout=90) as ws:
            assert json.loads(await ws.recv())["event"] == "connect.challenge"
            await ws.send(json.dumps({"type": "req", "id": "1", "method": "connect", "params": {}}))
            assert json.loads(await ws.recv())["ok"]
            await ws.send(json.dumps({"type": "req", "id": "2", "method": "health", "params": {}}))
            assert json.loads(await ws.recv())["ok"]
        await eventually(lambda: len(events_for(platform, subjects.INSTANCE_WOKEN, user)) == 2, timeout=10)
        assert [w["reason"] for w in events_for(platform, subjects.INSTANCE_WOKEN, user)] == [
            "request",
            "request",
        ]
    finally:
        await delete(platform, user)


async def test_a_telegram_message_wakes_it_once(waker, platform, fakes, store):
    user, token, _ = await make(platform, fakes)
    tg = fakes.telegram
    try:
        await suspend(platform, user)
        await eventually(lambda: tg.polling(token), timeout=20)  # the waker long-polls the sleeper's bot
        uid = tg.inject_message(token, "are you awake?")
        await eventually(lambda: events_for(platform, subjects.INSTANCE_WOKEN, user), timeout=60)
        await asyncio.sleep(3)  # more than a poll and a sweep: a second wake would have come by now
        assert [w["reason"] for w in events_for(platform, subjects.INSTANCE_WOKEN, user)] == ["telegram"]
        assert tg.conflicts_for(token) == 0
        assert uid in tg.unconfirmed(token)  # still there for the gateway to read
        assert not tg.polling(token)
    finally:
        await delete(platform, user)


async def test_a_users_stop_is_never_woken(waker, proxy, platform, fakes, store, docker_client):
    user, token, _ = await make(platform, fakes)
    _, key = await keys.create_key(store, user, {"chat"})
    try:
        subject, _ = await platform.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=user), timeout=60)
        assert subject == subjects.INSTANCE_STOPPED
        fakes.telegram.inject_message(token, "hello?")
        async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
            t0 = time.monotonic()
            r = await http.post(
                "/v1/chat/completions", json=chat("hi"), headers={"Authorization": f"Bearer {key}"}
            )
        assert r.status_code == 503 and r.json()["state"] == "stopped" and time.monotonic() - t0 < 2
        assert "Retry-After" not in r.headers
        await asyncio.sleep(3)
        assert events_for(platform, subjects.INSTANCE_WOKEN, user) == []
        assert not container_running(docker_client, user) and not fakes.telegram.polling(token)
    finally:
        await delete(platform, user)


async def test_the_monitor_does_not_count_a_sleeper_as_down(waker, monitor, platform, fakes):
    user, _, _ = await make(platform, fakes)
    try:
        await asyncio.sleep(3)  # watched and healthy first
        await suspend(platform, user)
        await asyncio.sleep(6)  # several probe intervals and Docker's die event
        health = [b for s, b in platform.seen if s == subjects.health_subject(user)]
        assert not [h for h in health if h["state"] in ("unhealthy", "unreachable", "crashlooping")], health
        restarts = [
            b for s, b in platform.seen if s == subjects.INSTANCE_RESTART and b.get("user_id") == user
        ]
        assert restarts == []
    finally:
        await delete(platform, user)


async def test_a_crash_restart_is_held_not_502(proxy, monitor, platform, fakes, store, docker_client):
    user, _, _ = await make(platform, fakes)
    _, key = await keys.create_key(store, user, {"chat"})
    auth = {"Authorization": f"Bearer {key}"}
    try:
        async with httpx.AsyncClient(base_url=proxy.address, timeout=90) as http:
            assert (
                await http.post("/v1/chat/completions", json=chat("before"), headers=auth)
            ).status_code == 200
            held_before = await held_served(http, proxy)
            # Docker's restart policy or the monitor's restart request brings it back meanwhile.
            docker_client.containers.get(f"zaki-user-{user}").kill()
            answers, took = [], []
            for i in range(5):
                t0 = time.monotonic()
                answers.append(await http.post("/v1/chat/completions", json=chat(f"after {i}"), headers=auth))
                took.append(round(time.monotonic() - t0, 2))
            held = await held_served(http, proxy) - held_before
        assert [r.status_code for r in answers] == [200] * 5, [r.text for r in answers]
        assert held >= 1  # the first one waited for the gateway instead of a 502
        print(f"\ncrash-restart: {held:.0f} request(s) held, latencies {took} s")
    finally:
        await delete(platform, user)


async def held_served(http: httpx.AsyncClient, proxy) -> float:
    text = (await http.get(proxy.metrics)).text
    for line in text.splitlines():
        if line.startswith('zaki_proxy_hold_total{outcome="served"}'):
            return float(line.split()[-1])
    return 0.0


async def test_a_scheduled_job_wakes_it_in_time(waker, platform, fakes, settings):
    """The gateway's next cron job (its own state database) sets when it wakes by itself."""
    from datetime import UTC, datetime, timedelta

    from tests.test_waker import make_state, ms

    user, _, _ = await make(platform, fakes)
    try:
        job = datetime.now(UTC) + timedelta(seconds=settings.wake_lead_s + 8)
        state_dir = settings.data_root / "users" / user / ".openclaw"
        scratch = settings.data_root / "users" / user / "cronfixture"
        make_state(scratch, [(1, {"schedule": {"kind": "at"}}, {"nextRunAtMs": ms(job)})], wal=False)
        (state_dir / "state").mkdir(exist_ok=True)  # the stand-in keeps no state database of its own
        (scratch / ".openclaw" / "state" / "openclaw.sqlite").rename(state_dir / "state" / "openclaw.sqlite")
        ev = await suspend(platform, user)
        expected = job - timedelta(seconds=settings.wake_lead_s)
        assert abs((ev["next_wake_at"] - expected).total_seconds()) < 1  # said in the event
        woken = await eventually(lambda: events_for(platform, subjects.INSTANCE_WOKEN, user), timeout=40)
        assert [w["reason"] for w in woken] == ["schedule"]
        woke_at = datetime.fromisoformat(woken[0]["occurred_at"])
        assert expected <= woke_at < job  # in time for the job, not before its wake time
    finally:
        await delete(platform, user)


async def test_a_long_stream_keeps_it_awake(waker, proxy, platform, fakes, store):
    """A request in flight (here an SSE stream longer than the idle time) is activity until it ends."""
    user, _, _ = await make(platform, fakes, idle_s=5)
    _, key = await keys.create_key(store, user, {"chat"})
    body = chat("slow", stream=True, standin_chunks=15, standin_delay_ms=700)  # ~10.5 s, twice the idle time
    try:
        async with httpx.AsyncClient(base_url=proxy.address, timeout=90) as http:
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                assert r.status_code == 200
                text = "".join([c async for c in r.aiter_text()])
        assert text.rstrip().endswith("data: [DONE]")
        assert events_for(platform, subjects.INSTANCE_SUSPENDED, user) == []  # not during the stream
        # Once it is over, the idle clock runs again.
        await eventually(lambda: events_for(platform, subjects.INSTANCE_SUSPENDED, user), timeout=40)
    finally:
        await delete(platform, user)


async def test_ten_sleepers_woken_together_boot_once_each(waker, proxy, platform, fakes, store):
    made = await asyncio.gather(*(make(platform, fakes) for _ in range(10)))
    users = [u for u, _, _ in made]
    try:
        creds = {u: (await keys.create_key(store, u, {"chat"}))[1] for u in users}
        await asyncio.gather(*(suspend(platform, u) for u in users))
        async with httpx.AsyncClient(base_url=proxy.address, timeout=120) as http:
            answers = await asyncio.gather(
                *(
                    http.post(
                        "/v1/chat/completions",
                        json=chat(f"{u}:{i}"),
                        headers={"Authorization": f"Bearer {creds[u]}"},
                    )
                    for u in users
                    for i in range(3)
                )
            )
        assert [r.status_code for r in answers] == [200] * 30, [
            r.text for r in answers if r.status_code != 200
        ]
        for u in users:
            await eventually(lambda u=u: events_for(platform, subjects.INSTANCE_WOKEN, u), timeout=20)
        await asyncio.sleep(1)
        assert {u: len(events_for(platform, subjects.INSTANCE_WOKEN, u)) for u in users} == {
            u: 1 for u in users
        }
    finally:
        await asyncio.gather(*(delete(platform, u) for u in users))


async def test_gateways_keep_nodes_compile_cache_in_their_state_folder(
    provisioner, platform, fakes, settings, docker_client
):
    """A wake starts the same container: Node's compile cache from the first boot is reused. Node
    writes it when the process ends: here at the suspend (until the images' health check stopped
    starting a Node process every 10 s, that process's own exit wrote it)."""
    user, _, _ = await make(platform, fakes)
    try:
        c = docker_client.containers.get(f"zaki-user-{user}")
        env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
        assert env["NODE_COMPILE_CACHE"] == "/home/node/.openclaw/cache/node-compile"
        cache = settings.data_root / "users" / user / ".openclaw" / "cache" / "node-compile"
        await suspend(platform, user)
        await eventually(lambda: cache.is_dir() and any(p.is_file() for p in cache.rglob("*")), timeout=20)
    finally:
        await delete(platform, user)
