"""Provisioner benchmark, in one run on this machine:

1. ``instance.requested`` -> ``instance.ready`` for the real OpenClaw gateway, per phase,
   next to a bare ``docker run`` of the same image with the same config (time to /readyz);
2. a burst of 50 requests with the stand-in image: total time, per-request p50/p99, lost.

    python bench/provisioner.py [--burst 50] [--real 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

from shared import subjects
from shared.client import PlatformClient
from shared.crypto import KeyRing
from shared.events import InstanceCommand, InstanceDelete, InstanceRequested
from shared.gateway import identity_headers
from zaki.cleanup import remove_managed
from zaki.fake_world import fake_world_env
from zaki.fakes import FakeLLM, FakeTelegram, bound_port, serve
from zaki.stack import Stack, docker_bridge_ip, free_network_pool, free_port, wait_for_port

REAL = "zaki/openclaw-gateway:2026.9.6"
STANDIN = "zaki/standin-gateway:latest"


def token() -> str:
    return f"{uuid.uuid4().int % 10**9 + 10**9}:{uuid.uuid4().hex}{uuid.uuid4().hex[:5]}"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def wait_ready(port: int, user: str, timeout: float = 180) -> float:
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=2) as http:
        while time.perf_counter() - t0 < timeout:
            try:
                r = await http.get(f"http://127.0.0.1:{port}/readyz", headers=identity_headers(user))
                if r.status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("not ready")


async def bare_docker_run(data_root: Path, user: str) -> float:
    """`docker run` of the same image with the config the provisioner wrote, to /readyz."""
    client = docker.from_env()
    # A fresh folder with only the config: the same cold start the provisioner paid for.
    src = data_root / "bare" / user
    (src / ".openclaw").mkdir(parents=True)
    (src / "workspace").mkdir()
    shutil.copy(
        data_root / "users" / user / ".openclaw" / "openclaw.json", src / ".openclaw" / "openclaw.json"
    )
    subprocess.run(["chown", "-R", "1000:1000", str(src)], check=True)
    port = free_port()
    net = client.networks.get(f"zaki-net-{user}")
    t0 = time.perf_counter()
    c = client.containers.run(
        REAL,
        detach=True,
        name=f"bare-{user}",
        network=net.name,
        ports={"18789/tcp": ("127.0.0.1", port)},
        volumes={
            str(src / ".openclaw"): {"bind": "/home/node/.openclaw"},
            str(src / "workspace"): {"bind": "/home/node/workspace"},
        },
        extra_hosts={"host.docker.internal": "host-gateway"},
        mem_limit="2g",
        environment={
            "OPENCLAW_CONFIG_PATH": "/home/node/.openclaw/openclaw.json",
            "OPENCLAW_STATE_DIR": "/home/node/.openclaw",
        },
    )
    try:
        await wait_ready(port, user)
        return time.perf_counter() - t0
    finally:
        c.remove(force=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--burst", type=int, default=50)
    ap.add_argument("--real", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zaki-bench-prov-"))
    stack = Stack(tmp / "stack")
    bridge = docker_bridge_ip()
    llm, tg = FakeLLM(), FakeTelegram(accept_all=True)
    lr, tr = await serve(llm.app(), bridge, 0), await serve(tg.app(), bridge, 0)
    platform_id = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        nats_addr, mongo_addr = stack.start_nats().address, stack.start_ferretdb().address
        broker_port = free_port(bridge)  # no broker runs here: nothing calls a model
        env = {
            "ZAKI_NATS_URL": nats_addr,
            "ZAKI_MONGO_URL": mongo_addr,
            "ZAKI_SECRET_KEYS": KeyRing.new_key_spec("b"),
            "ZAKI_DATA_ROOT": str(tmp / "data"),
            "ZAKI_PLATFORM_ID": platform_id,
            "ZAKI_NETWORK_POOL": free_network_pool(),
            "ZAKI_ALLOWED_IMAGES": STANDIN,
            "ZAKI_PORT_RANGE_START": "33000",
            "ZAKI_PORT_RANGE_END": "33999",
            **fake_world_env(bridge, bound_port(tr), bound_port(lr), broker_port, "sk-bench"),
            "ZAKI_RECONCILE_INTERVAL_S": "3600",
        }
        mport = free_port()
        p = stack.start_service("services.provisioner", {**env, "ZAKI_METRICS_PORT": str(mport)})
        wait_for_port("127.0.0.1", mport, p.proc, "provisioner")
        await asyncio.sleep(2)
        platform = await PlatformClient.connect(nats_addr)

        rows = []
        for _ in range(args.real):
            ev = InstanceRequested(
                request_id=uuid.uuid4().hex,
                user_id=f"real{uuid.uuid4().hex[:8]}",
                bot_token=token(),
                image=REAL,
            )
            t0 = time.perf_counter()
            subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=300)
            total = time.perf_counter() - t0
            assert subject == subjects.INSTANCE_READY, ready
            await platform.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=ev.user_id))
            bare = await bare_docker_run(tmp / "data", ev.user_id)
            rows.append((total, ready.timings, bare))
            await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))

        burst = [
            InstanceRequested(
                request_id=uuid.uuid4().hex,
                user_id=f"b{i}x{uuid.uuid4().hex[:6]}",
                bot_token=token(),
                image=STANDIN,
            )
            for i in range(args.burst)
        ]
        starts: dict[str, float] = {}

        async def one(ev):
            starts[ev.request_id] = time.perf_counter()
            subject, out = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=600)
            return subject, time.perf_counter() - starts[ev.request_id], out

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(e) for e in burst), return_exceptions=True)
        burst_total = time.perf_counter() - t0
        ok = [r for r in results if not isinstance(r, BaseException) and r[0] == subjects.INSTANCE_READY]
        lat = [r[1] for r in ok]
        ports = {r[2].port for r in ok}
        await asyncio.gather(
            *(
                platform.call(
                    subjects.INSTANCE_DELETE, InstanceDelete(user_id=e.user_id, purge=True), timeout=120
                )
                for e in burst
            )
        )

        print("\nProvisioning the real OpenClaw gateway (instance.requested -> instance.ready), one run")
        for total, timings, bare in rows:
            print(f"  zaki provisioner total {total:6.2f} s  phases {json.dumps(timings)}")
            print(
                f"  bare docker run -> /readyz {bare:6.2f} s  (same image, same config)  overhead {total - bare:+.2f} s"
            )
        print(f"\nBurst of {args.burst} requests (stand-in image), one provisioner")
        print(
            f"  total {burst_total:.2f} s   ready {len(ok)}/{args.burst}   lost {args.burst - len(ok)}   distinct ports {len(ports)}"
        )
        if lat:
            print(f"  per request p50 {statistics.median(lat):.2f} s   p99 {pct(lat, 0.99):.2f} s")
        await platform.close()
    finally:
        stack.stop()
        await lr.cleanup()
        await tr.cleanup()
        remove_managed(platform_id)


if __name__ == "__main__":
    asyncio.run(main())
