"""Restart before memory runs out (issue 17.3): the trend rules without I/O, the cgroup reader,
and on a private platform (provisioner, proxy, monitor; a 192 MiB limit) a stand-in that leaks
3 MiB/s is restarted with reason memory_growth before any OOM kill, and a long request in
flight delays that restart until it has ended, whole."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from services.gateway_proxy import keys
from services.monitor.memory import MemoryTrend, decide, read_cgroup, slope, time_to_limit
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceDelete, InstanceRequested
from shared.gateway import container_name
from shared.settings import ZakiSettings
from shared.store import Store
from tests.conftest import JWT_SECRET, MONITOR_ENV, STANDIN_IMAGE, eventually, new_user
from tests.test_self_healing import start_private_platform
from zaki.stack import free_network_pool, free_port, wait_for_port

MiB = 1 << 20

# --- the rules ----------------------------------------------------------------------------------


def test_slope_and_projection():
    samples = [(float(t), 100.0 + 3 * t) for t in range(10)]
    assert slope(samples) == pytest.approx(3.0)
    assert time_to_limit(samples, 160.0) == pytest.approx((160 - 127) / 3)
    assert time_to_limit([(0.0, 50.0), (1.0, 50.0), (2.0, 49.0)], 100.0) is None  # not growing
    assert slope([(0.0, 1.0)]) == 0.0 and time_to_limit([], 10.0) is None


def _trend(points: list[tuple[float, float]], limit: float, s: ZakiSettings) -> MemoryTrend:
    t = MemoryTrend(s.memory_window_s)
    for at, used in points:
        t.add(at, used, limit, s.memory_high_ratio)
    return t


def test_decisions_high_for_a_while_projected_and_forced():
    s = ZakiSettings(
        memory_high_ratio=0.8,
        memory_high_for_s=60,
        memory_horizon_s=1800,
        memory_force_s=60,
        memory_window_s=600,
    )
    limit = 1000 * MiB
    flat_low = _trend([(t, 300 * MiB) for t in range(0, 100, 10)], limit, s)
    assert decide(flat_low, 100, s).action == "ok"
    flat_high = _trend([(t, 850 * MiB) for t in range(0, 100, 10)], limit, s)
    assert decide(flat_high, 100, s).action == "restart" and "for 90 s" in decide(flat_high, 100, s).detail
    short_high = _trend([(t, 850 * MiB) for t in range(0, 30, 10)], limit, s)
    assert decide(short_high, 30, s).action == "ok"  # not for long enough yet
    # 0.5 MiB/s from 300 MiB: the limit in ~23 min (inside the 30-min horizon), far from forced.
    growing = _trend([(t, 300 * MiB + t * MiB / 2) for t in range(0, 60, 5)], limit, s)
    v = decide(growing, 60, s)
    assert v.action == "restart" and 1300 < v.eta_s < 1500
    slow = _trend([(t, 300 * MiB + t * MiB / 10) for t in range(0, 60, 5)], limit, s)
    assert decide(slow, 60, s).action == "ok"  # ~2 h away
    close = _trend([(t, 900 * MiB + t * MiB * 2) for t in range(0, 20, 2)], limit, s)
    assert decide(close, 20, s).action == "force"
    off = ZakiSettings(memory_high_ratio=0)
    assert decide(_trend([(0, 999 * MiB)], limit, off), 0, off).action == "ok"


def test_a_booting_gateway_is_not_a_leak():
    """Found by the first-hour test: a real gateway's boot (0 to ~1 GiB in 20 s) was projected to
    hit its 2 GiB limit in 101 s and restarted mid-chat. Its first minutes are not sampled."""
    s = ZakiSettings(memory_warmup_s=300)
    limit = 2048 * MiB
    boot = [(float(t), min(1090, 55 * t) * MiB) for t in range(0, 30, 10)]
    idle = [(float(t), 1090 * MiB) for t in range(30, 900, 10)]
    t = MemoryTrend(s.memory_window_s, s.memory_warmup_s)
    for at, used in boot + idle:
        t.add(at, used, limit, s.memory_high_ratio)
        assert decide(t, at, s).action == "ok", at
    # A leak after the warm-up is still seen.
    for at in range(900, 1200, 10):
        t.add(float(at), (1090 + (at - 900)) * MiB, limit, s.memory_high_ratio)
    assert decide(t, 1190.0, s).action in ("restart", "force")


def test_the_window_forgets_old_samples():
    s = ZakiSettings(memory_window_s=30)
    t = _trend([(float(x), 100.0) for x in range(100)], 1000.0, s)
    assert len(t.samples) == 31 and t.samples[0][0] == 69.0


def test_cgroup_v1_files(tmp_path: Path):
    d = tmp_path / "abc"
    d.mkdir()
    (d / "memory.usage_in_bytes").write_text("300000000\n")
    (d / "memory.limit_in_bytes").write_text("536870912\n")
    (d / "memory.stat").write_text("cache 5\ntotal_inactive_file 100000000\nrss 1\n")
    assert read_cgroup("abc", str(tmp_path)) == (200_000_000, 536_870_912)
    assert read_cgroup("missing", str(tmp_path)) is None


# --- on a private platform ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_platform(tmp_path_factory, service_env, docker_client):
    p = start_private_platform(
        tmp_path_factory.mktemp("mem"),
        service_env,
        "mem",
        free_network_pool(),
        ZAKI_ALLOWED_IMAGES=STANDIN_IMAGE,
        ZAKI_GATEWAY_MEMORY="192m",
    )
    port = free_port()
    proxy = p.stack.start_service(
        "services.gateway_proxy",
        {
            **p.env,
            "ZAKI_PROXY_PORT": str(port),
            "ZAKI_METRICS_PORT": str(free_port()),
            "ZAKI_JWT_SECRET": JWT_SECRET,
            "ZAKI_ACTIVITY_FLUSH_S": "1",
        },
    )
    wait_for_port("127.0.0.1", port, proxy.proc, "proxy")
    mport = free_port()
    monitor = p.stack.start_service(
        "services.monitor",
        {
            **p.env,
            **MONITOR_ENV,
            "ZAKI_REPLICA_ID": "mem-mon",
            "ZAKI_METRICS_PORT": str(mport),
            "ZAKI_MEMORY_HIGH_RATIO": "0.9",
            "ZAKI_MEMORY_SAMPLE_S": "1",
            "ZAKI_MEMORY_WINDOW_S": "20",
            "ZAKI_MEMORY_WARMUP_S": "0",  # the stand-in leaks from its first second
            "ZAKI_MEMORY_QUIET_S": "3",
            "ZAKI_MEMORY_FORCE_S": "12",
        },
    )
    wait_for_port("127.0.0.1", mport, monitor.proc, "monitor")
    yield p, f"http://127.0.0.1:{port}"
    p.stack.stop()


async def test_a_leaking_gateway_is_restarted_when_quiet_before_the_kernel_kills_it(
    memory_platform, fakes, docker_client
):
    p, proxy = memory_platform
    client = await PlatformClient.connect(p.env["ZAKI_NATS_URL"])
    store = Store(p.env["ZAKI_MONGO_URL"], "zaki")
    user = new_user("mem")
    try:
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
        )
        subject, _ = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
        assert subject == subjects.INSTANCE_READY
        name = container_name(user)
        assert docker_client.containers.get(name).attrs["HostConfig"]["Memory"] == 192 * MiB
        _, key = await keys.create_key(store, user, {"chat"})
        t0 = datetime.now(UTC)
        faults = p.data_root / "users" / user / ".openclaw" / "standin-faults.json"
        faults.write_text(json.dumps({"leak_mb_per_s": 3}))
        # A 15-second stream in flight: the restart must wait for its end.
        body = {
            "model": "openclaw",
            "stream": True,
            "messages": [{"role": "user", "content": "a long answer please"}],
            "standin_chunks": 15,
            "standin_delay_ms": 1000,
        }
        async with httpx.AsyncClient(base_url=proxy, timeout=120) as http:
            r = await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        ended = datetime.now(UTC)
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        assert r.text.count("chat.completion.chunk") == 17  # role, 15 parts, stop: nothing cut off

        async def claimed():
            return await store.db["restart_claims"].find_one(
                {"_id": {"$regex": f"^{user}:"}, "reason": "memory_growth"}
            )

        claim = await eventually(claimed, timeout=60, interval=0.5)
        faults.unlink()  # the next incarnation does not leak
        at = claim["at"] if claim["at"].tzinfo else claim["at"].replace(tzinfo=UTC)
        assert at >= ended, (at, ended)  # not while the stream was in flight
        print(
            f"\nmemory_growth restart {(at - t0).total_seconds():.1f} s after the leak began, "
            f"{(at - ended).total_seconds():.1f} s after the stream ended"
        )

        def ready_again():
            return [b for s, b in client.events(subjects.INSTANCE_READY) if b["user_id"] == user][1:]

        await eventually(ready_again, timeout=60)
        c = docker_client.containers.get(name)
        assert c.attrs["State"]["OOMKilled"] is False and c.status == "running"
        ooms = docker_client.events(
            since=t0, until=datetime.now(UTC), decode=True, filters={"event": "oom", "container": name}
        )
        assert list(ooms) == []
    finally:
        await client.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60)
        await client.close()
        await store.close()
