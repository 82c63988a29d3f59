"""Faults under load: every service killed with SIGKILL, NATS, FerretDB and dockerd restarted,
a full disk, a paused container, a slow Docker daemon and wall-clock jumps. Each test prints a
line for the fault table (`pytest -s tests/test_faults.py`) and asserts that nothing was lost."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest

from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceRequested, InstanceUpdate
from tests.conftest import STANDIN_IMAGE, new_bot_token, new_user, require_tool
from tests.faults import (
    SERVICES,
    FaultPlatform,
    LoadReport,
    SlowDockerSocket,
    check_converged,
    outcomes_in_stream,
    restart_requests,
    steady_load,
    usage_tokens,
)

CHAT = {"model": "openclaw", "messages": [{"role": "user", "content": "load"}]}
MODEL_CALL = {"model": "echo-1", "messages": [{"role": "user", "content": "load"}]}


@pytest.fixture
async def fp(tmp_path, fakes, keyring_spec, docker_client):
    p = FaultPlatform(tmp_path, fakes, keyring_spec)
    yield p
    await p.close(docker_client)


async def burst_under_fault(fp: FaultPlatform, docker_client, fault, label: str, n: int = 12) -> dict:
    """12 instance requests, 200 proxied requests and 100 brokered model calls; *fault* strikes
    half a second in. Returns what happened, for the fault table. (Each request is a container
    and a network: 20 cost a test ~10 s more to create and remove, and a dozen in flight is load
    enough for every fault here.)"""
    platform = await PlatformClient.connect(fp.nats.address)
    try:
        tenant, key, caller, credential = await fp.tenant(platform)
        users, request_ids = await fp.request(platform, n)
        proxy, broker = LoadReport(), LoadReport()
        load = asyncio.gather(
            steady_load(
                f"{fp.proxy_url}/v1/chat/completions", {"Authorization": f"Bearer {key}"}, CHAT, 200, proxy
            ),
            steady_load(
                f"{fp.broker_url}/p/zaki/chat/completions",
                {"Authorization": f"Bearer {credential}"},
                MODEL_CALL,
                100,
                broker,
            ),
        )
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await fault()
        recovered_s = time.monotonic() - t0
        await load
        # Every answered model call is counted (8 tokens each from the fake provider).
        counted = await usage_tokens(fp.store, caller)
        outcomes = await outcomes_in_stream(fp.env["ZAKI_NATS_URL"], request_ids, timeout=150)
        state = await check_converged(fp, docker_client, [*users, tenant])
        result = {
            "fault": label,
            "requests": f"{sum(s == subjects.INSTANCE_READY for s in outcomes.values())}/{n} ready, "
            f"{sum(s == subjects.INSTANCE_FAILED for s in outcomes.values())} failed, "
            f"{n - len(outcomes)} without outcome",
            "proxied": f"{proxy.ok}/200 ok, {proxy.retried} retried, {proxy.lost} lost",
            "brokered": f"{broker.ok}/100 ok, {broker.retried} retried, {broker.lost} lost",
            "usage": f"{counted // 8} of {broker.ok} answered calls counted",
            "fault_s": round(recovered_s, 1),
            **state,
        }
        print("FAULT-TABLE", json.dumps(result))
        assert len(outcomes) == n and set(outcomes.values()) == {subjects.INSTANCE_READY}, result
        assert proxy.lost == 0 and broker.lost == 0, result
        assert counted >= broker.ok * 8, result
        assert not state["duplicates"] and not state["orphans"] and not state["missing"], result
        assert not state["not_running"] and state["ports_unique"] and state["ports_per_instance"], result
        return result
    finally:
        await platform.close()


@pytest.mark.parametrize("module", SERVICES)
async def test_sigkill_each_service_during_a_burst(fp, docker_client, module):
    await fp.start_all()

    async def fault() -> None:
        fp.kill9(module)
        await asyncio.sleep(2)
        fp.start(module)
        await fp.ready()

    await burst_under_fault(fp, docker_client, fault, f"kill -9 {module.split('.')[1]}, restarted 2 s later")


@pytest.mark.parametrize("part", ["nats", "ferretdb", "dockerd"])
async def test_restart_infrastructure_under_load(fp, docker_client, part):
    await fp.start_all()

    async def fault() -> None:
        if part == "nats":
            await asyncio.to_thread(fp.restart_nats)
        elif part == "ferretdb":
            await asyncio.to_thread(fp.restart_ferretdb)
        else:
            await asyncio.to_thread(fp.restart_dockerd)
        # Nobody restarts the services: they reconnect by themselves.
        for p in fp.procs.values():
            assert p.proc.poll() is None, f"{p.name} exited"

    await burst_under_fault(fp, docker_client, fault, f"restart {part}")


def small_filesystem(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)


def fill(path: Path) -> None:
    """Writes zeros until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


