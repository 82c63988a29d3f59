"""Wake latency (issue 16), in one run on this machine:

for the stand-in gateway and (``--real 1``) the real OpenClaw gateway,
1. cold: ``instance.requested`` -> ``instance.ready``;
2. wake: a request through the proxy for a suspended instance -> its first byte
   (``GET /v1/models``; the proxy asks for the wake and holds the request), several rounds;
3. real only, with ``--bare``: the gateway's bare boot (``docker run`` of the same image and
   config -> /readyz), without and with Node's compile cache;

for each suspend mode in ``--modes`` (``stop``: a wake is a boot; ``swap``: a thaw; a swap file
of its own is switched on for the run), on a platform of its own.

    python bench/wake.py [--rounds 5] [--real 1] [--modes stop,swap] [--bare]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import bench_platform
from bench.provisioner import REAL, STANDIN, token, wait_ready
from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceCommand, InstanceRequested, InstanceSuspend
from shared.store import Store
from zaki.stack import free_port


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
    ap.add_argument("--modes", default="stop,swap", help="ZAKI_SUSPEND_MODE values to compare, in one run")
    ap.add_argument(
        "--bare", action="store_true", help="also time bare docker runs (with and without compile cache)"
    )
    args = ap.parse_args()
    rows = []
    with swap_file(4):
        for mode in args.modes.split(","):
            env = {
                "ZAKI_ALLOWED_IMAGES": STANDIN,
                "ZAKI_RECONCILE_INTERVAL_S": "3600",
                "ZAKI_IDLE_SUSPEND_S": "0",  # suspended by command here, never by the clock
                "ZAKI_WAKE_TIMEOUT_S": "300",  # measure a slow boot on a loaded machine, not the 503
                "ZAKI_SUSPEND_MODE": mode,
            }
            async with bench_platform(f"w{mode}", env, broker=True, proxy=True) as p:
                assert p.proxy
                rows.append(
                    (
                        f"stand-in, {mode}",
                        await measure(p.platform, p.store, p.proxy, STANDIN, args.rounds),
                        None,
                    )
                )
                for _ in range(args.real):
                    real = await measure(p.platform, p.store, p.proxy, REAL, max(1, args.rounds // 2))
                    await p.platform.call(
                        subjects.INSTANCE_STOP, InstanceCommand(user_id=real["user"]), timeout=120
                    )
                    data_root = Path(p.env["ZAKI_DATA_ROOT"])
                    bare = await bare_boots(data_root, real["user"]) if args.bare and mode == "stop" else None
                    rows.append((f"real OpenClaw, {mode}", real, bare))

    print("\nWake latency, one run (request through the proxy -> first byte, instance suspended before)")
    print(
        "| gateway, suspend mode | cold requested -> ready s | wake -> first byte s (median, max) | of which start or thaw / ready s | first byte after ready s | bare boot s |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r, bare in rows:
        ws = r["wakes"]
        starts = [t.get("wake_start", t.get("wake_thaw", 0)) for t in r["timings"]]
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
            print(f"\n{name} bare boot -> /readyz: " + ", ".join(f"{k} {v:.2f} s" for k, v in bare.items()))
        assert all(s == 200 for s in r["statuses"]), r["statuses"]


@contextlib.contextmanager
def swap_file(size_gib: int) -> Iterator[None]:
    """Swap for the swap mode (a host setting: a file of this run's, removed after)."""
    path = Path(f"/var/tmp/zaki-bench-swap-{uuid.uuid4().hex[:6]}")
    subprocess.run(["fallocate", "-l", f"{size_gib}G", str(path)], check=True)
    path.chmod(0o600)
    subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
    subprocess.run(["swapon", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["swapoff", str(path)], check=False)
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    asyncio.run(main())
