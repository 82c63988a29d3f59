"""Wake latency (issue 16), in one run on this machine:

for the stand-in gateway and (``--real 1``) the real OpenClaw gateway,
1. cold: ``instance.requested`` -> ``instance.ready``;
2. wake: a request through the proxy for a suspended instance -> its first byte
   (``GET /v1/models``; the proxy asks for the wake and holds the request), several rounds;
3. real only, with ``--bare``: the gateway's bare boot (``docker run`` of the same image and
   config -> /readyz), without and with Node's compile cache.

    python bench/wake.py [--rounds 5] [--real 1] [--bare]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provisioner import REAL, STANDIN, token, wait_ready
from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.crypto import KeyRing
from shared.events import InstanceCommand, InstanceDelete, InstanceRequested, InstanceSuspend
from shared.store import Store
from zaki.fake_world import fake_world_env
from zaki.fakes import FakeLLM, FakeTelegram, bound_port, serve
from zaki.stack import Stack, docker_bridge_ip, free_network_pool, free_port, wait_for_port


async def bare_boots(data_root: Path, user: str) -> dict[str, float]:
    """``docker run`` of the real image with the instance's config, to /readyz: without Node's
    compile cache, then with it on the data folder (first run fills it, second uses it)."""
    client = docker.from_env()
    src = data_root / "bare" / user
    (src / ".openclaw").mkdir(parents=True)
    (src / "workspace").mkdir()
    shutil.copy(
        data_root / "users" / user / ".openclaw" / "openclaw.json", src / ".openclaw" / "openclaw.json"
    )
    subprocess.run(["chown", "-R", "1000:1000", str(src)], check=True)
    net = client.networks.get(f"zaki-net-{user}")
    out = {}
    for name, extra in (
        ("no cache", {}),
        ("compile cache, cold", {"NODE_COMPILE_CACHE": "/home/node/.openclaw/cache/node-compile"}),
        ("compile cache, warm", {"NODE_COMPILE_CACHE": "/home/node/.openclaw/cache/node-compile"}),
    ):
        port = free_port()
        t0 = time.perf_counter()
        c = client.containers.run(
            REAL,
            detach=True,
            name=f"bare-{user}-{len(out)}",
            network=net.name,
            ports={"18789/tcp": ("127.0.0.1", port)},
            volumes={
                str(src / ".openclaw"): {"bind": "/home/node/.openclaw"},
                str(src / "workspace"): {"bind": "/home/node/workspace"},
            },
            extra_hosts={"host.docker.internal": "host-gateway"},
            mem_limit="2g",
            nano_cpus=2 * 10**9,
            environment={
                "OPENCLAW_CONFIG_PATH": "/home/node/.openclaw/openclaw.json",
                "OPENCLAW_STATE_DIR": "/home/node/.openclaw",
                **extra,
            },
        )
        try:
            await wait_ready(port, user)
            out[name] = time.perf_counter() - t0
        finally:
            c.remove(force=True)
    return out


async def first_byte(http: httpx.AsyncClient, key: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with http.stream("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"}) as r:
        async for _ in r.aiter_raw():
            return time.perf_counter() - t0, r.status_code
    return time.perf_counter() - t0, r.status_code


async def measure(platform: PlatformClient, store: Store, proxy: str, image: str, rounds: int) -> dict:
    ev = InstanceRequested(
        request_id=uuid.uuid4().hex, user_id=f"w{uuid.uuid4().hex[:10]}", bot_token=token(), image=image
    )
    t0 = time.perf_counter()
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=300)
    cold = time.perf_counter() - t0
    assert subject == subjects.INSTANCE_READY, ready
    _, key = await keys.create_key(store, ev.user_id, {"chat"})
    wakes, statuses, woken_timings = [], [], []
    async with httpx.AsyncClient(base_url=proxy, timeout=300) as http:
        await first_byte(http, key)  # warm: the proxy's route and pool
        for _ in range(rounds):
            subject, out = await platform.call(
                subjects.INSTANCE_SUSPEND, InstanceSuspend(user_id=ev.user_id), timeout=120
            )
            assert subject == subjects.INSTANCE_SUSPENDED, out
            await asyncio.sleep(1)
            seconds, status = await first_byte(http, key)
            wakes.append(seconds)
            statuses.append(status)
            for _ in range(50):
                w = [
                    b for s, b in platform.seen if s == subjects.INSTANCE_WOKEN and b["user_id"] == ev.user_id
                ]
                if len(w) >= len(wakes):
                    woken_timings.append(w[-1]["timings"])
                    break
                await asyncio.sleep(0.1)
    return {"user": ev.user_id, "cold": cold, "wakes": wakes, "statuses": statuses, "timings": woken_timings}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--real", type=int, default=1)
    ap.add_argument(
        "--bare", action="store_true", help="also time bare docker runs (with and without compile cache)"
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zaki-bench-wake-"))
    stack = Stack(tmp / "stack")
    bridge = docker_bridge_ip()
    llm, tg = FakeLLM(), FakeTelegram(accept_all=True)
    lr, tr = await serve(llm.app(), bridge, 0), await serve(tg.app(), bridge, 0)
    platform_id = f"benchw-{uuid.uuid4().hex[:6]}"
    try:
        nats_addr, mongo_addr = stack.start_nats().address, stack.start_ferretdb().address
        broker_port = free_port(bridge)
        env = {
            "ZAKI_NATS_URL": nats_addr,
            "ZAKI_MONGO_URL": mongo_addr,
            "ZAKI_SECRET_KEYS": KeyRing.new_key_spec("b"),
            "ZAKI_DATA_ROOT": str(tmp / "data"),
            "ZAKI_PLATFORM_ID": platform_id,
            "ZAKI_NETWORK_POOL": free_network_pool(),
            "ZAKI_ALLOWED_IMAGES": STANDIN,
            "ZAKI_PORT_RANGE_START": "34000",
            "ZAKI_PORT_RANGE_END": "34999",
            **fake_world_env(bridge, bound_port(tr), bound_port(lr), broker_port, "sk-bench"),
            "ZAKI_RECONCILE_INTERVAL_S": "3600",
            "ZAKI_IDLE_SUSPEND_S": "0",  # suspended by command here, never by the clock
            "ZAKI_WAKE_TIMEOUT_S": "300",  # measure a slow boot on a loaded machine, not the 503
            "ZAKI_READINESS_TIMEOUT_S": "300",
        }
        mport = free_port()
        p = stack.start_service("services.provisioner", {**env, "ZAKI_METRICS_PORT": str(mport)})
        wait_for_port("127.0.0.1", mport, p.proc, "provisioner")
        proxy_port = free_port()
        px = stack.start_service("services.gateway_proxy", {**env, "ZAKI_PROXY_PORT": str(proxy_port)})
        wait_for_port("127.0.0.1", proxy_port, px.proc, "proxy")
        await asyncio.sleep(2)
        platform = await PlatformClient.connect(nats_addr)
        store = Store(mongo_addr, "zaki")
        proxy = f"http://127.0.0.1:{proxy_port}"

        rows = [("stand-in", await measure(platform, store, proxy, STANDIN, args.rounds), None)]
        for _ in range(args.real):
            real = await measure(platform, store, proxy, REAL, max(1, args.rounds // 2))
            await platform.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=real["user"]), timeout=120)
            bare = await bare_boots(tmp / "data", real["user"]) if args.bare else None
            rows.append(("real OpenClaw", real, bare))
        for _, r, _ in rows:
            await platform.call(
                subjects.INSTANCE_DELETE, InstanceDelete(user_id=r["user"], purge=True), timeout=120
            )

        print("\nWake latency, one run (request through the proxy -> first byte, instance suspended before)")
        print(
            "| gateway | cold requested -> ready s | wake -> first byte s (median, max) | of which docker start / ready s | first byte after ready s | bare boot s |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for name, r, bare in rows:
            ws = r["wakes"]
            starts = [t.get("wake_start", 0) for t in r["timings"]]
            readies = [t.get("wake_ready", 0) for t in r["timings"]]
            bare_s = f"{bare['no cache']:.2f}" if bare else "-"
            totals = [t.get("total", 0) for t in r["timings"]]
            after = [w - t for w, t in zip(ws, totals, strict=False)] or [0.0]
            print(
                f"| {name} | {r['cold']:.2f} | {statistics.median(ws):.2f}, {max(ws):.2f} | "
                f"{statistics.median(starts) if starts else 0:.2f} / {statistics.median(readies) if readies else 0:.2f} | "
                f"{statistics.median(after):.2f} (max {max(after):.2f}) | {bare_s} |"
            )
        for name, r, bare in rows:
            if bare:
                print(
                    f"\n{name} bare boot -> /readyz: " + ", ".join(f"{k} {v:.2f} s" for k, v in bare.items())
                )
            assert all(s == 200 for s in r["statuses"]), r["statuses"]
        await platform.close()
        await store.close()
    finally:
        stack.stop()
        await lr.cleanup()
        await tr.cleanup()
        client = docker.from_env()
        for c in client.containers.list(all=True, filters={"label": f"zaki.managed={platform_id}"}):
            c.remove(force=True)


if __name__ == "__main__":
    asyncio.run(main())
