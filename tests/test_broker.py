"""The LLM broker: no provider key in any container, budgets at the edge, keys rotated live."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import nats
import pytest

from services.llm_broker.app import provider_error
from services.llm_broker.budget import BudgetPolicy
from services.llm_broker.usage import UsageMeter
from shared import subjects
from shared.crypto import KeyRing, credential_hash, instance_secret_context, new_broker_credential
from shared.events import Budget, BudgetExceeded, InstanceDelete, InstanceUpdate
from shared.gateway import container_name
from shared.settings import ZakiSettings
from tests.conftest import STANDIN_IMAGE, assert_metrics, broker_url, eventually, new_user
from tests.test_provisioner import chat, request

# --- pure parts ------------------------------------------------------------------------------


def sse(*events: dict, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_usage_from_an_openai_stream_in_any_chunking(step):
    body = sse(
        {"choices": [{"delta": {"content": "hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}},
    )
    meter = UsageMeter(streaming=True)
    for i in range(0, len(body), step):
        meter.feed(body[i : i + step])
    u = meter.finish()
    assert (u.prompt_tokens, u.completion_tokens, u.reported) == (11, 2, True)


def test_usage_from_anthropic_and_responses_streams():
    anthropic = UsageMeter(True)
    anthropic.feed(
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":9}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":4}}\n\n'
    )
    assert (anthropic.finish().prompt_tokens, anthropic.usage.completion_tokens) == (9, 4)
    responses = UsageMeter(True)
    responses.feed(
        sse({"type": "response.completed", "response": {"usage": {"input_tokens": 3, "output_tokens": 5}}})
    )
    assert responses.finish().total == 8


def test_usage_is_estimated_when_a_stream_hides_it():
    meter = UsageMeter(True)
    meter.feed(sse({"choices": [{"delta": {"content": "x" * 40}}]}))
    u = meter.finish()
    assert not u.reported and u.completion_tokens == 10


def test_usage_of_a_json_answer_and_of_garbage():
    meter = UsageMeter(False)
    meter.feed(b'{"usage": {"prompt_tokens": 5, "completion_tokens": 3}}')
    assert meter.finish().total == 8
    junk = UsageMeter(True)
    junk.feed(b"data: {not json\n\ndata: [1,2]\n\n" + b"x" * 3_000_000)
    assert junk.finish().total == 0


def test_budget_policy_prefers_the_instance_own_fields():
    s = ZakiSettings(budget_requests_per_minute=60, budget_tokens_per_day=1000, budget_tokens_per_month=0)
    p = BudgetPolicy.effective({"tokens_per_day": 50}, s)
    assert (p.requests_per_minute, p.tokens_per_day, p.tokens_per_month) == (60, 50, 0)
    assert BudgetPolicy.effective(None, s).tokens_per_day == 1000


def test_errors_come_in_the_provider_shape():
    a = json.loads(provider_error("anthropic-messages", 429, "rate_limit_exceeded", "over").body)
    assert a == {"type": "error", "error": {"type": "rate_limit_error", "message": "over"}}
    o = json.loads(provider_error("openai-completions", 429, "rate_limit_exceeded", "over").body)
    assert o["error"]["code"] == "rate_limit_exceeded" and o["error"]["message"] == "over"


# --- the broker process, called from the host --------------------------------------------------


async def fake_instance(store, keyring_spec: str, subnet: str, **fields) -> tuple[str, str]:
    """An instance record with a broker credential, as the provisioner writes it (no container):
    *subnet* says where its calls may come from (the host itself for calls made by the test)."""
    user, credential = new_user("b"), new_broker_credential()
    await store.create_instance(
        user,
        {
            "instance_id": uuid.uuid4().hex,
            "broker_key_hash": credential_hash(credential),
            "subnet": subnet,
            **fields,
        },
    )
    await store.instances.update_one({"_id": user}, {"$set": {"state": "running"}})
    return user, credential


def chat_body(text: str, stream: bool = False) -> dict:
    return {"model": "echo-1", "stream": stream, "messages": [{"role": "user", "content": text}]}


async def test_broker_attaches_the_platform_key_and_counts_usage(
    broker, store, service_env, keyring_spec, fakes, host_net
):
    user, cred = await fake_instance(store, keyring_spec, host_net)
    n = len(fakes.llm.calls)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{broker_url(service_env)}/p/zaki/chat/completions",
            headers={"Authorization": f"Bearer {cred}"},
            json=chat_body("hi broker"),
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: hi broker"
    assert len(fakes.llm.calls) == n + 1
    # The provider saw the platform key, never the broker credential.
    assert fakes.llm.auth_headers[-1] == f"Bearer {service_env['ZAKI_LLM_API_KEY']}"
    assert cred not in r.text and service_env["ZAKI_LLM_API_KEY"] not in r.text

    async def recorded():
        doc = await store.usage.find_one({"user_id": user})
        return doc if doc and doc["tokens"] == 8 else None

    doc = await eventually(recorded, timeout=10)
    assert (doc["requests"], doc["prompt_tokens"], doc["completion_tokens"]) == (1, 5, 3)
    await assert_metrics(
        broker.address,
        "zaki_broker_requests_total",
        "zaki_broker_tokens_total",
        "zaki_broker_overhead_seconds",
    )


async def test_broker_refuses_bad_credentials_and_wrong_networks(broker, store, service_env, keyring_spec):
    _, cred = await fake_instance(store, keyring_spec, "10.99.0.0/29")  # a tenant network, not the host
    url = f"{broker_url(service_env)}/p/zaki/chat/completions"
    async with httpx.AsyncClient(timeout=30) as http:
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer sk-not-a-broker-key"}, 401),
            ({"Authorization": f"Bearer {new_broker_credential()}"}, 401),  # well-formed, unknown
            ({"Authorization": f"Bearer {cred}"}, 403),  # right credential, wrong network
            ({"x-api-key": cred}, 403),
        ):
            r = await http.post(url, headers=headers, json=chat_body("x"))
            assert r.status_code == status, (headers, r.text)
            assert "error" in r.json()


async def test_only_model_routes_of_known_providers_pass(broker, store, service_env, keyring_spec, host_net):
    _, cred = await fake_instance(store, keyring_spec, host_net)
    auth = {"Authorization": f"Bearer {cred}"}
    base = broker_url(service_env)
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await http.get(f"{base}/p/zaki/models", headers=auth)).status_code == 200
        for method, path in (
            ("POST", "/p/nosuch/chat/completions"),
            ("POST", "/p/zaki/files"),
            ("POST", "/p/zaki/../admin"),
            ("GET", "/v1/chat/completions"),
            ("DELETE", "/p/zaki/models"),
        ):
            r = await http.request(method, f"{base}{path}", headers=auth)
            assert r.status_code == 404, (method, path, r.text)


async def test_a_stopped_instance_may_not_call_models(broker, store, service_env, keyring_spec, host_net):
    user, cred = await fake_instance(store, keyring_spec, host_net)
    await store.instances.update_one({"_id": user}, {"$set": {"state": "stopped"}})
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{broker_url(service_env)}/p/zaki/chat/completions",
            headers={"Authorization": f"Bearer {cred}"},
            json=chat_body("x"),
        )
    assert r.status_code == 403 and r.json()["error"]["code"] == "instance_not_running"


async def test_a_streamed_answer_passes_chunk_by_chunk(broker, store, service_env, keyring_spec, host_net):
    _, cred = await fake_instance(store, keyring_spec, host_net)
    arrivals: list[tuple[float, bytes]] = []
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream(
            "POST",
            f"{broker_url(service_env)}/p/zaki/chat/completions",
            headers={"Authorization": f"Bearer {cred}"},
            json=chat_body("slow one two three four", stream=True),
        ) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for chunk in r.aiter_raw():
            arrivals.append((time.monotonic(), chunk))
    words = [t for t, c in arrivals if b'"content": "' in c and b'"content": ""' not in c]
    # The fake sends a word every 0.2 s: the client saw them arrive spread out, not all at the end.
    assert len(words) >= 4, arrivals
    assert words[-1] - words[0] >= 0.45
    assert b"[DONE]" in b"".join(c for _, c in arrivals)


async def test_bring_your_own_key_is_used_only_for_its_user(
    broker, store, service_env, keyring_spec, fakes, host_net
):
    ring = KeyRing.from_spec(keyring_spec)
    own_key = "sk-user-own-" + uuid.uuid4().hex
    user, cred = await fake_instance(
        store,
        keyring_spec,
        host_net,
        provider={
            "name": "mine",
            "base_url": f"http://{fakes.host}:{fakes.llm_port}/v1",
            "api": "openai-completions",
        },
    )
    await store.instances.update_one(
        {"_id": user},
        {"$set": {"provider_key_enc": ring.encrypt(own_key, instance_secret_context(user, "provider_key"))}},
    )
    _, other = await fake_instance(store, keyring_spec, host_net)
    url = f"{broker_url(service_env)}/p/mine/chat/completions"
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url, headers={"Authorization": f"Bearer {cred}"}, json=chat_body("mine"))
        assert r.status_code == 200, r.text
        assert fakes.llm.auth_headers[-1] == f"Bearer {own_key}"
        # Another user cannot reach that provider, let alone its key.
        r = await http.post(url, headers={"Authorization": f"Bearer {other}"}, json=chat_body("theirs"))
        assert r.status_code == 404


def zaki_cli(service_env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, **service_env, "ZAKI_STATE_DIR": "/nonexistent"}
    return subprocess.run(
        [sys.executable, "-m", "zaki.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_providers_add_rotate_revoke_take_effect_on_the_next_call(
    broker, store, service_env, keyring_spec, fakes, host_net
):
    name = f"p{uuid.uuid4().hex[:8]}"
    k1, k2 = "sk-first-" + uuid.uuid4().hex, "sk-second-" + uuid.uuid4().hex
    out = zaki_cli(
        service_env,
        "providers",
        "add",
        name,
        "--base-url",
        f"http://{fakes.host}:{fakes.llm_port}",
        "--api",
        "anthropic-messages",
        "--models",
        "claude-echo",
        stdin=k1 + "\n",
    )
    assert out.returncode == 0, out.stderr
    assert k1 not in out.stdout + out.stderr
    listed = zaki_cli(service_env, "providers", "list")
    assert name in listed.stdout and k1 not in listed.stdout and "key_enc" not in listed.stdout
    doc = await store.get_provider(name)
    assert k1 not in json.dumps(doc, default=str)  # sealed at rest

    _, cred = await fake_instance(store, keyring_spec, host_net)
    url = f"{broker_url(service_env)}/p/{name}/v1/messages"
    headers = {"x-api-key": cred, "anthropic-version": "2023-06-01"}
    body = {"model": "claude-echo", "max_tokens": 10, "messages": [{"role": "user", "content": "a"}]}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url, headers=headers, json=body)
        assert r.status_code == 200, r.text
        assert fakes.llm.auth_headers[-1] == k1

        # Rotate: the provider now only takes k2. The very next call uses it.
        fakes.llm.accepted_keys = {k2}
        try:
            out = zaki_cli(service_env, "providers", "rotate", name, stdin=k2 + "\n")
            assert out.returncode == 0, out.stderr
            r = await http.post(url, headers=headers, json={**body, "stream": True})
            assert r.status_code == 200, r.text
            assert fakes.llm.auth_headers[-1] == k2
            assert "message_delta" in r.text
        finally:
            fakes.llm.accepted_keys = None

        out = zaki_cli(service_env, "providers", "revoke", name)
        assert out.returncode == 0, out.stderr
        r = await http.post(url, headers=headers, json=body)
        assert r.status_code == 404 and r.json()["type"] == "error"  # anthropic-shaped
    assert (await store.get_provider(name))["key_enc"] is None


async def test_budget_overrun_gives_a_429_and_one_event(broker, store, service_env, keyring_spec, host_net):
    user, cred = await fake_instance(store, keyring_spec, host_net, budget={"tokens_per_day": 10})
    nc = await nats.connect(service_env["ZAKI_NATS_URL"])
    events: list[BudgetExceeded] = []

    async def on_event(msg) -> None:
        ev = BudgetExceeded.model_validate_json(msg.data)
        if ev.user_id == user:
            events.append(ev)

    await nc.subscribe(subjects.INSTANCE_BUDGET_EXCEEDED, cb=on_event)
    statuses = []
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(4):
            r = await http.post(
                f"{broker_url(service_env)}/p/zaki/chat/completions",
                headers={"Authorization": f"Bearer {cred}"},
                json=chat_body("spend"),
            )
            statuses.append(r.status_code)
    # 8 tokens a call against 10 a day: two calls pass, then the broker refuses.
    assert statuses == [200, 200, 429, 429], statuses
    err = r.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and "tokens_per_day" in err["message"]
    assert int(r.headers["Retry-After"]) > 0
    await eventually(lambda: len(events) >= 1, timeout=10)
    await asyncio.sleep(0.5)
    assert len(events) == 1 and events[0].limit == "tokens_per_day" and events[0].allowed == 10
    await nc.close()
    await assert_metrics(broker.address, 'zaki_broker_refused_total{reason="tokens_per_day"}')


async def test_requests_per_minute_limit(broker, store, service_env, keyring_spec, host_net):
    _, cred = await fake_instance(store, keyring_spec, host_net, budget={"requests_per_minute": 3})
    async with httpx.AsyncClient(timeout=30) as http:
        codes = [
            (
                await http.get(
                    f"{broker_url(service_env)}/p/zaki/models", headers={"Authorization": f"Bearer {cred}"}
                )
            ).status_code
            for _ in range(5)
        ]
    assert codes == [200, 200, 200, 429, 429]


# --- the real gateway, configured by the provisioner ---------------------------------------------


NODE_CALL = """
const [url, key, text] = process.argv.slice(1);
fetch(url, {method: 'POST', headers: {'authorization': 'Bearer ' + key, 'content-type': 'application/json'},
  body: JSON.stringify({model: 'echo-1', messages: [{role: 'user', content: text}]})})
  .then(async r => console.log(JSON.stringify({status: r.status, body: await r.text()})))
  .catch(e => console.log(JSON.stringify({status: 0, body: String(e)})));
