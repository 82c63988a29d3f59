"""Self-healing past `failed` (issue 14.3): a running instance that fails on the platform's
side is retried by reconcile with exponential backoff, up to a bound, then `crashlooping`;
an upgrade whose image never gets ready is rolled back to the last good image. On a private
platform (its own NATS, FerretDB and provisioner) with short backoffs, and a gateway image
built here from the stand-in that exits at once."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import docker
import httpx
import pytest

from services.provisioner import healing
from shared import subjects
from shared.client import PlatformClient
from shared.events import FailureReason, InstanceCommand, InstanceDelete, InstanceRequested, InstanceUpgrade
from shared.gateway import container_name
from shared.settings import ZakiSettings
from shared.state import InstanceState
from shared.store import Store
from tests.conftest import SESSION, STANDIN_IMAGE, _wait_consumers, eventually, new_user
from zaki.cleanup import remove_managed
from zaki.stack import Stack, free_network_pool, free_port, wait_for_port

NEVER_READY_IMAGE = "zaki/standin-gateway:never-ready"


@dataclass
class PrivatePlatform:
    stack: Stack
    env: dict[str, str]
    metrics: str

    @property
    def data_root(self) -> Path:
        return Path(self.env["ZAKI_DATA_ROOT"])

    def stop(self) -> None:
        """Its processes, then what it left on Docker (gateways, pool slots, networks)."""
        self.stack.stop()
        remove_managed(self.env["ZAKI_PLATFORM_ID"])


def platform_env(
    service_env: dict[str, str], root: Path, name: str, pool: str, nats_url: str, mongo_url: str, **extra: str
) -> dict[str, str]:
    """A private platform's settings: its own NATS and FerretDB, data folder, ports and ids."""
    port0 = 27000 + (free_port() % 60) * 16  # below the ephemeral range (32768+): see tests/faults.py
    return {
        **service_env,
        "ZAKI_NATS_URL": nats_url,
        "ZAKI_MONGO_URL": mongo_url,
        "ZAKI_DATA_ROOT": str(root / "data"),
        "ZAKI_PORT_RANGE_START": str(port0),
        "ZAKI_PORT_RANGE_END": str(port0 + 15),
        "ZAKI_DOCKER_HOST_ID": name,
        "ZAKI_PLATFORM_ID": f"{name}-{SESSION}",
        "ZAKI_NETWORK_POOL": pool,
        "ZAKI_METRICS_PORT": str(free_port()),
        "ZAKI_RECONCILE_INTERVAL_S": "1",
        **extra,
    }


def start_private_platform(root: Path, service_env: dict[str, str], name: str, pool: str, **extra: str):
    """NATS, FerretDB and one provisioner of their own, so that settings (backoffs, limits) can
    be short without touching the session's platform."""
    stack = Stack(root / "stack")
    nats_p, mongo_p = stack.start_nats(), stack.start_ferretdb()
    env = platform_env(service_env, root, name, pool, nats_p.address, mongo_p.address, **extra)
    p = stack.start_service("services.provisioner", env)
    wait_for_port("127.0.0.1", int(env["ZAKI_METRICS_PORT"]), p.proc, f"{name} provisioner")
    asyncio.run(_wait_consumers(nats_p.address, len(subjects.COMMANDS)))
    return PrivatePlatform(stack, env, f"http://127.0.0.1:{env['ZAKI_METRICS_PORT']}/metrics")


@pytest.fixture(scope="session")
def never_ready_image(docker_client: docker.DockerClient) -> str:
    """The stand-in with STANDIN_EXIT_CODE baked in: every start exits at once, so it never
    answers /readyz (built locally with `docker commit`; no registry)."""
    c = docker_client.containers.create(STANDIN_IMAGE)
    try:
        c.commit("zaki/standin-gateway", "never-ready", changes=["ENV STANDIN_EXIT_CODE=3"])
    finally:
        c.remove(force=True)
    return NEVER_READY_IMAGE


@pytest.fixture(scope="module")
def healing_platform(
    tmp_path_factory, service_env: dict[str, str], docker_client, never_ready_image: str
) -> Iterator[PrivatePlatform]:
    p = start_private_platform(
        tmp_path_factory.mktemp("heal"),
        service_env,
        "heal",
        free_network_pool(),
        ZAKI_ALLOWED_IMAGES=f"{STANDIN_IMAGE},{never_ready_image}",
        ZAKI_READINESS_TIMEOUT_S="30",
        ZAKI_HEAL_BACKOFF_BASE_S="1",
        ZAKI_HEAL_BACKOFF_MAX_S="4",
        ZAKI_HEAL_MAX_ATTEMPTS="3",
    )
    yield p
    p.stack.stop()


@pytest.fixture
async def hp(healing_platform: PrivatePlatform):
    client = await PlatformClient.connect(healing_platform.env["ZAKI_NATS_URL"])
    store = Store(healing_platform.env["ZAKI_MONGO_URL"], "zaki")
    yield healing_platform, client, store
    await client.close()
    await store.close()


