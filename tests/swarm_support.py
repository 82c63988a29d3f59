"""Helpers of the Swarm lab tests (tests/test_swarm_lab.py): the platform test's drain, node loss
and capacity checks, and the platform of one provisioner per node."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.backup.core import list_backups, make_target
from services.backup.ops import Backups
from services.backup.schedule import Scheduler
from services.provisioner.config import user_dirs
from services.provisioner.swarm_runtime import SwarmRuntime
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceCommand, InstanceMove
from shared.settings import ZakiSettings
from shared.store import Store
from tests.conftest import (
    STANDIN_IMAGE,
    eventually,
    node_series,
    start_monitor,
)
from tests.test_self_healing import platform_env
from zaki import swarm_lab
from zaki.stack import REPO, Stack, free_port, wait_for_port


async def one_gateway_per_node(metrics_url: str, lab: swarm_lab.Lab) -> bool:
    """The provisioner's zaki_node_* series: every node ready, holding one 64 MiB gateway."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(metrics_url)).text
    series = node_series(text)
    names = {n.name for n in lab.nodes}
    return (
        series.get("zaki_node_gateways") == dict.fromkeys(names, 1)
        and series.get("zaki_node_memory_reserved_bytes") == dict.fromkeys(names, 64 << 20)
        and series.get("zaki_node_ready") == dict.fromkeys(names, 1)
    )


async def lose_node_3(
    lab: swarm_lab.Lab,
    platform: PlatformClient,
    proxy: Any,
    store: Store,
    placed: dict[str, str],
    keys_of: dict[str, str],
) -> dict[str, str]:
    """Node 3's engine is killed: the monitor reports its users ``node_down`` and moves them
    (``instance.move``, not a restart: they are pinned to a node that may never return); each
    answers again from node 1 or 2 with its folder; the others are not touched."""
    node3 = lab.node(3)
    lost = sorted(u for u, host in placed.items() if host == node3.ip)
    assert lost, placed
    before = {u: (await store.get_instance(u))["instance_id"] for u in placed}
    since = len(platform.seen)
    t0 = time.monotonic()
    await asyncio.to_thread(swarm_lab.run, "docker", "kill", node3.name)

    async def back() -> dict[str, str] | None:
        docs = {u: await store.get_instance(u) for u in lost}
        if all(d["state"] == "running" and d["host"] != node3.ip for d in docs.values()):
            return {u: d["host"] for u, d in docs.items()}
        return None

    moved = await eventually(back, timeout=180, interval=1)
    took = time.monotonic() - t0
    for user in lost:
        await chat_through(proxy, user, keys_of[user])
    seen = platform.seen[since:]
    down = {
        b["user_id"]
        for s, b in seen
        if s.startswith(subjects.INSTANCE_HEALTH) and b.get("reason") == "node_down"
    }
    assert down == set(lost), seen
    touched = {b.get("user_id") for s, b in seen if s in (subjects.INSTANCE_RESTART, subjects.INSTANCE_MOVE)}
    assert touched == set(lost), touched  # moves for the lost users, nothing for the others
    for other, host in placed.items():
        if other not in lost:
            d = await store.get_instance(other)
            assert (d["host"], d["instance_id"], d["state"]) == (host, before[other], "running")
            await chat_through(proxy, other, keys_of[other])
    print(f"\nnode 3 killed: {lost} reported node_down and answering from {moved} after {took:.1f} s")
    # Node 3 comes back (its engine and its swarm state are on its volume) for the tests below.
    await asyncio.to_thread(swarm_lab.run, "docker", "start", node3.name)

    def ready_again() -> bool:
        states = swarm_lab.nd(lab.manager, "node", "ls", "--format", "{{.Hostname}} {{.Status}}")
        return f"{node3.name} Ready" in states

    await eventually(lambda: asyncio.to_thread(ready_again), timeout=90, interval=1)
    return moved


