"""Boot time of the real OpenClaw gateway (issue 16.5), variants side by side in one run.

Each variant runs one hardened gateway container the way the provisioner does (same
runtime, config renderer, env, limits), with the fake LLM and fake Telegram behind it:
1. first boot on an empty data folder (``docker start`` -> /readyz 200 -> first byte of a chat);
2. ``--wakes`` more boots of the same container after ``docker stop`` (what a wake of a
   suspended instance pays: the state folder and Node's compile cache are warm).
It prints the medians and the timeline of the gateway's own log lines for one wake.

    python bench/boot.py [--wakes 3] [--variants baseline,lean]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import datetime as dt
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.provisioner.config import (
    GatewaySpec,
    Provider,
    gateway_env,
    prepare_user_dirs,
    render_openclaw_config,
    user_dirs,
    write_config_atomically,
)
from services.provisioner.runtime import ContainerSpec, DockerRuntime
from shared.gateway import CONTAINER_STATE_DIR, CONTAINER_WORKSPACE, identity_headers, network_name
from shared.settings import ZakiSettings
from zaki.fakes import FakeLLM, FakeTelegram, bound_port, serve
from zaki.stack import docker_bridge_ip, free_port

REAL = "zaki/openclaw-gateway:2026.9.6"
MARKS = ("loading configuration", "spawn broker ready", "starting http server", "] ready")


@dataclass(frozen=True)
class Variant:
    name: str
    image: str = REAL
    env: dict[str, str] = field(default_factory=dict)
    config: Callable[[dict[str, Any]], dict[str, Any]] = lambda c: c


def base_env() -> dict[str, str]:
    """The provisioner's env for a gateway before issue 16.5's changes (the variants add them)."""
    return {
        **gateway_env(),
        "NODE_COMPILE_CACHE": f"{CONTAINER_STATE_DIR}/cache/node-compile",
        "NODE_OPTIONS": "--max-old-space-size=1024",
    }


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dst)
    for k, v in src.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_config(extra: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda c: _merge(c, extra)


# OpenClaw respawns itself once when NODE_COMPILE_CACHE is set (openclaw.mjs,
# respawnWithPackagedCompileCacheIfNeeded) to move the cache into a per-version subfolder;
# this env var is its own "already respawned" marker.
NO_RESPAWN = {"OPENCLAW_PACKAGED_COMPILE_CACHE_RESPAWNED": "1"}
LEAN = {"plugins": {"allow": ["telegram", "memory-core"]}}
NO_DREAM = {"plugins": {"entries": {"memory-core": {"config": {"dreaming": {"enabled": False}}}}}}

VARIANTS: dict[str, Variant] = {
    "baseline": Variant("baseline"),
    "no-compile-cache": Variant("no-compile-cache", env={"NODE_DISABLE_COMPILE_CACHE": "1"}),
    "no-respawn": Variant("no-respawn", env=NO_RESPAWN),
    "lean-plugins": Variant("lean-plugins", config=with_config(LEAN)),
    "lean-no-dreaming": Variant("lean-no-dreaming", config=with_config(_merge(LEAN, NO_DREAM))),
    "all": Variant("all", env=NO_RESPAWN, config=with_config(_merge(LEAN, NO_DREAM))),
    # Not candidates: OpenClaw's own startup step trace in the log (--log to read it), and
    # V8 CPU profiles of every process into <state>/prof (--keep to read them).
    "trace": Variant("trace", env={"OPENCLAW_GATEWAY_STARTUP_TRACE": "1"}),
    "cpuprof": Variant(
        "cpuprof",
        env={"NODE_OPTIONS": "--max-old-space-size=1024 --cpu-prof --cpu-prof-dir=/home/node/.openclaw/prof"},
    ),
}


async def wait_ready(http: httpx.AsyncClient, port: int, user: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = await http.get(f"http://127.0.0.1:{port}/readyz", headers=identity_headers(user))
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("gateway not ready")


async def chat(http: httpx.AsyncClient, port: int, user: str) -> float:
    t0 = time.perf_counter()
    body = {"model": "openclaw", "messages": [{"role": "user", "content": "hi"}], "user": "bench"}
    r = await http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=identity_headers(user)
    )
    assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def timeline(container, since: dt.datetime, everything: bool = False) -> list[tuple[float, str]]:
    """Seconds after *since* at which each of MARKS (or every line) first appears in the log."""
    out: list[tuple[float, str]] = []
    seen: set[str] = set()
    for raw in container.logs(timestamps=True, since=since).decode(errors="replace").splitlines():
        stamp, _, text = raw.partition(" ")
        t = (dt.datetime.fromisoformat(stamp[:26] + "+00:00") - since).total_seconds()
        if everything:
            out.append((t, text.strip()[:160]))
            continue
        for mark in MARKS:
            if mark not in seen and mark in text.lower():
                seen.add(mark)
                out.append((t, text.strip()[:100]))
    return out


@dataclass
class Result:
    first: float = 0.0
    ready: list[float] = field(default_factory=list)
    first_byte: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU seconds the container used until ready (wakes)
    first_cpu: float = 0.0
    timeline: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Subject:
    """One variant's container (own user and network, so containers never share a name)."""

    variant: Variant
    user: str
    port: int
    name: str
    result: Result = field(default_factory=Result)


