"""The web dashboard in a real browser (Debian's Chromium, headless, driven by Playwright) on a
platform of its own with stand-in gateways: a person signs up, gets an agent, chats with it,
shapes and runs it, and deletes it; another person sees none of it; an operator administers.
Each page is screenshotted at desktop and phone width into docs/screenshots/.

The tests in this module run in order and share the people they create (module fixtures)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx
import pytest

from services.dashboard import accounts
from tests.browser.harness import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    DESKTOP,
    PHONE,
    SHOTS,
    Site,
    curl_first_token,
    require_browser,
    start_site,
)
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(900)
PASSWORD = "a sturdy pass phrase 42"
FIGURES: dict[str, object] = {}


class Person:
    """One browser profile (its own cookies) with one tab, watching for script errors."""

    def __init__(self, ctx, page, name: str) -> None:
        self.ctx, self.page, self.name = ctx, page, name
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on(
            "console",
            lambda m: (
                self.errors.append(f"console: {m.text}")
                if m.type == "error" and "Failed to load resource" not in m.text
                else None
            ),
        )
        page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))

    @classmethod
    async def open(cls, browser, site: Site, name: str) -> Person:
        ctx = await browser.new_context(viewport=DESKTOP, base_url=site.origin)
        return cls(ctx, await ctx.new_page(), name)

    async def goto(self, route: str) -> None:
        await self.page.goto(f"/#/{route}")
        await self.ready(route.split("?")[0])

    async def ready(self, page_name: str, timeout: float = 15_000) -> None:
        await self.page.wait_for_selector(f"main[data-page='{page_name}'][data-ready='1']", timeout=timeout)

    async def shoot(self, name: str) -> None:
        """The current page at desktop and phone width."""
        SHOTS.mkdir(parents=True, exist_ok=True)
        for size, tag in ((DESKTOP, "desktop"), (PHONE, "phone")):
            await self.page.set_viewport_size(size)
            await self.page.wait_for_timeout(150)
            await self.page.screenshot(path=str(SHOTS / f"{name}-{tag}.png"))
        await self.page.set_viewport_size(DESKTOP)

    async def fetch(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        """A request from the page itself (its cookies, its Origin)."""
        return await self.page.evaluate(
            """async ([m, p, b]) => {
                const r = await fetch(p, {method: m, headers: {"Content-Type": "application/json"},
                                          body: b === null ? undefined : JSON.stringify(b)});
                const t = await r.text();
                let j = null; try { j = JSON.parse(t); } catch {}
                return [r.status, j];
            }""",
            [method, path, body],
        )

    async def signup(self, username: str) -> None:
        await self.goto("signup")
        await self.page.fill("#f-username", username)
        await self.page.fill("#f-password", PASSWORD)
        await self.page.click("form button[type=submit]")
        await self.ready("agent")

    async def login(self, login: str, password: str = PASSWORD) -> None:
        await self.page.fill("#f-login", login)
        await self.page.fill("#f-password", password)
        await self.page.click("form button[type=submit]")

    async def close(self) -> None:
        await self.ctx.close()


@pytest.fixture(scope="module")
async def site(tmp_path_factory, fakes, keyring_spec, docker_client):
    require_browser()
    s = await start_site(tmp_path_factory.mktemp("dashboard"), fakes, keyring_spec)
    yield s
    await s.front.close()
    await s.plat.close(docker_client)


@pytest.fixture(scope="module")
async def browser():
    require_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        await b.close()


def uname(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
async def alice(site, browser, fakes):
    """Signs up and gets an agent through the pages; the agent is running when this returns."""
    p = await Person.open(browser, site, uname("alice"))
    await p.signup(p.name)
    await p.page.wait_for_selector("#get-agent")
    await p.shoot("get-agent")
    p.bot_username = f"{p.name}_bot"
    token = fakes.bot(p.bot_username)
    await p.page.fill("#f-bot_token", token)
    t0 = time.perf_counter()
    await p.page.click("#get-agent button[type=submit]")
    await p.page.wait_for_selector("#agent-state[data-state='running']", timeout=120_000)
    FIGURES["submit_to_running_s"] = round(time.perf_counter() - t0, 2)
    _, body = await p.fetch("GET", "/api/agent")
    FIGURES["provisioner_time_to_ready_s"] = body["agent"]["history"][-1]["elapsed_s"]
    p.user_id = (await p.fetch("GET", "/api/me"))[1]["user"]["id"]
    yield p
    assert not p.errors, p.errors
    await p.close()


# --- the tests, in the order a person meets the pages ---------------------------------------


async def test_first_page_load_is_small_and_fast(site, browser):
    """Bytes on the wire (compressed as sent) and time to an interactive log-in form, cold cache."""
    ctx = await browser.new_context(viewport=DESKTOP, base_url=site.origin)
    page = await ctx.new_page()
    cdp = await ctx.new_cdp_session(page)
    await cdp.send("Network.enable")
    sizes: dict[str, int] = {}
    urls: dict[str, str] = {}
    cdp.on("Network.responseReceived", lambda e: urls.__setitem__(e["requestId"], e["response"]["url"]))
    cdp.on("Network.loadingFinished", lambda e: sizes.__setitem__(e["requestId"], e["encodedDataLength"]))
    await page.goto("/")
    await page.wait_for_selector("main[data-page='login'][data-ready='1'] #f-login")
    tti_ms = await page.evaluate("performance.getEntriesByName('zaki:interactive')[0].startTime")
    await page.wait_for_load_state("networkidle")
    total = sum(sizes.values())
    FIGURES["first_load_bytes"] = total
    FIGURES["first_load_requests"] = len(sizes)
    FIGURES["first_load_tti_ms"] = round(tti_ms)
    # Same origin only: no CDN, no external font, nothing else on the network.
    assert all(u.startswith(site.origin) for u in urls.values()), urls
    assert total <= 300 * 1024, (total, urls)
    assert tti_ms <= 1000, tti_ms
    await ctx.close()


async def test_sign_up_refuses_bad_input_with_a_clear_message(site, browser):
    p = await Person.open(browser, site, uname("eve"))
    await p.goto("signup")
    await p.shoot("signup")
    await p.page.fill("#f-username", p.name)
    await p.page.fill("#f-password", "short")
    await p.page.click("form button[type=submit]")
    err = p.page.locator("p.notice.error")
    await err.wait_for()
    assert "password" in (await err.text_content()).lower()
    assert await p.page.locator(".field.invalid #f-password").count() == 1
    assert (await p.fetch("GET", "/api/me"))[0] == 401  # nothing was created, nobody logged in
    await p.goto("login")
    await p.shoot("login")
    await p.close()


async def test_sign_up_then_a_token_shows_running_in_time(alice):
    """requested → … → running on the page within the provisioner's own time-to-ready + 2 s."""
    page_s, ready_s = FIGURES["submit_to_running_s"], FIGURES["provisioner_time_to_ready_s"]
    assert page_s <= ready_s + 2, FIGURES
    link = alice.page.locator("#bot-link")
    assert await link.get_attribute("href") == f"https://t.me/{alice.bot_username}"
    steps = alice.page.locator("#steps li.done")
    assert await steps.count() == 4
    await alice.shoot("agent")


