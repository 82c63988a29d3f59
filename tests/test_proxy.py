"""The gateway proxy as a process: auth, tenant isolation, limits, streaming, WebSockets."""

import asyncio
import itertools
import json
import re
import signal
import time
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import nats
import pytest
import websockets

from services.gateway_proxy import keys
from services.provisioner.service import _ctx
from shared import subjects
from shared.crypto import KeyRing
from shared.events import InstanceCommand, InstanceDelete, InstanceRequested
from shared.gateway import identity_headers
from shared.state import InstanceState
from tests.conftest import JWT_SECRET, STANDIN_IMAGE, all_log_text, eventually, new_user, operator_connect


async def make_instance(platform, fakes, image=STANDIN_IMAGE):
    ev = InstanceRequested(request_id=new_user("req"), user_id=new_user(), bot_token=fakes.bot(), image=image)
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=180)
    assert subject == subjects.INSTANCE_READY, ready
    return ev.user_id, ready


def chat_body(text="hi", **kw):
    return {"model": "openclaw", "messages": [{"role": "user", "content": text}], **kw}


@pytest.fixture(scope="module")
async def two_tenants(provisioner, proxy, fakes, stack):
    from shared.client import PlatformClient
    from shared.store import Store

    platform = await PlatformClient.connect(stack.nats.address)
    store = Store(stack.mongo.address, "zaki")
    (a, _ready_a), (b, _ready_b) = await asyncio.gather(
        make_instance(platform, fakes), make_instance(platform, fakes)
    )
    _, key_a = await keys.create_key(store, a, {"chat", "tools", "ws"})
    _, key_b = await keys.create_key(store, b, {"chat", "tools", "ws"})
    yield {"a": a, "b": b, "key_a": key_a, "key_b": key_b, "store": store}
    for u in (a, b):
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True))
    await platform.close()
    await store.close()


async def test_chat_is_routed_by_credential_only(proxy, two_tenants):
    t = two_tenants
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        r = await http.post(
            "/v1/chat/completions", json=chat_body("x"), headers={"Authorization": f"Bearer {t['key_a']}"}
        )
        assert r.status_code == 200
        assert r.json()["system_fingerprint"] == f"zaki-{t['a']}"[:63]
        b_identity = f"{t['b']}@zaki.local"
        tricks = [
            ("/v1/chat/completions", {"X-Forwarded-User": b_identity}),
            ("/v1/chat/completions", {"Host": f"{t['b']}.zaki.local"}),
            ("/v1/chat/completions", {"X-Zaki-User": t["b"], "X-User-Id": t["b"]}),
            (f"/v1/chat/completions?user={t['b']}&user_id={t['b']}", {}),
            ("/v1/chat/completions", {"Forwarded": f"for=1.2.3.4;by={t['b']}", "X-Real-IP": "10.0.0.9"}),
            ("/v1/chat/completions", {"Cookie": f"zaki_session={t['key_b']}"}),  # header wins; cookie ignored
        ]
        for path, extra in tricks:
            r = await http.post(
                path, json=chat_body("x"), headers={"Authorization": f"Bearer {t['key_a']}", **extra}
            )
            assert r.status_code == 200, (path, extra, r.text)
            assert r.json()["system_fingerprint"] == f"zaki-{t['a']}"[:63], (path, extra)
        for path in (
            f"/{t['b']}/v1/chat/completions",
            "/v1/../v1/chat/completions/../../x",
            "/__standin/headers",
        ):
            r = await http.post(path, json=chat_body(), headers={"Authorization": f"Bearer {t['key_a']}"})
            assert r.status_code == 404


