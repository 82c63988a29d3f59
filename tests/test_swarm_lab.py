"""A Docker Swarm of three nested engines on this machine (zaki/swarm_lab.py, docs/swarm.md):
one stand-in gateway per node placed by constraint, each on its tenant's own overlay network and
published in host mode on its node; the host (where the proxy runs) reaches every one at
node_ip:port, and a tenant's task cannot reach another tenant's, on another node or its own."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import docker
import httpx
import pytest

from services.gateway_proxy import keys
from services.provisioner.networks import RuntimeError_
from services.provisioner.runtime import ContainerSpec
from services.provisioner.swarm_guard import GuardSpec, ensure_guard, guard_name, label_guarded_nodes
from services.provisioner.swarm_runtime import NODE_LABEL, SwarmRuntime
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceDelete, InstanceMove, InstanceRequested
from shared.gateway import CONTAINER_STATE_DIR, container_name, identity_headers, network_name
from shared.store import Store
from tests.conftest import (
    STANDIN_IMAGE,
    eventually,
    new_user,
    require_tool,
    start_monitor,
)
from tests.proxy_support import start_proxy
from tests.swarm_lab_fixtures import SERVICES_IMAGE
from tests.swarm_support import (
    chat_through,
    drain_and_chat,
    lose_node_3,
    one_gateway_per_node,
)
from tests.test_self_healing import start_private_platform
from zaki import swarm_lab

pytestmark = require_tool(shutil.which("docker"), "docker")


GUARD_PLATFORM = "lab"
# The guard the first test runs by hand: what guard_spec() makes of ZAKI_EGRESS_POLICY=enforce.
GUARD = GuardSpec(
    SERVICES_IMAGE, {"ZAKI_BROKER_PORT": "8090", "ZAKI_NODE_GUARD_INTERVAL_S": "1", "ZAKI_METRICS_PORT": "0"}
)
PORT = 18789  # the gateway's port in its container
# tenant -> (node, published port on that node)
TENANTS = {"a": (1, 30001), "b": (2, 30002), "c": (3, 30003), "d": (2, 30004)}
# Runs in a tenant's container (node is the stand-in's runtime): one line per URL.
PROBE = """(async () => { for (const u of process.argv.slice(1)) {
  try { const r = await fetch(u, { signal: AbortSignal.timeout(3000) }); console.log("OK", r.status, u); }
  catch (e) { console.log("ERR", (e.cause && e.cause.code) || e.name, u); } } })();"""


def http_status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code
    except httpx.HTTPError:
        return None


def task_container(lab: swarm_lab.Lab, node: int, service: str) -> str:
    return swarm_lab.nd(
        lab.node(node), "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}"
    )


def overlay_address(lab: swarm_lab.Lab, node: int, tenant: str) -> str:
    fmt = f'{{{{(index .NetworkSettings.Networks "tenant-{tenant}").IPAddress}}}}'
    return swarm_lab.nd(lab.node(node), "inspect", "-f", fmt, task_container(lab, node, f"gw-{tenant}"))


def probe(lab: swarm_lab.Lab, node: int, service: str, *urls: str) -> dict[str, str]:
    """Fetches *urls* from inside *service*'s container (an attacker's view): url -> OK/ERR."""
    cid = task_container(lab, node, service)
    out = swarm_lab.nd(lab.node(node), "exec", cid, "node", "-e", PROBE, *urls, timeout=60)
    return {line.split()[2]: " ".join(line.split()[:2]) for line in out.splitlines()}


def test_a_gateway_on_each_node_is_reached_from_the_host_and_tenants_cannot_cross(
    lab: swarm_lab.Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.monotonic()
    m = lab.manager
    for t, (n, published) in TENANTS.items():
        swarm_lab.nd(m, "network", "create", "-d", "overlay", f"tenant-{t}")
        # dnsrr: no virtual IP (IPVS is not in this kernel); host mode: the port opens on the
        # task's node only, where the proxy reaches it (the ingress mesh also needs IPVS).
        swarm_lab.nd(
            m, "service", "create", "-d", "-q", "--no-resolve-image", "--name", f"gw-{t}",
            "--network", f"tenant-{t}", "--endpoint-mode", "dnsrr",
            "--constraint", f"node.labels.zaki.node==n{n}", "--reserve-memory", "64M",
            "--publish", f"mode=host,target={PORT},published={published}", STANDIN_IMAGE,
        )  # fmt: skip
    urls = {t: f"http://{lab.node(n).ip}:{p}/healthz" for t, (n, p) in TENANTS.items()}
    deadline = time.monotonic() + 90
    while any(http_status(u) != 200 for u in urls.values()):
        assert time.monotonic() < deadline, {t: http_status(u) for t, u in urls.items()}
        time.sleep(0.5)
    placed = time.monotonic() - t0
    for t, (n, _) in TENANTS.items():
        node = swarm_lab.nd(
            m, "service", "ps", f"gw-{t}", "--format", "{{.Node}}", "-f", "desired-state=running"
        )
        assert node == lab.node(n).name, (t, node)

    overlay_ip = {t: overlay_address(lab, n, t) for t, (n, _) in TENANTS.items()}
    # Tenant b (node 2) attacks c (node 3: its overlay address and published port), d (node 2,
    # through the node's own address) and a (node 1). Its own gateway answers: the probe works.
    attacks = [f"http://{overlay_ip['c']}:{PORT}/healthz", urls["c"], urls["d"], urls["a"]]
    own = f"http://127.0.0.1:{PORT}/healthz"
    before = probe(lab, 2, "gw-b", urls["c"])
    # Without the egress chains a published port is open to every tenant: what they close.
    assert before[urls["c"]] == "OK 200", before

    # The platform's node guard (services/node_guard) on every node: what the provisioner runs
    # with ZAKI_EGRESS_POLICY=enforce. Each node is labelled once its guard is healthy.
    client = docker.DockerClient(base_url=swarm_lab.api_url(lab, m), timeout=60)
    t_guard = time.monotonic()
    ensure_guard(client, GUARD, GUARD_PLATFORM)
    deadline = time.monotonic() + 90
    while len(label_guarded_nodes(client, GUARD_PLATFORM)) < len(lab.nodes):
        assert time.monotonic() < deadline, swarm_lab.nd(m, "service", "ps", guard_name(GUARD_PLATFORM))
        time.sleep(0.5)
    guarded_in = time.monotonic() - t_guard
    after = probe(lab, 2, "gw-b", own, *attacks)
    assert after[own] == "OK 200", after
    for url in attacks:
        assert after[url].startswith("ERR"), (url, after)
    for t, u in urls.items():  # the proxy's path still works
        assert http_status(u) == 200, t
    # A tenant (or a mistake) flushes the jump on node 2: the guard's next round puts it back
    # (the attack above shows what the jump stops; a probe could not see the gap reliably:
    # the guard's round is 1 s here).
    ipt = ("docker", "exec", lab.node(2).name, "iptables", "-w")
    t_tamper = time.monotonic()
    swarm_lab.run(*ipt, "-D", "DOCKER-USER", "-j", "ZAKI-EGRESS")
    deadline = time.monotonic() + 30
    while subprocess.run([*ipt, "-C", "DOCKER-USER", "-j", "ZAKI-EGRESS"], capture_output=True).returncode:
        assert time.monotonic() < deadline, "the guard did not put the jump back"
        time.sleep(0.1)
    assert probe(lab, 2, "gw-b", urls["c"])[urls["c"]].startswith("ERR")  # closed again
    repaired_in = time.monotonic() - t_tamper
    with pytest.raises(RuntimeError_, match="one platform per swarm"):  # two would fight over the chains
        ensure_guard(client, GUARD, "another-platform")
    client.api.remove_service(guard_name(GUARD_PLATFORM))  # the platform test below runs its own

    mem = {x.name[-2:]: round(swarm_lab.node_memory_mb(x)["engine_rss"]) for x in lab.nodes}
    with capsys.disabled():
        times = {k: round(v, 1) for k, v in lab.timings.items()}
        print(f"\nswarm lab {lab.id}: {times} s; 4 services reachable in {placed:.1f} s; "
              f"guards healthy on 3 nodes in {guarded_in:.1f} s; a deleted jump back in {repaired_in:.1f} s; "
              f"engine RSS MB {mem}")  # fmt: skip
        print(f"attacks from gw-b with the node guards: {after}")
    for t in TENANTS:  # the swarm is empty again for the platform's own placements below
        swarm_lab.nd(m, "service", "rm", f"gw-{t}")
    deadline = time.monotonic() + 30
    while (
        swarm_lab.nd(m, "network", "rm", *(f"tenant-{t}" for t in TENANTS), check=False).count("tenant-") < 4
    ):
        assert time.monotonic() < deadline
        time.sleep(0.5)


async def test_the_platform_on_swarm_serves_a_chat_through_the_proxy_on_each_node(
    lab: swarm_lab.Lab, data_root: Path, tmp_path_factory, service_env: dict[str, str], fakes
) -> None:
    """ZAKI_RUNTIME=swarm end to end: the provisioner places three users' gateways (one per node,
    the swarm spreads them), records each one's node as its address, and the proxy on the host
    reaches each there; the gateway trusts the proxy's address as the nodes see it."""
    t0 = time.monotonic()
    net = ipaddress.ip_network(lab.subnet).network_address
    host_ip = str(net + 1)
    # In a thread: the fake Telegram answers from this event loop (the provisioner checks the token).
    p = await asyncio.to_thread(
        start_private_platform,
        tmp_path_factory.mktemp("onswarm"), service_env, "onswarm", f"{net + 224 * 256}/24",
        ZAKI_RUNTIME="swarm",
        ZAKI_SWARM_GUARD_IMAGE=SERVICES_IMAGE, ZAKI_NODE_GUARD_INTERVAL_S="2",
        ZAKI_SWARM_MANAGER_URL=swarm_lab.api_url(lab, lab.manager),
        ZAKI_SWARM_PROXY_ADDRESS=host_ip, ZAKI_DATA_ROOT=str(data_root / "platform"),
        ZAKI_GATEWAY_IMAGE=STANDIN_IMAGE, ZAKI_NETWORK_PREFIX="28", ZAKI_GATEWAY_MEMORY="64m",
        ZAKI_GATEWAY_CPUS="0.5",
    )  # fmt: skip
    try:
        proxy = await asyncio.to_thread(start_proxy, p.stack, p.env, True)
        # The manager marks a node down after missing heartbeats: every 1 s here (default 5 s), so
        # it knows before the monitor gives up on a gateway (4 probes, 2 s apart).
        swarm_lab.nd(lab.manager, "swarm", "update", "--dispatcher-heartbeat", "1s")
        await asyncio.to_thread(
            start_monitor, p.stack, p.env, "swarm-mon", ZAKI_PROBE_INTERVAL_S="2", ZAKI_UNHEALTHY_AFTER="4"
        )  # it follows the swarm's nodes
        rt = SwarmRuntime(swarm_lab.api_url(lab, lab.manager))

        async def scenario() -> dict[str, str]:
            platform = await PlatformClient.connect(p.env["ZAKI_NATS_URL"])
            store = Store(p.env["ZAKI_MONGO_URL"], p.env["ZAKI_MONGO_DB"])
            placed: dict[str, str] = {}
            keys_of: dict[str, str] = {}
            try:
                for _ in range(3):  # one after another: each goes to the node with fewest tasks
                    ev = InstanceRequested(
                        request_id=new_user("req"), user_id=new_user("w"), bot_token=fakes.bot(),
                        image=STANDIN_IMAGE,
                    )  # fmt: skip
                    subject, body = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
                    assert subject == subjects.INSTANCE_READY, body
                    doc = await store.get_instance(ev.user_id)
                    assert doc is not None and doc["host"] == await rt.address(container_name(ev.user_id))
                    placed[ev.user_id] = doc["host"]
                    _, keys_of[ev.user_id] = await keys.create_key(store, ev.user_id, {"chat"})
                    await chat_through(proxy, ev.user_id, keys_of[ev.user_id])
                assert sorted(placed.values()) == sorted(n.ip for n in lab.nodes), placed
                # Only on nodes the platform's own guard fenced in (it runs with the policy on).
                label = f"node.label=zaki.egress.{p.env['ZAKI_PLATFORM_ID']}=guarded"
                guarded = swarm_lab.nd(lab.manager, "node", "ls", "-f", label, "--format", "{{.Hostname}}")
                assert set(guarded.split()) == {n.name for n in lab.nodes}
                # Capacity per node on the provisioner's metrics: one gateway and its reservation each.
                await eventually(lambda: one_gateway_per_node(p.metrics, lab), timeout=20, interval=0.5)
                placed.update(await drain_and_chat(lab, p, platform, proxy, store, placed, keys_of))
                placed.update(await lose_node_3(lab, platform, proxy, store, placed, keys_of))
                # Reconcile ran all along (every second) and never took the guard for an orphan.
                reconciles = (await asyncio.to_thread(httpx.get, p.metrics)).text
                assert 'zaki_provisioner_reconcile_actions_total{action="removed_orphan"} 0.0' in reconciles
                logs = "".join(f.read_text() for f in (p.stack.state_dir / "logs").glob("*.log"))
                assert "reconcile failed" not in logs
                guard = swarm_lab.nd(lab.manager, "service", "ls", "-q", "-f", "name=zaki-node-guard-")
                assert len(guard.split()) == 1
                for user in placed:  # and gone again, from the swarm too
                    subject, body = await platform.call(
                        subjects.INSTANCE_DELETE, InstanceDelete(request_id=new_user("req"), user_id=user),
                        timeout=60,
                    )  # fmt: skip
                    assert subject == subjects.INSTANCE_DELETED, body
                    assert not (await rt.status(container_name(user))).exists
                return placed
            finally:
                await platform.close()
                await store.close()

        placed = await scenario()
        print(
            f"\nthree users on swarm, placed, chatted and deleted in {time.monotonic() - t0:.1f} s: {placed}"
        )
    finally:
        await asyncio.to_thread(p.stop)