async def test_full_disk_fails_clearly_and_never_corrupts_a_config(
    tmp_path, fakes, keyring_spec, docker_client
):
    data = tmp_path / "small"
    small_filesystem(data, "2m")
    fp = FaultPlatform(tmp_path, fakes, keyring_spec, data_root=data)
    try:
        fp.start("services.provisioner")
        await fp.ready_consumers()
        platform = await PlatformClient.connect(fp.nats.address)
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=new_user("d"), bot_token=new_bot_token(), image=STANDIN_IMAGE
        )
        fakes.telegram.add_bot(ev.bot_token.get_secret_value(), "diskbot")
        subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
        assert subject == subjects.INSTANCE_READY
        config = data / "users" / ev.user_id / ".openclaw" / "openclaw.json"
        before = config.read_bytes()
        # Fill the disk, then ask for a change that rewrites the config.
        filler = data / "filler"
        fill(filler)
        subject, failed = await platform.call(
            subjects.INSTANCE_UPDATE, InstanceUpdate(user_id=ev.user_id, model="zaki/echo-2"), timeout=120
        )
        assert subject == subjects.INSTANCE_FAILED and failed.reason == "disk_error", failed
        assert "No space left" in failed.message
        assert config.read_bytes() == before  # the old config, whole
        json.loads(config.read_text())
        assert not [
            p for p in config.parent.iterdir() if p.name.startswith(".openclaw.json.")
        ]  # no temp left
        # A new user on the full disk: a clear failure, nothing half-written, no container.
        ev2 = InstanceRequested(
            request_id=new_user("req"), user_id=new_user("d"), bot_token=new_bot_token(), image=STANDIN_IMAGE
        )
        fakes.telegram.add_bot(ev2.bot_token.get_secret_value(), "diskbot2")
        subject, failed2 = await platform.call(subjects.INSTANCE_REQUESTED, ev2, timeout=120)
        assert subject == subjects.INSTANCE_FAILED and failed2.reason == "disk_error", failed2
        assert not (data / "users" / ev2.user_id / ".openclaw" / "openclaw.json").exists()
        assert docker_client.containers.list(all=True, filters={"label": f"zaki.user={ev2.user_id}"}) == []
        # Space again: the same user's retry succeeds.
        filler.unlink()
        ev3 = InstanceRequested(
            request_id=new_user("req"), user_id=ev2.user_id, bot_token=ev2.bot_token, image=STANDIN_IMAGE
        )
        subject, retried = await platform.call(subjects.INSTANCE_REQUESTED, ev3, timeout=120)
        assert subject == subjects.INSTANCE_READY, retried
        print(
            "FAULT-TABLE",
            json.dumps(
                {
                    "fault": "data root full (2 MiB tmpfs) during update and create",
                    "result": "instance.failed disk_error both times; old config intact; retry after freeing space ready",
                }
            ),
        )
        await platform.close()
    finally:
        await fp.close(docker_client)
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(data)], check=False)


# --- slow or odd infrastructure must not cause restart storms ----------------------------------


