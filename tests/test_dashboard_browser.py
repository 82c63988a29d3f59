"""The web dashboard in a real browser (Debian's Chromium, headless, driven by Playwright) on a
platform of its own with stand-in gateways: a person signs up, gets an agent, chats with it,
shapes and runs it, and deletes it; another person sees none of it; an operator administers.
Each page is screenshotted at desktop and phone width into docs/screenshots/.

The tests in this module run in order and share the people they create (module fixtures)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest

from services.dashboard import accounts
from services.dashboard.pages import STATIC
from tests.browser.harness import (
    CHROMIUM,
    CHROMIUM_FLAGS,
    DESKTOP,
    PHONE,
    Site,
    curl_first_token,
    require_browser,
    shots_dir,
    start_site,
)
from tests.conftest import REAL_IMAGE, eventually

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
        folder = shots_dir()
        folder.mkdir(parents=True, exist_ok=True)
        for size, tag in ((DESKTOP, "desktop"), (PHONE, "phone")):
            await self.page.set_viewport_size(size)
            await self.page.wait_for_timeout(150)
            await self.page.screenshot(path=str(folder / f"{name}-{tag}.png"))
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
async def real_site(tmp_path_factory, fakes, keyring_spec, docker_client):
    require_browser()
    s = await start_site(tmp_path_factory.mktemp("dashboard-real"), fakes, keyring_spec, image=REAL_IMAGE)
    yield s
    await s.front.close()
    await s.plat.close(docker_client)


async def with_agent(
    site: Site, browser, fakes, prefix: str, ready_timeout_s: float, shoot: bool = False
) -> Person:
    """Signs up and gets an agent through the pages; the agent is running when this returns."""
    p = await Person.open(browser, site, uname(prefix))
    await p.signup(p.name)
    await p.page.wait_for_selector("#get-agent")
    if shoot:
        await p.shoot("get-agent")
    p.bot_username = f"{p.name}_bot"
    token = p.bot_token = fakes.bot(p.bot_username)
    await p.page.fill("#f-bot_token", token)
    t0 = time.perf_counter()
    await p.page.click("#get-agent button[type=submit]")
    await p.page.wait_for_selector("#agent-state[data-state='running']", timeout=ready_timeout_s * 1000)
    p.submit_to_running_s = round(time.perf_counter() - t0, 2)
    _, body = await p.fetch("GET", "/api/agent")
    p.time_to_ready_s = body["agent"]["history"][-1]["elapsed_s"]
    p.user_id = (await p.fetch("GET", "/api/me"))[1]["user"]["id"]
    return p


@pytest.fixture(scope="module")
async def alice(site, browser, fakes):
    """A person with an agent on the stand-in gateway."""
    p = await with_agent(site, browser, fakes, "alice", 120, shoot=True)
    FIGURES["standin_submit_to_running_s"] = p.submit_to_running_s
    FIGURES["standin_provisioner_time_to_ready_s"] = p.time_to_ready_s
    yield p
    assert not p.errors, p.errors
    await p.close()


@pytest.fixture(scope="module")
async def carol(real_site, browser, fakes):
    """A person with an agent on the real OpenClaw gateway."""
    p = await with_agent(real_site, browser, fakes, "carol", 300)
    FIGURES["real_submit_to_running_s"] = p.submit_to_running_s
    FIGURES["real_provisioner_time_to_ready_s"] = p.time_to_ready_s
    yield p
    assert not p.errors, p.errors
    await p.close()


# --- the tests, in the order a person meets the pages ---------------------------------------


HTML_SINKS = re.compile(
    r"\.innerHTML|\.outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|setAttribute\(\s*[\"']on|\.style\.cssText"
)


def test_pages_never_turn_strings_into_markup():
    """The pages' one rule for user text: DOM nodes and textContent only, never an HTML parser
    (the CSP forbids inline code too; this keeps the source honest)."""
    sources = sorted(STATIC.rglob("*.js"))
    assert len(sources) >= 10
    found = [
        f"{path.relative_to(STATIC)}:{n}: {line.strip()}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if HTML_SINKS.search(line.split("//", 1)[0])
    ]
    assert not found, found
    index = (STATIC / "index.html").read_text()
    assert "<script>" not in index and " style=" not in index and " on" not in index.split("<body>")[1]


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
    doc = await page.goto("/")
    csp = (await doc.all_headers()).get("content-security-policy", "")
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp, csp
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


ALLOWED_TAGS = {
    "P",
    "BR",
    "H4",
    "H5",
    "H6",
    "UL",
    "OL",
    "LI",
    "BLOCKQUOTE",
    "PRE",
    "CODE",
    "STRONG",
    "EM",
    "A",
}
HOSTILE_MARKDOWN = [
    "<script>window.__xss=1</script>",
    "<img src=x onerror=window.__xss=1>",
    "[click](javascript:window.__xss=1)",
    "[click](JaVaScRiPt:window.__xss=1)",
    "[data](data:text/html,<script>window.__xss=1</script>)",
    "[rel](/api/me) [proto](//evil.example/x)",
    "**<b onmouseover=x>bold</b>** *<i>it</i>* `<code>`",
    "```\n</code></pre><script>window.__xss=1</script>\n```",
    "> <iframe src=javascript:window.__xss=1></iframe>",
    "- <svg onload=window.__xss=1>\n1. <a href=javascript:x>y</a>",
    "# <style>body{display:none}</style>",
    "[ok](https://example.org/a?b=1&c=<x>) [mail](mailto:a@example.org)",
]


async def test_markdown_renderer_makes_only_safe_elements(site, browser):
    """The chat's renderer on hostile input, in the browser: only the subset's elements, links
    only to absolute http(s)/mailto URLs, and no script ever runs."""
    ctx = await browser.new_context(base_url=site.origin)
    page = await ctx.new_page()
    await page.goto("/")
    rendered = await page.evaluate(
        """async (cases) => {
            const md = await import("/assets/js/md.js");
            return cases.map((c) => {
                const d = document.createElement("div");
                d.append(md.render(c));
                document.body.append(d);
                return {tags: [...d.querySelectorAll("*")].map((e) => e.tagName),
                        attrs: [...d.querySelectorAll("*")].flatMap((e) => e.getAttributeNames()),
                        hrefs: [...d.querySelectorAll("a")].map((a) => a.getAttribute("href")),
                        text: d.textContent};
            });
        }""",
        HOSTILE_MARKDOWN,
    )
    await page.wait_for_timeout(200)  # an injected handler would have fired by now
    assert await page.evaluate("window.__xss === undefined")
    for case, out in zip(HOSTILE_MARKDOWN, rendered, strict=True):
        assert set(out["tags"]) <= ALLOWED_TAGS, (case, out)
        assert set(out["attrs"]) <= {"href", "rel", "target"}, (case, out)
        assert all(h.startswith(("https://", "http://", "mailto:")) for h in out["hrefs"]), (case, out)
    assert rendered[0]["text"] == HOSTILE_MARKDOWN[0]  # shown, not run
    assert rendered[-1]["hrefs"] == ["https://example.org/a?b=1&c=%3Cx%3E", "mailto:a@example.org"]
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
    assert alice.submit_to_running_s <= alice.time_to_ready_s + 2, FIGURES
    link = alice.page.locator("#bot-link")
    assert await link.get_attribute("href") == f"https://t.me/{alice.bot_username}"
    assert await alice.page.locator("#steps li.done").count() == 4
    # The monitor's first probes reach the page as health events.
    await alice.page.wait_for_selector("#agent-health[data-health='healthy']", timeout=30_000)
    await alice.shoot("agent")


async def chat(p: Person, text: str, timeout_s: float = 60) -> str:
    """Sends from the chat page; returns the streamed answer's text once it is complete."""
    before = await p.page.locator(".msg.assistant[data-done='1']").count()
    await p.page.fill("#chat-input", text)
    await p.page.click("#chat-send")
    answer = p.page.locator(".msg.assistant[data-done='1']").nth(before)
    await answer.wait_for(timeout=timeout_s * 1000)
    p.last_answer = answer
    return await answer.text_content()


