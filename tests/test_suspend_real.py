"""Idle suspend and wake on the real OpenClaw gateway (issue 16): one real gateway for the
whole module (~1 GiB, ~20 s a boot). A Telegram message sent while it sleeps wakes it and the
gateway itself answers that very update once; an HTTP chat, an SSE stream and a WebSocket RPC
call through the proxy each wake it after an idle suspend and are answered by the gateway
itself (stop mode: each wake is a boot). The cron wake on the real gateway is in
test_pool_swap_real.py (swap mode: a thaw fits a short lead time, so the test waits less). Each test brings the sleeper to the state it needs (awake or not, its
idle time) and starts a waker with no memory of the test before: the waker does not ask for
a suspend or a wake of a user again within a minute (REASK_S), which made each test wait on
the one before. (test_suspend.py covers the same on stand-ins.)"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import docker
import httpx
import pytest
import websockets

from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceRequested, InstanceUpdate
from shared.gateway import CONTAINER_STATE_DIR, GATEWAY_PORT, container_name
from shared.state import InstanceState
from shared.store import Store
from tests.conftest import REAL_IMAGE, eventually, new_user, operator_connect, outside_world_env
from tests.proxy_support import start_proxy
from tests.test_self_healing import start_private_platform
from tests.test_suspend import WAKER_ENV, chat, delete, suspend
from zaki.stack import Process, free_network_pool, free_port, wait_for_port

pytestmark = [pytest.mark.gateway, pytest.mark.timeout(600)]

FLUSH_S = 1  # ZAKI_ACTIVITY_FLUSH_S here: a request in flight is seen within a second
IDLE_S = 4  # short, but over two flushes and a second (the floor, services/waker/idle.py)
# ZAKI_WAKE_LEAD_S: a sleeper with a job is woken this long before it. It must cover a wake's
# boot (9-23 s measured here): a job missed at boot is deferred 2 min by OpenClaw.
LEAD_S = 45


def start_waker(stack: Any, env: dict[str, str]) -> Process:
    port = free_port()
    waker_env = {**env, **WAKER_ENV, "ZAKI_WAKE_LEAD_S": str(LEAD_S), "ZAKI_METRICS_PORT": str(port)}
    p = stack.start_service("services.waker", waker_env)
    wait_for_port("127.0.0.1", port, p.proc, "waker")
    return p


@pytest.fixture(scope="module")
def own(tmp_path_factory, service_env, fakes) -> Any:
    """A platform of its own (NATS, FerretDB, provisioner, broker, waker, proxy): a real boot
    took over the session's 120 s readiness timeout while other work loaded this 2-core
    machine, so readiness and the proxy's hold get 300 s here, as test_first_hour does."""
    broker_port = free_port(fakes.host)
    p = start_private_platform(
        tmp_path_factory.mktemp("sreal"),
        {**service_env, **outside_world_env(fakes, broker_port)},
        "sreal",
        free_network_pool(),
        ZAKI_READINESS_TIMEOUT_S="300",
        ZAKI_RECONCILE_INTERVAL_S="5",
        ZAKI_WAKE_LEAD_S=str(LEAD_S),
        ZAKI_ACTIVITY_FLUSH_S=str(FLUSH_S),
    )
    env = {k: v for k, v in p.env.items() if k != "ZAKI_METRICS_PORT"}
    try:
        broker = p.stack.start_service("services.llm_broker", {**env, "ZAKI_METRICS_PORT": str(free_port())})
        wait_for_port(fakes.host, broker_port, broker.proc, "llm broker")
        own = SimpleNamespace(env=env, data_root=p.data_root, waker=start_waker(p.stack, env))
        own.proxy = start_proxy(p.stack, env, fastpath=True, ZAKI_WAKE_TIMEOUT_S="300")
        own.proxy.address = f"http://{own.proxy.address}"
        yield own
    finally:
        p.stack.stop()


@pytest.fixture
async def platform(own) -> Any:
    c = await PlatformClient.connect(own.env["ZAKI_NATS_URL"])
    yield c
    await c.close()


@pytest.fixture(scope="module")
def proxy(own) -> Process:
    return own.proxy


@pytest.fixture(scope="module")
async def sleeper(own, fakes) -> Any:
    """The module's one real gateway, with an API key for chat and WS, answering Telegram chat
    4242; its idle time is each test's (``prepare``)."""
    platform = await PlatformClient.connect(own.env["ZAKI_NATS_URL"])
    store = Store(own.env["ZAKI_MONGO_URL"], "zaki")
    token = fakes.bot()
    ev = InstanceRequested(
        request_id=new_user("req"),
        user_id=new_user("r"),
        bot_token=token,
        image=REAL_IMAGE,
        idle_suspend_s=0,
        telegram_allow_from=["4242"],
    )
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=400)
    assert subject == subjects.INSTANCE_READY, ready
    _, key = await keys.create_key(store, ev.user_id, {"chat", "ws"})
    yield {"user": ev.user_id, "key": key, "store": store, "token": token}
    await delete(platform, ev.user_id)
    await platform.close()
    await store.close()