async def test_credentials_are_checked(proxy, two_tenants):
    t = two_tenants
    now = datetime.now(UTC)
    claims = {"sub": t["a"], "aud": "zaki", "exp": now + timedelta(minutes=5)}
    good = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    expired = jwt.encode({**claims, "exp": now - timedelta(minutes=5)}, JWT_SECRET, algorithm="HS256")
    wrong_key = jwt.encode(claims, "another-secret-of-enough-length-1234", algorithm="HS256")
    alg_none = jwt.encode(claims, None, algorithm="none")
    no_tools = jwt.encode({**claims, "scopes": ["chat"]}, JWT_SECRET, algorithm="HS256")
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        r = await http.post("/v1/chat/completions", json=chat_body())
        assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_api_key"
        for bad in ("zk_nope", t["key_a"][:-2] + "xx", expired, wrong_key, alg_none, "a.b.c"):
            r = await http.post(
                "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {bad}"}
            )
            assert r.status_code == 401, bad
        r = await http.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {good}"}
        )
        assert r.status_code == 200 and r.json()["system_fingerprint"] == f"zaki-{t['a']}"[:63]
        r = await http.post(
            "/tools/invoke", json={"tool": "sessions_list"}, headers={"Authorization": f"Bearer {no_tools}"}
        )
        assert r.status_code == 403
        r = await http.post(
            "/tools/invoke", json={"tool": "sessions_list"}, headers={"Authorization": f"Bearer {good}"}
        )
        assert r.status_code == 200 and r.json()["ok"] is True


async def test_revoked_key_is_refused_at_once(proxy, two_tenants, stack):
    t = two_tenants
    key_id, key = await keys.create_key(t["store"], t["a"], {"chat"})
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        assert (await http.post("/v1/chat/completions", json=chat_body(), headers=auth)).status_code == 200
        assert await keys.revoke(t["store"], key_id)
        nc = await nats.connect(stack.nats.address)
        await nc.publish(subjects.APIKEY_REVOKED, key_id.encode())
        await nc.flush()
        await nc.close()
        await eventually(lambda: _status(http, "/v1/chat/completions", auth, 401), timeout=2, interval=0.05)


async def test_session_tokens_of_a_user_whose_sessions_ended_are_refused(proxy, two_tenants):
    """Issue 13.8: deleting an instance (or disabling an account) ends the user's dashboard
    sessions; a proxy session token (JWT) issued before that is refused by every proxy within
    a second, so a re-created user id inherits no live session."""
    t = two_tenants
    now = int(time.time())
    token = jwt.encode({"sub": t["a"], "aud": "zaki", "iat": now - 5, "exp": now + 300}, JWT_SECRET, "HS256")
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        assert (await http.post("/v1/chat/completions", json=chat_body(), headers=auth)).status_code == 200
        await t["store"].revoke_user_sessions(t["a"])  # what delete and disable call
        await eventually(lambda: _status(http, "/v1/chat/completions", auth, 401), timeout=2, interval=0.05)
        later = int(time.time()) + 1
        fresh = jwt.encode(
            {"sub": t["a"], "aud": "zaki", "iat": later, "exp": later + 300}, JWT_SECRET, "HS256"
        )
        r = await http.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": f"Bearer {fresh}"}
        )
        assert r.status_code == 200  # a session begun after the cutoff works


async def _status(http, path, headers, want):
    return (await http.post(path, json=chat_body(), headers=headers)).status_code == want


