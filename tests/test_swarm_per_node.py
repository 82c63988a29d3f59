"""One provisioner per Swarm node, each with its data root on its node's own disk (issue 18,
``ZAKI_SWARM_NODE``), on the session's Swarm lab (tests/swarm_lab_fixtures.py): command routing,
placement races, moves that carry the folder as a backup, exits seen on every node, a backup
service per node and the loss of a node with its disk."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import nats

from services.provisioner.config import user_dirs
from services.provisioner.routing import node_subject
from services.provisioner.swarm_runtime import SwarmRuntime
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceCommand, InstanceDelete, InstanceRequested
from shared.store import Store
from tests.conftest import STANDIN_IMAGE, _wait_consumers, eventually, new_user, require_tool
from tests.swarm_support import (
    a_crash_on_a_node_is_reported,
    commands_wait_for_a_move,
    executed,
    lose_node_3_and_its_disk,
    move_across_disks,
    one_backup_service_per_node,
    per_node_platform,
)
from zaki import swarm_lab

pytestmark = require_tool(shutil.which("docker"), "docker")


async def tear_down(platform: PlatformClient, store: Store, stack: Any, users: Iterable[str]) -> None:
    """Deletes the test's users (purged) and stops its platform."""
    for user in users:
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60)
    await platform.close()
    await store.close()
    await asyncio.to_thread(stack.stop)


def no_reservation_held(rt: SwarmRuntime) -> bool:
    """No task of any service with a memory reservation still holds it on a node (the scheduler
    frees it only once the task has ended, not when its service is removed)."""
    api = rt.client.api
    services = api.services()
    free = {  # services that reserve nothing (the node guard); a removed one's tasks still may
        svc["ID"]
        for svc in services
        if not (
            ((svc["Spec"].get("TaskTemplate") or {}).get("Resources") or {}).get("Reservations") or {}
        ).get("MemoryBytes")
    }
    holding = ("assigned", "accepted", "preparing", "ready", "starting", "running")
    return not any(t["Status"]["State"] in holding for t in api.tasks() if t["ServiceID"] not in free)