async def _instance(client: PlatformClient, fakes, image: str = STANDIN_IMAGE, prefix: str = "h") -> str:
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user(prefix), bot_token=fakes.bot(), image=image
    )
    subject, ready = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY, ready
    return ev.user_id


def _faults(p: PrivatePlatform, user: str) -> Path:
    return p.data_root / "users" / user / ".openclaw" / "standin-faults.json"


def _failures(client: PlatformClient, user: str) -> list[dict]:
    return [b for _, b in client.events(subjects.INSTANCE_FAILED) if b["user_id"] == user]


def _at(body: dict) -> datetime:
    return datetime.fromisoformat(body["occurred_at"])


async def _state(store: Store, user: str) -> str | None:
    doc = await store.get_instance(user)
    return doc and doc["state"]


def _container(docker_client, user: str):
    found = docker_client.containers.list(all=True, filters={"label": f"zaki.user={user}"})
    return found[0] if found else None


async def _monitor_restart_that_fails(
    p: PrivatePlatform, client: PlatformClient, store: Store, user: str
) -> dict:
    """Breaks the gateway, then sends the restart the monitor would: it fails, and leaves a
    record that reconcile will retry."""
    _faults(p, user).write_text(json.dumps({"exit_code": 3}))
    cmd = InstanceCommand(user_id=user, reason="monitor: probe_failed")
    subject, failed = await client.call(subjects.INSTANCE_RESTART, cmd, timeout=120)
    assert subject == subjects.INSTANCE_FAILED and failed.reason == "gateway_not_ready", failed
    doc = await store.get_instance(user)
    assert doc["state"] == "failed" and "port" not in doc
    assert doc["heal"]["attempts"] == 0
    assert (doc["heal"]["next_at"] - doc["heal"]["failed_at"]).total_seconds() == pytest.approx(1.0)
    return doc


async def test_a_running_instance_whose_restart_fails_is_retried_until_it_runs(hp, fakes, docker_client):
    p, client, store = hp
    user = await _instance(client, fakes)
    first = await _monitor_restart_that_fails(p, client, store, user)

    async def retried_once():
        doc = await store.get_instance(user)
        return doc if doc["state"] == "failed" and doc["heal"]["attempts"] == 1 else None

    second = await eventually(retried_once, timeout=60, interval=0.1)
    # The retry waited out the first backoff (1 s); the next one waits twice as long.
    assert (second["heal"]["failed_at"] - first["heal"]["failed_at"]).total_seconds() >= 1.0
    assert (second["heal"]["next_at"] - second["heal"]["failed_at"]).total_seconds() == pytest.approx(2.0)

    _faults(p, user).unlink()  # the cause goes away: the next retry brings it back
    await eventually(lambda: _state_is(store, user, "running"), timeout=60, interval=0.2)
    c = _container(docker_client, user)
    assert c is not None and c.status == "running"
    doc = await store.get_instance(user)
    ready = [b for _, b in client.events(subjects.INSTANCE_READY) if b["user_id"] == user]
    assert ready[-1]["port"] == doc["port"]  # the proxies learn the new route
    await client.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


async def _state_is(store: Store, user: str, state: str) -> bool:
    return await _state(store, user) == state


async def test_retries_are_bounded_then_crashlooping_with_an_event(hp, fakes, docker_client):
    p, client, store = hp
    user = await _instance(client, fakes)
    await _monitor_restart_that_fails(p, client, store, user)
    await eventually(lambda: _state_is(store, user, "crashlooping"), timeout=120, interval=0.2)

    failures = _failures(client, user)
    assert [f["reason"] for f in failures] == ["gateway_not_ready"] * 4 + ["crashlooping"], failures
    assert "gave up after 3 retries" in failures[-1]["message"]
    # Exponential backoff: 1, 2, 4 s (capped at 4) between a failure and the next retry's failure.
    gaps = [(_at(b) - _at(a)).total_seconds() for a, b in itertools.pairwise(failures[:4])]
    assert all(gap >= delay for gap, delay in zip(gaps, (1, 2, 4), strict=True)), gaps
    assert _container(docker_client, user) is None
    assert (await store.get_instance(user)).get("port") is None

    async def alerting():  # the gauge behind ZakiInstanceRetriesExhausted
        async with httpx.AsyncClient() as http:
            return 'zaki_instances{state="crashlooping"} 1.0' in (await http.get(p.metrics)).text

    await eventually(alerting, timeout=10)
    await asyncio.sleep(3)  # three more reconcile passes: left alone
    assert len(_failures(client, user)) == 5 and await _state(store, user) == "crashlooping"

    _faults(p, user).unlink()  # fixed: a user's start brings it back
    subject, ready = await client.call(subjects.INSTANCE_START, InstanceCommand(user_id=user), timeout=120)
    assert subject == subjects.INSTANCE_READY, ready
    assert (await store.get_instance(user))["heal"] is None
    await client.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