"""


async def call_from_container(docker_client, user: str, url: str, key: str, text: str) -> dict:
    """A model call made by a process inside the tenant's container (in a thread: the fake
    provider answering it runs on this test's event loop)."""
    c = docker_client.containers.get(container_name(user))
    res = await asyncio.to_thread(c.exec_run, ["node", "-e", NODE_CALL, url, key, text], user="1000")
    return json.loads(res.output.decode().strip().splitlines()[-1])


@pytest.mark.gateway
async def test_real_gateway_chats_through_the_broker_with_no_provider_key_inside(
    provisioner, broker, platform, fakes, store, service_env, docker_client, state_dir
):
    a = request(fakes)
    b = request(fakes, image=STANDIN_IMAGE)
    (sa, ready), (sb, _) = await asyncio.gather(
        platform.call(subjects.INSTANCE_REQUESTED, a, timeout=180),
        platform.call(subjects.INSTANCE_REQUESTED, b, timeout=180),
    )
    assert sa == sb == subjects.INSTANCE_READY
    platform_key = service_env["ZAKI_LLM_API_KEY"]

    # The real gateway answers through the broker, which attached the platform key.
    n = len(fakes.llm.calls)
    assert await chat(ready.port, a.user_id, "through the broker") == "echo: through the broker"
    assert len(fakes.llm.calls) > n and fakes.llm.auth_headers[-1] == f"Bearer {platform_key}"

    # Inside the container: the config names the broker and a broker credential, no provider key.
    container = docker_client.containers.get(container_name(a.user_id))
    raw = container.exec_run(["cat", "/home/node/.openclaw/openclaw.json"], user="1000").output.decode()
    assert platform_key not in raw
    env_dump = container.exec_run(["env"], user="1000").output.decode()
    assert platform_key not in env_dump
    provider = json.loads(raw)["models"]["providers"]["zaki"]
    assert provider["apiKey"].startswith("zkb_")
    assert provider["baseUrl"] == f"{service_env['ZAKI_BROKER_URL_FOR_GATEWAYS']}/p/zaki"
    own_cred = provider["apiKey"]
    b_cred = json.loads(
        (state_dir / "data" / "users" / b.user_id / ".openclaw" / "openclaw.json").read_text()
    )["models"]["providers"]["zaki"]["apiKey"]
    assert b_cred != own_cred
    # The stored record keeps the credential sealed and hashed, never in clear.
    doc = await store.get_instance(a.user_id)
    assert own_cred not in json.dumps(doc, default=str)

    url = f"{service_env['ZAKI_BROKER_URL_FOR_GATEWAYS']}/p/zaki/chat/completions"
    ok = await call_from_container(docker_client, a.user_id, url, own_cred, "mine")
    assert ok["status"] == 200, ok
    # B's credential, even copied into A's container, is refused: it only works from B's network.
    stolen = await call_from_container(docker_client, a.user_id, url, b_cred, "stolen")
    assert stolen["status"] == 403, stolen
    assert platform_key not in stolen["body"] and platform_key not in ok["body"]

    # A budget set by an event (no restart) is enforced at once: 429 to the gateway, plus the event.
    nc = await nats.connect(service_env["ZAKI_NATS_URL"])
    seen: list[BudgetExceeded] = []

    async def on_event(msg) -> None:
        ev = BudgetExceeded.model_validate_json(msg.data)
        if ev.user_id == a.user_id:
            seen.append(ev)

    await nc.subscribe(subjects.INSTANCE_BUDGET_EXCEEDED, cb=on_event)
    cid = container.id
    subject, _ = await platform.call(
        subjects.INSTANCE_UPDATE,
        InstanceUpdate(user_id=a.user_id, budget=Budget(tokens_per_day=1)),
        timeout=60,
    )
    assert subject == subjects.INSTANCE_READY
    assert docker_client.containers.get(container_name(a.user_id)).id == cid  # not recreated

    async def refused():
        r = await call_from_container(docker_client, a.user_id, url, own_cred, "over budget")
        return r if r["status"] == 429 else None

    over = await eventually(refused, timeout=20, interval=1)
    assert "tokens_per_day" in over["body"]
    await eventually(lambda: seen, timeout=10)
    await nc.close()
    await asyncio.gather(
        *(
            platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=e.user_id, purge=True))
            for e in (a, b)
        )
    )