async def create_subject(
    v: Variant, runtime: DockerRuntime, data: Path, llm_port: int, tg_port: int
) -> Subject:
    user = f"boot{uuid.uuid4().hex[:10]}"
    gw_ip = await runtime.ensure_network(user)
    spec = GatewaySpec(
        user_id=user,
        bot_token=f"{uuid.uuid4().int % 10**9 + 10**9}:{uuid.uuid4().hex}",
        model="zaki/echo-1",
        provider=Provider(
            "zaki", f"http://host.docker.internal:{llm_port}/v1", "openai-completions", "sk-bench", ()
        ),
        trusted_proxy_ip=gw_ip,
        password=secrets.token_urlsafe(24),
        telegram_api_root=f"http://host.docker.internal:{tg_port}",
        telegram_private_network=True,
    )
    dirs = user_dirs(data / v.name, user)
    prepare_user_dirs(dirs)
    write_config_atomically(dirs.config, v.config(render_openclaw_config(spec)))
    port = free_port()
    cspec = ContainerSpec(
        user_id=user,
        instance_id=v.name,
        image=v.image,
        host_port=port,
        publish_ip="127.0.0.1",
        network=network_name(user),
        binds={str(dirs.state): CONTAINER_STATE_DIR, str(dirs.workspace): CONTAINER_WORKSPACE},
        env={**base_env(), **v.env},
    )
    await runtime.create(cspec)
    return Subject(v, user, port, cspec.name)


async def boot_once(
    s: Subject, runtime: DockerRuntime, http: httpx.AsyncClient, first: bool, everything: bool
) -> None:
    since = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    await runtime.start(s.name)
    try:
        await wait_ready(http, s.port, s.user)
        ready = time.perf_counter() - t0
        # CPU time until ready: unlike wall time, barely moved by other work on a shared host.
        stats = docker.from_env().containers.get(s.name).stats(stream=False)
        cpu = stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
        fb = ready + await chat(http, s.port, s.user)
        # Printed at once: a long run under load still leaves its figures if it is cut short.
        print(
            f"{s.variant.name}: {'first boot' if first else 'wake'} ready {ready:.2f} s (CPU {cpu:.2f} s), chat {fb:.2f} s",
            file=sys.stderr,
        )
        if first:
            s.result.first, s.result.first_cpu = ready, cpu
        else:
            s.result.cpu.append(cpu)
            s.result.ready.append(ready)
            s.result.first_byte.append(fb)
            s.result.timeline = timeline(docker.from_env().containers.get(s.name), since, everything)
    finally:
        await runtime.stop(s.name, timeout=30)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wakes", type=int, default=3)
    ap.add_argument("--variants", default=",".join(n for n in VARIANTS if n not in ("trace", "cpuprof")))
    ap.add_argument("--log", action="store_true", help="print every log line of the last wake")
    ap.add_argument("--keep", action="store_true", help="keep the data folders (printed)")
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    bridge = docker_bridge_ip()
    llm, tg = FakeLLM(), FakeTelegram(accept_all=True)
    lr, tr = await serve(llm.app(), bridge, 0), await serve(tg.app(), bridge, 0)
    allow = f"{bridge}/32:{bound_port(lr)},{bridge}/32:{bound_port(tr)}"
    runtime = DockerRuntime(
        platform_id=f"bboot-{uuid.uuid4().hex[:6]}", settings=ZakiSettings(egress_allow=allow)
    )
    tmp = Path(tempfile.mkdtemp(prefix="zaki-bench-boot-"))
    subjects: list[Subject] = []
    try:
        for n in names:
            subjects.append(await create_subject(VARIANTS[n], runtime, tmp, bound_port(lr), bound_port(tr)))
        async with httpx.AsyncClient(timeout=120) as http:
            # Round-robin: every variant sees the same (shared, fluctuating) machine load.
            for i in range(args.wakes + 1):
                for s in subjects:
                    await boot_once(s, runtime, http, i == 0, args.log)
    finally:
        for s in subjects:
            await runtime.remove(s.name)
            await runtime.remove_network(s.user)
        await lr.cleanup()
        await tr.cleanup()
        if args.keep:
            print(f"data kept in {tmp}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    print(
        f"\nReal gateway boot, one run, variants interleaved, {args.wakes} wakes each (docker start of a stopped container)"
    )
    print(
        "| variant | first boot -> /readyz s | wake -> /readyz s (median, max) | wake CPU s until ready | wake -> first chat byte s (median) |"
    )
    print("|---|---:|---:|---:|---:|")
    for s in subjects:
        r = s.result
        print(
            f"| {s.variant.name} | {r.first:.2f} (CPU {r.first_cpu:.2f}) | {statistics.median(r.ready):.2f}, {max(r.ready):.2f} | "
            f"{statistics.median(r.cpu):.2f} | {statistics.median(r.first_byte):.2f} |"
        )
    for s in subjects:
        print(f"\n{s.variant.name}, gateway log of the last wake (s after docker start):")
        for t, line in s.result.timeline:
            print(f"  {t:6.2f}  {line}")


if __name__ == "__main__":
    asyncio.run(main())
