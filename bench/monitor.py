"""Monitor benchmark: one sweep of 1,000 instances (one stand-in process serving 1,000
ports on loopback), against the seed's serial one-at-a-time /health loop, in one run.

    python bench/monitor.py [--instances 1000] [--sweeps 5]

Reports sweep wall time, CPU time per sweep, CPU share at one sweep per minute and at
the default interval, and the monitor's memory. The seed loop is measured on the same
endpoints; with every endpoint healthy its time is N round trips, and when endpoints hang
it is N x its 5 s timeout (computed, not waited for).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from bench.proxy import node
from services.monitor.monitor import Monitor
from shared.settings import ZakiSettings
from shared.store import Store
from zaki.stack import REPO, Stack, wait_for_port


def free_range(n: int) -> list[int]:
    """n consecutive loopback ports that nothing listens on (below the ephemeral range)."""
    import socket

    for base in range(20000, 32000 - n, 1000):
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free port range")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def seed_loop(ports: list[int]) -> float:
    """The seed's monitor: for each instance, one GET /health, one after another."""
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=5) as http:
        for p in ports:
            with contextlib.suppress(httpx.HTTPError):
                await http.get(f"http://127.0.0.1:{p}/healthz")
    return time.perf_counter() - t0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--sweeps", type=int, default=5)
    args = ap.parse_args()
    n = args.instances
    tmp = Path(tempfile.mkdtemp(prefix="zaki-bench-mon-"))
    stack = Stack(tmp / "stack")
    try:
        mongo = stack.start_ferretdb().address
        ports = free_range(n)
        upstream = stack.spawn(
            "standins",
            [node(), str(REPO / "deploy/images/standin/server.js")],
            {
                "STANDIN_PORTS": f"{ports[0]}-{ports[-1]}",
                "STANDIN_HOST": "127.0.0.1",
                "OPENCLAW_CONFIG_PATH": str(tmp / "none.json"),
            },
        )
        wait_for_port("127.0.0.1", ports[-1], upstream.proc, "stand-ins", timeout=60)
        store = Store(mongo, "benchmon")
        await store.ensure_indexes()
        await store.instances.delete_many({})
        await store.instances.insert_many(
            [
                {
                    "_id": f"user{i:05d}",
                    "state": "running",
                    "host": "127.0.0.1",
                    "port": p,
                    "instance_id": f"i{i}",
                    "docker_host": "local",
                    "version": 1,
                }
                for i, p in enumerate(ports)
            ]
        )
        published = []

        async def publish(subject, event):
            published.append(subject)

        settings = ZakiSettings(
            mongo_url=mongo,
            mongo_db="benchmon",
            probe_spread=0.0,
            probe_concurrency=200,
            health_write_interval_s=3600,
            replica_id="bench",
        )
        monitor = Monitor(settings, store, publish)
        await monitor.heartbeat()
        await monitor.sweep()  # warm-up: connections, first health documents
        walls, cpus, refreshes = [], [], []
        for _ in range(args.sweeps):
            r0 = time.perf_counter()
            await monitor.refresh()
            refreshes.append(time.perf_counter() - r0)
            c0, w0 = time.process_time(), time.perf_counter()
            await monitor.sweep()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        healthy = monitor.counts()
        seed = await seed_loop(ports)
        wall, cpu = statistics.median(walls), statistics.median(cpus)
        print(
            f"\nMonitor sweep of {n} instances (one stand-in process, {n} loopback ports), median of {args.sweeps}"
        )
        print(f"{'':<34} {'wall s':>8} {'CPU s':>7} {'CPU @1/min':>10} {'CPU @4 s':>9}")
        print(
            f"{'zaki monitor (200 concurrent)':<34} {wall:>8.2f} {cpu:>7.2f} {cpu / 60:>10.1%} {cpu / 4:>9.1%}"
        )
        print(f"{'seed: serial GET /health':<34} {seed:>8.2f} {'':>7}")
        print(f"{'seed, if every gateway hangs (5 s)':<34} {n * 5:>8.0f}   (computed)")
        print(f"of which reading the instance list from the store: {statistics.median(refreshes):.2f} s")
        print(f"states after the sweeps: { {k.value: v for k, v in healthy.items()} }")
        print(f"monitor process max RSS: {rss_mib():.0f} MiB; health events published: {len(published)}")
        await monitor.close()
        await store.close()
    finally:
        stack.stop()


if __name__ == "__main__":
    asyncio.run(main())
