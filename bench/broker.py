"""LLM broker benchmark, in one run on this machine: a model call straight to the fake
OpenAI-compatible provider, next to the same call through the broker (credential check,
budget check, key swap, usage counting on the stream).

    python bench/broker.py [--n 400] [--concurrency 16] [--reservations store|process]

Reports, for a non-streamed and a streamed chat completion: sequential latency p50/p99
(one call at a time: the broker's added latency), streamed time to first byte, and
calls/s with several calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.crypto import KeyRing, credential_hash, new_broker_credential
from shared.store import Store
from zaki.stack import Stack, docker_bridge_ip, free_port, wait_for_port

BODY = {"model": "echo-1", "messages": [{"role": "user", "content": "benchmark"}]}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def sequential(url: str, headers: dict[str, str], stream: bool, n: int) -> dict[str, float]:
    total, first = [], []
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            async with http.stream("POST", url, json={**BODY, "stream": stream}, headers=headers) as r:
                assert r.status_code == 200, r.status_code
                got_first = False
                async for _chunk in r.aiter_raw():
                    if not got_first:
                        first.append(time.perf_counter() - t0)
                        got_first = True
            total.append(time.perf_counter() - t0)
    return {
        "p50": statistics.median(total) * 1000,
        "p99": pct(total, 0.99) * 1000,
        "ttfb": statistics.median(first) * 1000,
    }


async def throughput(url: str, headers: dict[str, str], stream: bool, n: int, conc: int) -> float:
    done = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal done
        while done < n:
            done += 1
            r = await http.post(url, json={**BODY, "stream": stream}, headers=headers)
            assert r.status_code == 200, r.status_code

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(conc)))
        return n / (time.perf_counter() - t0)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--reservations", choices=("store", "process"), default="store")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zaki-bench-broker-"))
    stack = Stack(tmp / "stack")
    try:
        nats_addr = stack.start_nats().address
        mongo_addr = stack.start_ferretdb().address
        host = docker_bridge_ip()
        llm_port, broker_port = free_port(host), free_port(host)
        fake = stack.spawn(
            "fakes", [sys.executable, "-m", "zaki.fakes", "--host", host, "--llm-port", str(llm_port)]
        )
        wait_for_port(host, llm_port, fake.proc, "fake LLM")
        keys = KeyRing.new_key_spec("b1")
        env = {
            "ZAKI_NATS_URL": nats_addr,
            "ZAKI_MONGO_URL": mongo_addr,
            "ZAKI_MONGO_DB": "bench",
            "ZAKI_SECRET_KEYS": keys,
            "ZAKI_LLM_BASE_URL": f"http://{host}:{llm_port}/v1",
            "ZAKI_BROKER_HTTP_HOSTS": f"{host}:{llm_port}",
            "ZAKI_BROKER_PRIVATE_HOSTS": f"{host}:{llm_port}",
            "ZAKI_LLM_API_KEY": "sk-bench-" + uuid.uuid4().hex,
            "ZAKI_BROKER_HOST": host,
            "ZAKI_BROKER_PORT": str(broker_port),
            "ZAKI_BUDGET_REQUESTS_PER_MINUTE": "10000000",
            "ZAKI_BUDGET_TOKENS_PER_DAY": "1000000000",  # budgets on: the check is part of the cost
            "ZAKI_BROKER_RESERVATIONS": args.reservations,
            "ZAKI_METRICS_PORT": "0",
        }
        broker = stack.start_service("services.llm_broker", env)
        wait_for_port(host, broker_port, broker.proc, "broker")
        broker_base = f"http://{host}:{broker_port}"
        async with httpx.AsyncClient() as http:
            source = (await http.get(f"{broker_base}/healthz")).json()["source"]
        credential = new_broker_credential()
        store = Store(mongo_addr, "bench")
        await store.instances.insert_one(
            {
                "_id": "bench",
                "state": "running",
                "instance_id": "b1",
                "version": 1,
                "broker_key_hash": credential_hash(credential),
                "subnet": f"{source}/32",
            }
        )
        await store.close()
        contenders = [
            ("direct to provider", f"http://{host}:{llm_port}/v1/chat/completions", {}),
            (
                "through the broker",
                f"{broker_base}/p/zaki/chat/completions",
                {"Authorization": f"Bearer {credential}"},
            ),
        ]
        rows = []
        for name, url, headers in contenders:
            await sequential(url, headers, False, 20)  # warm up connections and caches
            plain = await sequential(url, headers, False, args.n)
            streamed = await sequential(url, headers, True, args.n)
            rps = await throughput(url, headers, False, args.n * 2, args.concurrency)
            rows.append((name, plain, streamed, rps))
            print(f"measured {name}", file=sys.stderr)
        direct = rows[0]
        print(
            f"\nLLM broker benchmark on {os.cpu_count()} cores, fake provider, {args.n} sequential calls each, "
            f"throughput with {args.concurrency} in flight, one run"
        )
        print(
            f"{'path':<20} {'JSON p50':>9} {'p99':>7} {'+p50':>6} {'SSE p50':>8} {'p99':>7} {'+p50':>6} "
            f"{'SSE TTFB':>9} {'+TTFB':>6} {'calls/s':>8}"
        )
        for name, plain, streamed, rps in rows:
            print(
                f"{name:<20} {plain['p50']:>9.2f} {plain['p99']:>7.2f} {plain['p50'] - direct[1]['p50']:>+6.2f} "
                f"{streamed['p50']:>8.2f} {streamed['p99']:>7.2f} {streamed['p50'] - direct[2]['p50']:>+6.2f} "
                f"{streamed['ttfb']:>9.2f} {streamed['ttfb'] - direct[2]['ttfb']:>+6.2f} {rps:>8.0f}"
            )
        print("(milliseconds; + columns: added over the direct call in this run)")
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