async def test_a_users_stop_and_a_bad_first_request_are_never_retried(
    hp, fakes, docker_client, never_ready_image
):
    _, client, store = hp
    stopped = await _instance(client, fakes)
    subject, _ = await client.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=stopped), timeout=60)
    assert subject == subjects.INSTANCE_STOPPED
    # Never running: a request whose image never gets ready fails once and stays failed.
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("h"), bot_token=fakes.bot(), image=never_ready_image
    )
    subject, failed = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_FAILED and failed.reason == "gateway_not_ready"
    assert (await store.get_instance(ev.user_id)).get("heal") is None

    await asyncio.sleep(5)  # five reconcile passes with a 1 s backoff
    assert await _state(store, stopped) == "stopped" and _container(docker_client, stopped).status == "exited"
    assert not [b for _, b in client.events(subjects.INSTANCE_READY) if b["user_id"] == stopped][1:]
    assert await _state(store, ev.user_id) == "failed" and len(_failures(client, ev.user_id)) == 1
    assert _container(docker_client, ev.user_id) is None
    for user in (stopped, ev.user_id):
        await client.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


async def test_an_upgrade_that_never_gets_ready_is_rolled_back(hp, fakes, docker_client, never_ready_image):
    _, client, store = hp
    user = await _instance(client, fakes)
    upgrade = InstanceUpgrade(user_id=user, image=never_ready_image)
    subject, rolled = await client.call(subjects.INSTANCE_UPGRADE, upgrade, timeout=120)
    assert subject == subjects.INSTANCE_UPGRADE_ROLLED_BACK, rolled
    assert rolled.reason == FailureReason.GATEWAY_NOT_READY and "keeps exiting" in rolled.message
    assert rolled.failed_image == never_ready_image and rolled.image == STANDIN_IMAGE

    def ready_again():
        return [
            b for s, b in client.events(subjects.INSTANCE_READY) if b.get("request_id") == upgrade.request_id
        ]

    (ready,) = await eventually(ready_again, timeout=60)
    assert ready["image"] == STANDIN_IMAGE
    c = _container(docker_client, user)
    assert c.status == "running" and c.attrs["Config"]["Image"] == STANDIN_IMAGE
    doc = await store.get_instance(user)
    assert doc["state"] == "running" and doc["image"] == doc["last_good_image"] == STANDIN_IMAGE
    assert doc["port"] == ready["port"] and doc.get("heal") is None
    await client.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


async def test_an_attempt_of_reconcile_abandoned_mid_way_is_failed_then_retried(hp, fakes, docker_client):
    """What a provisioner killed in the middle of recreating a container leaves behind: a
    record `starting` that no command will ever redeliver, and no container."""
    _, client, store = hp
    user = await _instance(client, fakes)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    await store.transition(user, InstanceState.STARTING, set_fields={"auto_attempt_at": long_ago})
    docker_client.containers.get(container_name(user)).remove(force=True)

    await eventually(lambda: _state_is(store, user, "running"), timeout=60, interval=0.2)
    assert [f["reason"] for f in _failures(client, user)] == ["internal_error"]
    assert _container(docker_client, user).status == "running"
    doc = await store.get_instance(user)
    assert doc.get("auto_attempt_at") is None and doc["heal"]["attempts"] == 1
    await client.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


# --- the rules, without I/O ---------------------------------------------------------------------


def test_backoff_doubles_is_capped_and_resets_after_a_quiet_hour():
    s = ZakiSettings(heal_backoff_base_s=30, heal_backoff_max_s=100, heal_max_attempts=3, heal_reset_s=3600)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    first = healing.next_heal(None, FailureReason.GATEWAY_NOT_READY, t0, s)
    assert first["attempts"] == 0 and first["next_at"] == t0 + timedelta(seconds=30)
    assert healing.decide(first, t0 + timedelta(seconds=29), s) is None
    assert healing.decide(first, t0 + timedelta(seconds=30), s) == "retry"
    delays = []
    prev, now = first, t0
    for attempts in (1, 2):
        now += timedelta(seconds=200)
        prev = healing.next_heal({**prev, "attempts": attempts}, FailureReason.DOCKER, now, s)
        delays.append((prev["next_at"] - now).total_seconds())
    assert delays == [60, 100]  # 30 * 2, then 30 * 4 capped at 100
    assert healing.decide({**prev, "attempts": 3}, now, s) == "give_up"
    # A failure long after the last one is a new story: the count starts again.
    later = healing.next_heal({**prev, "attempts": 3}, FailureReason.DOCKER, now + timedelta(hours=2), s)
    assert later["attempts"] == 0
    assert healing.decide(None, now, s) is None  # a failure nobody marked for healing
    assert FailureReason.INVALID_BOT_TOKEN not in healing.HEALABLE
    assert FailureReason.DISK_QUOTA not in healing.HEALABLE
