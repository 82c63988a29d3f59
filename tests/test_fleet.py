"""Fleet upgrades in canary waves (issue 17.2; the planner and the gate alone: test_fleet_rules.py). On a
private platform (provisioner and monitor of its own, stand-in instances) a rollout to a good
image goes through every wave, one to an image that never gets ready halts after the canary
with nobody left on it, one to an image that gets ready and then stops answering is rolled
back by the runner, and a runner killed with SIGKILL mid-wave is resumed by ``zaki fleet resume``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import docker
import pytest

from services.fleet import plan as fp
from services.fleet import runner as fr
from shared import audit, subjects
from shared.client import PlatformClient
from shared.events import (
    ActorKind,
    InstanceCommand,
    InstanceDelete,
    InstanceRequested,
    InstanceSuspend,
    InstanceWake,
)
from shared.store import Store
from tests.conftest import MONITOR_ENV, STANDIN_IMAGE, eventually, new_user
from tests.test_self_healing import start_private_platform
from zaki.cli.audit import cli_actor
from zaki.stack import free_network_pool, free_port, wait_for_port

pytestmark = pytest.mark.timeout(900)

GOOD = "zaki/standin-gateway:fleet-next"
HANGS = "zaki/standin-gateway:fleet-hangs"
NEVER = "zaki/standin-gateway:never-ready"
ERRS = "zaki/standin-gateway:fleet-5xx"
IMAGES = [STANDIN_IMAGE, GOOD, HANGS, NEVER, ERRS]


def _commit(client: docker.DockerClient, tag: str, *changes: str) -> None:
    repo, _, name = tag.partition(":")
    c = client.containers.create(STANDIN_IMAGE)
    try:
        c.commit(repo, name, changes=list(changes))
    finally:
        c.remove(force=True)


@pytest.fixture(scope="module")
def fleet_platform(tmp_path_factory, service_env, docker_client):
    _commit(docker_client, GOOD, "ENV STANDIN_FLEET=next")
    _commit(docker_client, HANGS, "ENV STANDIN_HANG_AFTER_MS=6000")
    _commit(docker_client, NEVER, "ENV STANDIN_EXIT_CODE=3")
    _commit(docker_client, ERRS, "ENV STANDIN_HTTP_500=1")
    port0 = 28000 + (free_port() % 25) * 40  # below the ephemeral range (32768+): see tests/faults.py
    p = start_private_platform(
        tmp_path_factory.mktemp("fleet"),
        service_env,
        "fleet",
        free_network_pool(),
        ZAKI_ALLOWED_IMAGES=",".join(IMAGES),
        ZAKI_READINESS_TIMEOUT_S="30",
        ZAKI_PORT_RANGE_START=str(port0),
        ZAKI_PORT_RANGE_END=str(port0 + 39),
        ZAKI_FLEET_LEASE_S="3",
    )
    mport = free_port()
    mon = p.stack.start_service(
        "services.monitor",
        {**p.env, **MONITOR_ENV, "ZAKI_REPLICA_ID": "fleet-mon", "ZAKI_METRICS_PORT": str(mport)},
    )
    wait_for_port("127.0.0.1", mport, mon.proc, "monitor")
    yield p
    p.stack.stop()


@pytest.fixture
async def fleet(fleet_platform):
    client = await PlatformClient.connect(fleet_platform.env["ZAKI_NATS_URL"])
    store = Store(fleet_platform.env["ZAKI_MONGO_URL"], "zaki")
    yield fleet_platform, client, store
    users = [d["_id"] for d in await store.list_instances()]
    await asyncio.gather(
        *(client.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True), 120) for u in users),
        return_exceptions=True,
    )
    await fr.rollouts(store).delete_many({})
    await fr.members(store).delete_many({})
    await client.close()
    await store.close()


async def _instances(client: PlatformClient, fakes, n: int) -> list[str]:
    async def one() -> str:
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=new_user("f"), bot_token=fakes.bot(), image=STANDIN_IMAGE
        )
        subject, outcome = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=180)
        assert subject == subjects.INSTANCE_READY, outcome
        return ev.user_id

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _fleet_events(client: PlatformClient) -> list[tuple[str, dict]]:
    """The zaki.fleet.* events kept in the audit stream."""
    info = await client.js.stream_info(subjects.AUDIT_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await client.js.get_msg(subjects.AUDIT_STREAM, seq)
        if msg.subject.startswith(f"{subjects.FLEET}."):
            out.append((msg.subject, json.loads(msg.data)))
    return out


async def _images(store: Store, users: list[str]) -> dict[str, str]:
    return {u: (await store.get_instance(u))["image"] for u in users}


async def _create(
    store: Store, p, image: str, canary: str, waves: str, soak_s: float, parallel: int = 4, limits=None
):
    return await fr.create(
        store,
        image,
        fp.parse_share(canary),
        fp.parse_waves(waves),
        soak_s=soak_s,
        actor=cli_actor("test"),
        allowed=IMAGES,
        parallel=parallel,
        limits=limits,
    )


async def test_a_good_image_goes_through_every_wave(fleet, fakes, docker_client):
    p, client, store = fleet
    users = await _instances(client, fakes, 20)
    doc = await _create(store, p, GOOD, "5%", "25%,50%,100%", soak_s=3)
    assert [len(fr.group(doc, i)) for i in range(4)] == [1, 4, 5, 10]
    steps: list[str] = []
    t0 = time.monotonic()
    final = await fr.Runner(store, client, on_progress=lambda d, s: steps.append(s), lease_s=3).run(
        doc["_id"]
    )
    elapsed = time.monotonic() - t0
    print(f"\n20 stand-in instances upgraded in 4 groups (soak 3 s each, 4 at once): {elapsed:.1f} s")
    assert final["state"] == "completed" and fr.counts(final) == {"upgraded": 20}
    assert (
        steps.count("gate_passed") == 4
        and steps.count("instance_upgraded") == 20
        and steps[-1] == "completed"
    )
    assert set((await _images(store, users)).values()) == {GOOD}
    for u in users:
        assert docker_client.containers.get(f"zaki-user-{u}").attrs["Config"]["Image"] == GOOD
    # Each step is an event on zaki.fleet.*, and each upgrade says who asked.
    seen = {s for s, b in await _fleet_events(client) if b.get("rollout_id") == doc["_id"]}
    assert {f"{subjects.FLEET}.{s}" for s in ("started", "wave_started", "gate_passed", "completed")} <= seen
    rows = await audit.read(client.js, actor="platform:fleet")
    upgrades = {
        r["user_id"] for r in rows if r["kind"] == "command" and r["subject"] == subjects.INSTANCE_UPGRADE
    }
    assert upgrades == set(users)


async def test_an_image_that_never_gets_ready_halts_after_the_canary_and_nobody_stays_on_it(fleet, fakes):
    p, client, store = fleet
    users = await _instances(client, fakes, 6)
    doc = await _create(store, p, NEVER, "34%", "100%", soak_s=2)
    canary = fr.group(doc, 0)
    assert len(canary) == 3
    final = await fr.Runner(store, client, lease_s=3).run(doc["_id"])
    assert final["state"] == "halted" and final["wave"] == 0
    assert all(final["instances"][u]["status"] == "failed" for u in canary)
    assert all(final["instances"][u]["status"] == "pending" for u in fr.group(doc, 1))  # never touched
    assert any("did not get ready" in r for r in final["reasons"])

    async def all_back() -> bool:
        docs = [await store.get_instance(u) for u in users]
        return all(d["image"] == STANDIN_IMAGE and d["state"] == "running" for d in docs)

    await eventually(all_back, timeout=120, interval=1)


async def test_an_image_that_breaks_after_getting_ready_is_rolled_back_by_the_runner(fleet, fakes):
    """Ready on /readyz, then it stops answering: the monitor's health fails the gate during the
    soak, and the runner itself puts every upgraded instance back on its previous image."""
    p, client, store = fleet
    users = await _instances(client, fakes, 4)
    doc = await _create(store, p, HANGS, "50%", "100%", soak_s=40)
    canary = fr.group(doc, 0)
    t0 = time.monotonic()
    final = await fr.Runner(store, client, lease_s=3).run(doc["_id"])
    assert final["state"] == "halted" and time.monotonic() - t0 < 60  # halted during the soak
    assert any("health" in r for r in final["reasons"]), final["reasons"]
    assert {final["instances"][u]["status"] for u in canary} == {"reverted"}
    assert all(final["instances"][u]["status"] == "pending" for u in fr.group(doc, 1))

    async def all_back() -> bool:
        docs = [await store.get_instance(u) for u in users]
        return all(d["image"] == STANDIN_IMAGE and d["state"] == "running" for d in docs)

    await eventually(all_back, timeout=120, interval=1)
    # The rollback went through the provisioner as commands of the platform (audit actor).
    assert doc["actor"]["kind"] == ActorKind.CLI


def _zaki(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zaki.cli", "--state-dir", "/nonexistent", "fleet", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip


async def test_a_runner_killed_mid_wave_is_resumed(fleet, fakes):
    p, client, store = fleet
    users = await _instances(client, fakes, 6)
    proc = _zaki(
        p.env,
        "upgrade",
        "--image",
        GOOD,
        "--canary",
        "17%",
        "--waves",
        "100%",
        "--soak-s",
        "1",
        "--parallel",
        "1",
    )

    async def mid_wave():
        doc = await fr.rollouts(store).find_one({"state": "running"})
        doc = doc and await fr.get(store, doc["_id"])
        if doc is None or doc["wave"] < 1:
            return None
        done = fr.counts(doc).get("upgraded", 0)
        return doc if 2 <= done < 6 else None

    doc = await eventually(mid_wave, timeout=180, interval=0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    left = await fr.get(store, doc["_id"])
    assert left["state"] == "running" and fr.counts(left).get("upgraded", 0) < 6

    resumed = _zaki(p.env, "resume", doc["_id"])
    out, err = await asyncio.to_thread(resumed.communicate, timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "completed" in out and "resumed" in err  # plain progress lines: stderr is not a terminal
    final = await fr.get(store, doc["_id"])
    assert final["state"] == "completed" and fr.counts(final) == {"upgraded": 6}
    assert set((await _images(store, users)).values()) == {GOOD}
    status = _zaki(p.env, "status", doc["_id"])
    out, _ = status.communicate(timeout=60)
    assert doc["_id"] in out and "completed" in out


async def test_an_abort_mid_soak_rolls_the_upgraded_back(fleet, fakes):
    p, client, store = fleet
    users = await _instances(client, fakes, 3)
    doc = await _create(store, p, GOOD, "34%", "100%", soak_s=60)
    task = asyncio.create_task(fr.Runner(store, client, lease_s=3).run(doc["_id"]))

    async def canary_up():
        d = await fr.get(store, doc["_id"])
        return all(d["instances"][u]["status"] == "upgraded" for u in fr.group(d, 0))

    await eventually(canary_up, timeout=120)
    aborted = await asyncio.to_thread(lambda: _zaki(p.env, "abort", doc["_id"]).communicate(timeout=60))
    assert "abort asked" in aborted[0], aborted
    t0 = time.monotonic()
    final = await asyncio.wait_for(task, 120)
    assert final["state"] == "aborted" and time.monotonic() - t0 < 30  # not after the 60 s soak
    assert {final["instances"][u]["status"] for u in fr.group(doc, 0)} == {"reverted"}
    assert set((await _images(store, users)).values()) == {STANDIN_IMAGE}


async def test_the_admin_api_runs_and_shows_a_rollout(fleet, fakes):
    from tests.test_dashboard_api import PASSWORD, PREFIX, Browser, start_dashboard

    p, client, store = fleet
    users = await _instances(client, fakes, 2)
    dash = start_dashboard(p.stack, p.env, ZAKI_METRICS_PORT=str(free_port()))
    root = new_user("op")
    made = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "zaki.cli", "--state-dir", "/nonexistent", "admin", "create", root, "--password-stdin"],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=60,
        env={**os.environ, **p.env, "ZAKI_DASHBOARD_USER_PREFIX": PREFIX},
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    async with Browser(dash.address) as op, Browser(dash.address) as anon:
        assert (await op.login(root)).status_code == 200
        assert (await anon.http.get("/api/admin/fleet")).status_code == 401
        bad = await op.http.post("/api/admin/fleet", json={"image": GOOD, "canary": "0%"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_rollout"
        r = await op.http.post(
            "/api/admin/fleet", json={"image": GOOD, "canary": "50%", "waves": "100%", "soak_s": 1}
        )
        assert r.status_code == 202, r.text
        rid = r.json()["rollout_id"]
        busy = await op.http.post("/api/admin/fleet", json={"image": GOOD})
        assert busy.status_code == 409

        async def done():
            out = (await op.http.get(f"/api/admin/fleet/{rid}")).json()
            return out if out["state"] == "completed" else None

        out = await eventually(done, timeout=180, interval=1)
        assert out["counts"] == {"upgraded": 2} and {m["user_id"] for m in out["instances"]} == set(users)
        listed = (await op.http.get("/api/admin/fleet")).json()["rollouts"]
        assert listed[0]["id"] == rid and listed[0]["groups"] == [1, 1]
        records = (await op.http.get("/api/admin/audit?limit=200")).json()["records"]
        assert any(x["action"] == "fleet.upgrade" and x["detail"].get("rollout") == rid for x in records)
        upgrades = [x for x in records if x["action"] == f"command:{subjects.INSTANCE_UPGRADE}"]
        assert {x["target"] for x in upgrades} >= set(users) and {x["actor"] for x in upgrades} == {
            "platform:fleet"
        }
    assert set((await _images(store, users)).values()) == {GOOD}


async def _all_back(store: Store, users: list[str]) -> None:
    async def back() -> bool:
        docs = [await store.get_instance(u) for u in users]
        return all(d["image"] == STANDIN_IMAGE and d["state"] == "running" for d in docs)

    try:
        await eventually(back, timeout=120, interval=1)
    except AssertionError:
        docs = [await store.get_instance(u) for u in users]
        raise AssertionError(f"not all back: {[(d['state'], d['image']) for d in docs]}") from None


async def test_an_image_answering_5xx_through_the_proxy_is_halted_and_rolled_back(fleet, fakes):
    """Ready on /readyz and healthy to the monitor, but every request of its users answers
    500: the proxy's answer counts fail the gate during the soak and the canary is rolled back."""
    import httpx

    from services.gateway_proxy import keys
    from tests.conftest import JWT_SECRET

    p, client, store = fleet
    users = await _instances(client, fakes, 4)
    port = free_port()
    proxy = p.stack.start_service(
        "services.gateway_proxy",
        {**p.env, "ZAKI_PROXY_PORT": str(port), "ZAKI_METRICS_PORT": str(free_port()),
         "ZAKI_JWT_SECRET": JWT_SECRET, "ZAKI_ACTIVITY_FLUSH_S": "0.5", "ZAKI_RATE_LIMIT_RPS": "1000",
         "ZAKI_RATE_LIMIT_BURST": "1000"},
    )  # fmt: skip
    seen: dict[str, list[int]] = {u: [] for u in users}

    async def user_load(http: httpx.AsyncClient, u: str) -> None:
        auth = {"Authorization": f"Bearer {(await keys.create_key(store, u, {'chat'}))[1]}"}
        while True:
            try:  # a request held while its gateway restarts may outlast the client's patience
                seen[u].append((await http.get("/v1/models", headers=auth)).status_code)
            except httpx.TransportError:
                seen[u].append(0)
            await asyncio.sleep(0.1)

    async def load() -> None:  # each user its own loop: one held request holds up no one else
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            await asyncio.gather(*(user_load(http, u) for u in users))

    wait_for_port("127.0.0.1", port, proxy.proc, "gateway proxy")
    traffic = asyncio.create_task(load())
    try:
        try:
            await eventually(lambda: all(200 in seen[u] for u in users) or traffic.done(), timeout=60)
        except AssertionError:
            raise AssertionError(
                f"no 200 for every user: { ({u: set(v) for u, v in seen.items()}) }"
            ) from None
        if traffic.done():
            traffic.result()  # raises what stopped it
        doc = await _create(store, p, ERRS, "50%", "100%", soak_s=60, limits=fp.Limits(0.2, 0.2, 10))
        canary = fr.group(doc, 0)
        final = await fr.Runner(store, client, lease_s=3).run(doc["_id"])
        assert final["state"] == "halted", (
            final["state"],
            fr.counts(final),
            {u: seen[u][-5:] for u in users},
        )
        after = {u: len(seen[u]) for u in users}
        await _all_back(store, users)
        await eventually(lambda: all(seen[u][after[u] :].count(200) >= 3 for u in users), timeout=60)
    finally:
        traffic.cancel()
        proxy.stop()
        p.stack.processes.remove(proxy)
    assert final["state"] == "halted" and final["wave"] == 0
    # Only the rate, judged per canary instance ("<user>: proxy 5xx rate ...").
    assert final["reasons"] and all(
        r.split(": ", 1)[1].startswith("proxy 5xx rate") for r in final["reasons"]
    )
    assert {r.split(": ", 1)[0] for r in final["reasons"]} <= set(canary), final["reasons"]
    assert {final["instances"][u]["status"] for u in canary} == {"reverted"}
    assert all(final["instances"][u]["status"] == "pending" for u in fr.group(doc, 1))
    assert any(500 in seen[u] for u in canary)  # what the users of the bad image got meanwhile
    assert not any(500 in seen[u] for u in fr.group(doc, 1))


