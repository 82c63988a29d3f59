"""The dashboard's agent routes on the real platform (provisioner, proxy, Docker; the stand-in
gateway image): create from a bot token, the live state stream, files, start/stop, isolation
from another account, chat through the proxy with the cookie, and deleting the account."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Fakes, eventually, new_bot_token
from tests.test_dashboard_api import (
    ORIGIN,
    PASSWORD,
    PROXY_ORIGIN,
    Browser,
    shared_dashboard,
    signed_up,
    start_dashboard,
)
from tests.test_suspend import delete
from zaki.stack import Process

pytestmark = pytest.mark.timeout(600)
STATES = ["requested", "provisioning", "starting", "running"]


@pytest.fixture
def dashboard(stack, service_env, proxy) -> Process:
    return shared_dashboard(stack, service_env, proxy=proxy.address)


async def read_sse(b: Browser, until: str, timeout: float = 90.0) -> list[tuple[str, dict, float]]:
    """(event, data, arrival time) from /api/agent/events until an event named *until*."""
    out: list[tuple[str, dict, float]] = []
    async with asyncio.timeout(timeout):
        async with b.http.stream("GET", "/api/agent/events", timeout=None) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            event = None
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event:
                    out.append((event, json.loads(line[6:]), time.monotonic()))
                    if event == until:
                        return out
    return out


async def agent(b: Browser) -> dict | None:
    r = await b.http.get("/api/agent")
    assert r.status_code == 200, r.text
    return r.json()["agent"]


async def test_refused_tokens_and_models_change_nothing(dashboard: Process, fakes: Fakes, store) -> None:
    async with await signed_up(dashboard.address) as b:
        for body, code in (
            ({"bot_token": "not a token"}, "invalid_bot_token"),
            ({"bot_token": new_bot_token()}, "bot_token_rejected"),  # well formed, unknown to Telegram
            ({"bot_token": fakes.bot(), "model": "evil/model"}, "model_not_allowed"),
        ):
            r = await b.http.post("/api/agent", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
            assert r.json()["error"]["field"] in ("bot_token", "model")
        assert await agent(b) is None
        assert await store.get_instance(b.user["id"]) is None
        r = await b.http.get("/api/agent/events")
        assert r.status_code == 404


async def test_agent_from_token_to_running_then_run_shape_and_delete_it(
    dashboard: Process, proxy: Process, provisioner: Process, fakes: Fakes, service_env, store, platform
) -> None:
    a = await signed_up(dashboard.address)
    b = await signed_up(dashboard.address)
    try:
        username = f"dash_{a.user['id'][-8:]}_bot"
        token = fakes.bot(username)
        t0 = time.monotonic()
        r = await a.http.post("/api/agent", json={"bot_token": token})
        assert r.status_code == 202, r.text
        assert r.json()["bot_username"] == username and r.json()["state"] == "requested"
        events = await read_sse(a, "ready")
        t_ready = events[-1][2] - t0
        states = [d["state"] for e, d, _ in events if e == "state"]
        assert [s for s in STATES if s in states] == STATES, states  # every step, in order
        assert states.index("requested") < states.index("provisioning") < states.index("running")
        elapsed = [d["elapsed_s"] for e, d, _ in events if e == "state"]
        assert elapsed == sorted(elapsed) and elapsed[0] == 0.0
        ready = events[-1][1]
        assert ready["bot_link"] == f"https://t.me/{username}" and ready["elapsed_s"] > 0
        ready_event = next(
            body for subj, body in platform.events("zaki.instance.ready") if body["user_id"] == a.user["id"]
        )
        print(
            f"\nsubmit token -> page sees running: {t_ready:.2f} s; provisioner time-to-ready "
            f"{ready_event['timings']['total']:.2f} s"
        )
        view = await agent(a)
        assert view["state"] == "running" and view["bot_link"] == f"https://t.me/{username}"
        assert [s["state"] for s in view["history"]][-1] == "running"

        # Another account: the same bot is refused without naming its owner, and sees nothing of A's.
        r = await b.http.post("/api/agent", json={"bot_token": token})
        assert r.status_code == 409 and r.json()["error"]["code"] == "bot_token_in_use"
        assert a.user["username"] not in r.text and a.user["id"] not in r.text
        assert await agent(b) is None
        for path in ("/api/agent/files/SOUL.md", "/api/agent/events"):
            assert (await b.http.get(path)).status_code == 404
        r = await b.http.get("/api/agent/pairing")
        assert r.status_code == 409 and r.json()["error"]["state"] == "absent"
        assert (await b.http.post("/api/agent/stop")).status_code == 404
        assert (await b.http.get("/api/agent/usage")).json()["today"]["tokens"] == 0

        await _chat_relay(a, b, proxy, dashboard)

        await _files(a, b, Path(service_env["ZAKI_DATA_ROOT"]) / "users" / a.user["id"] / "workspace")
        await _stop_and_start(a)

        # A model change is an instance.update for the provisioner (only allowed models pass).
        r = await a.http.patch("/api/agent", json={"model": "zaki/echo-1"})
        assert r.status_code == 202, r.text
        update = await eventually(
            lambda: [
                b
                for s, b in platform.events("zaki.instance.update")
                if b["request_id"] == r.json()["request_id"]
            ]
        )
        assert update[0]["user_id"] == a.user["id"] and update[0]["model"] == "zaki/echo-1"
        assert (await a.http.patch("/api/agent", json={"model": "other/x"})).status_code == 400
        assert (await b.http.patch("/api/agent", json={"model": "zaki/echo-1"})).status_code == 404

        # Delete the account (keep memory): keys and sessions revoked, the instance removed.
        key = (await a.http.post("/api/keys", json={"scopes": ["chat"]})).json()["key"]
        r = await a.http.request("DELETE", "/api/me", json={"password": PASSWORD, "confirm": "someone-else"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "confirmation_mismatch"
        session = a.cookie("zaki_dash")
        r = await a.http.request(
            "DELETE", "/api/me", json={"password": PASSWORD, "confirm": a.user["username"], "purge": False}
        )
        assert r.status_code == 202 and r.json()["request_id"], r.text
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{proxy.address}/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 401
            r = await http.get(f"{dashboard.address}/api/me", headers={"Authorization": f"Bearer {session}"})
            assert r.status_code == 401
        await eventually(lambda: _gone(store, a.user["id"]), timeout=60)
        ws = Path(service_env["ZAKI_DATA_ROOT"]) / "users" / a.user["id"] / "workspace"
        assert (ws / "SOUL.md").exists()  # purge=false keeps the memory
        # The bot is free again for another account.
        r = await b.http.post("/api/agent", json={"bot_token": token})
        assert r.status_code == 202, r.text
        await read_sse(b, "ready")
        r = await b.http.request(
            "DELETE", "/api/me", json={"password": PASSWORD, "confirm": b.user["username"], "purge": True}
        )
        assert r.status_code == 202
        await eventually(lambda: _gone(store, b.user["id"]), timeout=60)
        assert not (Path(service_env["ZAKI_DATA_ROOT"]) / "users" / b.user["id"]).exists()
    finally:
        await a.http.aclose()
        await b.http.aclose()


async def _gone(store, user_id: str) -> bool:
    return await store.get_instance(user_id) is None


async def _files(a: Browser, b: Browser, ws: Path) -> None:
    r = await a.http.get("/api/agent/files/SOUL.md")
    assert r.status_code == 200 and r.json()["content"].startswith("# SOUL"), r.text
    etag = r.json()["etag"]
    text = "# SOUL\n\nYou answer like a pirate. <script>alert(1)</script>\n"
    r = await a.http.put("/api/agent/files/SOUL.md", json={"content": text, "etag": etag})
    assert r.status_code == 200 and r.json()["content"] == text  # stored as typed, escaped by the pages
    st = os.stat(ws / "SOUL.md")
    assert (ws / "SOUL.md").read_text() == text and st.st_uid == 1000 and stat.S_IMODE(st.st_mode) == 0o600
    # A stale etag: someone else saved in between.
    r = await a.http.put("/api/agent/files/SOUL.md", json={"content": "lost", "etag": etag})
    assert r.status_code == 409 and r.json()["error"]["code"] == "edit_conflict"
    assert (ws / "SOUL.md").read_text() == text
    r = await a.http.put("/api/agent/files/MEMORY.md", json={"content": "x" * (64 * 1024 + 1)})
    assert r.status_code == 413 and (ws / "MEMORY.md").read_text().startswith("# MEMORY")
    assert (await a.http.get("/api/agent/files/openclaw.json")).status_code == 404
    assert (await a.http.get("/api/agent/files/..%2F.openclaw%2Fopenclaw.json")).status_code == 404
    # The tenant made MEMORY.md a link to a host file: never read, and a save replaces the link only.
    secret = ws.parent / "host-secret.txt"
    secret.write_text("host secret")
    (ws / "MEMORY.md").unlink()
    (ws / "MEMORY.md").symlink_to(secret)
    r = await a.http.get("/api/agent/files/MEMORY.md")
    assert r.status_code == 409 and "host secret" not in r.text
    r = await a.http.put("/api/agent/files/MEMORY.md", json={"content": "# MEMORY\n"})
    assert r.status_code == 200
    assert secret.read_text() == "host secret" and not (ws / "MEMORY.md").is_symlink()
    os.mkfifo(ws / "fifo")
    (ws / "SOUL.md").unlink()
    (ws / "fifo").rename(ws / "SOUL.md")  # a FIFO would block a naive reader forever
    r = await a.http.get("/api/agent/files/SOUL.md", timeout=10)
    assert r.status_code == 409
    r = await a.http.put("/api/agent/files/SOUL.md", json={"content": text})
    assert r.status_code == 200 and (ws / "SOUL.md").read_text() == text
    # Another account never reaches these files.
    assert (await b.http.put("/api/agent/files/SOUL.md", json={"content": "pwned"})).status_code == 404
    assert (ws / "SOUL.md").read_text() == text


async def _stop_and_start(a: Browser) -> None:
    r = await a.http.post("/api/agent/start")
    assert r.status_code == 409 and r.json()["error"] == {
        "code": "illegal_state",
        "message": "cannot start an agent that is running",
        "state": "running",
    }
    assert (await a.http.post("/api/agent/stop")).status_code == 202
    await eventually(lambda: _state_is(a, "stopped"), timeout=60)
    r = await a.http.get("/api/agent/files/SOUL.md")
    assert r.status_code == 200  # files work while the gateway is stopped
    assert (await a.http.post("/api/agent/start")).status_code == 202
    events = await read_sse(a, "ready")
    assert events[-1][1]["state"] == "running"
    usage = (await a.http.get("/api/agent/usage")).json()
    assert usage["budget"]["requests_per_minute"] == 60 and usage["today"]["requests"] >= 0


async def _state_is(b: Browser, state: str) -> bool:
    view = await agent(b)
    return bool(view) and view["state"] == state


async def test_agent_events_need_a_session(dashboard: Process) -> None:
    async with httpx.AsyncClient(base_url=dashboard.address) as anon:
        r = await anon.get("/api/agent/events")
        assert r.status_code == 401 and r.json()["error"]["code"] == "not_authenticated"
        r = await anon.post("/api/agent", json={"bot_token": "1:2"}, headers={"Origin": ORIGIN})
        assert r.status_code == 401


def _relay_connections(dashboard: Process, proxy: Process) -> set[str]:
    """The dashboard's open TCP connections to the proxy (local address:port)."""
    port = proxy.address.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", "dport", "=", f":{port}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {line.split()[2] for line in out.splitlines() if f"pid={dashboard.proc.pid}," in line}


