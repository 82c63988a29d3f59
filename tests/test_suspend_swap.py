"""Swap-mode suspend (ZAKI_SUSPEND_MODE=swap, issue 16.5) on stand-ins holding 300 MiB: a
suspended gateway is frozen and its memory pushed to swap (not stopped); a request through the
proxy thaws the same container (no boot) and is answered; a user's stop of a frozen sleeper
stops it; without swap space a sleeper is stopped instead, and still wakes; a frozen sleeper
that Docker runs again by itself is stopped by reconcile. The real gateway (Telegram handed
over while frozen) is in tests/test_pool_swap_real.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceCommand, InstanceRequested
from shared.gateway import container_name
from shared.store import Store
from tests.conftest import STANDIN_IMAGE, eventually, new_user, swap_space
from tests.proxy_support import start_proxy
from tests.test_self_healing import PrivatePlatform, start_private_platform
from tests.test_suspend import chat, events_for, suspend
from zaki.stack import free_network_pool

MIB = 1 << 20


@pytest.fixture(scope="module")
def swap() -> Iterator[Path]:
    with swap_space(2) as path:
        yield path


@pytest.fixture(scope="module")
def swap_platform(tmp_path_factory, service_env, docker_client, swap) -> Iterator[Any]:
    p = start_private_platform(
        tmp_path_factory.mktemp("swap"),
        service_env,
        "swap",
        free_network_pool(),
        ZAKI_GATEWAY_IMAGE=STANDIN_IMAGE,
        ZAKI_SUSPEND_MODE="swap",
        ZAKI_GATEWAY_MEMORY="1g",
        ZAKI_READINESS_TIMEOUT_S="30",
    )
    env = {k: v for k, v in p.env.items() if k != "ZAKI_METRICS_PORT"}
    proxy = start_proxy(p.stack, env, fastpath=True, ZAKI_WAKE_TIMEOUT_S="60")
    yield p, f"http://{proxy.address}"
    p.stop()


@pytest.fixture
async def sp(swap_platform) -> AsyncIterator[tuple[PrivatePlatform, str, PlatformClient, Store]]:
    p, proxy = swap_platform
    client = await PlatformClient.connect(p.env["ZAKI_NATS_URL"])
    store = Store(p.env["ZAKI_MONGO_URL"], "zaki")
    yield p, proxy, client, store
    await client.close()
    await store.close()


async def sleeper(p: PrivatePlatform, client: PlatformClient, store: Store, fakes) -> tuple[str, str]:
    """A stand-in holding 300 MiB, and an API key for it."""
    ev = InstanceRequested(request_id=new_user("req"), user_id=new_user("sw"), bot_token=fakes.bot())
    faults = p.data_root / "users" / ev.user_id / ".openclaw" / "standin-faults.json"
    subject, ready = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY, ready
    faults.write_text(json.dumps({"alloc_mb": 300}))
    _, key = await keys.create_key(store, ev.user_id, {"chat"})
    return ev.user_id, key


def resident(docker_client: docker.DockerClient, user: str) -> int:
    m = docker_client.containers.get(container_name(user)).stats(stream=False)["memory_stats"]
    return m["usage"] - m["stats"].get("cache", 0)


async def test_a_sleeper_is_frozen_in_swap_and_a_request_thaws_it(sp, fakes, docker_client) -> None:
    p, proxy, client, store = sp
    user, key = await sleeper(p, client, store, fakes)
    await eventually(lambda: resident(docker_client, user) > 300 * MIB or None, timeout=20)
    before = docker_client.containers.get(container_name(user))
    await suspend(client, user)
    c = docker_client.containers.get(container_name(user))
    assert c.status == "paused" and c.id == before.id, c.status
    assert resident(docker_client, user) < 256 * MIB, "its memory went to swap"
    doc = await store.get_instance(user)
    assert doc["state"] == "suspended" and doc["asleep"] and doc["sleep"] == "swap"
    config = json.loads((p.data_root / "users" / user / ".openclaw" / "openclaw.json").read_text())
    assert config["channels"]["telegram"]["enabled"] is False, "the bot is the waker's while it sleeps"
    async with httpx.AsyncClient(base_url=proxy, timeout=60) as http:
        r = await http.post(
            "/v1/chat/completions", json=chat("wake"), headers={"Authorization": f"Bearer {key}"}
        )
    assert r.status_code == 200, r.text
    c = docker_client.containers.get(container_name(user))
    assert c.status == "running" and c.id == before.id, "thawed, not booted again"
    assert c.attrs["HostConfig"]["Memory"] == 1 << 30 and c.attrs["HostConfig"]["MemorySwap"] == 1 << 30
    [woken] = await eventually(lambda: events_for(client, subjects.INSTANCE_WOKEN, user), timeout=10)
    assert woken["reason"] == "request" and "wake_thaw" in woken["timings"], woken
    config = json.loads((p.data_root / "users" / user / ".openclaw" / "openclaw.json").read_text())
    assert config["channels"]["telegram"]["enabled"] is True


async def test_a_users_stop_of_a_frozen_sleeper_stops_it(sp, fakes, docker_client) -> None:
    p, proxy, client, store = sp
    user, key = await sleeper(p, client, store, fakes)
    await suspend(client, user)
    assert docker_client.containers.get(container_name(user)).status == "paused"
    subject, body = await client.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=user), timeout=60)
    assert subject == subjects.INSTANCE_STOPPED, body
    assert docker_client.containers.get(container_name(user)).status == "exited"
    async with httpx.AsyncClient(base_url=proxy, timeout=30) as http:
        r = await http.post(
            "/v1/chat/completions", json=chat("no"), headers={"Authorization": f"Bearer {key}"}
        )
    assert r.status_code == 503 and r.json()["state"] == "stopped", r.text
    # Stopped while squeezed: its next start runs with the gateway's memory, not the floor.
    subject, body = await client.call(subjects.INSTANCE_START, InstanceCommand(user_id=user), timeout=60)
    assert subject == subjects.INSTANCE_READY, body
    host = docker_client.containers.get(container_name(user)).attrs["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 1 << 30, host


async def test_without_swap_a_sleeper_is_stopped_and_still_wakes(sp, fakes, docker_client, swap) -> None:
    p, proxy, client, store = sp
    user, key = await sleeper(p, client, store, fakes)
    await eventually(lambda: resident(docker_client, user) > 300 * MIB or None, timeout=20)
    await asyncio.to_thread(subprocess.run, ["swapoff", str(swap)], check=True)
    try:
        await suspend(client, user)
    finally:
        await asyncio.to_thread(subprocess.run, ["swapon", str(swap)], check=True)
    assert docker_client.containers.get(container_name(user)).status == "exited"
    assert (await store.get_instance(user))["sleep"] == "stop"
    async with httpx.AsyncClient(base_url=proxy, timeout=60) as http:
        r = await http.post(
            "/v1/chat/completions", json=chat("wake"), headers={"Authorization": f"Bearer {key}"}
        )
    assert r.status_code == 200, r.text
    # instance.woken follows instance.ready, which the proxy waited for: it may come just after.
    [woken] = await eventually(lambda: events_for(client, subjects.INSTANCE_WOKEN, user), timeout=10)
    assert "wake_start" in woken["timings"], woken


async def test_a_frozen_sleeper_running_again_is_stopped_by_reconcile(sp, fakes, docker_client) -> None:
    p, proxy, client, store = sp
    user, key = await sleeper(p, client, store, fakes)
    await suspend(client, user)
    docker_client.containers.get(container_name(user)).unpause()  # as after a host reboot
    await eventually(
        lambda: docker_client.containers.get(container_name(user)).status == "exited" or None, timeout=30
    )
    assert (await store.get_instance(user))["state"] == "suspended"
    # Its wake starts it with its memory limit back (it was stopped while squeezed).
    async with httpx.AsyncClient(base_url=proxy, timeout=60) as http:
        r = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    host = docker_client.containers.get(container_name(user)).attrs["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 1 << 30, host
