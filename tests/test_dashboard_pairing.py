"""Pairing and web-chat history through the dashboard, on a real OpenClaw gateway with
``dmPolicy: pairing`` and the fake Telegram: a stranger writes to the bot, the request shows in
the API, the owner approves, and the stranger's next message is answered by the agent. Also:
the user's own proxied WebSocket never gets ``operator.pairing``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import websockets

from shared.gateway import DASHBOARD_SCOPES, dashboard_identity, gateway_identity
from tests.conftest import Fakes, eventually, operator_connect
from tests.test_dashboard_agent import read_sse
from tests.test_dashboard_api import PROXY_ORIGIN, Browser, signed_up, start_dashboard
from zaki.stack import Process

pytestmark = [pytest.mark.gateway, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def real_dashboard(stack, service_env) -> Process:
    """A dashboard whose agents run the real gateway image (the platform default)."""
    return start_dashboard(stack, service_env, ZAKI_DASHBOARD_GATEWAY_IMAGE="")


def dashboard_identity_granted(config_path: Path, user_id: str) -> bool:
    """The provisioner's config lists the dashboard's identity with operator.pairing, and
    the proxy's identity without it."""
    auth = json.loads(config_path.read_text())["gateway"]["auth"]
    identity = dashboard_identity(user_id)
    return (
        identity in auth["trustedProxy"]["allowUsers"]
        and auth["identityScopes"][identity] == list(DASHBOARD_SCOPES)
        and "operator.pairing" not in auth["identityScopes"][gateway_identity(user_id)]
    )


async def pending(b: Browser) -> list[dict] | None:
    r = await b.http.get("/api/agent/pairing")
    if r.status_code == 502:  # the gateway has not applied the config yet
        return None
    assert r.status_code == 200, r.text
    return r.json()["requests"]


def answers_to(fakes: Fakes, chat_id: int) -> list[str]:
    return [str(m.get("text", "")) for m in fakes.telegram.sent if str(m.get("chat_id")) == str(chat_id)]