async def prepare(sleeper: dict, own: Any, platform: PlatformClient, idle_s: int, awake: bool) -> int:
    """Whatever the test before left: the sleeper's idle time is *idle_s*; it is awake when
    *awake* (else awake or suspended for being idle). The waker keeps an ask only until its
    outcome (services/waker/asks.py), so nothing the test before asked delays this one. Returns
    how many events *platform* had seen by then: the test's own come after."""
    store, user = sleeper["store"], sleeper["user"]
    if (await store.get_instance(user)).get("idle_suspend_s") != idle_s:
        await platform.send(subjects.INSTANCE_UPDATE, InstanceUpdate(user_id=user, idle_suspend_s=idle_s))
        await eventually(lambda: field_is(store, user, "idle_suspend_s", idle_s), timeout=15)
    doc = await store.get_instance(user)
    if awake or (doc["state"] == InstanceState.SUSPENDED and doc.get("suspend_reason") != "idle"):
        async with httpx.AsyncClient(base_url=own.proxy.address, timeout=360) as http:  # wakes a sleeper
            r = await http.get("/v1/models", headers={"Authorization": f"Bearer {sleeper['key']}"})
            assert r.status_code == 200, r.text
    return len(platform.seen)


async def field_is(store: Store, user: str, name: str, value: object) -> bool:
    doc = await store.get_instance(user)
    return doc is not None and doc.get(name) == value


def events_since(platform: PlatformClient, since: int, subject: str, user: str) -> list[dict]:
    """The events of *user* on *subject* after the first *since* the client saw."""
    return [b for s, b in platform.seen[since:] if s == subject and b.get("user_id") == user]


async def asleep_after_idle(store: Store, user: str) -> dict:
    """Waits until the gateway was suspended for being idle and its container has stopped."""

    async def check() -> dict | None:
        doc = await store.get_instance(user)
        return doc if doc and doc["state"] == InstanceState.SUSPENDED and doc.get("asleep") else None

    doc = await eventually(check, timeout=90, interval=0.5)
    assert doc["suspend_reason"] == "idle"
    return doc


async def woken_by_request(platform: PlatformClient, since: int, user: str) -> dict:
    woken = await eventually(lambda: events_since(platform, since, subjects.INSTANCE_WOKEN, user), timeout=30)
    assert [w["reason"] for w in woken] == ["request"], woken
    return woken[0]


async def test_a_telegram_message_wakes_the_real_gateway_which_answers_it_once(sleeper, own, platform, fakes):
    """A Telegram message sent while it sleeps wakes it, and the gateway itself reads that very
    update and answers it once; the fake Bot API saw no 409 and lost no update."""
    tg, token, user = fakes.telegram, sleeper["token"], sleeper["user"]
    await prepare(sleeper, own, platform, 0, awake=True)  # up, and not suspended again for idle
    await eventually(lambda: tg.polling(token), timeout=60)  # the gateway's own long poll
    since = len(platform.seen)
    await suspend(platform, user)
    await eventually(lambda: tg.polling(token), timeout=20)  # now the waker's
    uid = tg.inject_message(token, "hello sleeper", chat_id=4242)
    t0 = time.monotonic()
    await eventually(lambda: events_since(platform, since, subjects.INSTANCE_WOKEN, user), timeout=180)
    answered = await eventually(
        lambda: [m for m in tg.answers(token) if "hello sleeper" in m["text"]], timeout=180
    )
    took = time.monotonic() - t0
    await asyncio.sleep(10)  # time for a duplicate answer, if there were one
    answers = [m for m in tg.answers(token) if "hello sleeper" in m["text"]]
    assert len(answers) == 1 and str(answers[0]["chat_id"]) == "4242", answers
    assert [w["reason"] for w in events_since(platform, since, subjects.INSTANCE_WOKEN, user)] == ["telegram"]
    assert tg.conflicts_for(token) == 0
    gateway_reads = [d for d in tg.delivered if d[1] == uid and d[2] != "zaki-waker"]
    assert gateway_reads, tg.delivered  # the gateway read the very update that woke it
    await eventually(lambda: uid not in tg.unconfirmed(token), timeout=60)  # and confirmed it
    print(
        f"\nreal gateway: Telegram message while suspended answered once after {took:.1f} s: {answered[0]['text']!r}"
    )