async def test_bring_your_own_key_from_instance_requested(
    provisioner, broker, platform, fakes, store, docker_client, state_dir
):
    """A user's own provider key in instance.requested: sealed in their record, never in their
    container; their gateway's calls to that provider carry it, through the broker."""
    from pydantic import SecretStr

    from shared.events import ProviderSettings

    own_key = "sk-own-" + uuid.uuid4().hex
    ev = request(
        fakes,
        image=STANDIN_IMAGE,
        model="mine/echo-1",
        # Built unchecked: the provisioner validates it under its own settings, which allow
        # the fake provider (this test process's settings do not).
        provider=ProviderSettings.model_construct(
            name="mine",
            base_url=f"http://{fakes.host}:{fakes.llm_port}/v1",
            api="openai-completions",
            api_key=SecretStr(own_key),
            models=["echo-1"],
        ),
    )
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY, ready
    try:
        raw = (state_dir / "data" / "users" / ev.user_id / ".openclaw" / "openclaw.json").read_text()
        assert own_key not in raw
        provider = json.loads(raw)["models"]["providers"]["mine"]
        assert provider["apiKey"].startswith("zkb_") and provider["baseUrl"].endswith("/p/mine")
        assert own_key not in json.dumps(await store.get_instance(ev.user_id), default=str)  # sealed
        answer = await call_from_container(
            docker_client, ev.user_id, f"{provider['baseUrl']}/chat/completions", provider["apiKey"], "byok"
        )
        assert answer["status"] == 200 and "echo: byok" in answer["body"], answer
        assert fakes.llm.auth_headers[-1] == f"Bearer {own_key}"
    finally:
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))
