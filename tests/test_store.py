"""The Mongo store on the real MongoDB-compatible server (FerretDB)."""

import asyncio

import pytest
from pymongo.errors import DuplicateKeyError

from shared.state import IllegalTransition, InstanceState
from tests.conftest import new_user


async def test_insert_find_update(store):
    user = new_user()
    doc = await store.create_instance(user, {"instance_id": "i1", "docker_host": "h1"})
    assert doc is not None
    assert (await store.get_instance(user))["state"] == "requested"
    assert await store.create_instance(user, {"instance_id": "i2"}) is None  # one record per user
    assert await store.update_instance(user, {"port": 1234}, "i1")
    assert not await store.update_instance(user, {"port": 9}, "other-incarnation")
    got = await store.get_instance(user)
    assert got["port"] == 1234 and got["instance_id"] == "i1"


async def test_unique_index_refuses_a_second_owner_of_a_port(store):
    await store.ports.insert_one({"_id": "hx:1", "docker_host": "hx", "port": 40001, "user_id": "a"})
    with pytest.raises(DuplicateKeyError):
        await store.ports.insert_one({"_id": "hx:other", "docker_host": "hx", "port": 40001, "user_id": "b"})


async def test_transitions_are_conditional_and_atomic(store):
    user = new_user()
    await store.create_instance(user, {"instance_id": "i1"})
    with pytest.raises(IllegalTransition):
        await store.transition(user, InstanceState.RUNNING)  # requested -> running skips steps
    assert (await store.get_instance(user))["state"] == "requested"
    for target in (InstanceState.PROVISIONING, InstanceState.STARTING, InstanceState.RUNNING):
        await store.transition(user, target, instance_id="i1")
    # Ten writers race for running -> stopping (stopping -> stopping is illegal): exactly one wins.
    results = await asyncio.gather(
        *(store.transition(user, InstanceState.STOPPING) for _ in range(10)), return_exceptions=True
    )
    assert sum(isinstance(r, dict) for r in results) == 1
    assert all(isinstance(r, IllegalTransition) for r in results if not isinstance(r, dict))
    doc = await store.get_instance(user)
    assert doc["state"] == "stopping" and doc["version"] == 5
    with pytest.raises(IllegalTransition):
        await store.transition(user, InstanceState.STOPPED, instance_id="stale-incarnation")


async def test_concurrent_field_updates_are_not_lost(store):
    user = new_user()
    await store.create_instance(user, {"instance_id": "i1"})
    await asyncio.gather(*(store.update_instance(user, {f"f{i}": i}) for i in range(10)))
    doc = await store.get_instance(user)
    assert all(doc[f"f{i}"] == i for i in range(10)) and doc["version"] == 11


async def test_concurrent_port_allocation_gives_distinct_ports(store):
    host = "h-" + new_user()
    ports = await asyncio.gather(*(store.allocate_port(host, f"user{i}", 50000, 50030) for i in range(20)))
    assert len(set(ports)) == 20
    assert await store.allocate_port(host, "user3", 50000, 50030) == ports[3]  # idempotent per user
    assert await store.release_port(host, "user3") == 1
    assert await store.ports.count_documents({"docker_host": host}) == 19


async def test_request_ids_are_claimed_once(store):
    rid = new_user("req")
    assert await store.claim_request(rid, "alice", "requested") is None
    again = await store.claim_request(rid, "alice", "requested")
    assert again is not None and again["_id"] == rid


async def test_a_dead_writers_claim_blocks_only_until_it_goes_stale(store):
    """A writer that claimed version 2 and died before writing (FerretDB restarted under it)
    must not wedge the record forever: a fresh orphan claim blocks, a stale one is dropped."""
    from datetime import timedelta

    from shared.store import STALE_CLAIM_S, utcnow

    user = new_user()
    await store.create_instance(user, {"instance_id": "i1"})
    await store.journal.insert_one({"_id": f"{user}:2", "user_id": user, "at": utcnow()})
    with pytest.raises(RuntimeError, match="contention"):
        await store.transition(user, InstanceState.PROVISIONING)
    assert (await store.get_instance(user))["state"] == "requested"
    await store.journal.update_one(
        {"_id": f"{user}:2"}, {"$set": {"at": utcnow() - timedelta(seconds=STALE_CLAIM_S + 1)}}
    )
    doc = await store.transition(user, InstanceState.PROVISIONING)
    assert doc["state"] == "provisioning" and doc["version"] == 2
