"""Drain time per user on a Swarm (issue #18): N stand-in gateways pinned to node 2 of a lab
(zaki/swarm_lab.py), then, in one run, two ways through ``SwarmRuntime``:

- baseline: each restarted in place (stop, start on the same node, ``/readyz`` 200 again);
- drain: node 2 drained, each moved as ``instance.move`` does it (stop, ``unpin``, start where
  the swarm places it, ``/readyz`` 200 at its new node), three at a time like ``zaki swarm drain``.

    python bench/swarm_drain.py [--n 6]

The runtime's part only: the platform adds a backup before each move and its readiness probe
(the lab test's CLI drain of one user, backup included: docs/swarm.md). All nodes share this
machine's two cores.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.swarm_placement import IMAGE, answers, set_active, spec
from services.provisioner.runtime import ContainerSpec
from services.provisioner.swarm_runtime import SwarmRuntime
from zaki import swarm_lab
from zaki.stack import ensure_images

PARALLEL_MOVES = 3  # as zaki/cli/swarm.py


async def ready(rt: SwarmRuntime, s: ContainerSpec) -> str:
    url = f"http://{await rt.address(s.name)}:{s.host_port}/readyz"
    deadline = time.monotonic() + 120
    while not await asyncio.to_thread(answers, url, s.user_id):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer")
        await asyncio.sleep(0.1)
    return url.split("/")[2].split(":")[0]


async def bench(lab: swarm_lab.Lab, rt: SwarmRuntime, n: int) -> dict[str, object]:
    base = ipaddress.ip_network(lab.subnet).network_address + 240 * 256
    specs = [spec(f"d{i}", 31200 + i) for i in range(n)]
    set_active(rt, 0)  # only node 2 active while they are placed: all land (and are pinned) there
    node2 = lab.node(2).name
    n2 = next(x for x in rt.client.api.nodes() if x["Description"]["Hostname"] == node2)
    rt.client.api.update_node(n2["ID"], n2["Version"]["Index"], dict(n2["Spec"], Availability="active"))
    for i, s in enumerate(specs):
        await rt.ensure_network(s.user_id, f"{base + 16 * i}/28")
        await rt.create(s)
        await rt.start(s.name)
        await ready(rt, s)
    set_active(rt, 3)

    restart = []
    for s in specs:  # baseline: in place, one at a time
        t0 = time.monotonic()
        await rt.stop(s.name, 5)
        await rt.start(s.name)
        await ready(rt, s)
        restart.append(time.monotonic() - t0)

    gate, moves, where = asyncio.Semaphore(PARALLEL_MOVES), [], []

    async def move(s: ContainerSpec) -> None:
        async with gate:
            t0 = time.monotonic()
            await rt.stop(s.name, 5)
            await rt.unpin(s.name, node2)
            await rt.start(s.name)
            where.append(await ready(rt, s))
            moves.append(time.monotonic() - t0)

    t0 = time.monotonic()
    await rt.drain(node2)
    await asyncio.gather(*(move(s) for s in specs))
    total = time.monotonic() - t0
    for s in specs:
        await rt.remove(s.name)
        await rt.remove_network(s.user_id)
    return {"restart": restart, "moves": moves, "total": total, "spread": Counter(where)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=6)
    args = ap.parse_args()
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        ensure_images(which="standin")
    lab = swarm_lab.up(3, images=[IMAGE], dockerd_args=["--no-new-privileges"])
    try:
        rt = SwarmRuntime(swarm_lab.api_url(lab, lab.manager))
        r = asyncio.run(bench(lab, rt, args.n))
    finally:
        swarm_lab.down(lab.id)

    def row(name: str, xs: list[float]) -> str:
        xs = sorted(xs)
        return f"{name:<28} | {sum(xs) / len(xs):>6.2f} | {xs[len(xs) // 2]:>6.2f} | {xs[-1]:>6.2f}"

    print(f"\n{args.n} stand-ins pinned to node 2; seconds per user (stop -> /readyz 200 again)")
    print(f"{'':<28} | {'mean':>6} | {'median':>6} | {'max':>6}")
    print(row("restart in place (baseline)", r["restart"]))  # type: ignore[arg-type]
    print(row("move off the drained node", r["moves"]))  # type: ignore[arg-type]
    print(f"whole drain, {PARALLEL_MOVES} at a time: {r['total']:.1f} s; landed on {dict(r['spread'])}")


if __name__ == "__main__":
    main()
