"""The proxy's hold for sleeping gateways (services/gateway_proxy/wake.py) on the real store:
one wake asked however many requests wait, bounded by a per-tenant queue and a timeout (then
the state to answer 503 with), served as soon as the instance is routed, a user's stop never held."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.gateway_proxy.routing import NoRoute, RoutingTable
from services.gateway_proxy.wake import Gone, WakeGate
from shared.state import InstanceState
from tests.conftest import new_user


async def record(store, state: InstanceState, port: int = 40123) -> str:
    user = new_user("g")
    # On a Docker host no provisioner of the session serves: its reconcile would find no
    # container for the record and mark it failed while the test is holding requests for it.
    await store.create_instance(
        user, {"instance_id": "i1", "docker_host": "gate-test-host", "host": "127.0.0.1", "port": port}
    )
    await store.instances.update_one({"_id": user}, {"$set": {"state": state.value}})
    return user


def gate_for(routes: RoutingTable, timeout_s: float, queue: int) -> list[str]:
    asked: list[str] = []

    async def ask(user_id: str) -> None:
        asked.append(user_id)

    routes.gate = WakeGate(timeout_s, queue, ask)
    return asked


async def test_many_waiters_one_wake_served_when_routed(store):
    routes = RoutingTable(store)
    asked = gate_for(routes, 10, 64)
    user = await record(store, InstanceState.SUSPENDED)
    waiters = [asyncio.create_task(routes.resolve(user)) for _ in range(20)]
    await asyncio.sleep(0.3)
    assert asked == [user] and not any(w.done() for w in waiters)
    routes.on_ready(user, "local", "127.0.0.1", 40123, "i1")
    routes_got = await asyncio.wait_for(asyncio.gather(*waiters), 2)
    assert {r.port for r in routes_got} == {40123}
    # Asleep again later: a new wake is asked for.
    routes.on_gone(user, "suspended")
    task = asyncio.create_task(routes.resolve(user))
    await asyncio.sleep(0.2)
    assert asked == [user, user]
    routes.on_ready(user, "local", "127.0.0.1", 40123, "i1")
    await asyncio.wait_for(task, 2)


async def test_hold_is_bounded_by_time_and_queue(store):
    routes = RoutingTable(store)
    asked = gate_for(routes, 1.5, 2)
    user = await record(store, InstanceState.SUSPENDED)
    t0 = time.monotonic()
    waiters = [asyncio.create_task(routes.resolve(user)) for _ in range(3)]
    done, _ = await asyncio.wait(waiters, timeout=0.3)
    assert len(done) == 1  # the third found the queue full at once
    with pytest.raises(NoRoute) as full:
        done.pop().result()
    assert full.value.state == "suspended"
    for w in waiters:
        if not w.done():
            with pytest.raises(NoRoute) as late:
                await w
            assert late.value.state == "suspended"  # answered 503 with the state, after the timeout
    assert 1.4 < time.monotonic() - t0 < 3.5 and asked == [user]


async def test_a_users_stop_is_not_held(store):
    routes = RoutingTable(store)
    asked = gate_for(routes, 10, 64)
    user = await record(store, InstanceState.STOPPED)
    t0 = time.monotonic()
    with pytest.raises(NoRoute) as e:
        await routes.resolve(user)
    assert e.value.state == "stopped" and time.monotonic() - t0 < 0.5 and asked == []


async def test_a_waiter_follows_the_record_when_the_event_is_missed(store):
    routes = RoutingTable(store)
    gate_for(routes, 10, 64)
    user = await record(store, InstanceState.SUSPENDED)
    task = asyncio.create_task(routes.resolve(user))
    await asyncio.sleep(0.2)
    # Woken by another proxy replica's request: this one hears no event, only the record says.
    await store.instances.update_one({"_id": user}, {"$set": {"state": "running"}})
    route = await asyncio.wait_for(task, 3)
    assert route.port == 40123 and routes.routes[user] == route
    # A sleeper that is stopped meanwhile: the waiter gives up with the new state.
    user2 = await record(store, InstanceState.SUSPENDED)
    task = asyncio.create_task(routes.resolve(user2))
    await asyncio.sleep(0.2)
    await store.instances.update_one({"_id": user2}, {"$set": {"state": "stopped"}})
    with pytest.raises(NoRoute) as e:
        await asyncio.wait_for(task, 3)
    assert e.value.state == "stopped"


async def test_gone_carries_the_state():
    assert Gone("suspended").state == "suspended" and str(Gone(None)) == "absent"