async def _relay_abort(a: Browser, dashboard: Process, proxy: Process) -> None:
    """The client goes away while the agent is silent: the dashboard drops its relayed request at
    once (the stand-in's next write is 4 s away, so nothing else would end it before then)."""
    body = {"model": "openclaw", "user": "web:c2", "stream": True, "standin_chunks": 2,
            "standin_delay_ms": 4000, "messages": [{"role": "user", "content": "think long"}]}  # fmt: skip
    async with a.http.stream("POST", "/api/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):  # the first chunk (the role): the stream is open
                break
        during = _relay_connections(dashboard, proxy)
        assert during, "no relayed connection seen"
    t0 = time.monotonic()
    while during <= _relay_connections(dashboard, proxy):
        assert time.monotonic() - t0 < 2.0, "the relayed request outlived its client"
        await asyncio.sleep(0.05)
    print(f"relayed request dropped {time.monotonic() - t0:.2f} s after the client went away")


async def _chat_relay(a: Browser, b: Browser, proxy: Process, dashboard: Process) -> None:
    """The pages' chat on the dashboard's own origin: relayed through the real proxy to the
    stand-in gateway, streamed as written; other accounts and other origins get nothing."""
    body = {"model": "openclaw", "user": "web:c1", "messages": [{"role": "user", "content": "hi there"}]}
    r = await a.http.post("/api/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: hi there"
    # Streamed: four pieces written 0.5 s apart arrive as they are written, not all at the end.
    streamed = {**body, "stream": True, "standin_chunks": 4, "standin_delay_ms": 500}
    arrivals: list[tuple[float, str]] = []
    t0 = time.monotonic()
    async with a.http.stream("POST", "/api/chat/completions", json=streamed) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        # Only status and content type pass: the stand-in's "no-cache" is replaced by ours.
        assert r.headers["cache-control"] == "no-store"
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                piece = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if piece:
                    arrivals.append((time.monotonic() - t0, piece))
    assert "".join(p for _, p in arrivals) == "echo: hi there" and len(arrivals) == 4, arrivals
    assert arrivals[-1][0] - arrivals[0][0] > 1.2, arrivals  # not buffered
    print(f"\nrelayed chat: first piece {arrivals[0][0]:.2f} s, last {arrivals[-1][0]:.2f} s")
    await _relay_abort(a, dashboard, proxy)
    # Another account has no agent: told so by the dashboard itself, nothing is relayed (its
    # JWT would name its own user in any case: never A's gateway).
    r = await b.http.post("/api/chat/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    assert "no agent" in r.json()["error"]["message"] and "echo" not in r.text
    # A cookie-carrying POST from the proxy's origin (tenant content) or another site is refused.
    for origin in (PROXY_ORIGIN, "https://evil.example"):
        r = await a.http.post("/api/chat/completions", json=body, headers={"Origin": origin})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", r.text
    for bad in ([1], {"model": "openclaw", "messages": []}, {"messages": [{"role": "user"}]}):
        r = await a.http.post("/api/chat/completions", json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input", (bad, r.text)
    r = await a.http.post("/api/chat/completions", content=b"x" * (300 * 1024),
        headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # The dashboard's origin is not the proxy's: the proxy refuses the cookie from it.
    r = await a.http.post(f"{proxy.address}/v1/chat/completions", json=body)
    assert r.status_code == 403, r.text


async def test_an_open_event_stream_does_not_hold_the_dashboard_at_shutdown(
    stack, service_env, provisioner, platform, fakes: Fakes
) -> None:
    """SIGTERM with a page's live stream open: the dashboard ends it and exits (aiohttp's default
    would wait 60 s for the stream, and the stack kills what is still running after 10 s)."""
    own = start_dashboard(stack, service_env)
    b = await signed_up(own.address)
    try:
        async with b:
            r = await b.http.post("/api/agent", json={"bot_token": fakes.bot()})
            assert r.status_code == 202, r.text
            async with b.http.stream("GET", "/api/agent/events", timeout=None) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                assert (await anext(lines)).startswith("event: ")  # the stream is live
                own.proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(own.proc.wait, 8)  # raises if still running
                assert code == 0
    finally:
        own.stop()
        if b.user:  # its agent goes with it
            await delete(platform, b.user["id"])