async def _park(client: PlatformClient, stopped: str, asleep: str) -> None:
    subject, _ = await client.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=stopped), 120)
    assert subject == subjects.INSTANCE_STOPPED
    subject, _ = await client.call(subjects.INSTANCE_SUSPEND, InstanceSuspend(user_id=asleep), 120)
    assert subject == subjects.INSTANCE_SUSPENDED


async def test_stopped_and_suspended_instances_get_the_image_on_their_record_only(
    fleet, fakes, docker_client
):
    """Not started by the rollout; put back by its rollback; started with the new image when
    their owner (or traffic) starts them."""
    p, client, store = fleet
    running, stopped, asleep = await _instances(client, fakes, 3)
    await _park(client, stopped, asleep)

    def container(u: str):
        return docker_client.containers.get(f"zaki-user-{u}")

    def parked_as(before: str) -> None:
        for u in (stopped, asleep):
            assert container(u).status != "running"
        assert container(stopped).attrs["Config"]["Image"] == before

    # One group of all three: the running one never gets ready on the image, the parked ones
    # had it recorded; the rollback puts their previous image back on their records.
    doc = await _create(store, p, NEVER, "100%", "100%", soak_s=1)
    final = await fr.Runner(store, client, lease_s=3).run(doc["_id"])
    assert final["state"] == "halted"
    assert {u: final["instances"][u]["status"] for u in (running, stopped, asleep)} == {
        running: "failed",
        stopped: "reverted",
        asleep: "reverted",
    }
    assert {u: (await store.get_instance(u))["state"] for u in (stopped, asleep)} == {
        stopped: "stopped",
        asleep: "suspended",
    }
    assert set((await _images(store, [stopped, asleep])).values()) == {STANDIN_IMAGE}
    parked_as(STANDIN_IMAGE)
    await _all_back(store, [running])  # the provisioner's own rollback of the failed one

    doc = await _create(store, p, GOOD, "34%", "100%", soak_s=1)
    steps: list[str] = []
    final = await fr.Runner(store, client, on_progress=lambda d, s: steps.append(s), lease_s=3).run(
        doc["_id"]
    )
    assert final["state"] == "completed" and fr.counts(final) == {"upgraded": 1, "recorded": 2}
    assert steps.count("instance_recorded") == 2
    assert set((await _images(store, [running, stopped, asleep])).values()) == {GOOD}
    assert (await store.get_instance(asleep))["state"] == "suspended"
    parked_as(STANDIN_IMAGE)  # not started, its container untouched

    subject, _ = await client.call(subjects.INSTANCE_START, InstanceCommand(user_id=stopped), 120)
    assert subject == subjects.INSTANCE_READY
    subject, _ = await client.call(subjects.INSTANCE_WAKE, InstanceWake(user_id=asleep), 120)
    assert subject == subjects.INSTANCE_READY
    for u in (stopped, asleep):
        assert container(u).attrs["Config"]["Image"] == GOOD and container(u).status == "running"


