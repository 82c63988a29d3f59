"""Placement throughput of the Swarm runtime (issue #18): N stand-in gateways created and started
through ``SwarmRuntime`` (its own overlay each, published in host mode), timed until every one
answers ``/readyz`` at ``address():port``; first with one node active (the others drained: the
baseline), then with three, in one lab (zaki/swarm_lab.py) in one run.

    python bench/swarm_placement.py [--n 20] [--concurrency 6]

All nodes share this machine's cores, so three nodes cannot be three times faster here: what
the table shows is the runtime's and the scheduler's overhead, not a cluster's capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.provisioner.runtime import ContainerSpec
from services.provisioner.swarm_runtime import SwarmRuntime
from shared.gateway import identity_headers, network_name
from zaki import swarm_lab
from zaki.stack import ensure_images

IMAGE = "zaki/standin-gateway:latest"


def set_active(rt: SwarmRuntime, active: int) -> None:
    """The first *active* nodes take tasks; the others are drained."""
    nodes = sorted(rt.client.api.nodes(), key=lambda n: n["Description"]["Hostname"])
    for i, n in enumerate(nodes):
        spec = dict(n["Spec"], Availability="active" if i < active else "drain")
        rt.client.api.update_node(n["ID"], n["Version"]["Index"], spec)


def spec(user: str, port: int) -> ContainerSpec:
    return ContainerSpec(
        user_id=user, instance_id="b", image=IMAGE, host_port=port, publish_ip="0.0.0.0",
        network=network_name(user), binds={}, memory="64m", cpus=0.5,
    )  # fmt: skip


def answers(url: str, user: str) -> bool:
    try:
        return httpx.get(url, headers=identity_headers(user), timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


async def run(lab: swarm_lab.Lab, rt: SwarmRuntime, tag: str, n: int, conc: int) -> dict[str, object]:
    base = ipaddress.ip_network(lab.subnet).network_address + 240 * 256
    specs = [spec(f"{tag}{i}", 31000 + i) for i in range(n)]
    sem = asyncio.Semaphore(conc)

    async def one(i: int, s: ContainerSpec) -> str:
        async with sem:
            await rt.ensure_network(s.user_id, f"{base + 16 * i}/28")
            await rt.create(s)
            await rt.start(s.name)
            url = f"http://{await rt.address(s.name)}:{s.host_port}/readyz"
        deadline = time.monotonic() + 120
        while True:
            if await asyncio.to_thread(answers, url, s.user_id):
                return url
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer")
            await asyncio.sleep(0.2)

    t0 = time.monotonic()
    urls = await asyncio.gather(*(one(i, s) for i, s in enumerate(specs)))
    took = time.monotonic() - t0
    spread = Counter(u.split("/")[2].split(":")[0] for u in urls)
    for s in specs:  # not timed
        await rt.remove(s.name)
        await rt.remove_network(s.user_id)
    return {"s": took, "rate": n / took, "spread": sorted(spread.values(), reverse=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=6)
    args = ap.parse_args()
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        ensure_images(which="standin")
    lab = swarm_lab.up(3, images=[IMAGE], dockerd_args=["--no-new-privileges"])
    try:
        host_ip = str(ipaddress.ip_network(lab.subnet).network_address + 1)
        rt = SwarmRuntime(swarm_lab.api_url(lab, lab.manager), proxy_address=host_ip)
        rows = []
        for nodes, tag in ((1, "a"), (3, "b")):
            set_active(rt, nodes)
            rows.append((nodes, asyncio.run(run(lab, rt, tag, args.n, args.concurrency))))
    finally:
        swarm_lab.down(lab.id)
    base = rows[0][1]["rate"]
    print(f"\nSwarmRuntime placement, {args.n} stand-ins, {args.concurrency} at a time "
          f"(create + start -> /readyz 200 at node_ip:port)")  # fmt: skip
    print(f"{'nodes':>5} | {'seconds':>7} | {'inst/s':>6} | {'vs 1 node':>9} | per node")
    print(f"{'-' * 5}-+-{'-' * 7}-+-{'-' * 6}-+-{'-' * 9}-+-{'-' * 10}")
    for nodes, r in rows:
        print(f"{nodes:>5} | {r['s']:>7.1f} | {r['rate']:>6.2f} | {r['rate'] / base:>8.2f}x | {r['spread']}")
    print(
        "earlier baseline (docs/swarm.md, CLI one service at a time): 10 on 1 node 1.35/s, 30 on 3 nodes 1.5/s"
    )


if __name__ == "__main__":
    main()