async def test_limits_413_and_429(proxy, two_tenants):
    t = two_tenants
    auth = {"Authorization": f"Bearer {t['key_b']}"}
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        r = await http.post(
            "/v1/chat/completions",
            content=b"x" * (2 << 20),
            headers={**auth, "Content-Type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
        results = await asyncio.gather(*(http.get("/v1/models", headers=auth) for _ in range(150)))
        codes = [r.status_code for r in results]
        assert 429 in codes and 200 in codes
        limited = next(r for r in results if r.status_code == 429)
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["type"] == "rate_limit_exceeded"
    await asyncio.sleep(2)  # let the bucket refill for other tests


async def test_expect_100_continue_is_answered(proxy, two_tenants):
    """curl sends `Expect: 100-continue` with bodies over 1 KiB and waits for the go-ahead."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(proxy.address.rsplit(":", 1)[1]))
    body = json.dumps(chat_body("x" * 2000)).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {two_tenants['key_a']}\r\n".encode()
        + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 0.5) == b"HTTP/1.1 100 Continue\r\n"
    await reader.readline()
    writer.write(body)
    status = await asyncio.wait_for(reader.readline(), 10)
    assert status.startswith(b"HTTP/1.1 200"), status
    writer.close()


async def test_sse_passes_through_chunk_by_chunk(proxy, two_tenants):
    t = two_tenants
    auth = {"Authorization": f"Bearer {t['key_a']}"}
    arrivals = []
    body = chat_body("slow stream please", stream=True, standin_chunks=5, standin_delay_ms=300)
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=auth) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.monotonic(), line))
    content = "".join(
        (json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
        for _, line in arrivals
        if line != "data: [DONE]"
    )
    assert content == "echo: slow stream please"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    assert len([g for g in gaps if g > 0.2]) >= 3  # arrived as sent, not buffered to the end


async def test_websocket_rpc_and_limit(proxy, two_tenants):
    t = two_tenants
    url = proxy.address.replace("http://", "ws://") + "/ws"
    hdrs = {"Authorization": f"Bearer {t['key_a']}"}
    async with websockets.connect(url, additional_headers=hdrs) as ws:
        challenge = json.loads(await ws.recv())
        assert challenge["event"] == "connect.challenge"
        await ws.send(
            json.dumps(
                {
                    "type": "req",
                    "id": "1",
                    "method": "connect",
                    "params": {"auth": {"token": "client-made-up"}},
                }
            )
        )
        hello = json.loads(await ws.recv())
        assert hello["ok"] and hello["payload"]["auth"]["method"] == "trusted-proxy"
        await ws.send(json.dumps({"type": "req", "id": "2", "method": "health", "params": {}}))
        assert json.loads(await ws.recv()) == {"type": "res", "id": "2", "ok": True, "payload": {"ok": True}}
    # Per-tenant WebSocket limit (3 in this test setup).
    conns = [await websockets.connect(url, additional_headers=hdrs) for _ in range(3)]
    with pytest.raises(websockets.exceptions.InvalidStatus) as exc:
        await websockets.connect(url, additional_headers=hdrs)
    assert exc.value.response.status_code == 429
    for c in conns:
        await c.close()
    with pytest.raises(websockets.exceptions.InvalidStatus) as exc:
        await websockets.connect(url)
    assert exc.value.response.status_code == 401


async def test_stopped_and_deleted_instances_answer_503(proxy, provisioner, platform, fakes, store):
    user, _ = await make_instance(platform, fakes)
    _, key = await keys.create_key(store, user, {"chat"})
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        assert (await http.get("/v1/models", headers=auth)).status_code == 200
        await platform.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=user))
        r = await http.get("/v1/models", headers=auth)
        assert r.status_code == 503 and r.json()["state"] == "stopped"
        assert r.json()["error"]["type"] == "instance_not_running"
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))
        # Deleting revokes the user's keys (issue 13.8): the old key is refused at once ...
        r = await http.get("/v1/models", headers=auth)
        assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
        _, fresh = await keys.create_key(store, user, {"chat"})

        async def absent():  # ... and a new one hears that the instance is gone
            r = await http.get("/v1/models", headers={"Authorization": f"Bearer {fresh}"})
            return r.status_code == 503 and r.json()["state"] == "absent"

        await eventually(absent, timeout=2, interval=0.05)


async def test_unreachable_gateway_is_502_or_503(
    stack, service_env, provisioner, platform, fakes, store, docker_client
):
    """A gateway that does not answer while its record says running: the request is held for it
    to come back (issue 16, ZAKI_WAKE_TIMEOUT_S, short here), then answered with a typed error.
    (A killed gateway comes back within the hold, through Docker's restart policy or reconcile,
    and is then answered 200: test_suspend.py; here nothing ever listens on the record's port.)"""
    from tests.proxy_support import start_proxy
    from zaki.stack import free_port

    user, _ = await make_instance(platform, fakes)
    _, key = await keys.create_key(store, user, {"chat"})
    await store.instances.update_one({"_id": user}, {"$set": {"port": free_port()}})
    proxy = start_proxy(stack, service_env, fastpath=True, ZAKI_WAKE_TIMEOUT_S="2")
    try:
        async with httpx.AsyncClient(base_url=f"http://{proxy.address}", timeout=30) as http:
            r = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code in (502, 503), r.text
            assert r.json()["error"]["type"] in ("gateway_unreachable", "instance_not_running")
    finally:
        proxy.stop()
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


@pytest.fixture(scope="module")
async def real_gateway(proxy, provisioner, fakes, stack, keyring_spec):
    """One real OpenClaw gateway for every test of this module that needs one (~1 GiB, ~15 s)."""
    from shared.client import PlatformClient
    from shared.store import Store
    from tests.conftest import REAL_IMAGE

    platform = await PlatformClient.connect(stack.nats.address)
    store = Store(stack.mongo.address, "zaki")
    user, _ = await make_instance(platform, fakes, image=REAL_IMAGE)
    _, key = await keys.create_key(store, user, {"chat", "tools", "ws"})
    doc = await store.get_instance(user)
    password = KeyRing.from_spec(keyring_spec).decrypt(
        doc["gateway_password_enc"], _ctx(user, "gateway_password")
    )
    yield {"user": user, "key": key, "password": password, "doc": doc}
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))
    await platform.close()
    await store.close()


@pytest.mark.gateway
async def test_real_gateway_through_the_proxy(proxy, real_gateway):
    user, key, password = real_gateway["user"], real_gateway["key"], real_gateway["password"]
    received = bytearray()
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=proxy.address, timeout=90) as http:
        r = await http.post("/v1/chat/completions", json=chat_body("via proxy"), headers=auth)
        assert r.status_code == 200, r.text
        received += r.content + str(r.headers).encode()
        assert r.json()["choices"][0]["message"]["content"] == "echo: via proxy"
        text = ""
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat_body("streamed", stream=True), headers=auth
        ) as s:
            async for chunk in s.aiter_bytes():
                received += chunk
                text += chunk.decode()
        assert "data: [DONE]" in text and "streamed" in text
        r = await http.post("/tools/invoke", json={"tool": "sessions_list", "args": {}}, headers=auth)
        received += r.content
        assert r.status_code == 200 and r.json()["ok"] is True
    url = proxy.address.replace("http://", "ws://") + "/ws"
    async with websockets.connect(url, additional_headers=auth, max_size=64 << 20) as ws:
        received += (await ws.recv()).encode()
        await ws.send(operator_connect("c1"))
        hello = await _response(ws, "c1", received)
        assert hello["ok"], hello
        assert set(hello["payload"]["auth"]["scopes"]) >= {"operator.read", "operator.write"}
        assert "operator.admin" not in hello["payload"]["auth"]["scopes"]
        await ws.send(json.dumps({"type": "req", "id": "c2", "method": "sessions.list", "params": {}}))
        listed = await _response(ws, "c2", received)
        assert listed["ok"], listed
    await _control_ui(proxy, user, key, received)
    assert password.encode() not in received


