"""The dashboard API (services/dashboard) on real NATS and FerretDB: accounts, sessions, the
proxy's cookie, cross-site refusals, log-in throttling, API keys, the operator's actions and CLI.

Helpers here (start_dashboard, Browser, signup) are shared with the other test_dashboard_* files.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import timedelta

import httpx
import jwt
import pytest

from tests.conftest import JWT_SECRET, SESSION, STANDIN_IMAGE
from zaki.stack import Process, Stack, free_port, wait_for_port

# The dashboard's own public origin (its pages and API) and the proxy's: never the same (H4).
ORIGIN = "http://127.0.0.1:8095"
PROXY_ORIGIN = "http://127.0.0.1:8080"
PREFIX = f"d{SESSION}"  # dashboard user ids carry the test session: conftest's cleanup finds them
PASSWORD = "blue-Harbor-7-lantern"


def start_dashboard(stack: Stack, service_env: dict[str, str], **extra: str) -> Process:
    port = free_port()
    env = {
        **service_env,
        "ZAKI_DASHBOARD_PORT": str(port),
        "ZAKI_JWT_SECRET": JWT_SECRET,
        "ZAKI_DASHBOARD_USER_PREFIX": PREFIX,
        "ZAKI_DASHBOARD_GATEWAY_IMAGE": STANDIN_IMAGE,
        "ZAKI_PROXY_PUBLIC_ORIGIN": PROXY_ORIGIN,
        "ZAKI_DASHBOARD_PUBLIC_ORIGIN": ORIGIN,
        # No proxy unless a test gives one: a closed loopback port (never someone else's 8080).
        "ZAKI_DASHBOARD_PROXY_URL": "http://127.0.0.1:9",
        **extra,
    }
    p = stack.start_service("services.dashboard", env)
    wait_for_port("127.0.0.1", port, p.proc, "dashboard")
    p.address = f"http://127.0.0.1:{port}"
    return p


_SHARED: dict[str, Process] = {}


def shared_dashboard(stack: Stack, service_env: dict[str, str], proxy: str | None = None) -> Process:
    """One dashboard for every test_dashboard_* module of this session (one more that knows the
    test proxy's address, for the pages' chat relay)."""
    name = f"dashboard:{proxy}"
    p = _SHARED.get(name)
    if p is None or p.proc.poll() is not None:
        extra = {"ZAKI_DASHBOARD_PROXY_URL": proxy} if proxy else {}
        p = _SHARED[name] = start_dashboard(stack, service_env, **extra)
    return p


@pytest.fixture
def dashboard(stack: Stack, service_env: dict[str, str]) -> Process:
    return shared_dashboard(stack, service_env)


def new_name(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Browser:
    """A client that behaves like our own pages in a browser: a cookie jar, and the platform's
    Origin on every unsafe request (a browser adds it by itself)."""

    def __init__(self, base: str, origin: str | None = ORIGIN, address: str | None = None) -> None:
        headers = {"Origin": origin} if origin else {}
        if address:
            headers["X-Forwarded-For"] = address
        self.http = httpx.AsyncClient(base_url=base, headers=headers, timeout=30)
        self.user: dict = {}

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    def cookie(self, name: str) -> str | None:
        return self.http.cookies.get(name)

    async def signup(self, username: str | None = None, password: str = PASSWORD, **extra) -> httpx.Response:
        r = await self.http.post(
            "/api/auth/signup", json={"username": username or new_name(), "password": password, **extra}
        )
        if r.status_code == 201:
            self.user = r.json()["user"]
        return r

    async def login(self, login: str, password: str = PASSWORD) -> httpx.Response:
        return await self.http.post("/api/auth/login", json={"login": login, "password": password})


async def signed_up(base: str, **kw) -> Browser:
    b = Browser(base, **kw)
    r = await b.signup()
    assert r.status_code == 201, r.text
    return b


def set_cookie_headers(r: httpx.Response) -> dict[str, str]:
    return {h.split("=", 1)[0]: h for h in r.headers.get_list("set-cookie")}


# --- accounts and sessions -----------------------------------------------------------------------


async def test_signup_sets_both_cookies_and_the_proxy_accepts_the_jwt(
    dashboard: Process, proxy: Process
) -> None:
    async with Browser(dashboard.address) as b:
        name = new_name("Alice")
        r = await b.signup(name, email=f"{name}@example.com")
        assert r.status_code == 201, r.text
        user = r.json()["user"]
        assert user["username"] == name.lower() and user["role"] == "user" and user["id"].startswith(PREFIX)
        cookies = set_cookie_headers(r)
        for c in ("zaki_dash", "zaki_session"):
            attrs = cookies[c].lower()
            assert "httponly" in attrs and "samesite=lax" in attrs and "path=/" in attrs
            assert "secure" not in attrs  # the public origin is http here
        claims = jwt.decode(b.cookie("zaki_session"), JWT_SECRET, algorithms=["HS256"], audience="zaki")
        assert claims["sub"] == user["id"] and set(claims["scopes"]) == {"chat", "tools", "ws", "ui"}
        assert 0 < claims["exp"] - claims["iat"] <= 900
        me = await b.http.get("/api/me")
        assert me.status_code == 200 and me.json()["user"]["id"] == user["id"]
        # The real proxy takes the cookie for this user: not 401, but "no instance yet".
        r = await b.http.get(f"{proxy.address}/v1/models", headers={"Origin": PROXY_ORIGIN})
        assert r.status_code == 503 and r.json()["state"] == "absent", r.text
        # A JWT signed with another secret is refused by the proxy.
        forged = jwt.encode({**claims, "exp": claims["exp"]}, "not-the-secret-" * 3, algorithm="HS256")
        async with httpx.AsyncClient(cookies={"zaki_session": forged}) as forger:
            r = await forger.get(f"{proxy.address}/v1/models", headers={"Origin": PROXY_ORIGIN})
        assert r.status_code == 401


async def test_duplicate_names_and_weak_passwords_are_refused_and_change_nothing(dashboard: Process) -> None:
    async with Browser(dashboard.address) as b:
        name = new_name()
        email = f"{name}@example.com"
        assert (await b.signup(name, email=email)).status_code == 201
    async with Browser(dashboard.address) as other:
        r = await other.signup(name.upper())
        assert r.status_code == 409 and r.json()["error"] == {
            "code": "name_taken",
            "message": "this username is already taken",
            "field": "username",
        }
        r = await other.signup(new_name(), email=email.upper())
        assert r.status_code == 409 and r.json()["error"]["field"] == "email"
        for weak in ("short1!", "1234567890", "aaaaaaaaaaaa", "{name}-is-me"):
            fresh = new_name()
            weak = weak.format(name=fresh)
            r = await other.signup(fresh, password=weak)
            assert r.status_code == 400 and r.json()["error"]["code"] == "weak_password", (weak, r.text)
            # Nothing was created: the name is still free.
            assert (await other.login(fresh, weak)).status_code == 401
        assert other.cookie("zaki_dash") is None
        r = await other.http.post("/api/auth/signup", json={"username": "<script>", "password": PASSWORD})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"
        assert r.json()["error"]["field"] == "username"
        r = await other.http.post(
            "/api/auth/signup", json={"username": new_name(), "password": PASSWORD, "x": 1}
        )
        assert r.status_code == 400 and r.json()["error"]["field"] == "x"


async def test_login_issues_a_new_session_and_logout_revokes_it(dashboard: Process) -> None:
    async with Browser(dashboard.address) as b:
        name = new_name()
        assert (await b.signup(name)).status_code == 201
        first = b.cookie("zaki_dash")
        r = await b.login(name.upper())  # usernames are case-insensitive
        assert r.status_code == 200, r.text
        second = b.cookie("zaki_dash")
        assert second and second != first  # no fixation: a new id at every log-in
        old = await b.http.get("/api/me", headers={"Authorization": f"Bearer {first}"})
        assert old.status_code == 401 and old.json()["error"]["code"] == "not_authenticated"
        assert (await b.http.get("/api/me")).status_code == 200
        r = await b.http.post("/api/auth/logout")
        assert r.status_code == 204
        # Revoked on the server, not only forgotten by the browser.
        r = await b.http.get("/api/me", headers={"Authorization": f"Bearer {second}"})
        assert r.status_code == 401


async def test_sessions_expire_when_idle(dashboard: Process, store) -> None:
    from services.dashboard.sessions import _digest

    async with await signed_up(dashboard.address) as b:
        token = b.cookie("zaki_dash")
        assert (await b.http.get("/api/me")).status_code == 200
        doc = await store.db["dashboard_sessions"].find_one({"_id": _digest(token)})
        await store.db["dashboard_sessions"].update_one(
            {"_id": doc["_id"]}, {"$set": {"last_seen_at": doc["last_seen_at"] - timedelta(days=8)}}
        )
        r = await b.http.get("/api/me")
        assert r.status_code == 401 and r.json()["error"]["code"] == "not_authenticated"
        assert await store.db["dashboard_sessions"].find_one({"_id": doc["_id"]}) is None


async def test_cross_site_requests_are_refused(dashboard: Process) -> None:
    async with await signed_up(dashboard.address) as b:
        # A cookie-carrying POST from another site, or with no Origin at all, is refused.
        # The proxy's origin too: it serves content the tenant controls (the gateway's Control UI).
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Origin": PROXY_ORIGIN}):
            r = await b.http.post("/api/keys", json={"scopes": ["chat"]}, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        bare = httpx.AsyncClient(base_url=dashboard.address, cookies=b.http.cookies)
        try:
            r = await bare.post("/api/keys", json={"scopes": ["chat"]})
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
            # An HTML form cannot send JSON; its encodings are refused.
            r = await bare.post("/api/keys", data={"scopes": "chat"}, headers={"Origin": ORIGIN})
            assert r.status_code == 415
        finally:
            await bare.aclose()
        assert (await b.http.get("/api/keys")).json()["keys"] == []  # nothing was created
        # Log-in CSRF: a foreign page cannot log a browser into an account.
        r = await b.http.post(
            "/api/auth/login", json={"login": b.user["username"], "password": PASSWORD},
            headers={"Origin": "https://evil.example"},
        )  # fmt: skip
        assert r.status_code == 403
        # A password change from a page on the proxy's origin is refused the same way.
        r = await b.http.post("/api/me/password", json={"current_password": PASSWORD,
            "new_password": "other-Harbor-8-lantern"}, headers={"Origin": PROXY_ORIGIN})  # fmt: skip
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert (await b.login(b.user["username"])).status_code == 200  # the password is unchanged
        # Our own origin works.
        assert (await b.http.post("/api/keys", json={"scopes": ["chat"]})).status_code == 201


async def test_login_is_throttled_per_account_and_per_address(dashboard: Process) -> None:
    name = new_name()
    async with Browser(dashboard.address, address="198.51.100.10") as b:
        assert (await b.signup(name)).status_code == 201
        for _ in range(5):
            assert (await b.login(name, "wrong-password-123")).status_code == 401
        r = await b.login(name, "wrong-password-123")
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_attempts"
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        # The account stays locked for a while, even from another address and with the right password.
    async with Browser(dashboard.address, address="198.51.100.11") as c:
        assert (await c.login(name)).status_code == 429
    # Per address: 20 failures on 20 different accounts, then even a good log-in waits.
    async with Browser(dashboard.address, address="198.51.100.12") as d:
        codes = []
        for _ in range(30):
            r = await d.login(new_name(), "wrong-password-123")
            codes.append(r.status_code)
            if r.status_code == 429:
                break
        # The burst (20) is honoured, then refusals come (a token refills every 10 s meanwhile).
        assert codes[:20] == [401] * 20 and codes[-1] == 429 and len(codes) <= 25, codes
        assert "Retry-After" in r.headers
    # Another address is not affected.
    async with Browser(dashboard.address, address="198.51.100.13") as e:
        assert (await e.signup()).status_code == 201
        assert (await e.login(e.user["username"])).status_code == 200


# --- API keys ------------------------------------------------------------------------------------


async def test_api_keys_shown_once_listed_and_revoked_at_once(dashboard: Process, proxy: Process) -> None:
    async with await signed_up(dashboard.address) as b:
        r = await b.http.post("/api/keys", json={"scopes": ["chat", "tools"], "expires_days": 30})
        assert r.status_code == 201, r.text
        created = r.json()
        key = created["key"]
        assert key.startswith("zk_") and created["scopes"] == ["chat", "tools"] and created["expires_at"]
        listed = (await b.http.get("/api/keys")).json()["keys"]
        assert [k["id"] for k in listed] == [created["id"]] and listed[0]["state"] == "active"
        assert key not in (await b.http.get("/api/keys")).text  # never shown again
        auth = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient() as http:
            assert (
                await http.get(f"{proxy.address}/v1/models", headers=auth)
            ).status_code == 503  # no instance
            assert (await b.http.delete(f"/api/keys/{created['id']}")).status_code == 204
            # The proxy's NATS notice races this next request by a few event-loop turns: well
            # within 2 s, where the cache alone would have kept it 30 s.
            for _ in range(40):
                r = await http.get(f"{proxy.address}/v1/models", headers=auth)
                if r.status_code != 503:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 401  # the proxy dropped its cached copy
        assert (await b.http.get("/api/keys")).json()["keys"][0]["state"] == "revoked"
        r = await b.http.post("/api/keys", json={"scopes": ["admin"]})
        assert r.status_code == 400 and r.json()["error"]["field"] == "scopes"


async def test_another_account_cannot_see_or_revoke_my_keys(dashboard: Process) -> None:
    async with await signed_up(dashboard.address) as a, await signed_up(dashboard.address) as b:
        key_id = (await a.http.post("/api/keys", json={"scopes": ["chat"]})).json()["id"]
        assert (await b.http.get("/api/keys")).json()["keys"] == []
        r = await b.http.delete(f"/api/keys/{key_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert (await a.http.get("/api/keys")).json()["keys"][0]["state"] == "active"
        # Operator routes are not for users.
        r = await b.http.get("/api/admin/accounts")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


# --- operators -----------------------------------------------------------------------------------


def zaki_admin(service_env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, **service_env, "ZAKI_DASHBOARD_USER_PREFIX": PREFIX}
    return subprocess.run(
        [sys.executable, "-m", "zaki.cli", "--state-dir", "/nonexistent", "admin", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


async def test_operator_cli_and_admin_actions_are_audited(dashboard: Process, service_env, store) -> None:
    root = new_name("root")
    r = await asyncio.to_thread(
        zaki_admin, service_env, "create", root, "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert r.returncode == 0, r.stderr
    async with await signed_up(dashboard.address) as user, Browser(dashboard.address) as op:
        assert (await op.login(root)).status_code == 200
        me = (await op.http.get("/api/me")).json()["user"]
        assert me["role"] == "operator"
        accounts = (await op.http.get("/api/admin/accounts")).json()["accounts"]
        assert user.user["id"] in {a["user"]["id"] for a in accounts}
        providers = (await op.http.get("/api/admin/providers")).text
        assert "key" not in providers.replace('"keys"', "")  # no key, sealed or not
        r = await op.http.post(f"/api/admin/accounts/{user.user['id']}/disable")
        assert r.status_code == 200
        r = await user.http.get("/api/me")
        assert r.status_code in (401, 403)
        r = await user.login(user.user["username"])
        assert r.status_code == 403 and r.json()["error"]["code"] == "account_disabled"
        records = (await op.http.get("/api/admin/audit")).json()["records"]
        rec = next(x for x in records if x["target"] == user.user["id"])
        assert (
            rec["action"] == "account.disable"
            and rec["actor"] == me["id"]
            and rec["actor_name"] == root.lower()
        )
        # The CLI can enable and reset too, and its actions are audited as well.
        r = await asyncio.to_thread(zaki_admin, service_env, "enable", user.user["username"])
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(zaki_admin, service_env, "reset", user.user["username"])
        assert r.returncode == 0, r.stderr
        temp = r.stdout.strip().splitlines()[-1].split()[-1]
        assert (await user.login(user.user["username"])).status_code == 401  # the old password is gone
        assert (await user.login(user.user["username"], temp)).status_code == 200
        r = await asyncio.to_thread(zaki_admin, service_env, "list")
        assert r.returncode == 0 and root.lower() in r.stdout and "operator" in r.stdout
        r = await asyncio.to_thread(zaki_admin, service_env, "disable", "nobody-at-all")
        assert r.returncode == 1 and "not_found" in r.stderr
        actions = {
            (x["action"], x["actor"]) async for x in store.db["audit"].find({"target": user.user["id"]})
        }
        assert {("account.enable", "cli"), ("account.reset_password", "cli")} <= actions