async def chat_through(proxy: Any, user: str, key: str) -> None:
    """A chat through the proxy, answered by *user*'s own gateway (the stand-in names its host)."""
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        r = await http.post(
            f"http://{proxy.address}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "openclaw", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert r.status_code == 200, r.text
    assert r.json()["system_fingerprint"] == f"zaki-{user}", r.json()
    assert r.json()["choices"][0]["message"]["content"] == "echo: hi"


async def drain_and_chat(
    lab: swarm_lab.Lab,
    p: Any,
    platform: PlatformClient,
    proxy: Any,
    store: Store,
    placed: dict[str, str],
    keys_of: dict[str, str],
) -> dict[str, str]:
    """`zaki swarm drain` on node 2 (the CLI, as an operator runs it): its user is backed up,
    moved to node 1 or 3 with its folder as it was, and answers there through the proxy; the
    others are not touched. Node 2 is made active again for the tests after this one."""
    node2 = lab.node(2)
    (user,) = [u for u, host in placed.items() if host == node2.ip]
    marker = user_dirs(Path(p.env["ZAKI_DATA_ROOT"]), user).workspace / "MOVED.md"
    marker.write_text("written before the move\n")
    before = {u: (await store.get_instance(u))["instance_id"] for u in placed}
    t0 = time.monotonic()
    out = await asyncio.to_thread(
        subprocess.run,
        [str(REPO / ".venv/bin/zaki"), "--state-dir", str(Path(p.env["ZAKI_DATA_ROOT"]).parent), "swarm", "drain", node2.name],
        env={**os.environ, **p.env}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    took = time.monotonic() - t0
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"{user}: ready" in out.stdout, out.stdout
        doc = await store.get_instance(user)
        assert doc["state"] == "running" and doc["host"] in {lab.node(1).ip, lab.node(3).ip}, doc
        assert marker.read_text() == "written before the move\n"  # the folder came along
        await chat_through(proxy, user, keys_of[user])  # the proxy follows the record
        # A node that is not one is refused before anything stops.
        bad = InstanceMove(user_id=user, away_from="no-such-node")
        subject, body = await platform.call(subjects.INSTANCE_MOVE, bad, timeout=30)
        assert subject == subjects.INSTANCE_FAILED and body.reason == "invalid_request", body
        assert (await store.get_instance(user))["state"] == "running"
        for other, host in placed.items():  # the others stayed where they were, untouched
            if other != user:
                d = await store.get_instance(other)
                assert (d["host"], d["instance_id"], d["state"]) == (host, before[other], "running")
                await chat_through(proxy, other, keys_of[other])
        target = make_target(ZakiSettings(**{k.removeprefix("ZAKI_").lower(): v for k, v in p.env.items()}))
        assert [m.reason for m in list_backups(target, user)] == ["pre_move"]  # taken before the move
        print(f"\ndrained {node2.name}: {user} moved to {doc['host']} in {took:.1f} s (CLI, incl. backup)")
        return {user: doc["host"]}
    finally:
        swarm_lab.nd(lab.manager, "node", "update", "--availability", "active", node2.name)


def per_node_platform(
    lab: swarm_lab.Lab, node_disks: list[Path], root: Path, service_env: dict[str, str], **extra: str
) -> tuple[Stack, dict[str, str], dict[str, str]]:
    """NATS, FerretDB and a provisioner for each node (ZAKI_SWARM_NODE), each with its data root on
    its node's own disk. Returns the stack, the shared env and each node's metrics URL."""
    stack = Stack(root / "stack")
    nats_p, mongo_p = stack.start_nats(), stack.start_ferretdb()
    net = ipaddress.ip_network(lab.subnet).network_address
    settings = {
        "ZAKI_RUNTIME": "swarm", "ZAKI_EGRESS_POLICY": "off",  # the guard is the platform test's
        "ZAKI_SWARM_MANAGER_URL": swarm_lab.api_url(lab, lab.manager), "ZAKI_SWARM_PROXY_ADDRESS": str(net + 1),
        "ZAKI_GATEWAY_IMAGE": STANDIN_IMAGE, "ZAKI_NETWORK_PREFIX": "28", "ZAKI_GATEWAY_MEMORY": "64m",
        "ZAKI_GATEWAY_CPUS": "0.5", "ZAKI_BACKUP_DIR": str(root / "backups"),  # every node reaches it (S3 in production)
    }  # fmt: skip
    env = platform_env(
        service_env,
        root,
        "pernode",
        f"{net + 225 * 256}/24",
        nats_p.address,
        mongo_p.address,
        **{**settings, **extra},
    )
    metrics_of = {}
    for node, disk in zip(lab.nodes, node_disks, strict=True):
        port = free_port()
        own = {
            **env,
            "ZAKI_SWARM_NODE": node.name,
            "ZAKI_DATA_ROOT": str(disk),
            "ZAKI_METRICS_PORT": str(port),
        }
        proc = stack.spawn(f"provisioner-{node.name}", [sys.executable, "-m", "services.provisioner"], own)
        wait_for_port("127.0.0.1", port, proc.proc, f"provisioner of {node.name}")
        metrics_of[node.name] = f"http://127.0.0.1:{port}/metrics"
    return stack, env, metrics_of


def executed(metrics_text: str) -> Counter[str]:
    """What a provisioner ran itself: gateways it made ready and lifecycle commands it did."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "zaki_provisioner_requests_total" and sample.labels["outcome"] == "ready":
                out["requested"] += int(sample.value)
            if sample.name == "zaki_provisioner_commands_total" and sample.labels["outcome"] == "ok":
                out[sample.labels["command"]] += int(sample.value)
    return +out


async def move_across_disks(
    platform: PlatformClient, store: Store, users: dict[str, str], disk_of: dict[str, Path],
    node_of_ip: dict[str, str], metrics_of: dict[str, str],
) -> dict[str, str]:  # fmt: skip
    """Moves with per-node disks (services/provisioner/moves.py): a running user and a stopped one
    (*users*: user -> node, the stopped one first) each leave their node; each folder goes with
    it as a backup, to another node's disk, and the old one is kept aside. Returns where they went."""
    async with httpx.AsyncClient() as http:
        before = {n: executed((await http.get(url)).text) for n, url in metrics_of.items()}
    stopped, running = list(users)[:2]
    moved: dict[str, str] = {}
    for user, outcome in ((running, subjects.INSTANCE_READY), (stopped, subjects.INSTANCE_STOPPED)):
        src = users[user]
        memory = user_dirs(disk_of[src], user).workspace / "MEMORY.md"
        memory.write_text(f"remember {user} on {src}\n")
        got, body = await platform.call(subjects.INSTANCE_MOVE, InstanceMove(user_id=user), timeout=120)
        assert got == outcome, body
        doc = await store.get_instance(user)
        assert doc is not None and not doc.get("move"), doc
        moved[user] = dst = node_of_ip[doc["host"]]
        assert dst != src
        assert (
            user_dirs(disk_of[dst], user).workspace / "MEMORY.md"
        ).read_text() == f"remember {user} on {src}\n"
        assert not user_dirs(disk_of[src], user).root.exists()  # gone from the node it left...
        kept = list((disk_of[src] / "users" / ".kept").glob(f"{user}-*"))  # ...but kept aside there
        assert len(kept) == 1 and (kept[0] / "workspace" / "MEMORY.md").is_file()
        assert not (kept[0] / ".openclaw" / "openclaw.json").exists()  # never its secrets
    # The stopped one starts where it went: its next command is run by that node's replica.
    got, body = await platform.call(subjects.INSTANCE_START, InstanceCommand(user_id=stopped), timeout=120)
    assert got == subjects.INSTANCE_READY, body
    assert node_of_ip[(await store.get_instance(stopped))["host"]] == moved[stopped]
    async with httpx.AsyncClient() as http:
        after = {n: executed((await http.get(url)).text) for n, url in metrics_of.items()}
    ran = {n: after[n] - before[n] for n in metrics_of}
    for user in (running, stopped):  # moved out by its old node's replica, in by its new one's
        assert ran[users[user]]["move"] >= 1 and ran[moved[user]]["move"] >= 1, ran
    return moved


async def commands_wait_for_a_move(platform: PlatformClient, store: Store, user: str, to: str) -> None:
    """While a user is moving (its record says where to), its commands go to that node, which
    refuses them until it lands (a start there would run on an empty folder)."""
    doc = await store.get_instance(user)
    assert doc is not None
    move = {"to": to, "from": "elsewhere", "backup_id": None, "state": doc["state"]}
    assert await store.update_instance(user, {"move": move}, doc["instance_id"])
    try:
        got, body = await platform.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=user), timeout=60)
        assert got == subjects.INSTANCE_FAILED and body.reason == "restore_in_progress", body
        assert "moving to another node" in body.message
        assert (await store.get_instance(user))["state"] == doc["state"]  # nothing done
    finally:
        await store.update_instance(user, {"move": None}, doc["instance_id"])