def _restart_control_plane(p, down_s: float = 2.0) -> None:
    """kill -9 of the provisioner, NATS stopped; both back on the same port after *down_s*."""
    procs = {x.name: x for x in p.stack.processes}
    prov, nats_p = procs["provisioner"], procs["nats"]
    os.killpg(prov.proc.pid, signal.SIGKILL)
    prov.proc.wait(10)
    nats_p.stop()
    p.stack.processes.remove(prov)
    p.stack.processes.remove(nats_p)
    time.sleep(down_s)
    p.stack.start_nats(int(p.env["ZAKI_NATS_URL"].rsplit(":", 1)[1]))
    prov = p.stack.start_service("services.provisioner", p.env)
    wait_for_port("127.0.0.1", int(p.env["ZAKI_METRICS_PORT"]), prov.proc, "provisioner", timeout=60)


async def test_a_control_plane_restart_mid_wave_is_ridden_out_without_duplicate_work(
    fleet, fakes, docker_client
):
    """NATS and the provisioner go down in the middle of a wave (the provisioner by kill -9,
    perhaps mid-upgrade) and come back; the runner (``zaki fleet upgrade``) stays up, retries
    its command until NATS takes it, reads a lost outcome from the record, and finishes: every
    instance on the new image, upgraded once (no second upgrade request, no second restart of
    an instance already upgraded)."""
    p, client, store = fleet
    users = await _instances(client, fakes, 6)
    proc = _zaki(p.env, "upgrade", "--image", GOOD, "--canary", "17%", "--waves", "100%", "--soak-s", "1",
                 "--parallel", "1", "--timeout", "240")  # fmt: skip

    async def mid_wave():
        doc = await fr.rollouts(store).find_one({"state": "running"})
        doc = doc and await fr.get(store, doc["_id"])
        if doc is None or doc["wave"] < 1:
            return None
        return doc if 2 <= fr.counts(doc).get("upgraded", 0) < 5 else None

    doc = await eventually(mid_wave, timeout=180, interval=0.2)
    done_before = [u for u, e in doc["instances"].items() if e["status"] == "upgraded"]
    started = {
        u: docker_client.containers.get(f"zaki-user-{u}").attrs["State"]["StartedAt"] for u in done_before
    }
    await asyncio.to_thread(_restart_control_plane, p)

    _, err = await asyncio.to_thread(proc.communicate, timeout=420)
    assert proc.returncode == 0, err[-3000:]
    final = await fr.get(store, doc["_id"])
    assert final["state"] == "completed" and fr.counts(final) == {"upgraded": 6}
    assert set((await _images(store, users)).values()) == {GOOD}
    for u in users:
        c = docker_client.containers.get(f"zaki-user-{u}")
        assert c.attrs["Config"]["Image"] == GOOD and c.status == "running"
    for u in done_before:  # not upgraded (restarted) a second time
        assert docker_client.containers.get(f"zaki-user-{u}").attrs["State"]["StartedAt"] == started[u]
    # One request per instance, whatever the redeliveries; one "upgraded" step per instance.
    client2 = await PlatformClient.connect(p.env["ZAKI_NATS_URL"])
    try:
        rows = await audit.read(client2.js, actor="platform:fleet")
        events = await _fleet_events(client2)
    finally:
        await client2.close()
    asked: dict[str, set[str]] = {}
    for r in rows:
        if r["kind"] == "command" and r["subject"] == subjects.INSTANCE_UPGRADE and r["user_id"] in users:
            asked.setdefault(r["user_id"], set()).add(r["request_id"])
    assert {u: len(ids) for u, ids in asked.items()} == dict.fromkeys(users, 1)
    upgraded = [
        b["user_id"] for s, b in events if s.endswith(".instance_upgraded") and b["rollout_id"] == doc["_id"]
    ]
    assert sorted(upgraded) == sorted(users)