@pytest.mark.gateway
async def test_proxied_http_never_runs_as_operator_admin(proxy, real_gateway):
    """Issue 13.4: without x-openclaw-scopes a trusted-proxy gateway grants an HTTP caller all
    its default operator scopes, admin included. The admin-only model override shows which:
    through the proxy it is refused; the same request straight to the gateway, with the
    proxy's identity headers and no scope header, is served."""
    chat = chat_body("override")
    override = {"x-openclaw-model": "zaki/echo-1"}
    async with httpx.AsyncClient(timeout=90) as http:
        via_proxy = await http.post(
            f"{proxy.address}/v1/chat/completions",
            json=chat,
            headers={
                "Authorization": f"Bearer {real_gateway['key']}",
                **override,
                "x-openclaw-scopes": "operator.admin",
            },  # a client's own claim is dropped
        )
        assert via_proxy.status_code == 403, via_proxy.text
        assert "operator.admin" in via_proxy.text
        doc = real_gateway["doc"]
        direct = await http.post(
            f"http://{doc.get('host', '127.0.0.1')}:{doc['port']}/v1/chat/completions",
            json=chat,
            headers={**identity_headers(real_gateway["user"], None, proto="http"), **override},
        )
        assert direct.status_code == 200, direct.text  # what every proxied request could do
        plain = await http.post(
            f"{proxy.address}/v1/chat/completions",
            json=chat,
            headers={"Authorization": f"Bearer {real_gateway['key']}"},
        )
        assert plain.status_code == 200, plain.text  # the route itself still works