async def test_web_chat_streams_the_agents_answer_and_renders_markdown_safely(alice, site):
    p = alice
    await p.goto("chat")
    hostile = "hello **world** <img src=x onerror=window.__xss=1> [x](javascript:window.__xss=2)"
    await p.page.fill("#chat-input", hostile)
    await p.page.click("#chat-send")
    answer = p.page.locator(".msg.assistant[data-done='1']").last
    await answer.wait_for(timeout=30_000)
    text = await answer.text_content()
    assert "echo: hello" in text and "<img src=x onerror" in text, text  # shown as text
    assert await answer.locator("strong").text_content() == "world"  # markdown applied
    assert await p.page.locator(".msg img, .msg a[href^='javascript']").count() == 0
    assert await p.page.evaluate("window.__xss === undefined")
    FIGURES["chat_first_token_page_ms"] = int(await answer.get_attribute("data-first-token-ms"))
    await p.shoot("chat")


async def test_api_key_create_shown_once_then_revoked_gets_401(alice, site):
    p = alice
    await p.goto("keys")
    await p.page.click("#key-create")
    key = await p.page.locator("#new-key-value").text_content()
    assert key.startswith("zk_")
    await p.shoot("keys")
    # The key works on the proxy, as curl would use it; and gives the curl side of the chat figure.
    first_s, out = await curl_first_token(site.origin, key, "hi from curl")
    assert "echo: hi from curl" in out
    FIGURES["chat_first_token_curl_ms"] = round(first_s * 1000)
    _, listed = await p.fetch("GET", "/api/keys")
    assert all("key" not in k for k in listed["keys"])  # never shown again
    key_id = next(k["id"] for k in listed["keys"] if k["state"] == "active")
    await p.page.click(f"button[data-revoke='{key_id}']")
    await p.page.wait_for_selector(f"tr[data-key='{key_id}'][data-state='revoked']")
    async with httpx.AsyncClient(base_url=site.origin) as http:
        r = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401


