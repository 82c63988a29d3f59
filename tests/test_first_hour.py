"""A new operator's first hour, as the README tells it, end to end on the real OpenClaw gateway:

`zaki up --demo` -> two users created with the CLI -> API keys -> a streamed chat and a
WebSocket RPC call for each through the proxy -> `zaki health` shows both healthy -> one
gateway killed comes back by itself -> the other user deleted: its routes answer 503, its
container, port and secrets are gone, and the first user never noticed -> Ctrl-C stops all.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import SESSION, eventually, new_bot_token, operator_connect
from zaki.stack import free_port


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    return [int(p) for p, pp in (line.split() for line in out.splitlines()) if int(pp) == pid]


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


class Operator:
    """Types the README's commands."""

    def __init__(self, state: Path, env: dict[str, str]) -> None:
        self.state, self.env = state, env

    async def zaki(self, *args: str, timeout: float = 300) -> str:
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "zaki.cli", "--state-dir", str(self.state), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout

    async def health(self) -> dict[str, str]:
        rows = (await self.zaki("health")).splitlines()[1:]
        return {r.split()[0]: r.split()[2] for r in rows if r.strip()}


async def streamed_chat(http: httpx.AsyncClient, key: str, text: str) -> str:
    body = {"model": "openclaw", "stream": True, "messages": [{"role": "user", "content": text}]}
    out = ""
    async with http.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as r:
        assert r.status_code == 200, await r.aread()
        async for chunk in r.aiter_text():
            out += chunk
    assert "data: [DONE]" in out
    return "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in out.splitlines()
        if line.startswith("data: {")
    )


async def ws_rpc(base: str, key: str) -> dict:
    async with websockets.connect(
        base.replace("http://", "ws://") + "/ws", additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        assert json.loads(await ws.recv())["event"] == "connect.challenge"
        await ws.send(operator_connect("c1"))
        await ws.send(json.dumps({"type": "req", "id": "c2", "method": "sessions.list", "params": {}}))
        answers: dict[str, dict] = {}
        while "c2" not in answers:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if msg.get("type") == "res":
                answers[msg["id"]] = msg
        assert answers["c1"]["ok"], answers
        return answers["c2"]


@pytest.mark.gateway
async def test_a_new_operators_first_hour(tmp_path, docker_client):
    state = tmp_path / "up"
    proxy_port = free_port()
    platform_id = f"firsthour-{SESSION}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZAKI_")}
    # Only isolation from other test sessions on this engine; everything else is the README's default.
    env.update(ZAKI_PLATFORM_ID=platform_id, ZAKI_NETWORK_POOL=f"10.{160 + int(SESSION, 16) % 30}.0.0/16")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zaki.cli",
            "--state-dir",
            str(state),
            "up",
            "--demo",
            "--no-build",
            "--proxy-port",
            str(proxy_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    children: list[int] = []
    op = Operator(state, env)
    alice, bob = f"alice{SESSION}", f"bob{SESSION}"
    try:
        deadline = time.monotonic() + 120
        while not any("Ctrl-C stops everything" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            lines.append(await asyncio.to_thread(proc.stdout.readline))
        text = "".join(lines)
        for part in (
            "NATS (JetStream)",
            "FerretDB (MongoDB wire)",
            "gateway proxy",
            "LLM broker",
            "monitor metrics",
        ):
            assert part in text, text
        children = _children(proc.pid)
        assert len(children) == 7  # nats, ferretdb, the fakes, four services

        # Two users, created with the CLI, in parallel; both on the real gateway.
        created = await asyncio.gather(
            *(
                op.zaki("instance", "create", u, "--bot-token", new_bot_token(), timeout=240)
                for u in (alice, bob)
            )
        )
        for out in created:
            assert json.loads(out)["event"] == "zaki.instance.ready", out
        keys = {}
        for u in (alice, bob):
            out = await op.zaki("keys", "create", "--user", u)
            keys[u] = re.search(r"(zk_\S+)", out).group(1)

        base = f"http://127.0.0.1:{proxy_port}"
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            for u in (alice, bob):
                assert await streamed_chat(http, keys[u], f"hello {u}") == f"echo: hello {u}"
                assert (await ws_rpc(base, keys[u]))["ok"]

            async def both_healthy():
                h = await op.health()
                return h.get(alice) == "healthy" and h.get(bob) == "healthy"

            await eventually(both_healthy, timeout=60, interval=2)

            # Kill alice's gateway; nobody acts; she is healthy again and answers.
            before = docker_client.containers.get(f"zaki-user-{alice}")
            started_at = before.attrs["State"]["StartedAt"]
            before.kill()

            async def alice_back():
                c = docker_client.containers.get(f"zaki-user-{alice}")
                return (
                    c.attrs["State"]["StartedAt"] != started_at
                    and (await op.health()).get(alice) == "healthy"
                )

            await eventually(alice_back, timeout=120, interval=2)
            assert await streamed_chat(http, keys[alice], "back again") == "echo: back again"
            assert await streamed_chat(http, keys[bob], "still here") == "echo: still here"

            # Delete bob: 503 on his routes, container, port and secrets gone; alice unaffected.
            bob_config = state / "data" / "users" / bob / ".openclaw" / "openclaw.json"
            assert bob_config.exists()
            deleted = json.loads(await op.zaki("instance", "delete", bob))
            assert deleted["event"] == "zaki.instance.deleted", deleted
            r = await http.post(
                "/v1/chat/completions",
                json={"model": "openclaw", "messages": [{"role": "user", "content": "x"}]},
                headers={"Authorization": f"Bearer {keys[bob]}"},
            )
            assert r.status_code == 503 and r.json()["state"] == "absent", r.text
            assert docker_client.containers.list(all=True, filters={"name": f"zaki-user-{bob}"}) == []
            assert not bob_config.exists()
            assert f"{bob} " not in await op.zaki("instance", "list")
            # The key is then revoked: 401 at once.
            key_id = keys[bob].split("_")[1]
            await op.zaki("keys", "revoke", "--key-id", key_id)
            r = await http.get("/v1/models", headers={"Authorization": f"Bearer {keys[bob]}"})
            assert r.status_code == 401
            assert await streamed_chat(http, keys[alice], "unaffected") == "echo: unaffected"
        await op.zaki("instance", "delete", alice, "--purge")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
        for c in docker_client.containers.list(all=True, filters={"label": f"zaki.managed={platform_id}"}):
            c.remove(force=True)
        for n in docker_client.networks.list(filters={"label": f"zaki.managed={platform_id}"}):
            n.remove()
    assert proc.returncode == 0, out
    assert "stopped." in out
    await asyncio.sleep(1)
    assert children and _alive(children) == []
