"""A user's import (POST /api/agent/import): their export comes back into their own agent; a
hostile archive is refused with a typed code and changes nothing; only the session's own account,
only from our own origin. One dashboard with small import limits for this module."""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import tarfile
import zlib
from pathlib import Path

import httpx
import pytest

from shared import subjects
from shared.events import InstanceDelete, InstanceRequested
from shared.gateway import container_name
from tests.browser.harness import CHROMIUM, CHROMIUM_FLAGS, require_browser
from tests.conftest import JWT_SECRET, STANDIN_IMAGE, new_user
from tests.test_backup_dashboard import seed
from tests.test_backup_platform import ready, rows
from tests.test_backup_platform import seed as seed_state
from tests.test_dashboard_api import ORIGIN, PASSWORD, PREFIX, Browser, new_name, signed_up
from zaki.stack import Process, free_port, wait_for_port

MAX_BYTES = 1 << 20
MAX_UNPACKED = 4 << 20
MAX_ENTRIES = 200
_DASH: dict[str, Process] = {}


@pytest.fixture
def dashboard(stack, service_env) -> Process:
    """Small import limits; its own address is one of its origins (the browser test uses it)."""
    p = _DASH.get("d")
    if p is None or p.proc.poll() is not None:
        port = free_port()
        address = f"http://127.0.0.1:{port}"
        env = {
            **service_env,
            "ZAKI_DASHBOARD_PORT": str(port),
            "ZAKI_JWT_SECRET": JWT_SECRET,
            "ZAKI_DASHBOARD_USER_PREFIX": PREFIX,
            "ZAKI_DASHBOARD_GATEWAY_IMAGE": STANDIN_IMAGE,
            "ZAKI_PROXY_PUBLIC_ORIGIN": "http://127.0.0.1:8080",
            "ZAKI_DASHBOARD_PUBLIC_ORIGIN": f"{ORIGIN},{address}",
            "ZAKI_DASHBOARD_IMPORT_MAX_BYTES": str(MAX_BYTES),
            "ZAKI_DASHBOARD_IMPORT_MAX_UNPACKED_BYTES": str(MAX_UNPACKED),
            "ZAKI_DASHBOARD_IMPORT_MAX_ENTRIES": str(MAX_ENTRIES),
        }
        p = stack.start_service("services.dashboard", env)
        wait_for_port("127.0.0.1", port, p.proc, "dashboard")
        p.address = address
        _DASH["d"] = p
    return p


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under *root* with its content (None: a directory), links not followed."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def targz(*members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", **pax: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    if pax:
        info.pax_headers = pax
    return info


def memory(text: bytes = b"imported") -> tuple[tarfile.TarInfo, bytes]:
    return member("workspace/MEMORY.md"), text


async def send(b: Browser, body: bytes, ctype: str = "application/gzip", **headers: str) -> httpx.Response:
    return await b.http.post("/api/agent/import", content=body, headers={"Content-Type": ctype, **headers})


async def test_export_then_import_brings_the_agent_back(dashboard, settings, store) -> None:
    async with await signed_up(dashboard.address) as user:
        uid = user.user["id"]
        folder = seed(settings, uid, "tea, not coffee")
        config = (folder / ".openclaw" / "openclaw.json").read_bytes()
        r = await user.http.get("/api/agent/export")
        assert r.status_code == 200
        exported = r.content
        # Unchanged folder: the import puts back exactly what the export held.
        r = await send(user, exported)
        assert r.status_code == 200, r.text
        assert r.json()["user_id"] == uid and r.json()["restarted"] is False
        assert (folder / "workspace" / "MEMORY.md").read_text() == "tea, not coffee"
        # A changed folder comes back to the export; the instance's own config stays.
        (folder / "workspace" / "MEMORY.md").write_text("lost")
        (folder / "workspace" / "new.md").write_text("after the export")
        r = await send(user, exported, "application/x-tar+gzip")
        assert r.status_code == 200, r.text
        assert (folder / "workspace" / "MEMORY.md").read_text() == "tea, not coffee"
        assert not (folder / "workspace" / "new.md").exists()
        assert (folder / ".openclaw" / "openclaw.json").read_bytes() == config
        st = os.stat(folder / "workspace" / "MEMORY.md")
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        assert not list((Path(settings.data_root) / "users" / ".backup-work").glob(f"import-{uid}-*"))
        # Audited as the account's own action.
        rec = await store.db["audit"].find_one({"action": "backup.import", "target": uid})
        assert rec is not None and rec["actor"] == uid and rec["detail"]["files"] >= 1
        # The OpenAPI document says the body is a file, not JSON.
        doc = (await user.http.get("/api/openapi.json")).json()
        content = doc["paths"]["/api/agent/import"]["post"]["requestBody"]["content"]
        assert content == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def _hostile() -> list[tuple[str, bytes, str]]:
    dev = member("workspace/null", tarfile.CHRTYPE)
    dev.devmajor, dev.devminor = 1, 3
    many = [(member(f"workspace/f{i}"), b"") for i in range(MAX_ENTRIES + 1)]
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        info, data = memory()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return [
        ("absolute path", targz(memory(), (member("/tmp/zaki-import-abs"), b"x")), "unsafe_path"),
        ("dot-dot", targz(memory(), (member("workspace/../../escaped"), b"x")), "unsafe_path"),
        (
            "symlink out",
            targz(memory(), (member("workspace/l", tarfile.SYMTYPE, "/etc/passwd"), None)),
            "link",
        ),
        (
            "hard link out",
            targz((member("workspace/h", tarfile.LNKTYPE, "../../../etc/passwd"), None)),
            "link",
        ),
        ("device", targz(memory(), (dev, None)), "special_file"),
        ("fifo", targz(memory(), (member("workspace/p", tarfile.FIFOTYPE), None)), "special_file"),
        ("config", targz(memory(), (member(".openclaw/openclaw.json"), b"{}")), "forbidden_file"),
        ("key", targz(memory(), (member(".openclaw/identity/device.key"), b"k")), "forbidden_file"),
        ("twice", targz(memory(), memory(b"again")), "path_conflict"),
        ("bomb", targz((member("workspace/zeros"), bytes(MAX_UNPACKED + 1))), "too_large"),
        (
            "header bomb",
            targz(
                (member("workspace/a", comment="A" * (MAX_UNPACKED + 1 << 1)), b"x"), fmt=tarfile.PAX_FORMAT
            ),
            "too_large",
        ),
        ("entries", targz(*many), "too_many_entries"),
        ("not gzip", b"PK\x03\x04 not a gzip file", "not_gzip"),
        ("plain tar", plain.getvalue(), "not_gzip"),
        ("broken gzip", gzip.compress(os.urandom(8192))[:-100], "bad_archive"),
        ("gzip, not tar", gzip.compress(b"hello " * 1000), "bad_archive"),
    ]