ORIGIN = "http://127.0.0.1:8080"  # ZAKI_PROXY_PUBLIC_ORIGIN's default: where the proxy's pages live


async def _control_ui(proxy, user: str, api_key: str, received: bytearray) -> None:
    """The gateway's Control UI through the proxy, as a browser with the dashboard's session
    cookie sees it; and the cookie refused to every other origin."""
    now = datetime.now(UTC)
    session = jwt.encode({"sub": user, "aud": "zaki", "exp": now + timedelta(minutes=5)}, JWT_SECRET, "HS256")
    cookie = {"Cookie": f"zaki_session={session}"}
    async with httpx.AsyncClient(base_url=proxy.address, timeout=60) as http:
        page = await http.get("/ui/", headers=cookie)  # a navigation: no Origin
        received += page.content + str(page.headers).encode()
        assert page.status_code == 200 and "text/html" in page.headers["content-type"], page.text[:300]
        assert "openclaw-app" in page.text
        assert page.headers.get("x-frame-options") == "DENY" and "set-cookie" not in page.headers
        asset = re.search(r'(?:src|href)="(/ui/assets/[^"]+\.js)"', page.text)
        assert asset, page.text[:2000]
        js = await http.get(asset.group(1), headers=cookie)
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert (await http.get("/ui/")).status_code == 401  # no credential
        no_ui = await http.get("/ui/", headers={"Authorization": f"Bearer {api_key}"})
        assert no_ui.status_code == 403  # an API key without the ui scope
        # Cross-site uses of the cookie: refused before they reach anything.
        for origin in ("https://evil.example", "null"):
            r = await http.post(
                "/v1/chat/completions", json=chat_body("csrf"), headers={**cookie, "Origin": origin}
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        r = await http.post("/v1/chat/completions", json=chat_body("csrf"), headers=cookie)
        assert r.status_code == 403  # a cookie-authenticated POST must say where it comes from
    ws_url = proxy.address.replace("http://", "ws://") + "/ui"
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(ws_url, additional_headers={**cookie, "Origin": "https://evil.example"})
    assert refused.value.response.status_code == 403  # no cross-site WebSocket hijacking
    async with websockets.connect(ws_url, additional_headers={**cookie, "Origin": ORIGIN}) as ws:
        received += (await ws.recv()).encode()
        await ws.send(operator_connect("u1", "openclaw-control-ui", "webchat", "web"))
        hello = await _response(ws, "u1", received)
        assert hello["ok"], hello  # device-less operator session, by trusted-proxy identity


async def _response(ws, rid, sink):
    while True:
        raw = await asyncio.wait_for(ws.recv(), 60)
        sink += raw.encode() if isinstance(raw, str) else raw
        msg = json.loads(raw)
        if msg.get("type") == "res" and msg.get("id") == rid:
            return msg


async def test_access_log_has_request_ids_and_no_credentials(proxy, two_tenants, state_dir):
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        await http.get("/v1/models", headers={"Authorization": f"Bearer {two_tenants['key_a']}"})
    text = all_log_text(state_dir)
    lines = [json.loads(line) for line in text.splitlines() if '"zaki.proxy.access"' in line]
    assert lines and all(line["request_id"] and "status" in line for line in lines)
    assert any(line["tenant"] == two_tenants["a"] for line in lines)
    assert two_tenants["key_a"] not in text and two_tenants["key_a"].split("_")[2] not in text


async def test_expired_key_and_starting_instance(proxy, store):
    from datetime import timedelta as td

    user = new_user()
    _, expired = await keys.create_key(store, user, {"chat"}, td(seconds=-1))
    _, key = await keys.create_key(store, user, {"chat", "ws"})
    await store.create_instance(user, {"instance_id": "s1", "docker_host": "local"})
    await store.transition(user, InstanceState.PROVISIONING)
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        r = await http.get("/v1/models", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]
        r = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 503 and r.json()["state"] == "provisioning"
        assert r.headers["Retry-After"] == "5"
    # The WebSocket handshake says the same.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            proxy.address.replace("http://", "ws://") + "/ws",
            additional_headers={"Authorization": f"Bearer {key}"},
        )
    assert refused.value.response.status_code == 503
    assert refused.value.response.headers["Retry-After"] == "5"
    assert json.loads(refused.value.response.body)["state"] == "provisioning"
    await store.instances.delete_one({"_id": user})