async def test_soul_md_edit_is_saved_escaped_and_limited(alice, site):
    p = alice
    await p.goto("files?f=SOUL.md")
    soul = "# Soul\nYou answer like a pirate. <script>window.__xss=3</script>\n"
    await p.page.fill("#file-content", soul)
    await p.page.click("#file-save")
    await p.page.wait_for_selector("#file-form p.notice.info")
    path = site.data_root / "users" / p.user_id / "workspace" / "SOUL.md"
    assert path.read_text() == soul
    await p.goto("files?f=MEMORY.md")
    await p.goto("files?f=SOUL.md")
    assert await p.page.input_value("#file-content") == soul
    assert await p.page.evaluate("window.__xss === undefined")
    await p.shoot("files")
    # Over the limit: the page refuses to send it, and says so.
    await p.page.fill("#file-content", "x" * (64 * 1024 + 1))
    assert await p.page.locator("#file-save").is_disabled()
    assert "over" in (await p.page.get_attribute("#file-size", "class"))
    assert path.read_text() == soul


async def test_stop_then_start_from_the_page(alice):
    p = alice
    await p.goto("agent")
    await p.page.click("#agent-stop")
    await p.page.wait_for_selector("#agent-state[data-state='stopped']", timeout=60_000)
    await p.shoot("agent-stopped")
    await p.page.click("#agent-start")
    await p.page.wait_for_selector("#agent-state[data-state='running']", timeout=60_000)


async def test_pairing_page(alice):
    p = alice
    await p.goto("pairing")
    await p.page.wait_for_selector("#pairing-empty:not([hidden]), #pairing-list li, p.notice")
    await p.shoot("pairing")


async def test_an_expired_session_goes_to_log_in_and_keeps_the_draft(alice):
    p = alice
    await p.goto("chat")
    await p.page.fill("#chat-input", "half-typed thought")
    await p.ctx.clear_cookies()  # as if the session had expired
    await p.page.click("#chat-send")
    await p.ready("login")
    assert "session has ended" in await p.page.locator("p.notice.info").text_content()
    await p.login(p.name)
    await p.ready("chat")
    assert await p.page.input_value("#chat-input") == "half-typed thought"
    await p.page.fill("#chat-input", "")


async def test_another_account_sees_none_of_it(alice, site, browser):
    bob = await Person.open(browser, site, uname("bob"))
    await bob.signup(bob.name)
    await bob.page.wait_for_selector("#get-agent")  # no agent of his own; none of alice's
    _, keys = await alice.fetch("GET", "/api/keys")
    for k in keys["keys"]:
        assert (await bob.fetch("DELETE", f"/api/keys/{k['id']}"))[0] == 404
    assert (await bob.fetch("GET", "/api/keys"))[1]["keys"] == []
    assert (await bob.fetch("GET", "/api/agent/files/SOUL.md"))[0] == 404
    assert (await bob.fetch("GET", "/api/agent/pairing"))[0] in (404, 409)
    assert (await bob.fetch("POST", "/api/agent/stop", {}))[0] == 404
    # The proxy: bob's cookie reaches no gateway (he has none), never alice's.
    status, _ = await bob.fetch(
        "POST", "/v1/chat/completions", {"model": "openclaw", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status in (404, 503), status
    await bob.goto("files")
    assert await bob.page.input_value("#file-content") == ""
    await bob.close()
    assert (await alice.fetch("GET", "/api/agent"))[1]["agent"]["state"] == "running"


async def test_operator_pages(alice, site, browser):
    name = uname("root")
    await accounts.create_account(site.plat.store, name, None, PASSWORD, role="operator")
    op = await Person.open(browser, site, name)
    await op.goto("login")
    await op.login(name)
    await op.ready("agent")
    for tab in ("accounts", "instances", "providers", "audit"):
        await op.goto(f"admin?t={tab}")
        await op.page.wait_for_selector("#admin-body table")
        await op.shoot(f"admin-{tab}")
    await op.goto("admin?t=instances")
    assert await op.page.locator(f"tr[data-user='{alice.user_id}']").count() == 1
    assert (await alice.fetch("GET", "/api/admin/accounts"))[0] == 403  # not for users
    assert await alice.page.locator("a[data-nav='admin']").count() == 0
    assert not op.errors, op.errors
    await op.close()


async def test_delete_account_removes_the_agent(alice, site, docker_client):
    p = alice
    await p.goto("account")
    await p.shoot("account")
    assert await p.page.locator("#delete-account").is_disabled()
    await p.page.fill("#f-confirm", p.name)
    await p.page.fill("#delete-form #f-password", PASSWORD)
    await p.page.check("#memory-erase")
    await p.page.click("#delete-account")
    await p.ready("login")
    assert (await p.fetch("GET", "/api/me"))[0] == 401

    def gone() -> bool:
        return not docker_client.containers.list(all=True, filters={"label": f"zaki.user={p.user_id}"})

    await eventually(gone, timeout=60)
    await p.login(p.name)
    await p.page.wait_for_selector("p.notice.error")
    print("\ndashboard figures:", json.dumps(FIGURES, indent=1))