async def test_web_chat_streams_the_agents_answer_and_renders_markdown_safely(alice, fakes):
    p = alice
    await p.goto("chat")
    hostile = "hello **world** <img src=x onerror=window.__xss=1> [x](javascript:window.__xss=2)"
    text = await chat(p, hostile)
    assert "echo: hello" in text and "<img src=x onerror" in text, text  # shown as text
    assert await p.last_answer.locator("strong").text_content() == "world"  # markdown applied
    assert await p.page.locator(".msg img, .msg a[href^='javascript']").count() == 0
    assert await p.page.evaluate("window.__xss === undefined")
    # The agent's first answer ever includes its cold start; the next one is the steady figure.
    FIGURES["chat_first_token_page_cold_ms"] = int(await p.last_answer.get_attribute("data-first-token-ms"))
    text = await chat(p, "Here is a list:\n- one\n- `two`\n\n```\nprint('three')\n```")
    FIGURES["chat_first_token_page_ms"] = int(await p.last_answer.get_attribute("data-first-token-ms"))
    assert await p.last_answer.locator("li").count() == 2
    assert await p.last_answer.locator("pre code").text_content() == "print('three')"
    await p.shoot("chat")
    # The conversation is listed (this browser remembers it even where the gateway keeps no list).
    await p.goto("chat")
    assert await p.page.locator("#conversations a[aria-current='true']").count() == 1