async def test_new_users_sent_to_the_same_node_at_once_go_on_to_nodes_with_room(
    lab: swarm_lab.Lab, node_disks: list[Path], tmp_path_factory, service_env: dict[str, str], fakes
) -> None:
    """One provisioner per node, each node's memory holding one gateway: three users asked for at
    once are all placed on the same (emptiest) node by the replicas that take them; that node's
    replica keeps one and sends the others on to nodes with room (it counts what it is placing
    itself), so every request gets a gateway and none a false ``no_capacity``. A fourth does not fit."""
    rt = SwarmRuntime(swarm_lab.api_url(lab, lab.manager))
    # Earlier tests' gateways hold their reservations in the scheduler until their tasks end.
    await eventually(lambda: asyncio.to_thread(no_reservation_held, rt), timeout=60, interval=0.5)
    memory = min(n.memory_bytes for n in await rt.node_capacity())
    one_per_node = str(memory // 2 + (64 << 20))
    stack, env, _ = await asyncio.to_thread(
        per_node_platform, lab, node_disks, tmp_path_factory.mktemp("race"), service_env,
        ZAKI_GATEWAY_MEMORY=one_per_node,
    )  # fmt: skip
    platform = await PlatformClient.connect(env["ZAKI_NATS_URL"])
    store = Store(env["ZAKI_MONGO_URL"], env["ZAKI_MONGO_DB"])
    users = [new_user("race") for _ in range(4)]
    try:
        await _wait_consumers(env["ZAKI_NATS_URL"], len(subjects.COMMANDS) + len(lab.nodes))

        def request(user: str) -> InstanceRequested:
            return InstanceRequested(
                request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
            )

        outcomes = await asyncio.gather(
            *(platform.call(subjects.INSTANCE_REQUESTED, request(u), timeout=120) for u in users[:3])
        )
        assert [s for s, _ in outcomes] == [subjects.INSTANCE_READY] * 3, outcomes
        hosts = {(await store.get_instance(u))["host"] for u in users[:3]}
        assert hosts == {n.ip for n in lab.nodes}
        got, body = await platform.call(subjects.INSTANCE_REQUESTED, request(users[3]), timeout=120)
        assert got == subjects.INSTANCE_FAILED and "no_capacity" in body.message, body
    finally:
        await tear_down(platform, store, stack, users)


async def test_one_provisioner_per_node_runs_only_the_commands_of_its_nodes_gateways(
    lab: swarm_lab.Lab, node_disks: list[Path], tmp_path_factory, service_env: dict[str, str], fakes
) -> None:
    """ZAKI_SWARM_NODE: one provisioner per node, each writing data folders on its node's own disk
    (a host folder no other node mounts). Commands published on the shared subjects, taken by any
    replica: three new users land one per node, each folder on its node's disk only; a stop and a
    start of each run on its node's replica alone (a wrong one would write the config on a disk
    the gateway's node does not have); a stop published straight to the wrong node's subject is
    sent on to the right one. Then moves with per-node disks: a running and a stopped user each
    leave their node with their folder (as a backup) and land on another node's disk; while a
    user is moving, its commands wait; a gateway killed on a node is reported by a monitor that
    watches the manager's tasks; a backup service per node backs up its own node's users only;
    node 3 lost with its disk: its user comes back elsewhere
    from its last backup."""
    stack, env, metrics_of = await asyncio.to_thread(
        per_node_platform, lab, node_disks, tmp_path_factory.mktemp("pernode"), service_env
    )
    disk_of = {n.name: d for n, d in zip(lab.nodes, node_disks, strict=True)}
    node_of_ip = {n.ip: n.name for n in lab.nodes}
    platform = await PlatformClient.connect(env["ZAKI_NATS_URL"])
    store = Store(env["ZAKI_MONGO_URL"], env["ZAKI_MONGO_DB"])
    users: dict[str, str] = {}  # user -> node
    try:
        await _wait_consumers(env["ZAKI_NATS_URL"], len(subjects.COMMANDS) + len(lab.nodes))

        async def call(subject: str, event: Any, want: str) -> None:
            got, body = await platform.call(subject, event, timeout=120)
            assert got == want, body

        for _ in lab.nodes:  # one after another: each goes where the most memory is left
            ev = InstanceRequested(
                request_id=new_user("req"), user_id=new_user("pn"), bot_token=fakes.bot(), image=STANDIN_IMAGE
            )
            await call(subjects.INSTANCE_REQUESTED, ev, subjects.INSTANCE_READY)
            users[ev.user_id] = node_of_ip[(await store.get_instance(ev.user_id))["host"]]
        assert sorted(users.values()) == sorted(n.name for n in lab.nodes), users
        for user, node in users.items():  # the folder on its node's disk, on no other
            assert [n for n, d in disk_of.items() if user_dirs(d, user).config.exists()] == [node]
            for subject, want in ((subjects.INSTANCE_STOP, subjects.INSTANCE_STOPPED),
                                  (subjects.INSTANCE_START, subjects.INSTANCE_READY)):  # fmt: skip
                await call(subject, InstanceCommand(request_id=new_user("req"), user_id=user), want)
        # Published to the wrong node's subject (a stale forward, or a mistake): sent on.
        first, first_node = next(iter(users.items()))
        wrong = next(n.name for n in lab.nodes if n.name != first_node)
        stop = InstanceCommand(request_id=new_user("req"), user_id=first)
        ack = await platform.js.publish(
            node_subject(wrong, subjects.INSTANCE_STOP), stop.model_dump_json().encode()
        )
        assert ack.stream == subjects.COMMAND_STREAM

        async def stopped() -> bool:
            return (await store.get_instance(first))["state"] == "stopped"

        await eventually(stopped, timeout=60, interval=0.5)
        # A node subject takes any last token: one that is no command is dead-lettered, not retried.
        await platform.js.publish(node_subject(first_node, f"{subjects.PREFIX}.instance.bogus"), b"{}")

        async def dead_lettered() -> bool:
            dead = subjects.dead_letter_subject(f"{subjects.PREFIX}.instance.bogus")
            try:
                return bool(await platform.js.get_last_msg(subjects.DEAD_LETTER_STREAM, dead))
            except nats.js.errors.NotFoundError:
                return False

        await eventually(dead_lettered, timeout=30, interval=0.5)
        async with httpx.AsyncClient() as http:
            ran = {n: executed((await http.get(url)).text) for n, url in metrics_of.items()}
        # "requested": gateways this replica made ready (its user's request, then its start).
        want = {node: Counter(requested=2, stop=1, start=1) for node in users.values()}
        want[first_node]["stop"] += 1
        assert ran == want, ran
        print(f"\none provisioner per node: {users}; each ran only its own: {ran}")
        await a_crash_on_a_node_is_reported(lab, platform, store, stack, env)
        t0 = time.monotonic()
        moved = await move_across_disks(platform, store, users, disk_of, node_of_ip, metrics_of)
        print(f"moved with per-node disks in {time.monotonic() - t0:.1f} s: {moved}")
        running = list(users)[1]
        await commands_wait_for_a_move(platform, store, running, moved[running])
        await one_backup_service_per_node(lab, store, disk_of, env)
        await lose_node_3_and_its_disk(lab, platform, store, disk_of, node_of_ip, env)
    finally:
        await tear_down(platform, store, stack, users)
