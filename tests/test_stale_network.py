"""A user's network and its record always agree, and health covers the model path.

A network left by a failed provisioning (or met by a platform restored from an older
database) used to be adopted by name whatever its subnet: the gateway then sat outside the
subnet the broker expects, every model call was refused, and health said healthy."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json

import docker
import pytest

from services.llm_broker.model_path import MODEL_PATH_SUBJECT
from services.provisioner.runtime import DockerRuntime, RuntimeError_
from shared import subjects
from shared.events import InstanceDelete, InstanceRequested
from shared.gateway import network_name
from tests.conftest import PLATFORM_ID, STANDIN_IMAGE, eventually, new_user
from tests.test_broker import call_from_container
from tests.test_monitor import health, make_instance, restarts

SLOT = 8  # addresses per instance network (/29)


def spare_subnet(service_env: dict[str, str], index: int) -> str:
    """A subnet of the pool that no port of the test range maps to."""
    pool = ipaddress.ip_network(service_env["ZAKI_NETWORK_POOL"])
    return f"{pool.network_address + (4000 + index) * SLOT}/29"


def make_network(client: docker.DockerClient, name: str, subnet: str, labels: dict[str, str]):
    gateway = str(next(ipaddress.ip_network(subnet).hosts()))
    ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet, gateway=gateway)])
    return client.networks.create(name, driver="bridge", ipam=ipam, labels=labels)


def subnet_of(client: docker.DockerClient, name: str) -> str:
    return client.networks.get(name).attrs["IPAM"]["Config"][0]["Subnet"]


def credential(state_dir, user: str) -> str:
    config = state_dir / "data" / "users" / user / ".openclaw" / "openclaw.json"
    return json.loads(config.read_text())["models"]["providers"]["zaki"]["apiKey"]


def model_url(service_env: dict[str, str]) -> str:
    return f"{service_env['ZAKI_BROKER_URL_FOR_GATEWAYS']}/p/zaki/chat/completions"


async def test_a_stale_network_is_replaced_and_the_gateway_calls_its_model(
    provisioner, broker, platform, fakes, docker_client, service_env, state_dir, store
):
    user = new_user("stale")
    stale = spare_subnet(service_env, 1)
    labels = {"zaki.managed": PLATFORM_ID, "zaki.user": user}
    make_network(docker_client, network_name(user), stale, labels)  # left from an earlier state
    try:
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
        )
        subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
        assert subject == subjects.INSTANCE_READY, ready
        # The gateway's own model call passes the broker's network check.
        res = await call_from_container(
            docker_client, user, model_url(service_env), credential(state_dir, user), "after a stale network"
        )
        assert res["status"] == 200, res
        assert "echo: after a stale network" in res["body"]
        record = await store.get_instance(user)
        assert subnet_of(docker_client, network_name(user)) == record["subnet"] != stale
    finally:
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


async def test_networks_that_disagree_are_found_replaced_or_refused(docker_client, service_env, settings):
    runtime = DockerRuntime(platform_id=PLATFORM_ID, settings=settings)
    a, b, c = new_user("na"), new_user("nb"), new_user("nc")
    mine = {"zaki.managed": PLATFORM_ID}
    try:
        # Reconcile names the user whose network has another subnet than the record.
        await runtime.ensure_network(a, spare_subnet(service_env, 2))
        assert await runtime.reconcile_networks({a: spare_subnet(service_env, 3)}) == [a]
        assert await runtime.reconcile_networks({a: spare_subnet(service_env, 2)}) == []
        # A container of someone else on it: never removed, the network is refused.
        other = docker_client.containers.create(STANDIN_IMAGE, network=network_name(a), labels=mine)
        with pytest.raises(RuntimeError_, match="in use"):
            await runtime.ensure_network(a, spare_subnet(service_env, 3))
        other.remove(force=True)
        # The user's own (stopped) gateway on it goes with it: the provisioner creates it again.
        own = docker_client.containers.create(
            STANDIN_IMAGE, network=network_name(a), labels={**mine, "zaki.user": a}
        )
        await runtime.ensure_network(a, spare_subnet(service_env, 3))
        assert subnet_of(docker_client, network_name(a)) == spare_subnet(service_env, 3)
        with pytest.raises(docker.errors.NotFound):
            own.reload()
        # A stale network of another user holding the subnet now allocated is removed.
        make_network(docker_client, network_name(b), spare_subnet(service_env, 4), {**mine, "zaki.user": b})
        await runtime.ensure_network(c, spare_subnet(service_env, 4))
        assert subnet_of(docker_client, network_name(c)) == spare_subnet(service_env, 4)
        with pytest.raises(docker.errors.NotFound):
            docker_client.networks.get(network_name(b))
        # A network of that name this platform does not manage is never adopted.
        make_network(docker_client, network_name(b), spare_subnet(service_env, 5), {"zaki.user": b})
        with pytest.raises(RuntimeError_, match="does not manage"):
            await runtime.ensure_network(b, spare_subnet(service_env, 5))
    finally:
        for u in (a, b, c):
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.networks.get(network_name(u)).remove()
        await runtime.reconcile_networks({})  # drops the egress rules of the removed bridges


async def test_an_instance_whose_model_calls_are_refused_is_not_healthy(
    monitor, broker, platform, fakes, docker_client, service_env, state_dir
):
    a = await make_instance(platform, fakes)
    b = await make_instance(platform, fakes)
    try:
        await eventually(lambda: any(h["state"] == "healthy" for h in health(platform, a)), timeout=15)
        key = credential(state_dir, a)
        # A's credential, from an address of the tenant pool outside A's network: refused.
        for _ in range(2):
            res = await call_from_container(docker_client, b, model_url(service_env), key, "wrong network")
            assert res["status"] == 403 and "wrong_network" in res["body"], res
        down = await eventually(
            lambda: [h for h in health(platform, a) if h["state"] == "unhealthy"], timeout=10
        )
        assert down[-1]["reason"] == "model_path_refused"
        assert "outside the instance's network" in down[-1]["detail"]
        await asyncio.sleep(2)
        assert health(platform, a)[-1]["state"] == "unhealthy"  # it stays so: probes still answer
        assert restarts(platform, a) == []  # a restart would not mend it
        # A's own gateway calls again: the path works, and health follows.
        res = await call_from_container(docker_client, a, model_url(service_env), key, "own network")
        assert res["status"] == 200, res
        await eventually(lambda: health(platform, a)[-1]["state"] == "healthy", timeout=10)
        # The broker published the model path's changes, once each.
        changes = [e["state"] for _, e in platform.events(f"{MODEL_PATH_SUBJECT}.{a}")]
        assert changes == ["refused", "ok"], changes
    finally:
        for u in (a, b):
            await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True), timeout=60)