async def test_api_key_create_shown_once_then_revoked_gets_401(alice, site):
    p = alice
    await p.goto("keys")
    await p.page.click("#key-create")
    key = await p.page.locator("#new-key-value").text_content()
    assert key.startswith("zk_")
    await p.shoot("keys")
    # The key works on the proxy, as curl would use it; and gives the curl side of the chat figure.
    first_s, starttransfer_s, out = await curl_first_token(site.proxy, key, "hi from curl")
    assert "echo: hi from curl" in out
    FIGURES["chat_first_token_curl_ms"] = round(first_s * 1000)
    FIGURES["chat_first_byte_curl_ms"] = round(starttransfer_s * 1000)
    _, listed = await p.fetch("GET", "/api/keys")
    assert all("key" not in k for k in listed["keys"])  # never shown again
    key_id = next(k["id"] for k in listed["keys"] if k["state"] == "active")
    await p.page.click(f"button[data-revoke='{key_id}']")
    await p.page.wait_for_selector(f"tr[data-key='{key_id}'][data-state='revoked']")
    async with httpx.AsyncClient(base_url=site.proxy) as http:
        r = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401


async def test_soul_md_edit_is_saved_escaped_and_limited(alice, site):
    p = alice
    marker = f"pirate-{uuid.uuid4().hex[:8]}"
    await p.goto("files?f=SOUL.md")
    soul = f"# Soul\nYou answer like a pirate ({marker}). <script>window.__xss=3</script>\n"
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


async def test_stop_then_start_from_the_page(alice, docker_client):
    p = alice
    await p.goto("agent")
    await p.page.click("#agent-stop")
    await p.page.wait_for_selector("#agent-state[data-state='stopped']", timeout=60_000)
    await p.shoot("agent-stopped")
    await p.page.click("#agent-start")
    await p.page.wait_for_selector("#agent-state[data-state='running']", timeout=60_000)
    await p.page.wait_for_selector("#agent-restart:not([disabled])")
    gateway = docker_client.containers.list(filters={"label": f"zaki.user={p.user_id}"})[0]
    started = gateway.attrs["State"]["StartedAt"]
    await p.page.click("#agent-restart")
    await p.page.wait_for_selector("text=Restart requested.", timeout=10_000)
    # The gateway really went round (a stand-in is back within a second or two: the page's
    # "starting" step can come and go between two looks, so the container says it).
    await eventually(lambda: _started_at(docker_client, p.user_id) not in (None, started), timeout=60)
    await p.page.wait_for_selector("#agent-state[data-state='running']", timeout=60_000)