async def running_instances(fp: FaultPlatform, n: int) -> list[str]:
    platform = await PlatformClient.connect(fp.nats.address)
    try:
        users, request_ids = await fp.request(platform, n)
    finally:
        await platform.close()
    outcomes = await outcomes_in_stream(fp.env["ZAKI_NATS_URL"], request_ids, timeout=120)
    assert set(outcomes.values()) == {subjects.INSTANCE_READY} and len(outcomes) == n, outcomes
    return users


async def health_of(fp: FaultPlatform) -> dict[str, str]:
    return {d["_id"]: d.get("state") async for d in fp.store.db["health"].find({})}


async def test_a_paused_container_is_restarted_once_not_in_a_storm(fp, docker_client):
    fp.start("services.provisioner")
    fp.start("services.monitor")
    await fp.ready_consumers()
    users = await running_instances(fp, 3)
    paused = docker_client.containers.get(f"zaki-user-{users[0]}")
    await asyncio.to_thread(paused.pause)
    # 22 s: the hang is seen within ~10 s (4 s probes, 2 failures); a storm would restart again.
    counts = await restart_requests(fp.env["ZAKI_NATS_URL"], 22)
    health = await health_of(fp)
    print(
        "FAULT-TABLE",
        json.dumps(
            {"fault": "docker pause one of 3 gateways, 22 s", "restarts": dict(counts), "health": health}
        ),
    )
    assert 1 <= counts[users[0]] <= 2, counts  # detected and restarted, then backoff: no storm
    assert counts[users[1]] == counts[users[2]] == 0, counts
    await eventually_healthy(fp, users)


async def eventually_healthy(fp: FaultPlatform, users: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = await health_of(fp)
        if all(health.get(u) == "healthy" for u in users):
            return
        assert time.monotonic() < deadline, health
        await asyncio.sleep(1)


async def test_a_slow_docker_daemon_causes_no_restarts(fp, docker_client, tmp_path):
    fp.start("services.provisioner")
    await fp.ready_consumers()
    users = await running_instances(fp, 3)
    slow = SlowDockerSocket(tmp_path / "slow-docker.sock", delay=2.0)
    fp.start("services.monitor", ZAKI_DOCKER_URL=await slow.start())
    try:
        counts = await restart_requests(fp.env["ZAKI_NATS_URL"], 20)  # five probe rounds
        health = await health_of(fp)
    finally:
        await slow.stop()
    print(
        "FAULT-TABLE",
        json.dumps(
            {
                "fault": "Docker API answers 2 s late (monitor), 20 s",
                "restarts": dict(counts),
                "health": health,
            }
        ),
    )
    assert sum(counts.values()) == 0, counts
    assert all(health.get(u) == "healthy" for u in users), health


FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@require_tool(Path(FAKETIME_LIB).exists(), "libfaketime (Debian's faketime)")
async def test_wall_clock_jumps_cause_no_restarts(fp, docker_client, tmp_path):
    fp.start("services.provisioner")
    await fp.ready_consumers()
    users = await running_instances(fp, 3)
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    fp.start("services.monitor")  # a normal replica
    fp.procs["steady"] = fp.procs.pop("services.monitor")
    fp.start(  # and one whose wall clock jumps (monotonic time is left alone, as the kernel does)
        "services.monitor",
        LD_PRELOAD=FAKETIME_LIB,
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        ZAKI_METRICS_PORT="0",
    )
    watch = asyncio.create_task(restart_requests(fp.env["ZAKI_NATS_URL"], 26))
    for jump in ("+2h", "-3h", "+1d", "+0"):  # each held over at least one 4 s probe round
        await asyncio.sleep(6)
        offset.write_text(jump + "\n")
    counts = await watch
    health = await health_of(fp)
    print(
        "FAULT-TABLE",
        json.dumps(
            {
                "fault": "wall clock of 1 of 2 monitors jumps +2h, -3h, +1d, back",
                "restarts": dict(counts),
                "health": health,
            }
        ),
    )
    assert sum(counts.values()) == 0, counts
    assert all(health.get(u) == "healthy" for u in users), health
    for p in fp.procs.values():
        assert p.proc.poll() is None, p.name