async def test_pairing_approve_and_dismiss_on_a_real_gateway(
    real_dashboard: Process, proxy: Process, provisioner: Process, fakes: Fakes, service_env, platform
) -> None:
    a = await signed_up(real_dashboard.address)
    other = await signed_up(real_dashboard.address)
    try:
        token = fakes.bot(f"pair_{a.user['id'][-8:]}_bot")
        t0 = time.monotonic()
        assert (await a.http.post("/api/agent", json={"bot_token": token})).status_code == 202
        events = await read_sse(a, "ready", timeout=400)  # a loaded machine: up to minutes
        ready = next(b for _, b in platform.events("zaki.instance.ready") if b["user_id"] == a.user["id"])
        print(
            f"\nreal gateway: submit token -> SSE ready {time.monotonic() - t0:.1f} s "
            f"(store: {events[-1][1]['elapsed_s']:.1f} s); provisioner time-to-ready {ready['timings']['total']:.1f} s"
        )
        config = Path(service_env["ZAKI_DATA_ROOT"]) / "users" / a.user["id"] / ".openclaw" / "openclaw.json"
        assert dashboard_identity_granted(config, a.user["id"])
        assert await eventually(lambda: _listable(a), timeout=120)

        # A stranger writes; the gateway answers with a pairing code and the request shows up.
        stranger, nosy = 777001, 777002
        fakes.telegram.inject_message(token, "hello bot", chat_id=stranger)
        fakes.telegram.inject_message(token, "me too", chat_id=nosy)
        reqs = await eventually(lambda: _two_requests(a), timeout=180)
        by_sender = {r["sender_id"]: r for r in reqs}
        assert {str(stranger), str(nosy)} <= set(by_sender)
        assert by_sender[str(stranger)]["channel"] == "telegram"
        await eventually(lambda: bool(answers_to(fakes, stranger)), timeout=120)  # the pairing-code reply

        # Another account sees none of it and cannot act on it.
        r = await other.http.get("/api/agent/pairing")
        assert r.status_code == 409 and r.json()["error"]["state"] == "absent"
        r = await other.http.post(
            "/api/agent/pairing/approve", json={"request_id": by_sender[str(stranger)]["request_id"]}
        )
        assert r.status_code == 409

        # The owner's own proxied WebSocket (cookie) has no operator.pairing: that scope is only
        # on the dashboard's path.
        ws_url = proxy.address.replace("http://", "ws://") + "/ws"
        cookie = {"Cookie": f"zaki_session={a.cookie('zaki_session')}", "Origin": PROXY_ORIGIN}
        async with websockets.connect(ws_url, additional_headers=cookie) as ws:
            await ws.recv()  # connect.challenge
            await ws.send(operator_connect("c1", "openclaw-control-ui", "webchat", "web"))
            hello = await _response(ws, "c1")
            assert hello["ok"] and "operator.pairing" not in hello["payload"]["auth"]["scopes"]
            await ws.send(
                json.dumps({"type": "req", "id": "p1", "method": "channels.pairing.list", "params": {}})
            )
            refused = await _response(ws, "p1")
            assert not refused["ok"], refused

        # Dismiss one, approve the other.
        r = await a.http.post(
            "/api/agent/pairing/dismiss", json={"request_id": by_sender[str(nosy)]["request_id"]}
        )
        assert r.status_code == 200, r.text
        r = await a.http.post(
            "/api/agent/pairing/approve", json={"request_id": by_sender[str(stranger)]["request_id"]}
        )
        assert r.status_code == 200, r.text
        assert await pending(a) == []
        r = await a.http.post("/api/agent/pairing/approve", json={"request_id": "no-such-request"})
        assert r.status_code == 404

        before = len(answers_to(fakes, stranger))
        t0 = time.monotonic()
        fakes.telegram.inject_message(token, "what is the plan", chat_id=stranger)
        await eventually(
            lambda: any("what is the plan" in t for t in answers_to(fakes, stranger)[before:]), timeout=180
        )
        print(f"approved stranger answered through Telegram in {time.monotonic() - t0:.1f} s")
        await _chat_history(a, proxy)
    finally:
        await a.http.aclose()
        await other.http.aclose()


async def _listable(b: Browser) -> bool:
    return await pending(b) is not None


async def _two_requests(b: Browser) -> list[dict] | None:
    reqs = await pending(b)
    return reqs if reqs and len(reqs) >= 2 else None


async def _response(ws, rid: str) -> dict:
    async with asyncio.timeout(30):
        while True:
            frame = json.loads(await ws.recv())
            if frame.get("type") == "res" and frame.get("id") == rid:
                return frame


async def _chat_history(a: Browser, proxy: Process) -> None:
    """A web chat through the proxy (cookie), then its conversation read back via the dashboard."""
    async with httpx.AsyncClient(
        cookies=a.http.cookies, headers={"Origin": PROXY_ORIGIN}, timeout=120
    ) as http:
        r = await http.post(
            f"{proxy.address}/v1/chat/completions",
            json={
                "model": "openclaw",
                "user": "web-c1",
                "messages": [{"role": "user", "content": "remember tea"}],
            },
        )
        assert r.status_code == 200, r.text
    sessions = (await a.http.get("/api/agent/chat/sessions")).json()["sessions"]
    assert sessions, "no conversation listed"
    found = False
    for s in sessions:
        r = await a.http.get("/api/agent/chat/history", params={"session": s["key"]})
        assert r.status_code == 200, r.text
        texts = [m["text"] for m in r.json()["messages"]]
        if any("remember tea" in t for t in texts):
            found = True
    assert found, sessions
    r = await a.http.post("/api/agent/chat/abort", json={"session": sessions[0]["key"]})
    assert r.status_code == 200 and r.json() == {"ok": True}, r.text