def _started_at(client, user_id: str) -> str | None:
    running = client.containers.list(filters={"label": f"zaki.user={user_id}"})
    return running[0].attrs["State"]["StartedAt"] if running else None


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
    # A token Telegram does not know, then alice's: clear messages that name no other account.
    for token, words in (("123456789:" + "A" * 35, "telegram"), (alice.bot_token, "another")):
        await bob.page.fill("#f-bot_token", token)
        await bob.page.click("#get-agent button[type=submit]")
        err = bob.page.locator("#get-agent p.notice.error:not([hidden])")
        await err.wait_for()
        message = (await err.text_content()).lower()
        assert words in message and alice.name not in message, message
        await bob.page.fill("#f-bot_token", "")
    assert (await bob.fetch("GET", "/api/agent"))[1]["agent"] is None
    _, keys = await alice.fetch("GET", "/api/keys")
    for k in keys["keys"]:
        assert (await bob.fetch("DELETE", f"/api/keys/{k['id']}"))[0] == 404
    assert (await bob.fetch("GET", "/api/keys"))[1]["keys"] == []
    assert (await bob.fetch("GET", "/api/agent/files/SOUL.md"))[0] == 404
    assert (await bob.fetch("GET", "/api/agent/pairing"))[0] in (404, 409)
    assert (await bob.fetch("POST", "/api/agent/stop", {}))[0] == 404
    # The page's chat: bob has no gateway, so nothing is relayed (never to alice's).
    status, body = await bob.fetch(
        "POST",
        "/api/chat/completions",
        {"model": "openclaw", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 404 and body["error"]["code"] == "not_found", (status, body)
    await bob.goto("files")
    assert await bob.page.input_value("#file-content") == ""
    await bob.close()
    assert (await alice.fetch("GET", "/api/agent"))[1]["agent"]["state"] == "running"


async def test_password_change_then_log_out_and_in_again(site, browser):
    p = await Person.open(browser, site, uname("erin"))
    await p.signup(p.name)
    await p.goto("account")
    new = PASSWORD + " renewed"
    await p.page.fill("#f-current_password", "not my password at all")
    await p.page.fill("#f-new_password", new)
    await p.page.click("#password-form button[type=submit]")
    err = p.page.locator("#password-form p.notice.error:not([hidden])")
    await err.wait_for()  # a wrong current password changes nothing
    await p.page.fill("#f-current_password", PASSWORD)
    await p.page.click("#password-form button[type=submit]")
    await p.page.wait_for_selector("#password-form p.notice.info:not([hidden])")
    await p.page.click("#logout")
    await p.ready("login")
    assert (await p.fetch("GET", "/api/me"))[0] == 401
    await p.login(p.name, PASSWORD)
    await p.page.wait_for_selector("main[data-page='login'] p.notice.error:not([hidden])")
    await p.login(p.name, new)
    await p.ready("agent")
    assert not p.errors, p.errors
    await p.close()


async def test_operator_pages(alice, site, browser):
    name = uname("root")
    await accounts.create_account(site.plat.store, name, None, PASSWORD, role="operator")
    op = await Person.open(browser, site, name)
    await op.goto("login")
    await op.login(name)
    await op.ready("agent")
    # An action from the page: disabling an account ends its session at once and is audited.
    dave = await Person.open(browser, site, uname("dave"))
    await dave.signup(dave.name)
    dave_id = (await dave.fetch("GET", "/api/me"))[1]["user"]["id"]
    await op.goto("admin?t=accounts")
    await op.page.click(f"tr[data-user='{dave_id}'] button:has-text('Disable')")
    await op.page.wait_for_selector(f"tr[data-user='{dave_id}'] button:has-text('Enable')")
    assert (await dave.fetch("GET", "/api/me"))[0] in (401, 403)
    await dave.close()
    for tab in ("accounts", "instances", "providers", "audit"):
        await op.goto(f"admin?t={tab}")
        await op.page.wait_for_selector("#admin-body table")
        await op.shoot(f"admin-{tab}")
    assert dave_id in await op.page.locator("#admin-body").text_content()  # the audit tab, last shot
    await op.goto("admin?t=instances")
    assert await op.page.locator(f"tr[data-user='{alice.user_id}']").count() == 1
    assert (await alice.fetch("GET", "/api/admin/accounts"))[0] == 403  # not for users
    assert await alice.page.locator("a[data-nav='admin']").count() == 0
    assert not op.errors, op.errors
    await op.close()


@pytest.mark.gateway
async def test_real_gateway_a_stranger_asks_the_owner_approves_the_agent_answers(carol, fakes):
    """Telegram pairing end to end: the stranger's request shows on the page, is approved there,
    and the stranger's next message gets the agent's answer through Telegram."""
    p, tg = carol, fakes.telegram
    stranger = 700_000 + uuid.uuid4().int % 100_000
    await p.goto("pairing")
    await p.page.wait_for_selector("#pairing-empty:not([hidden])", timeout=60_000)
    tg.inject_message(p.bot_token, "hello bot", chat_id=stranger)
    item = p.page.locator("li.pairing")
    await item.wait_for(timeout=30_000)  # the page polls every 5 s
    assert str(stranger) in await item.text_content()
    await p.shoot("pairing")
    await item.locator("button[data-action='approve']").click()
    notice = p.page.locator("main p.notice:not([hidden])").first
    await notice.wait_for(timeout=60_000)  # the gateway's answer, whichever it is
    assert "can now talk" in await notice.text_content(), await notice.text_content()
    await p.page.wait_for_selector("#pairing-empty:not([hidden])")
    t0 = time.perf_counter()
    tg.inject_message(p.bot_token, "may I talk now?", chat_id=stranger)

    def answered() -> bool:
        return any(
            str(m["chat_id"]) == str(stranger) and "may I talk now?" in str(m["text"])
            for m in tg.answers(p.bot_token)
        )

    await eventually(answered, timeout=180)  # the agent's first answer ever includes its cold start
    FIGURES["real_approved_stranger_answered_s"] = round(time.perf_counter() - t0, 1)


@pytest.mark.gateway
async def test_real_gateway_uses_soul_md_and_keeps_the_chat_history(carol, real_site, fakes):
    """SOUL.md saved on the page is in the agent's very next model call; the web conversation's
    history comes back from the gateway on a new visit; the first answer's time is recorded."""
    p = carol
    marker = f"pirate-{uuid.uuid4().hex[:8]}"
    await p.goto("files?f=SOUL.md")
    await p.page.fill("#file-content", f"# Soul\nYou answer like a pirate ({marker}).\n")
    await p.page.click("#file-save")
    await p.page.wait_for_selector("#file-form p.notice.info")
    await p.goto("chat")
    t0 = time.perf_counter()
    text = await chat(p, "who are you?", timeout_s=180)
    FIGURES["real_first_answer_page_s"] = round(time.perf_counter() - t0, 2)
    FIGURES["real_chat_first_token_page_cold_ms"] = int(
        await p.last_answer.get_attribute("data-first-token-ms")
    )
    assert "echo: who are you?" in text
    assert any(marker in json.dumps(c) for c in fakes.llm.calls)
    await chat(p, "and now?", timeout_s=120)
    FIGURES["real_chat_first_token_page_ms"] = int(await p.last_answer.get_attribute("data-first-token-ms"))
    # The same call with curl and an API key, on the proxy's origin.
    status, created = await p.fetch("POST", "/api/keys", {"scopes": ["chat"]})
    assert status == 201, created
    first_s, starttransfer_s, out = await curl_first_token(real_site.proxy, created["key"], "and curl?")
    assert "echo: and curl?" in out
    FIGURES["real_chat_first_token_curl_ms"] = round(first_s * 1000)
    FIGURES["real_chat_first_byte_curl_ms"] = round(starttransfer_s * 1000)
    await p.goto("agent")
    await p.goto("chat")
    await p.page.wait_for_selector(".msg.user >> text=and now?", timeout=30_000)
    await p.page.wait_for_selector(".msg.assistant >> text=echo: and now?")


@pytest.mark.gateway
async def test_real_gateway_answer_can_be_stopped(carol):
    """Stop while the agent is still writing: the page keeps what came and says it stopped."""
    p = carol
    await p.goto("chat")
    before = await p.page.locator(".msg.assistant").count()
    # The fake model streams a "slow …" answer one word every 0.2 s.
    await p.page.fill("#chat-input", "slow " + " ".join(f"w{i}" for i in range(40)))
    await p.page.click("#chat-send")
    answer = p.page.locator(".msg.assistant").nth(before)
    await answer.locator(".body >> text=w1").wait_for(timeout=120_000)
    await p.page.click("#chat-stop")
    await answer.locator(".stopped").wait_for()
    assert "w39" not in await answer.text_content()
    assert await p.page.locator("#chat-send").is_visible()  # ready for the next message


@pytest.mark.gateway
async def test_control_ui_link_opens_the_gateways_ui_with_the_session_cookie(carol):
    p = carol
    await p.goto("agent")
    async with p.ctx.expect_page() as opened:
        await p.page.click("#control-ui")
    ui = await opened.value
    await ui.wait_for_load_state()
    # The Control UI is a single-page app: once loaded it may move on to a route of its own (/ui/chat/main).
    assert urlsplit(ui.url).path.startswith("/ui/"), ui.url
    # The gateway's own page through the proxy: the session cookie is what lets the browser in.
    assert await ui.evaluate("fetch(location.href).then((r) => r.status)") == 200
    await p.ctx.clear_cookies()
    assert await ui.evaluate("fetch(location.href).then((r) => r.status)") == 401
    await ui.close()
    await p.page.goto("/#/login")
    await p.page.reload()  # a fresh start of the app: nobody logged in
    await p.ready("login")
    await p.login(p.name)
    await p.ready("agent")


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


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    yield
    print("\ndashboard figures:", json.dumps(FIGURES, indent=1))