async def lose_node_3_and_its_disk(
    lab: swarm_lab.Lab, platform: PlatformClient, store: Store, disk_of: dict[str, Path],
    node_of_ip: dict[str, str], env: dict[str, str],
) -> str:  # fmt: skip
    """Node 3's engine is killed with its disk out of reach: a move away from it (what the monitor
    sends for a node that is down) is placed on another node, whose replica restores the user's
    last backup there; what was written after that backup is lost with the node. Returns where it went."""
    node3 = lab.node(3)
    user = next(
        u for u, ip in [(d["_id"], d.get("host")) for d in await store.list_instances()] if ip == node3.ip
    )
    memory = user_dirs(disk_of[node3.name], user).workspace / "MEMORY.md"
    memory.write_text("in the last backup\n")
    own = {**env, "ZAKI_DATA_ROOT": str(disk_of[node3.name]), "ZAKI_SWARM_NODE": node3.name}
    settings = ZakiSettings(**{k.removeprefix("ZAKI_").lower(): v for k, v in own.items()})
    doc = await store.get_instance(user)
    await Backups.from_settings(settings).create(
        user, doc["instance_id"], "scheduled"
    )  # as services/backup does
    memory.write_text("written after it\n")
    swarm_lab.nd(lab.manager, "swarm", "update", "--dispatcher-heartbeat", "1s")
    await asyncio.to_thread(swarm_lab.run, "docker", "kill", node3.name)

    def down() -> bool:
        states = swarm_lab.nd(lab.manager, "node", "ls", "--format", "{{.Hostname}} {{.Status}}")
        return f"{node3.name} Down" in states

    await eventually(lambda: asyncio.to_thread(down), timeout=60, interval=1)
    t0 = time.monotonic()
    move = InstanceMove(user_id=user, away_from=node3.name)
    got, body = await platform.call(subjects.INSTANCE_MOVE, move, timeout=120)
    assert got == subjects.INSTANCE_READY, body
    where = node_of_ip[(await store.get_instance(user))["host"]]
    assert where != node3.name
    assert (user_dirs(disk_of[where], user).workspace / "MEMORY.md").read_text() == "in the last backup\n"
    print(f"node 3 lost: {user} restored from its last backup on {where} in {time.monotonic() - t0:.1f} s")
    return where


