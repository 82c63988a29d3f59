"""`zaki up` itself: secret files owner-only from their first byte, the stand-in echo image only
with --demo, and a warning when ZAKI_LLM_* disagree with the provider the broker stored."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SESSION, STANDIN_IMAGE, eventually, new_user
from zaki.cli.up import allowed_images
from zaki.stack import free_network_pool, free_port

ROOT = Path(__file__).resolve().parent.parent

# Runs in its own interpreter with the given umask. An audit hook (it observes, it replaces
# nothing) lists the state folder at every audited operation - every open, chmod, rename, link -
# so a file that ever exists with a wider mode, even between its creation and a chmod, is seen.
WATCH = r"""
import json, os, stat, sys
from pathlib import Path
state = Path(sys.argv[1])
os.umask(int(sys.argv[2], 8))
seen, busy = [], [False]
def watch(event, args):
    if busy[0]:
        return
    busy[0] = True
    try:
        for p in state.iterdir():
            seen.append([p.name, stat.S_IMODE(p.lstat().st_mode)])
    finally:
        busy[0] = False
from zaki.cli.up import secret_keys, write_env
sys.addaudithook(watch)
spec = secret_keys(state)
write_env(state, {"ZAKI_SECRET_KEYS": spec})
write_env(state, {"ZAKI_SECRET_KEYS": spec, "again": "1"})  # replacing keeps it owner-only too
assert secret_keys(state) == spec  # an existing key ring is never replaced
print(json.dumps(seen))
"""


@pytest.mark.parametrize("umask", ["0", "022"])
def test_key_ring_and_env_json_are_owner_only_from_their_first_byte(tmp_path, umask):
    state = tmp_path / "state"
    state.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", WATCH, str(state), umask],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("ZAKI_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    names = {name for name, _ in seen}
    assert {"secret_keys", "env.json"} <= names, names
    wider = [(name, oct(mode)) for name, mode in seen if mode != 0o600]
    assert wider == [], wider
    assert sorted(os.listdir(state)) == ["env.json", "secret_keys"]  # no temporary file left
    for name in ("env.json", "secret_keys"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600


def test_only_demo_allows_the_standin_image(monkeypatch):
    monkeypatch.delenv("ZAKI_ALLOWED_IMAGES", raising=False)
    assert allowed_images(demo=True) == STANDIN_IMAGE
    assert allowed_images(demo=False) == ""
    monkeypatch.setenv("ZAKI_ALLOWED_IMAGES", "zaki/other:1")  # an operator's explicit choice wins
    assert allowed_images(demo=False) == "zaki/other:1"


class Up:
    """`zaki up` as a process, and `zaki` commands against it."""

    def __init__(self, state: Path, env: dict[str, str]) -> None:
        self.state, self.env = state, env

    async def start(self, *flags: str, **settings: str) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zaki.cli", "--state-dir", str(self.state), "up", "--no-build", *flags],
            env={**self.env, **settings},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(await asyncio.to_thread(proc.stdout.readline))
        return proc, "".join(lines)

    @staticmethod
    async def stop(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0

    def settings(self) -> dict[str, str]:
        return json.loads((self.state / "env.json").read_text())

    async def zaki(self, *args: str) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "zaki.cli", "--state-dir", str(self.state), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    async def provider_url(self) -> str | None:
        listed = await self.zaki("providers", "list")
        docs = [json.loads(line) for line in listed.stdout.splitlines()]
        return next((d["base_url"] for d in docs if d["name"] == "zaki"), None)


async def test_up_warns_of_provider_drift_and_only_demo_allows_the_standin(tmp_path, fakes, docker_client):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZAKI_")}
    env.update(
        ZAKI_PLATFORM_ID=f"upwarn-{SESSION}",
        ZAKI_NETWORK_POOL=free_network_pool(),
        ZAKI_PROXY_PORT=str(free_port()),
        ZAKI_DASHBOARD_PORT=str(free_port()),
        # Never the real Telegram, even though nothing here should reach it.
        ZAKI_TELEGRAM_API_BASE=f"http://{fakes.host}:{fakes.tg_port}",
    )
    up = Up(tmp_path / "up", env)
    # 1. --demo: the stand-in is allowed; the broker seeds provider "zaki" with the fake's URL.
    proc, _ = await up.start("--demo")
    try:
        assert up.settings()["ZAKI_ALLOWED_IMAGES"] == STANDIN_IMAGE
        demo_url = await eventually(up.provider_url, timeout=30, interval=0.5)
        assert demo_url == up.settings()["ZAKI_LLM_BASE_URL"]
    finally:
        await up.stop(proc)
    # 2. --demo again: the fake comes back on the same port, so the stored provider still fits.
    proc, text = await up.start("--demo")
    await up.stop(proc)
    assert up.settings()["ZAKI_LLM_BASE_URL"] == demo_url and "warning" not in text, text

    # 3. Plain `zaki up` on the same state: nothing of the demo carries over, the stand-in is
    # refused, and the changed provider settings are named in a warning (never a key).
    proc, text = await up.start(ZAKI_LLM_BASE_URL="https://llm-b.example/v1", ZAKI_LLM_API_KEY="sk-other")
    try:
        settings = up.settings()
        assert settings["ZAKI_ALLOWED_IMAGES"] == "" and "ZAKI_TELEGRAM_PRIVATE_NETWORK" not in settings
        assert "warning: ZAKI_LLM_BASE_URL differs from provider zaki's stored base_url" in text, text
        assert "zaki providers update zaki --base-url 'https://llm-b.example/v1'" in text, text
        assert (
            "warning: ZAKI_LLM_API_KEY differs" in text and "sk-other" not in text and "sk-demo" not in text
        )
        assert await up.provider_url() == demo_url  # the stored one is used, as the warning says
        user = new_user("plain")
        out = await up.zaki("instance", "create", user, "--image", STANDIN_IMAGE, "--bot-token", fakes.bot())
        assert out.returncode == 1, out.stdout + out.stderr
        failed = json.loads(out.stdout)
        assert failed["event"] == "zaki.instance.failed" and "not allowed" in failed["message"], failed
    finally:
        await up.stop(proc)
