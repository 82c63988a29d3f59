"""A new user's first gateway (issue 16.5): a cold boot against a pre-started pool slot claimed
by a config hot reload (ZAKI_POOL_SIZE=1), on the real OpenClaw gateway, in one run.

Each round: a cold ``instance.requested`` -> ``instance.ready`` (the same image under a second
tag, which the pool does not serve), then a pooled one, each followed by a first chat
completion to the gateway and a Telegram message answered through the fake Bot API; between
requests the machine is left idle (the pool's refill boot finished). Also prints a ready
slot's memory, what the pool costs while nobody claims it.

    python bench/pool.py [--rounds 2] [--standin]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import BenchPlatform, bench_platform
from bench.provisioner import REAL, STANDIN, token
from shared import subjects
from shared.events import InstanceDelete, InstanceRequested
from shared.gateway import container_name, identity_headers

COLD_TAG = "zaki/openclaw-gateway:bench-cold"


async def pool_ready(p: BenchPlatform, http: httpx.AsyncClient, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if "zaki_pool_slots_ready 1.0" in (await http.get(p.metrics)).text:
            return time.perf_counter() - t0
        await asyncio.sleep(0.5)
    raise TimeoutError("the pool did not fill")


async def new_user(
    p: BenchPlatform, http: httpx.AsyncClient, image: str, telegram: bool, settle: float
) -> dict[str, float | str]:
    bot = token()
    p.telegram.add_bot(bot, f"b{uuid.uuid4().hex[:6]}")
    ev = InstanceRequested(
        request_id=uuid.uuid4().hex, user_id=f"n{uuid.uuid4().hex[:10]}", bot_token=bot, image=image
    )
    t0 = time.perf_counter()
    subject, ready = await p.platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=600)
    assert subject == subjects.INSTANCE_READY, ready
    to_ready = time.perf_counter() - t0
    doc = await p.store.get_instance(ev.user_id)
    await asyncio.sleep(settle)
    body = {"model": "openclaw", "messages": [{"role": "user", "content": "hi"}]}
    t1 = time.perf_counter()
    r = await http.post(
        f"http://127.0.0.1:{doc['port']}/v1/chat/completions", json=body, headers=identity_headers(ev.user_id)
    )
    assert r.status_code == 200, r.text
    chat = time.perf_counter() - t1
    t2 = time.perf_counter()
    if telegram:  # the stand-in has no Telegram channel
        p.telegram.inject_message(bot, "hello")
        while not p.telegram.answers(bot):
            if time.perf_counter() - t2 > 300:
                raise TimeoutError("no Telegram answer")
            await asyncio.sleep(0.1)
    telegram_s = time.perf_counter() - t2
    await p.platform.call(
        subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True), timeout=120
    )
    return {
        "ready": to_ready,
        "chat": chat,
        "telegram": telegram_s,
        "path": "claim" if "claim" in ready.timings else "cold",
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle", type=float, default=0, help="seconds between ready and the first chat")
    ap.add_argument("--standin", action="store_true", help="the stand-in image (a quick check of the bench)")
    args = ap.parse_args()
    image = STANDIN if args.standin else REAL
    client = docker.from_env()
    client.images.get(image).tag(COLD_TAG)
    env = {
        "ZAKI_GATEWAY_IMAGE": image,
        "ZAKI_ALLOWED_IMAGES": COLD_TAG,
        "ZAKI_POOL_SIZE": "1",
        "ZAKI_RECONCILE_INTERVAL_S": "5",
    }
    rows: dict[str, list[dict]] = {"cold": [], "claim": []}
    try:
        async with (
            bench_platform("pool", env, broker=True, ports=64) as p,
            httpx.AsyncClient(timeout=600) as http,
        ):
            fill = await pool_ready(p, http)
            slot = next(
                c
                for c in client.containers.list()
                if c.name.startswith(container_name("pool."))
                and p.env["ZAKI_PLATFORM_ID"] in c.labels.get("zaki.managed", "")
            )
            mem = slot.stats(stream=False)["memory_stats"]
            for _ in range(args.rounds):
                await pool_ready(p, http)
                await asyncio.sleep(5)  # let the refill's boot settle
                cold = await new_user(p, http, COLD_TAG, not args.standin, args.settle)
                assert cold["path"] == "cold", cold
                rows["cold"].append(cold)
                await pool_ready(p, http)
                await asyncio.sleep(5)
                claimed = await new_user(p, http, image, not args.standin, args.settle)
                assert claimed["path"] == "claim", claimed
                rows["claim"].append(claimed)
    finally:
        client.images.remove(COLD_TAG, noprune=True)
    print(
        f"\nA new user's gateway, {'stand-in' if args.standin else 'real OpenClaw'}, {args.rounds} rounds, one run"
    )
    print(
        f"first pool fill (a slot's boot) {fill:.2f} s; a ready slot uses {(mem.get('usage', 0) - mem.get('stats', {}).get('cache', 0)) / 2**20:.0f} MiB"
    )
    print(
        "| path | requested -> ready s (median, max) | first chat s (median) | Telegram answer s (median) |"
    )
    print("|---|---:|---:|---:|")
    for name, label in (("cold", "cold boot (baseline)"), ("claim", "pool slot claimed")):
        r = rows[name]
        ready = [x["ready"] for x in r]
        print(
            f"| {label} | {statistics.median(ready):.2f}, {max(ready):.2f} | "
            f"{statistics.median(x['chat'] for x in r):.2f} | {statistics.median(x['telegram'] for x in r):.2f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
