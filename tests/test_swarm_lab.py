"""A Docker Swarm of three nested engines on this machine (zaki/swarm_lab.py, docs/swarm.md):
one stand-in gateway per node placed by constraint, each on its tenant's own overlay network and
published in host mode on its node; the host (where the proxy runs) reaches every one at
node_ip:port, and a tenant's task cannot reach another tenant's, on another node or its own."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from services.provisioner.egress import EgressPolicy
from tests.conftest import STANDIN_IMAGE, require_tool
from zaki import swarm_lab
from zaki.stack import ensure_images

pytestmark = require_tool(shutil.which("docker"), "docker")

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


@pytest.fixture(scope="module")
def lab() -> Iterator[swarm_lab.Lab]:
    if subprocess.run(["docker", "image", "inspect", STANDIN_IMAGE], capture_output=True).returncode:
        ensure_images(which="standin")
    t0 = time.monotonic()
    made = swarm_lab.up(3, images=[STANDIN_IMAGE])
    made.timings["up_total"] = time.monotonic() - t0
    assert made.id in swarm_lab.labs()
    # The host engine itself is never part of the swarm.
    host_swarm = subprocess.run(
        ["docker", "info", "-f", "{{.Swarm.LocalNodeState}}"], capture_output=True, text=True
    )
    assert host_swarm.stdout.strip() == "inactive"
    try:
        yield made
    finally:
        t1 = time.monotonic()
        swarm_lab.down(made.id)
        print(f"swarm lab {made.id} removed in {time.monotonic() - t1:.1f} s")
        assert made.id not in swarm_lab.labs()


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

    policy = EgressPolicy(broker_port=8090)
    for node in lab.nodes:
        gw = swarm_lab.nd(
            node, "network", "inspect", "docker_gwbridge", "-f", "{{(index .IPAM.Config 0).Subnet}}"
        )
        swarm_lab.apply_egress(node, "docker_gwbridge", gw, policy)
    after = probe(lab, 2, "gw-b", own, *attacks)
    assert after[own] == "OK 200", after
    for url in attacks:
        assert after[url].startswith("ERR"), (url, after)
    for t, u in urls.items():  # the proxy's path still works
        assert http_status(u) == 200, t

    mem = {x.name[-2:]: round(swarm_lab.node_memory_mb(x)["engine_rss"]) for x in lab.nodes}
    with capsys.disabled():
        times = {k: round(v, 1) for k, v in lab.timings.items()}
        print(f"\nswarm lab {lab.id}: {times} s; 4 services reachable in {placed:.1f} s; "
              f"isolation checked in {time.monotonic() - t0 - placed:.1f} s; engine RSS MB {mem}")  # fmt: skip
        print(f"attacks from gw-b after the egress chains: {after}")