async def test_shutdown_drains_open_streams(stack, service_env, provisioner, two_tenants):
    from tests.conftest import free_port, wait_for_port

    port = free_port()
    p = stack.start_service(
        "services.gateway_proxy",
        {**service_env, "ZAKI_PROXY_PORT": str(port), "ZAKI_METRICS_PORT": "0", "ZAKI_PROXY_DRAIN_S": "20"},
    )
    wait_for_port("127.0.0.1", port, p.proc, "proxy")
    await asyncio.sleep(1)
    body = chat_body("drain me", stream=True, standin_chunks=6, standin_delay_ms=400)
    text = ""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {two_tenants['key_a']}"},
        ) as r:
            assert r.status_code == 200
            async for chunk in r.aiter_text():
                text += chunk
                if text.count("data: ") == 2:
                    p.proc.send_signal(signal.SIGTERM)  # mid-stream
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as fresh:
        with pytest.raises(httpx.ConnectError):
            await fresh.get("/v1/models")  # no new connections while draining or after
    assert "data: [DONE]" in text  # the open stream was allowed to finish
    p.proc.wait(30)


async def test_idle_and_trickling_connections_are_closed(stack, service_env, provisioner, two_tenants):
    """Keep-alive connections do not live forever, a request whose headers trickle in
    (slowloris) gets 408, and a gateway that goes silent mid-stream is cut off: nobody can
    hold connection slots indefinitely."""
    from tests.conftest import free_port, wait_for_port

    port = free_port()
    p = stack.start_service(
        "services.gateway_proxy",
        {
            **service_env,
            "ZAKI_PROXY_PORT": str(port),
            "ZAKI_METRICS_PORT": "0",
            "ZAKI_PROXY_KEEPALIVE_S": "1",
            "ZAKI_PROXY_HEADER_TIMEOUT_S": "1",
            "ZAKI_PROXY_IDLE_TIMEOUT_S": "1",
        },
    )
    try:
        wait_for_port("127.0.0.1", port, p.proc, "proxy")
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", port)
        slow_w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
        await slow_w.drain()
        answer = await asyncio.wait_for(slow_r.read(), 10)  # read() returns at EOF
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert await asyncio.wait_for(idle_r.read(), 10) == b""  # closed by the proxy
        for w in (idle_w, slow_w):
            w.close()
        # The gateway sends its first chunk, then nothing for 4 s: the proxy ends the stream.
        body = chat_body("silent", stream=True, standin_chunks=2, standin_delay_ms=4000)
        t0 = time.monotonic()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            with pytest.raises(httpx.HTTPError):
                async with http.stream(
                    "POST",
                    "/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {two_tenants['key_a']}"},
                ) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_bytes():
                        pass
        assert time.monotonic() - t0 < 3.5
    finally:
        p.stop()
