"""`zaki up --demo` brings the whole platform up on this machine and Ctrl-C stops it all."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx

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


async def test_zaki_up_runs_everything_and_ctrl_c_stops_it(tmp_path, docker_client):
    state = tmp_path / "up"
    proxy_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZAKI_")}
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
            "provisioner metrics",
            "monitor metrics",
            "gateway_proxy metrics",
        ):
            assert part in text, text
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(f"http://127.0.0.1:{proxy_port}/healthz")).json()["ok"] is True
            r = await http.get(f"http://127.0.0.1:{proxy_port}/v1/models")
            assert r.status_code == 401  # up, and refusing strangers
        children = _children(proc.pid)
        assert len(children) == 6  # nats, ferretdb, the fakes, three services
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, out
    assert "stopped." in out
    await asyncio.sleep(1)
    assert children and _alive(children) == []
