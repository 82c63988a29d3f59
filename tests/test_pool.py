"""Pre-started gateways for new users (issue 16.5, services/provisioner/pool.py), on stand-ins
that hot-reload their config like OpenClaw: a new user's gateway is a claimed slot, not a cold
boot; the claimed container serves only its user, on the user's network, port and folder,
survives Docker's own restart through the slot's old folder name, and is re-created on the
user's own paths at its first restart; anything wrong with a slot falls back to a cold start.
The claim on the real gateway (identity, Telegram and provider by hot reload) is in
tests/test_suspend_real.py, whose sleeper is a claimed slot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import docker
import httpx
import pytest

from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceCommand, InstanceRequested
from shared.gateway import container_name, identity_headers, network_name
from shared.store import Store
from shared.validation import InvalidInput, check_user_id
from tests.conftest import STANDIN_IMAGE, assert_metrics, eventually, new_bot_token, new_user
from tests.test_self_healing import PrivatePlatform, start_private_platform
from zaki.stack import free_network_pool, free_port, wait_for_port

POOL_SIZE = 2


@pytest.fixture(scope="module")
def pool_platform(tmp_path_factory, service_env: dict[str, str], docker_client) -> Iterator[PrivatePlatform]:
    p = start_private_platform(
        tmp_path_factory.mktemp("pool"),
        service_env,
        "pool",
        free_network_pool(),
        ZAKI_GATEWAY_IMAGE=STANDIN_IMAGE,
        ZAKI_ALLOWED_IMAGES="zaki/standin-gateway:canary",
        ZAKI_POOL_SIZE=str(POOL_SIZE),
        ZAKI_POOL_REFILL_DELAY_S="3",  # the refill waits after a claim: checked below
        ZAKI_READINESS_TIMEOUT_S="10",  # stand-ins are ready in under a second; a stray slot waits this long
    )
    yield p
    p.stop()


@pytest.fixture
async def pp(pool_platform: PrivatePlatform) -> AsyncIterator[tuple[PrivatePlatform, PlatformClient, Store]]:
    client = await PlatformClient.connect(pool_platform.env["ZAKI_NATS_URL"])
    store = Store(pool_platform.env["ZAKI_MONGO_URL"], "zaki")
    yield pool_platform, client, store
    await client.close()
    await store.close()


def slots(docker_client: docker.DockerClient, p: PrivatePlatform) -> dict[str, Any]:
    """Running pool slots by container id."""
    found = docker_client.containers.list(filters={"label": f"zaki.managed={p.env['ZAKI_PLATFORM_ID']}"})
    return {c.id: c for c in found if c.name.startswith(container_name("pool."))}


async def full_pool(docker_client: docker.DockerClient, p: PrivatePlatform) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        found = slots(docker_client, p)
        if len(found) != POOL_SIZE:
            return None
        async with httpx.AsyncClient() as http:
            text = (await http.get(p.metrics)).text
        return found if f"zaki_pool_slots_ready {POOL_SIZE}.0" in text else None

    return await eventually(check, timeout=60)


async def request(client: PlatformClient, fakes, image: str | None = None) -> tuple[str, Any]:
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("p"), bot_token=fakes.bot(), image=image
    )
    subject, ready = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY, ready
    return ev.user_id, ready


def models_status(port: int, user: str) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=identity_headers(user)).status_code


async def test_a_new_user_gets_a_pre_started_gateway(pp, fakes, docker_client) -> None:
    p, client, store = pp
    before = await full_pool(docker_client, p)
    user, ready = await request(client, fakes)
    assert "claim" in ready.timings and "create" not in ready.timings, ready.timings
    assert len(slots(docker_client, p)) == POOL_SIZE - 1, "no refill right after a claim"
    c = docker_client.containers.get(container_name(user))
    assert c.id in before, "the user's gateway is one of the slots that were ready"
    # A slot boots at a low CPU weight (a refill yields to users); the user's has the default.
    assert {s.attrs["HostConfig"]["CpuShares"] for s in before.values()} == {256}
    assert c.attrs["HostConfig"]["CpuShares"] == 1024
    slot_name = before[c.id].name.removeprefix(container_name(""))
    doc = await store.get_instance(user)
    assert doc["state"] == "running" and doc["instance_id"] == c.labels["zaki.instance"]
    # Only the user's network; the slot's network is gone.
    assert list(c.attrs["NetworkSettings"]["Networks"]) == [network_name(user)]
    with pytest.raises(docker.errors.NotFound):
        docker_client.networks.get(network_name(slot_name))
    # The user's port, folder and identity; the slot's identity is refused.
    assert await store.port_of("pool", user) == doc["port"]
    assert await store.port_of("pool", slot_name) is None
    users = p.data_root / "users"
    assert (users / user).is_dir() and not (users / user).is_symlink()
    assert (users / user / "workspace" / "SOUL.md").exists()
    assert (users / slot_name).is_symlink() and (users / slot_name).resolve() == (users / user).resolve()
    config = json.loads((users / user / ".openclaw" / "openclaw.json").read_text())
    assert config["gateway"]["auth"]["trustedProxy"]["allowUsers"][0] == f"{user}@zaki.local"
    assert config["channels"]["telegram"]["botToken"]
    assert models_status(doc["port"], user) == 200
    assert models_status(doc["port"], slot_name) == 401
    # The pool fills up again with a new slot.
    after = await full_pool(docker_client, p)
    assert c.id not in after and len(set(after) - set(before)) == 1
    await assert_metrics(p.metrics, 'zaki_pool_claims_total{outcome="claimed"}')


async def test_a_claimed_gateway_keeps_its_folder_across_restarts(pp, fakes, docker_client) -> None:
    p, client, _ = pp
    await full_pool(docker_client, p)
    user, ready = await request(client, fakes)
    assert "claim" in ready.timings
    users = p.data_root / "users"
    marker = users / user / "workspace" / "marker.txt"
    marker.write_text("mine")
    c = docker_client.containers.get(container_name(user))
    slot_link = next(e for e in users.iterdir() if e.is_symlink() and e.resolve() == (users / user).resolve())
    # Docker's own restart mounts the slot's old folder name: the symlink to the user's.
    c.restart(timeout=2)
    out = c.exec_run(["cat", "/home/node/workspace/marker.txt"]).output.decode()
    assert out == "mine", out
    # The platform's restart re-creates it on the user's own paths; the symlink then goes.
    cmd = InstanceCommand(user_id=user, reason="test")
    subject, body = await client.call(subjects.INSTANCE_RESTART, cmd, timeout=60)
    assert subject == subjects.INSTANCE_READY, body
    fresh = docker_client.containers.get(container_name(user))
    assert fresh.id != c.id
    sources = {m["Source"] for m in fresh.attrs["Mounts"] if m["Type"] == "bind"}
    assert sources == {str(users / user / ".openclaw"), str(users / user / "workspace")}, sources
    assert fresh.exec_run(["cat", "/home/node/workspace/marker.txt"]).output.decode() == "mine"
    await eventually(lambda: not slot_link.is_symlink() or None, timeout=30)


async def test_another_image_or_a_kept_folder_starts_cold(pp, fakes, docker_client) -> None:
    p, client, _ = pp
    before = await full_pool(docker_client, p)
    user, ready = await request(client, fakes, image="zaki/standin-gateway:canary")
    assert "claim" not in ready.timings and "create" in ready.timings
    assert docker_client.containers.get(container_name(user)).id not in before
    # A data folder kept from an earlier instance must be mounted as it is: cold start.
    kept = new_user("p")
    (p.data_root / "users" / kept / "workspace").mkdir(parents=True)
    ev = InstanceRequested(request_id=new_user("req"), user_id=kept, bot_token=fakes.bot())
    subject, ready = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY and "claim" not in ready.timings, ready
    assert set(slots(docker_client, p)) == set(before), "the pool was not touched"


async def test_a_broken_slot_falls_back_to_a_cold_start(pp, fakes, docker_client) -> None:
    p, client, store = pp
    before = await full_pool(docker_client, p)
    # Every ready slot loses its config: the claim cannot read the slot's password.
    for c in before.values():
        slot_dir = p.data_root / "users" / c.name.removeprefix(container_name(""))
        (slot_dir / ".openclaw" / "openclaw.json").unlink()
    user, ready = await request(client, fakes)
    assert "claim" not in ready.timings and "create" in ready.timings, ready.timings
    c = docker_client.containers.get(container_name(user))
    assert c.id not in before
    doc = await store.get_instance(user)
    assert models_status(doc["port"], user) == 200
    assert (p.data_root / "users" / user).is_dir() and not (p.data_root / "users" / user).is_symlink()
    await assert_metrics(p.metrics, 'zaki_pool_claims_total{outcome="fallback"}')
    # The broken slot is gone, folder and all; the pool fills up again.
    after = await full_pool(docker_client, p)
    gone = [cid for cid in before if cid not in after]
    assert gone, "the used slot was discarded"
    for cid in gone:
        assert not (p.data_root / "users" / before[cid].name.removeprefix(container_name(""))).exists()


def test_a_slot_name_is_never_a_users_id() -> None:
    """Slots are named "pool.<hex>"; user ids never contain '.', so a request cannot name one."""
    with pytest.raises(InvalidInput):
        check_user_id(container_name("pool.abc").removeprefix(container_name("")))
    with pytest.raises(ValueError):
        InstanceRequested(request_id="r1", user_id="pool.abc", bot_token=new_bot_token())


async def test_a_slot_whose_port_went_to_a_user_is_discarded(pp, docker_client) -> None:
    """A claim stopped between the port's transfer and the hand-over (its provisioner killed
    mid-way) leaves a running slot that holds a user's port, and perhaps the user's config (bot
    token, broker credential) and network: once older than any claim lasts (the readiness
    timeout), it is discarded; the pool is refilled meanwhile."""
    p, _, store = pp
    before = await full_pool(docker_client, p)
    cid, c = next(iter(before.items()))
    slot_id = c.name.removeprefix(container_name(""))
    user = new_user("p")
    assert await store.transfer_port("pool", slot_id, user)
    try:
        await eventually(lambda: cid not in slots(docker_client, p) or None, timeout=75)
        after = await full_pool(docker_client, p)
        assert cid not in after
        # The discard goes on after the container (network, port, folder).
        await eventually(lambda: not (p.data_root / "users" / slot_id).exists() or None, timeout=15)
        with pytest.raises(docker.errors.NotFound):
            docker_client.networks.get(network_name(slot_id))
    finally:
        await store.release_port("pool", user)


async def test_one_provisioner_per_docker_host_keeps_the_pool(pp, docker_client) -> None:
    """A second provisioner replica on the same Docker host neither starts slots of its own nor
    discards the first one's: the pool is kept by the holder of the host's pool lease."""
    p, _, _ = pp
    before = await full_pool(docker_client, p)
    mport = free_port()
    second = p.stack.start_service(
        "services.provisioner", {**p.env, "ZAKI_REPLICA_ID": "second", "ZAKI_METRICS_PORT": str(mport)}
    )
    try:
        wait_for_port("127.0.0.1", mport, second.proc, "second provisioner")
        await asyncio.sleep(5)  # five of the first's reconcile passes, and the second's
        assert set(slots(docker_client, p)) == set(before)
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{mport}/metrics")).text
        assert "zaki_pool_slots_ready 0.0" in text
    finally:
        second.stop()