async def a_crash_on_a_node_is_reported(
    lab: swarm_lab.Lab, platform: PlatformClient, store: Store, stack: Stack, env: dict[str, str]
) -> None:
    """A monitor on the host, whose engine runs no gateway, probing only every 2 minutes: a
    gateway SIGKILLed in node 3's engine is reported ``exited`` (exit 137) within seconds, from the
    manager's task list (services/monitor/tasks.py); the swarm starts it again on its node."""
    node3 = lab.node(3)
    user = next(d["_id"] for d in await store.list_instances(states=["running"]) if d.get("host") == node3.ip)
    mon = start_monitor(stack, env, "pernode-mon", ZAKI_PROBE_INTERVAL_S="120", ZAKI_SWARM_TASK_POLL_S="1")
    try:
        # Its first sweep makes the watches and its first task read marks older failures as
        # history (both at start); a read after that one sees the crash below as news.
        await asyncio.sleep(3)
        since = len(platform.seen)
        cid = swarm_lab.nd(node3, "ps", "-q", "--filter", f"label=zaki.user={user}").strip()
        assert cid, f"no container of {user} on {node3.name}"
        t0 = time.monotonic()
        swarm_lab.nd(node3, "kill", cid)

        def exited() -> dict[str, Any] | None:
            for subject, body in platform.seen[since:]:
                if subject.startswith(subjects.INSTANCE_HEALTH) and body.get("user_id") == user:
                    return body
            return None

        body = await eventually(exited, timeout=30, interval=0.25)
        took = time.monotonic() - t0
        assert (body["state"], body["reason"], body["detail"]) == (
            "unreachable",
            "exited",
            "exit code 137",
        ), body

        def running_again() -> bool:
            out = swarm_lab.nd(node3, "ps", "-q", "--filter", f"label=zaki.user={user}").strip()
            return bool(out) and out != cid

        await eventually(lambda: asyncio.to_thread(running_again), timeout=60, interval=0.5)
        print(
            f"a gateway killed on {node3.name}: reported exited after {took:.1f} s, started again by the swarm"
        )
    finally:
        mon.stop()


async def one_backup_service_per_node(
    lab: swarm_lab.Lab, store: Store, disk_of: dict[str, Path], env: dict[str, str]
) -> None:
    """With folders on each node's disk, a backup service per node (``ZAKI_SWARM_NODE``) backs up
    the gateways on its node and no other (another node's user has no folder on its disk, or a
    stale one left by a move): one sweep of each, every user's backup made once, none failed."""
    rt = SwarmRuntime(swarm_lab.api_url(lab, lab.manager))
    where = {n.address: n.node for n in await rt.node_capacity()}
    per_node = Counter(where[d["host"]] for d in await store.list_instances(states=["running"]))
    for node in lab.nodes:
        own = {**env, "ZAKI_DATA_ROOT": str(disk_of[node.name]), "ZAKI_SWARM_NODE": node.name}
        own["ZAKI_BACKUP_INTERVAL_S"] = "1"  # every user is due
        s = ZakiSettings(**{k.removeprefix("ZAKI_").lower(): v for k, v in own.items()})
        swept = await Scheduler(Backups.from_settings(s), store, rt.node_capacity).sweep()
        assert (swept["created"], swept["failed"]) == (per_node[node.name], 0), (node.name, swept)