N_PER_NODE = 10  # instances a node's memory holds: 30 need all three nodes, the 31st none


def spec_for(lab: swarm_lab.Lab, data_root: Path, i: int, memory: str) -> ContainerSpec:
    user = f"s{i}"
    folder = data_root / user
    folder.mkdir(exist_ok=True)
    os.chown(folder, 1000, 1000)
    return ContainerSpec(
        user_id=user, instance_id=f"i{i}", image=STANDIN_IMAGE, host_port=31000 + i,
        publish_ip="0.0.0.0", network=network_name(user), binds={str(folder): CONTAINER_STATE_DIR},
        memory=memory, cpus=0.5, pids_limit=256,
    )  # fmt: skip


def subnet_for(lab: swarm_lab.Lab, spec: ContainerSpec) -> str:
    """Tenant overlays in the top /20 of the lab's /16 (the swarm's pool allocates from its bottom)."""
    base = ipaddress.ip_network(lab.subnet).network_address + 240 * 256
    return f"{base + 16 * int(spec.user_id[1:])}/28"


def ready(url: str, user: str) -> int | None:
    try:
        return httpx.get(url, headers=identity_headers(user), timeout=2, trust_env=False).status_code
    except httpx.HTTPError:
        return None


def test_swarm_runtime_spreads_30_refuses_the_31st_and_round_trips(
    lab: swarm_lab.Lab, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.monotonic()
    host_ip = str(ipaddress.ip_network(lab.subnet).network_address + 1)  # the proxy, seen by nodes
    rt = SwarmRuntime(swarm_lab.api_url(lab, lab.manager), proxy_address=host_ip, admission_s=3)
    nodes = rt.client.api.nodes()
    node_mem = {n["ID"]: int(n["Description"]["Resources"]["MemoryBytes"]) for n in nodes}
    # Memory reserved per instance: ten fit on a node (the earlier test's 64 MiB ones too), eleven
    # do not. Every nested engine reports the host's memory, so this is what makes spreading needed.
    memory_mb = (min(node_mem.values()) - 256 * 2**20) // N_PER_NODE // 2**20
    specs = [spec_for(lab, data_root, i, f"{memory_mb}m") for i in range(3 * N_PER_NODE + 1)]
    sem = asyncio.Semaphore(6)

    async def provision(spec: ContainerSpec) -> None:
        async with sem:
            assert await rt.ensure_network(spec.user_id, subnet_for(lab, spec)) == host_ip
            await rt.create(spec)
            assert (await rt.status(spec.name)).state == "created"
            await rt.start(spec.name)

    async def scenario() -> tuple[dict[str, float], dict[str, tuple[int, int, int]]]:
        times: dict[str, float] = {}
        await asyncio.gather(*(provision(s) for s in specs[:-1]))
        urls = {s.user_id: f"http://{await rt.address(s.name)}:{s.host_port}/readyz" for s in specs[:-1]}
        deadline = time.monotonic() + 60
        while waiting := [u for u, url in urls.items() if ready(url, u) != 200]:
            assert time.monotonic() < deadline, waiting
            await asyncio.sleep(0.3)
        times["30 answering"] = time.monotonic() - t0
        spread = Counter(url.split("/")[2].split(":")[0] for url in urls.values())
        assert sorted(spread.values()) == [N_PER_NODE] * 3, spread
        # The 31st: no node has room; refused, not queued, nobody overcommitted.
        t1 = time.monotonic()
        with pytest.raises(RuntimeError_, match="no_capacity"):
            await provision(specs[-1])
        times["refusal"] = time.monotonic() - t1
        assert (await rt.status(specs[-1].name)).state != "running"
        await rt.remove(specs[-1].name)
        await rt.remove_network(specs[-1].user_id)
        reserved: Counter[str] = Counter()
        for t in rt.client.api.tasks(filters={"desired-state": "running"}):
            reserved[t["NodeID"]] += (
                (t["Spec"].get("Resources") or {}).get("Reservations", {}).get("MemoryBytes", 0)
            )
        assert all(reserved[n] <= node_mem[n] for n in reserved), (reserved, node_mem)
        names = {n["ID"]: n["Description"]["Hostname"] for n in nodes}
        used = {x.name: swarm_lab.node_memory_mb(x)["containers_rss"] for x in lab.nodes}
        per_node = {
            names[n][-2:]: (r // 2**20, node_mem[n] // 2**20, round(used[names[n]]))
            for n, r in reserved.items()
        }
        managed = await rt.list_managed()
        assert len(managed) == 30 and all(m.running for m in managed)
        # The hardening carries over to the task's container, and the placement is pinned.
        svc = rt.client.api.inspect_service(specs[1].name)
        node_id = svc["Spec"]["Labels"][NODE_LABEL]
        assert svc["Spec"]["TaskTemplate"]["Placement"]["Constraints"] == [f"node.id=={node_id}"]
        host = rt.client.api.inspect_node(node_id)["Description"]["Hostname"]
        c = json.loads(swarm_lab.nd(host, "inspect", (await rt.status(specs[1].name)).container_id))[0]
        hc = c["HostConfig"]
        assert (hc["ReadonlyRootfs"], hc["PidsLimit"], hc["CapDrop"], c["Config"]["User"]) == (
            True, 256, ["ALL"], "1000:1000"
        )  # fmt: skip
        # The reservation is the scheduler's accounting (counted above), not a cgroup setting.
        assert hc["Memory"] == memory_mb * 2**20
        # stop / start / remove: a stopped one is "exited", starts again on its node (its data).
        s, url = specs[0], urls[specs[0].user_id]
        t1 = time.monotonic()
        await rt.stop(s.name, timeout=1)
        st = await rt.status(s.name)
        assert st.exists and st.state == "exited" and not st.running, st
        assert ready(url, s.user_id) is None
        await rt.start(s.name)
        assert f"http://{await rt.address(s.name)}:{s.host_port}/readyz" == url
        while ready(url, s.user_id) != 200:
            assert time.monotonic() - t1 < 30
            await asyncio.sleep(0.2)
        st = await rt.status(s.name)
        assert st.running and st.user_id == s.user_id and st.bind_sources == (str(data_root / s.user_id),)
        assert isinstance(await rt.logs(s.name), list)
        assert not await rt.port_is_free(s.host_port) and await rt.port_is_free(32999)
        for unsupported in (rt.freeze(s.name, 0, 1), rt.thaw(s.name, 1), rt.hand_over("pool.x", "u")):
            with pytest.raises(RuntimeError_, match="not supported on Swarm"):
                await unsupported
        # A new instance of a placed user (another image or instance id) stays on its node.
        moved = dataclasses.replace(specs[1], instance_id="i1b")
        before = await rt.address(moved.name)
        await rt.create(moved)
        await rt.start(moved.name)
        assert (await rt.status(moved.name)).instance_id == "i1b"
        assert await rt.address(moved.name) == before
        await rt.remove(s.name)
        await rt.remove_network(s.user_id)
        assert not (await rt.status(s.name)).exists
        times["round trip"] = time.monotonic() - t1
        return times, per_node

    try:
        times, per_node = asyncio.run(scenario())
    finally:  # their reservations would fill the nodes for the tests after (one call; tasks end later)
        swarm_lab.nd(
            lab.manager, "service", "rm", *(s.name for s in specs), check=False
        )  # gone ones: skipped
    with capsys.disabled():
        shown = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
        print(f"\nSwarmRuntime: {shown}; test {time.monotonic() - t0:.1f} s ({memory_mb} MiB reserved each)")
        print(f"per node, MiB: (reserved, capacity, containers' RSS) {per_node}")


async def test_a_move_on_one_docker_engine_is_refused_and_changes_nothing(
    provisioner, platform, fakes, store
):
    """instance.move needs other nodes: on one engine it fails with a typed error before
    anything stops; a node name that is not one is refused by the event's own type."""
    from pydantic import ValidationError

    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("mv"), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, body = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY, body
    subject, body = await platform.call(subjects.INSTANCE_MOVE, InstanceMove(user_id=ev.user_id), timeout=30)
    assert subject == subjects.INSTANCE_FAILED and body.reason == "invalid_request", body
    assert "ZAKI_RUNTIME=swarm" in body.message
    doc = await store.get_instance(ev.user_id)
    assert doc["state"] == "running", doc  # nothing was stopped
    for bad in ("../etc", "node 2", "", "n" * 64):
        with pytest.raises(ValidationError, match="away_from"):
            InstanceMove(user_id=ev.user_id, away_from=bad)
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True), timeout=60)