async def test_an_http_chat_wakes_the_real_gateway(sleeper, own, proxy, platform, docker_client):
    user, auth = sleeper["user"], {"Authorization": f"Bearer {sleeper['key']}"}
    since = await prepare(sleeper, own, platform, IDLE_S, awake=False)
    await asleep_after_idle(sleeper["store"], user)
    assert not docker_client.containers.get(container_name(user)).attrs["State"]["Running"]
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=proxy.address, timeout=360) as http:
        r = await http.post("/v1/chat/completions", json=chat("wake by http"), headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: wake by http"
    woken = await woken_by_request(platform, since, user)
    print(
        f"\nreal gateway woken by HTTP chat: answered after {time.monotonic() - t0:.1f} s, {woken['timings']}"
    )


async def test_an_sse_stream_wakes_the_real_gateway(sleeper, own, proxy, platform):
    user, auth = sleeper["user"], {"Authorization": f"Bearer {sleeper['key']}"}
    since = await prepare(sleeper, own, platform, IDLE_S, awake=False)
    await asleep_after_idle(sleeper["store"], user)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=proxy.address, timeout=360) as http:
        body = chat("wake by sse", stream=True)
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text = "".join([c async for c in r.aiter_text()])
    assert text.rstrip().endswith("data: [DONE]"), text
    deltas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas) == "echo: wake by sse"
    woken = await woken_by_request(platform, since, user)
    print(f"\nreal gateway woken by SSE: streamed after {time.monotonic() - t0:.1f} s, {woken['timings']}")


async def test_a_websocket_rpc_call_wakes_the_real_gateway(sleeper, own, proxy, platform):
    user, auth = sleeper["user"], {"Authorization": f"Bearer {sleeper['key']}"}
    since = await prepare(sleeper, own, platform, IDLE_S, awake=False)
    await asleep_after_idle(sleeper["store"], user)
    t0 = time.monotonic()
    url = proxy.address.replace("http://", "ws://") + "/ws"
    async with websockets.connect(url, additional_headers=auth, open_timeout=360, max_size=64 << 20) as ws:
        assert json.loads(await ws.recv())["event"] == "connect.challenge"
        await ws.send(operator_connect("c1"))
        hello = await response(ws, "c1")
        assert hello["ok"], hello
        send = {"sessionKey": "agent:main:wake-ws", "message": "wake by ws", "idempotencyKey": new_user("k")}
        await ws.send(json.dumps({"type": "req", "id": "c2", "method": "chat.send", "params": send}))
        final = await chat_final(ws, "c2")
    [text] = [p["text"] for p in final["message"]["content"] if p.get("type") == "text"]
    assert final["message"]["role"] == "assistant" and text, final  # the run's answer, over the WS
    woken = await woken_by_request(platform, since, user)
    print(
        f"\nreal gateway woken by WebSocket: chat.send answered {text!r} after {time.monotonic() - t0:.1f} s"
    )
    assert woken["suspended_s"] > 0


async def response(ws, rid: str, events: list[dict] | None = None) -> dict:
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if msg.get("type") == "res" and msg.get("id") == rid:
            return msg
        if events is not None and msg.get("type") == "event":
            events.append(msg)


async def chat_final(ws, rid: str) -> dict:
    """``chat.send``'s answer: the started response, then the run's final ``chat`` event."""
    events: list[dict] = []
    started = await response(ws, rid, events)
    assert started["ok"], started
    while True:
        for e in events:
            if e.get("event") == "chat" and e["payload"].get("state") in ("final", "error"):
                assert e["payload"]["state"] == "final", e
                return e["payload"]
        events = [json.loads(await asyncio.wait_for(ws.recv(), 120))]


# OpenClaw's own RPC from inside the container over loopback, with the gateway's internal
# password from its config: operator.admin, which cron.add needs and no proxied client gets.
RPC_JS = """
const fs = require("fs");
const cfg = JSON.parse(fs.readFileSync(process.env.OC_CONFIG, "utf8"));
const [method, params] = [process.argv[1], JSON.parse(process.argv[2])];
const ws = new WebSocket("ws://127.0.0.1:" + process.env.OC_PORT + "/");
const done = (code, out) => { console.log(JSON.stringify(out)); process.exit(code); };
setTimeout(() => done(2, {error: "timeout"}), 30000);
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.type === "event" && m.event === "connect.challenge") {
    ws.send(JSON.stringify({type: "req", id: "c", method: "connect", params: {
      minProtocol: 4, maxProtocol: 4, role: "operator", caps: [],
      client: {id: "gateway-client", version: "0.1.0", platform: "linux", mode: "backend"},
      scopes: ["operator.admin", "operator.read", "operator.write"],
      auth: {password: cfg.gateway.auth.password}}}));
  } else if (m.type === "res" && m.id === "c") {
    if (!m.ok) done(1, m);
    ws.send(JSON.stringify({type: "req", id: "r", method, params}));
  } else if (m.type === "res" && m.id === "r") {
    done(m.ok ? 0 : 1, m);
  }
};
"""


def gateway_rpc(docker_client: docker.DockerClient, user: str, method: str, params: dict) -> dict:
    """One RPC call on the gateway's WebSocket from inside its container (the password never
    leaves it: the script reads the config file the gateway itself reads)."""
    code, out = docker_client.containers.get(container_name(user)).exec_run(
        ["node", "-e", RPC_JS, method, json.dumps(params)],
        environment={"OC_CONFIG": f"{CONTAINER_STATE_DIR}/openclaw.json", "OC_PORT": str(GATEWAY_PORT)},
    )
    answer = json.loads(out.decode().strip().splitlines()[-1])
    assert code == 0 and answer.get("ok"), answer
    return answer["payload"]