async def test_hostile_archives_are_refused_with_a_code_and_change_nothing(dashboard, settings) -> None:
    async with await signed_up(dashboard.address) as user:
        folder = seed(settings, user.user["id"], "mine")
        before = tree(folder)
        for what, body, code in _hostile():
            assert len(body) <= MAX_BYTES, what
            r = await send(user, body)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (what, r.text)
            assert tree(folder) == before, what
        assert not Path("/tmp/zaki-import-abs").exists()
        assert not (Path(settings.data_root) / "users" / "escaped").exists()
        # Over the upload limit: 413 before the archive is looked at.
        r = await send(user, os.urandom(MAX_BYTES + 1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        # Not a gzip media type (e.g. a form post): 415.
        r = await send(user, targz(memory()), "multipart/form-data; boundary=x")
        assert r.status_code == 415
        assert tree(folder) == before


async def test_only_the_sessions_own_account_and_only_from_our_origin(dashboard, settings) -> None:
    async with await signed_up(dashboard.address) as a, await signed_up(dashboard.address) as b:
        folder_a = seed(settings, a.user["id"], "a's memory")
        folder_b = seed(settings, b.user["id"], "b's memory")
        before_a = tree(folder_a)
        # B's import goes into B's agent: the route names no user, the session does.
        r = await send(b, targz(memory(b"written by b")))
        assert r.status_code == 200, r.text
        assert r.json()["user_id"] == b.user["id"]
        assert (folder_b / "workspace" / "MEMORY.md").read_bytes() == b"written by b"
        assert tree(folder_a) == before_a
        # An account whose agent has no data yet: 404, and no folder appears.
        async with await signed_up(dashboard.address) as c:
            r = await send(c, targz(memory(b"early")))
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
            assert not (Path(settings.data_root) / "users" / c.user["id"]).exists()
        # A database the export kept as raw bytes (unreadable) comes back as it was, never opened.
        torn = b"SQLite format 3\x00" + bytes(4080)
        r = await send(b, targz(memory(b"b again"), (member(".openclaw/state/torn.sqlite"), torn)))
        assert r.status_code == 200, r.text
        assert (folder_b / ".openclaw" / "state" / "torn.sqlite").read_bytes() == torn
        # No session: 401.
        async with httpx.AsyncClient(base_url=dashboard.address, headers={"Origin": ORIGIN}) as anon:
            r = await anon.post(
                "/api/agent/import", content=targz(memory()), headers={"Content-Type": "application/gzip"}
            )
            assert r.status_code == 401
        # A's cookie on a cross-site POST, or with no Origin at all: refused before the body is read.
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}):
            r = await send(a, targz(memory(b"csrf")), **headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", r.text
        bare = httpx.AsyncClient(base_url=dashboard.address, cookies=a.http.cookies)
        try:
            r = await bare.post(
                "/api/agent/import",
                content=targz(memory(b"csrf")),
                headers={"Content-Type": "application/gzip"},
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        finally:
            await bare.aclose()
        assert tree(folder_a) == before_a
        await asyncio.sleep(0)


async def test_import_onto_a_running_agent_stops_swaps_and_starts_it(
    dashboard, provisioner, platform, fakes, settings, store, docker_client
) -> None:
    async with await signed_up(dashboard.address) as user:
        uid = user.user["id"]
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=uid, bot_token=fakes.bot(), image=STANDIN_IMAGE
        )
        subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
        assert subject == subjects.INSTANCE_READY
        try:
            seed_state(settings, uid, "remember: tea", 1000)
            config = (Path(settings.data_root) / "users" / uid / ".openclaw" / "openclaw.json").read_bytes()
            exported = (await user.http.get("/api/agent/export")).content
            seed_state(settings, uid, "overwritten", 3)
            started = docker_client.containers.get(container_name(uid)).attrs["State"]["StartedAt"]
            r = await send(user, exported)
            assert r.status_code == 200 and r.json()["restarted"] is True, r.text
            print(
                f"\nimport onto a running stand-in (1,000 rows; stop, swap, start): {r.json()['seconds']:.2f} s"
            )
            root = Path(settings.data_root) / "users" / uid
            assert (root / "workspace" / "MEMORY.md").read_text() == "remember: tea"
            assert rows(settings, uid) == 1000
            assert (root / ".openclaw" / "openclaw.json").read_bytes() == config
            doc = await store.get_instance(uid)
            assert doc["state"] == "running" and await ready(doc["port"], uid)
            assert docker_client.containers.get(container_name(uid)).attrs["State"]["StartedAt"] != started
        finally:
            await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=uid, purge=True), timeout=60)


