"""The monitor as a process with stand-in gateways: detection, restarts, no storms."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from shared import subjects
from shared.events import InstanceCommand, InstanceDelete, InstanceRequested
from tests.conftest import STANDIN_IMAGE, assert_metrics, eventually, new_user, start_monitor


async def make_instance(platform, fakes):
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("m"), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY, ready
    return ev.user_id


def health(platform, user):
    return [b for _, b in platform.events(subjects.health_subject(user))]


def restarts(platform, user):
    return [b for s, b in platform.events(subjects.INSTANCE_RESTART) if b["user_id"] == user]


def write_faults(settings, user, faults: dict) -> None:
    path = Path(settings.data_root) / "users" / user / ".openclaw" / "standin-faults.json"
    path.write_text(json.dumps(faults))


async def delete(platform, user):
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60)


async def test_killed_gateway_is_detected_restarted_and_healthy_again(
    monitor, platform, fakes, docker_client
):
    user = await make_instance(platform, fakes)
    await eventually(lambda: any(h["state"] == "healthy" for h in health(platform, user)), timeout=15)
    t0 = time.monotonic()
    docker_client.containers.get(f"zaki-user-{user}").kill()
    down = await eventually(
        lambda: [h for h in health(platform, user) if h["state"] == "unreachable"], timeout=10
    )
    assert down[0]["reason"] == "exited"
    await eventually(lambda: restarts(platform, user), timeout=10 - (time.monotonic() - t0))
    assert time.monotonic() - t0 < 10
    await eventually(lambda: health(platform, user)[-1]["state"] == "healthy", timeout=30)
    assert docker_client.containers.get(f"zaki-user-{user}").status == "running"
    assert len(restarts(platform, user)) == 1
    await delete(platform, user)


async def test_slow_is_not_restarted_but_hung_is(monitor, platform, fakes, settings):
    user = await make_instance(platform, fakes)
    await eventually(lambda: any(h["state"] == "healthy" for h in health(platform, user)), timeout=15)
    write_faults(settings, user, {"readyz_delay_ms": 600})  # within the probe timeout
    await asyncio.sleep(5)
    assert restarts(platform, user) == []
    assert all(h["state"] in ("healthy", "degraded") for h in health(platform, user))
    write_faults(settings, user, {"hang": True})
    await eventually(lambda: restarts(platform, user), timeout=15)
    assert restarts(platform, user)[0]["reason"].startswith("monitor: timeout")
    write_faults(settings, user, {})
    await delete(platform, user)


async def test_crash_loop_stops_restart_requests(monitor, platform, fakes, settings):
    user = await make_instance(platform, fakes)
    await eventually(lambda: any(h["state"] == "healthy" for h in health(platform, user)), timeout=15)
    write_faults(settings, user, {"exit_code": 3})  # exits now and at every start
    looping = await eventually(
        lambda: [h for h in health(platform, user) if h["state"] == "crashlooping"], timeout=60
    )
    n = len(restarts(platform, user))
    assert n <= 3
    assert "restarts" in looping[0]["reason"]
    await asyncio.sleep(6)
    assert len(restarts(platform, user)) == n  # no more after crash-looping
    write_faults(settings, user, {})
    await delete(platform, user)


async def test_oom_kill_is_reported_as_oom(monitor, platform, fakes, settings):
    user = await make_instance(platform, fakes)
    await eventually(lambda: any(h["state"] == "healthy" for h in health(platform, user)), timeout=15)
    write_faults(settings, user, {"alloc_mb": 2600})  # over the 2 GiB limit
    oom = await eventually(lambda: [h for h in health(platform, user) if h["reason"] == "oom"], timeout=30)
    assert oom[0]["state"] == "unreachable"
    write_faults(settings, user, {})
    await delete(platform, user)


async def test_stopped_instance_is_never_restarted(monitor, platform, fakes, docker_client):
    user = await make_instance(platform, fakes)
    await eventually(lambda: any(h["state"] == "healthy" for h in health(platform, user)), timeout=15)
    subject, _ = await platform.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=user), timeout=60)
    assert subject == subjects.INSTANCE_STOPPED
    await asyncio.sleep(5)
    assert restarts(platform, user) == []
    assert docker_client.containers.get(f"zaki-user-{user}").status == "exited"
    await delete(platform, user)


async def test_two_replicas_share_and_take_over_without_double_restarts(
    monitor, stack, service_env, platform, fakes, store, docker_client
):
    second = start_monitor(stack, service_env, "mon-b")
    users = await asyncio.gather(*(make_instance(platform, fakes) for _ in range(6)))

    async def probed_by(replicas: set[str], since) -> bool:
        docs = {d["_id"]: d async for d in store.db["health"].find({"_id": {"$in": list(users)}})}
        return len(docs) == len(users) and all(
            d["replica"] in replicas and d.get("last_probe_at") and d["last_probe_at"].timestamp() > since
            for d in docs.values()
        )

    await eventually(lambda: probed_by({"mon-a", "mon-b"}, time.time() - 5), timeout=20)
    owners = {d["replica"] async for d in store.db["health"].find({"_id": {"$in": list(users)}})}
    assert owners == {"mon-a", "mon-b"}  # the work is shared
    os.kill(second.proc.pid, signal.SIGKILL)
    killed_at = time.time()
    # mon-a takes over every instance within about one probe interval (+ lease expiry).
    await eventually(lambda: probed_by({"mon-a"}, killed_at), timeout=10)
    # One failure, one restart request, although two replicas knew the instance.
    victim = users[0]
    docker_client.containers.get(f"zaki-user-{victim}").kill()
    await eventually(lambda: restarts(platform, victim), timeout=10)
    await asyncio.sleep(3)
    assert len(restarts(platform, victim)) == 1
    await asyncio.gather(*(delete(platform, u) for u in users))


async def test_summary_events_and_metrics(monitor, platform):

    summaries = []

    async def on_summary(msg):
        summaries.append(json.loads(msg.data))

    sub = await platform.nc.subscribe(subjects.HEALTH_SUMMARY, cb=on_summary)
    await eventually(lambda: summaries, timeout=10)  # every 2 s in this setup
    await sub.unsubscribe()
    assert summaries[0]["replica_id"] == "mon-a" and isinstance(summaries[0]["counts"], dict)
    await assert_metrics(
        monitor.address,
        "zaki_monitor_instances",
        "zaki_monitor_probe_seconds_bucket",
        "zaki_monitor_probe_failures_total",
        "zaki_monitor_restarts_requested_total",
        "zaki_monitor_sweep_seconds_bucket",
        "zaki_monitor_die_to_event_seconds_bucket",
    )
