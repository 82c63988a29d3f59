"""More of the dashboard: the pages' static files and headers, the proxy cookie's renewal,
password changes, closed sign-up and Secure cookies, a failed agent's reason, and an operator
acting on someone else's instance (stand-in gateway)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import httpx
import jwt
import pytest

from tests.conftest import JWT_SECRET, Fakes, eventually
from tests.test_dashboard_agent import agent, read_sse
from tests.test_dashboard_api import (
    PASSWORD,
    Browser,
    new_name,
    set_cookie_headers,
    shared_dashboard,
    signed_up,
    start_dashboard,
    zaki_admin,
)
from zaki.stack import Process

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def dashboard(stack, service_env) -> Process:
    return shared_dashboard(stack, service_env)


async def test_pages_are_served_same_origin_with_strict_headers(dashboard: Process) -> None:
    static = Path(__file__).resolve().parent.parent / "services" / "dashboard" / "static"
    async with httpx.AsyncClient(base_url=dashboard.address) as http:
        r = await http.get("/")
        assert r.status_code == 200 and r.text == (static / "index.html").read_text()
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        some_js = next(static.glob("js/*.js"))
        r = await http.get(f"/assets/js/{some_js.name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
        for bad in ("/assets/../api.py", "/assets/%2e%2e/api.py", "/assets/.hidden", "/assets/nope.js"):
            r = await http.get(bad)
            assert r.status_code == 404 and "import" not in r.text, bad


async def test_the_proxy_cookie_is_renewed_before_it_expires(dashboard: Process) -> None:
    async with await signed_up(dashboard.address) as b:
        old = jwt.encode(
            {"sub": b.user["id"], "aud": "zaki", "exp": int(time.time()) + 60, "scopes": ["chat"]},
            JWT_SECRET,
            algorithm="HS256",
        )
        b.http.cookies.set("zaki_session", old, domain="127.0.0.1")
        r = await b.http.get("/api/me")
        assert r.status_code == 200 and "zaki_session" in set_cookie_headers(r)
        fresh = jwt.decode(b.cookie("zaki_session"), JWT_SECRET, algorithms=["HS256"], audience="zaki")
        assert fresh["exp"] - time.time() > 800 and fresh["sub"] == b.user["id"]
        # A fresh one is left alone.
        r = await b.http.get("/api/me")
        assert "zaki_session" not in set_cookie_headers(r)


async def test_a_password_change_ends_the_other_sessions(dashboard: Process) -> None:
    name = new_name()
    async with Browser(dashboard.address) as one, Browser(dashboard.address) as two:
        assert (await one.signup(name)).status_code == 201
        assert (await two.login(name)).status_code == 200
        r = await one.http.post(
            "/api/me/password",
            json={"current_password": "wrong-password-1", "new_password": "new-Pass-word-9"},
        )
        assert r.status_code == 401 and r.json()["error"]["field"] == "current_password"
        r = await one.http.post(
            "/api/me/password", json={"current_password": PASSWORD, "new_password": "short"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "weak_password"
        r = await one.http.post(
            "/api/me/password", json={"current_password": PASSWORD, "new_password": "new-Pass-word-9"}
        )
        assert r.status_code == 204
        assert (await one.http.get("/api/me")).status_code == 200
        assert (await two.http.get("/api/me")).status_code == 401
        assert (await two.login(name)).status_code == 401
        assert (await two.login(name, "new-Pass-word-9")).status_code == 200


async def test_closed_signup_and_secure_cookies_on_an_https_origin(stack, service_env) -> None:
    origin = "https://zaki.example"
    proxy_origin = "https://gw.zaki.example"
    d = await asyncio.to_thread(
        start_dashboard,
        stack,
        service_env,
        ZAKI_PROXY_PUBLIC_ORIGIN=proxy_origin,
        ZAKI_DASHBOARD_SIGNUP_OPEN="false",
        ZAKI_DASHBOARD_PUBLIC_ORIGIN=f"{origin},http://dash.example:8095",
        ZAKI_DASHBOARD_COOKIE_DOMAIN="zaki.example",
    )
    try:
        async with Browser(d.address, origin=origin) as b:
            r = await b.signup()
            assert r.status_code == 403 and r.json()["error"]["code"] == "signup_closed"
            meta = (await b.http.get("/api/meta")).json()
            assert meta["signup_open"] is False and meta["public_origins"] == [
                origin,
                "http://dash.example:8095",
            ]
            # The Control UI lives on the proxy's origin, not the dashboard's.
            assert meta["links"]["control_ui"] == f"{proxy_origin}/ui/"
            assert meta["links"]["chat_completions"] == "/api/chat/completions"
            name = new_name("op")
            r = await asyncio.to_thread(
                zaki_admin, service_env, "create", name, "--password-stdin", stdin=PASSWORD
            )
            assert r.returncode == 0, r.stderr
            r = await b.login(name)
            assert r.status_code == 200
            assert r.json()["links"]["control_ui"] == f"{proxy_origin}/ui/"  # the pages keep this as "me"
            cookies = set_cookie_headers(r)
            for cookie in cookies.values():
                assert "secure" in cookie.lower()
            # The proxy's cookie reaches the proxy's host name; the dashboard's stays host-only.
            assert "domain=zaki.example" in cookies["zaki_session"].lower()
            assert "domain" not in cookies["zaki_dash"].lower()
            for other in ("http://127.0.0.1:8080", proxy_origin):  # the proxy's origin is not ours
                r = await b.http.post(
                    "/api/auth/login",
                    json={"login": name, "password": PASSWORD},
                    headers={"Origin": other},
                )
                assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
            # The dashboard's own extra origin (pages on its own port) is accepted too.
            r = await b.http.post(
                "/api/auth/login",
                json={"login": name, "password": PASSWORD},
                headers={"Origin": "http://dash.example:8095"},
            )
            assert r.status_code == 200
    finally:
        d.stop()


async def test_a_failed_agent_says_why_and_can_be_created_again(
    dashboard: Process, provisioner: Process, fakes: Fakes, service_env
) -> None:
    async with await signed_up(dashboard.address) as b:
        # The stand-in refuses its config (exit 78) when this file exists in its state folder.
        state = Path(service_env["ZAKI_DATA_ROOT"]) / "users" / b.user["id"] / ".openclaw"
        state.mkdir(parents=True)
        faults = state / "standin-faults.json"
        faults.write_text(json.dumps({"exit_code": 78}))
        os.chown(faults, 1000, 1000)
        r = await b.http.post("/api/agent", json={"bot_token": fakes.bot()})
        assert r.status_code == 202
        events = await read_sse(b, "failed", timeout=120)
        failed = events[-1][1]
        assert failed["reason"] == "gateway_not_ready" and "78" in failed["message"]
        view = await agent(b)
        assert view["state"] == "failed" and view["error"]["reason"] == "gateway_not_ready"
        faults.unlink()
        r = await b.http.post("/api/agent", json={"bot_token": fakes.bot()})
        assert r.status_code == 202, r.text
        await read_sse(b, "ready", timeout=120)
        assert (await agent(b))["error"] is None


async def test_an_operator_acts_on_any_instance_and_it_is_audited(
    dashboard: Process, provisioner: Process, fakes: Fakes, service_env, store
) -> None:
    root = new_name("root")
    r = await asyncio.to_thread(zaki_admin, service_env, "create", root, "--password-stdin", stdin=PASSWORD)
    assert r.returncode == 0, r.stderr
    async with await signed_up(dashboard.address) as user, Browser(dashboard.address) as op:
        assert (await op.login(root)).status_code == 200
        uid = user.user["id"]
        assert (await user.http.post("/api/agent", json={"bot_token": fakes.bot()})).status_code == 202
        await read_sse(user, "ready")
        listed = (await op.http.get("/api/admin/instances")).json()["instances"]
        mine = next(i for i in listed if i["user_id"] == uid)
        assert mine["state"] == "running" and mine["account"] == user.user["username"]
        r = await op.http.post(f"/api/admin/instances/{uid}/stop")
        assert r.status_code == 202
        await eventually(lambda: _state(user, "stopped"), timeout=60)
        r = await op.http.post(f"/api/admin/instances/{uid}/stop")
        assert r.status_code == 409 and r.json()["error"]["code"] == "illegal_state"
        r = await op.http.request("DELETE", f"/api/admin/instances/{uid}", params={"purge": "true"})
        assert r.status_code == 202
        await eventually(lambda: _no_instance(store, uid), timeout=60)
        # The provisioner ends the user's sessions with their instance (issue 13.8): log in again.
        assert (await user.http.get("/api/me")).status_code == 401
        assert (await user.login(user.user["username"])).status_code == 200
        await eventually(lambda: _no_agent(user), timeout=10)  # the page shows "no agent", not "requested"
        assert (await op.http.post("/api/admin/instances/nobody/start")).status_code == 404
        records = (await op.http.get("/api/admin/audit", params={"limit": 50})).json()["records"]
        mine = [(x["action"], x["detail"]) for x in records if x["target"] == uid]
        assert ("instance.stop", {}) in mine and ("instance.delete", {"purge": True}) in mine
        # The dashboard's own records name the operator (the platform's command:/outcome: records
        # of the shared audit trail, listed too, carry no dashboard account name).
        ours = [x for x in records if x["target"] == uid and ":" not in x["action"]]
        assert ours and all(x["actor_name"] == root.lower() for x in ours)


async def _state(b: Browser, state: str) -> bool:
    view = await agent(b)
    return bool(view) and view["state"] == state


async def _no_instance(store, user_id: str) -> bool:
    return await store.get_instance(user_id) is None


async def _no_agent(b: Browser) -> bool:
    return await agent(b) is None


async def test_usage_is_the_brokers_count_for_today_and_this_month(dashboard: Process, store) -> None:
    from services.llm_broker.budget import today

    async with await signed_up(dashboard.address) as b, await signed_up(dashboard.address) as other:
        day = today()
        earlier = f"{day[:7]}-01" if day[8:] != "01" else None
        await store.add_usage(b.user["id"], day, 3, 100, 20)
        if earlier:
            await store.add_usage(b.user["id"], earlier, 2, 50, 10)
        await store.add_usage(other.user["id"], day, 9, 999, 999)  # someone else's
        usage = (await b.http.get("/api/agent/usage")).json()
        assert usage["today"] == {
            "day": day, "tokens": 120, "prompt_tokens": 100, "completion_tokens": 20, "requests": 3
        }  # fmt: skip
        assert usage["month"] == {
            "month": day[:7],
            "tokens": 180 if earlier else 120,
            "requests": 5 if earlier else 3,
        }
        assert usage["budget"] == {
            "requests_per_minute": 60, "tokens_per_day": None, "tokens_per_month": None, "soft_ratio": 0.8
        }  # fmt: skip


def test_commands_are_offered_from_every_state_a_user_can_recover() -> None:
    from services.dashboard.agents import COMMAND_FROM
    from shared.state import InstanceState

    states = {s.value for s in InstanceState}
    assert all(allowed <= states for allowed in COMMAND_FROM.values())
    # Retries used up (issue 14.3): only the user's start or restart brings it back.
    assert "crashlooping" in COMMAND_FROM["start"] and "crashlooping" in COMMAND_FROM["restart"]
    assert "suspended" in COMMAND_FROM["start"] and "suspended" in COMMAND_FROM["stop"]