async def test_the_account_page_downloads_and_imports_the_agents_data(dashboard, settings, tmp_path) -> None:
    require_browser()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            ctx = await browser.new_context(base_url=dashboard.address, accept_downloads=True)
            page = await ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
            await page.goto("/#/signup")
            await page.fill("#f-username", new_name("web"))
            await page.fill("#f-password", PASSWORD)
            await page.click("form button[type=submit]")
            await page.wait_for_selector("main[data-page='agent'][data-ready='1']")
            uid = await page.evaluate("fetch('/api/me').then((r) => r.json()).then((j) => j.user.id)")
            folder = seed(settings, uid, "tea, from the page")
            await page.goto("/#/account")
            await page.wait_for_selector("main[data-page='account'][data-ready='1']")
            async with page.expect_download() as info:
                await page.click("#export-link")
            exported = tmp_path / "agent.tar.gz"
            await (await info.value).save_as(exported)
            (folder / "workspace" / "MEMORY.md").write_text("lost")
            # A file that is not an export: the page shows the API's code; nothing changes.
            (tmp_path / "notes.tar.gz").write_bytes(b"not a gzip file")
            await page.set_input_files("#import-file", str(tmp_path / "notes.tar.gz"))
            await page.click("#import-button")
            err = page.locator("#data-form p.notice.error:not([hidden])")
            await err.wait_for()
            assert "not_gzip" in await err.inner_text()
            assert (folder / "workspace" / "MEMORY.md").read_text() == "lost"
            await page.set_input_files("#import-file", str(exported))
            await page.click("#import-button")
            await page.wait_for_selector("#data-form p.notice.info:not([hidden])")
            assert (folder / "workspace" / "MEMORY.md").read_text() == "tea, from the page"
            assert not errors, errors
        finally:
            await browser.close()


def _pax_bomb(path: Path, comment_bytes: int) -> None:
    """A valid tar.gz whose one pax header holds *comment_bytes* (tarfile reads it whole), built
    streaming: a few MiB on disk."""
    body = b" comment="
    rest = len(body) + comment_bytes + 1  # the record: "<length> comment=<value>\n"
    length = rest + len(str(rest))
    length = rest + len(str(length))
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type, hdr.size = tarfile.XHDTYPE, length
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        f.write(z.compress(hdr.tobuf(tarfile.USTAR_FORMAT)))
        f.write(z.compress(str(length).encode() + body))
        chunk = b"A" * (1 << 20)
        left = comment_bytes
        while left:
            f.write(z.compress(chunk[: min(left, len(chunk))]))
            left -= min(left, len(chunk))
        f.write(z.compress(b"\n" + bytes(-length % 512)))
        info = tarfile.TarInfo("workspace/a")
        info.size = 1
        f.write(z.compress(info.tobuf(tarfile.USTAR_FORMAT) + b"x" + bytes(511) + bytes(1024)))
        f.write(z.flush())


def test_a_header_larger_than_the_checkers_memory_is_refused(tmp_path) -> None:
    """Within the unpacked-size budget, a 900 MiB pax header would sit in memory whole: the checker's
    address-space limit (768 MiB) ends that in its own process, as a typed refusal."""
    import subprocess
    import sys

    archive = tmp_path / "bomb.tar.gz"
    _pax_bomb(archive, 900 << 20)
    assert archive.stat().st_size < 8 << 20  # far under the 64 MiB upload limit
    args = [str(archive), str(tmp_path / "out"), str(4 << 30), "1000"]
    r = subprocess.run(
        [sys.executable, "-S", "-m", "services.dashboard.import_check", *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and '"code": "too_large"' in r.stdout, (r.returncode, r.stdout, r.stderr[-500:])
    assert not (tmp_path / "out").exists()
