"""Density (issue 16): how many accounts a given amount of memory serves when 10 % of them
are active at any moment, with idle suspend and without (the baseline), in one run.

Scaled down to fit this shared machine: stand-in gateways are made to hold ``--standin-mb``
resident (the stand-in's ``alloc_mb`` fault knob: touched buffers, counted by the cgroup) in
place of the real gateway's ~0.7-1 GiB, and the figure compared is accounts per MiB, which
does not depend on that size. One real gateway (``--real 1``) is measured in the same run:
its memory running and suspended, and a wake through the proxy, which gives the scale factor.

Baseline: ``--base`` accounts, never suspended. Suspend: ``--factor`` x as many accounts,
an idle time of ``--idle-s``; each tick of ``--tick-s`` a set of 10 % of the accounts is
active (half of it carried over from the tick before) and sends a chat through the proxy
every 1.5 s, waking a suspended gateway; the others are suspended by the real waker once
idle. Memory is the sum of the running gateways' cgroups (usage minus inactive file cache),
sampled every second, plus the waker's own RSS (it exists only with suspend).

    python bench/density.py [--standin-mb 256] [--base 8] [--factor 6] [--ticks 10] [--real 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provisioner import REAL, STANDIN, token
from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.crypto import KeyRing
from shared.events import InstanceDelete, InstanceRequested, InstanceSuspend
from shared.store import Store
from zaki.cleanup import remove_managed
from zaki.fake_world import fake_world_env
from zaki.fakes import FakeLLM, FakeTelegram, bound_port, serve
from zaki.stack import Process, Stack, docker_bridge_ip, free_network_pool, free_port, wait_for_port

MIB = 1 << 20
CGROUP = Path("/sys/fs/cgroup/memory/docker")  # cgroup v1, cgroupfs driver (this machine)


def cgroup_bytes(container_id: str) -> int:
    """What ``docker stats`` shows: usage minus inactive file cache (v1 or v2 layout)."""
    v1 = CGROUP / container_id
    if v1.is_dir():
        usage = int((v1 / "memory.usage_in_bytes").read_text())
        key = "total_inactive_file"
    else:
        v2 = next(Path("/sys/fs/cgroup").glob(f"**/docker-{container_id}.scope"), None)
        if v2 is None:
            return 0
        usage, v1, key = int((v2 / "memory.current").read_text()), v2, "inactive_file"
    for line in (v1 / "memory.stat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return usage - int(value)
    return usage


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Fleet:
    """The accounts of one scenario and what was sampled while they ran."""

    users: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    memory: list[int] = field(default_factory=list)  # gateways' bytes, one sample a second
    running: list[int] = field(default_factory=list)
    waker: list[int] = field(default_factory=list)
    answers: dict[int, int] = field(default_factory=dict)


class Bench:
    def __init__(self, platform: PlatformClient, store: Store, proxy: str, data: Path, label: str):
        self.platform, self.store, self.proxy, self.data = platform, store, proxy, data
        self.docker = docker.from_env()
        self.label = label

    def sample(self) -> tuple[int, int]:
        """(bytes, count) of this run's running gateways."""
        cs = self.docker.containers.list(filters={"label": f"zaki.managed={self.label}", "status": "running"})
        return sum(cgroup_bytes(c.id) for c in cs), len(cs)

    async def create(self, image: str, idle_s: int, hold_mb: int) -> tuple[str, str]:
        ev = InstanceRequested(
            request_id=uuid.uuid4().hex,
            user_id=f"d{uuid.uuid4().hex[:10]}",
            bot_token=token(),
            image=image,
            idle_suspend_s=idle_s,
        )
        subject, ready = await self.platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=300)
        assert subject == subjects.INSTANCE_READY, ready
        if hold_mb:  # read at every start of the stand-in and every 300 ms while it runs
            faults = self.data / "users" / ev.user_id / ".openclaw" / "standin-faults.json"
            faults.write_text(json.dumps({"alloc_mb": hold_mb}))
            faults.chmod(0o644)
        _, key = await keys.create_key(self.store, ev.user_id, {"chat"})
        return ev.user_id, key

    async def suspend(self, user: str) -> None:
        subject, out = await self.platform.call(
            subjects.INSTANCE_SUSPEND, InstanceSuspend(user_id=user), timeout=120
        )
        assert subject == subjects.INSTANCE_SUSPENDED, out

    async def populate(self, n: int, idle_s: int, hold_mb: int, asleep: bool, batch: int) -> Fleet:
        """*n* accounts, made *batch* at a time (suspended at once when *asleep*, so making them
        never holds more than a batch in memory)."""
        fleet = Fleet()
        for i in range(0, n, batch):
            made = await asyncio.gather(
                *(self.create(STANDIN, idle_s, hold_mb) for _ in range(min(batch, n - i)))
            )
            if asleep:
                await asyncio.sleep(1)  # let the batch take its memory, as a woken one will
                await asyncio.gather(*(self.suspend(u) for u, _ in made))
            for u, k in made:
                fleet.users.append(u)
                fleet.keys[u] = k
        return fleet

    async def run(
        self, fleet: Fleet, ticks: int, tick_s: float, active: float, waker: Process | None
    ) -> None:
        """Ticks of activity: 10 % of the accounts active, half of them carried over."""
        rng = random.Random(16)
        size = max(1, round(active * len(fleet.users)))
        current: list[str] = rng.sample(fleet.users, size)
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=self.proxy, timeout=300) as http:

            async def talk(user: str, until: float) -> None:
                body = {"model": "openclaw", "messages": [{"role": "user", "content": "hi"}]}
                while time.monotonic() < until and not stop.is_set():
                    r = await http.post(
                        "/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {fleet.keys[user]}"},
                    )
                    fleet.answers[r.status_code] = fleet.answers.get(r.status_code, 0) + 1
                    await asyncio.sleep(1.5)

            async def sampler() -> None:
                while not stop.is_set():
                    used, n = await asyncio.to_thread(self.sample)
                    fleet.memory.append(used)
                    fleet.running.append(n)
                    fleet.waker.append(rss_bytes(waker.proc.pid) if waker else 0)
                    await asyncio.sleep(1)

            warm = 2  # ticks before sampling: the population settles into its steady state
            sampling: asyncio.Task | None = None
            for t in range(ticks + warm):
                if t == warm:
                    sampling = asyncio.create_task(sampler())
                until = time.monotonic() + tick_s
                await asyncio.gather(*(talk(u, until) for u in current))
                keep = rng.sample(current, size // 2)
                rest = [u for u in fleet.users if u not in keep]
                current = keep + rng.sample(rest, size - len(keep))
            stop.set()
            if sampling is not None:
                await sampling

    async def delete(self, users: list[str]) -> None:
        for i in range(0, len(users), 8):
            await asyncio.gather(
                *(
                    self.platform.call(
                        subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True), timeout=120
                    )
                    for u in users[i : i + 8]
                )
            )

    async def real(self) -> dict:
        """One real gateway: its memory running, then suspended, and a wake through the proxy."""
        user, key = await self.create(REAL, 0, 0)
        name = f"zaki-user-{user}"
        await asyncio.sleep(20)  # past its start-up work (plugins, channels) to its idle footprint
        running = cgroup_bytes(self.docker.containers.get(name).id)
        await self.suspend(user)
        c = self.docker.containers.get(name)
        asleep = cgroup_bytes(c.id) if c.status == "running" else 0
        t0 = time.perf_counter()
        async with httpx.AsyncClient(base_url=self.proxy, timeout=300) as http:
            r = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        wake = time.perf_counter() - t0
        assert r.status_code == 200, r.text
        await self.delete([user])
        return {"running": running, "asleep": asleep, "container": c.status, "wake_s": wake}


def summary(f: Fleet) -> dict:
    with_waker = [m + w for m, w in zip(f.memory, f.waker, strict=True)]
    return {
        "mean": statistics.mean(with_waker) / MIB,
        "peak": max(with_waker) / MIB,
        "waker": statistics.mean(f.waker) / MIB,
        "run_mean": statistics.mean(f.running),
        "run_max": max(f.running),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--standin-mb", type=int, default=256, help="memory each stand-in holds resident")
    ap.add_argument("--base", type=int, default=8, help="accounts without suspend (all running)")
    ap.add_argument("--factor", type=int, default=6, help="accounts with suspend = factor x base")
    ap.add_argument("--active", type=float, default=0.1, help="share of accounts active at any moment")
    ap.add_argument("--ticks", type=int, default=8)
    ap.add_argument("--tick-s", type=float, default=12.0)
    ap.add_argument("--idle-s", type=int, default=3, help="idle time before a suspend")
    ap.add_argument("--real", type=int, default=1, choices=(0, 1))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="zaki-bench-density-"))
    stack = Stack(tmp / "stack")
    bridge = docker_bridge_ip()
    llm, tg = FakeLLM(), FakeTelegram(accept_all=True)
    lr, tr = await serve(llm.app(), bridge, 0), await serve(tg.app(), bridge, 0)
    label = f"benchd-{uuid.uuid4().hex[:6]}"
    t_start = time.perf_counter()
    try:
        nats_addr, mongo_addr = stack.start_nats().address, stack.start_ferretdb().address
        broker_port = free_port(bridge)
        env = {
            "ZAKI_NATS_URL": nats_addr,
            "ZAKI_MONGO_URL": mongo_addr,
            "ZAKI_SECRET_KEYS": KeyRing.new_key_spec("b"),
            "ZAKI_DATA_ROOT": str(tmp / "data"),
            "ZAKI_PLATFORM_ID": label,
            "ZAKI_NETWORK_POOL": free_network_pool(),
            "ZAKI_ALLOWED_IMAGES": STANDIN,
            "ZAKI_PORT_RANGE_START": "35000",
            "ZAKI_PORT_RANGE_END": "35999",
            **fake_world_env(bridge, bound_port(tr), bound_port(lr), broker_port, "sk-bench"),
            "ZAKI_RECONCILE_INTERVAL_S": "3600",
            "ZAKI_WAKE_TIMEOUT_S": "300",
            "ZAKI_READINESS_TIMEOUT_S": "300",
            "ZAKI_ACTIVITY_FLUSH_S": "1",
            "ZAKI_RATE_LIMIT_RPS": "50",
            "ZAKI_RATE_LIMIT_BURST": "60",
        }
        mport = free_port()
        p = stack.start_service("services.provisioner", {**env, "ZAKI_METRICS_PORT": str(mport)})
        wait_for_port("127.0.0.1", mport, p.proc, "provisioner")
        proxy_port = free_port()
        px = stack.start_service(
            "services.gateway_proxy", {**env, "ZAKI_PROXY_PORT": str(proxy_port), "ZAKI_METRICS_PORT": "0"}
        )
        wait_for_port("127.0.0.1", proxy_port, px.proc, "proxy")
        wport = free_port()
        waker = stack.start_service(
            "services.waker",
            {
                **env,
                "ZAKI_WAKER_SWEEP_S": "1",
                "ZAKI_WAKER_POLL_TIMEOUT_S": "5",
                "ZAKI_METRICS_PORT": str(wport),
            },
        )
        wait_for_port("127.0.0.1", wport, waker.proc, "waker")
        await asyncio.sleep(2)
        platform = await PlatformClient.connect(nats_addr)
        store = Store(mongo_addr, "zaki")
        bench = Bench(platform, store, f"http://127.0.0.1:{proxy_port}", tmp / "data", label)

        real = await bench.real() if args.real else None
        print(f"[density] real gateway done at {time.perf_counter() - t_start:.0f} s", flush=True)
        base = await bench.populate(args.base, 0, args.standin_mb, asleep=False, batch=args.base)
        await bench.run(base, max(3, args.ticks // 2), args.tick_s, args.active, None)
        await bench.delete(base.users)
        print(f"[density] baseline done at {time.perf_counter() - t_start:.0f} s", flush=True)
        n = args.base * args.factor
        sus = await bench.populate(n, args.idle_s, args.standin_mb, asleep=True, batch=args.base)
        print(
            f"[density] {n} accounts made and suspended at {time.perf_counter() - t_start:.0f} s", flush=True
        )
        await bench.run(sus, args.ticks, args.tick_s, args.active, waker)
        await bench.delete(sus.users)
        b, s = summary(base), summary(sus)
        per_b, per_s = b["peak"] / args.base, s["peak"] / n
        print(
            f"\nDensity, one run ({args.standin_mb} MiB stand-ins, {args.active:.0%} of accounts active, "
            f"idle time {args.idle_s} s, ticks of {args.tick_s:.0f} s; {time.perf_counter() - t_start:.0f} s)"
        )
        print(
            "| scenario | accounts | gateways running (mean, max) | memory MiB (mean, peak) | of which waker MiB | peak MiB per account | accounts per GiB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, acc, x, per in (
            ("no suspend (baseline)", args.base, b, per_b),
            ("idle suspend", n, s, per_s),
        ):
            print(
                f"| {name} | {acc} | {x['run_mean']:.1f}, {x['run_max']} | {x['mean']:.0f}, {x['peak']:.0f} | "
                f"{x['waker']:.0f} | {per:.1f} | {1024 / per:.1f} |"
            )
        ratio = per_b / per_s
        gw_only = (max(base.memory) / args.base) / (max(sus.memory) / n)
        print(
            f"\nAccounts at the same (peak) memory: {ratio:.1f}x with suspend "
            f"({n} accounts in {s['peak']:.0f} MiB vs {args.base} in {b['peak']:.0f} MiB; "
            f"{gw_only:.1f}x counting the gateways only, without the waker's own memory); "
            f"answers by status {dict(sorted(base.answers.items()))} / {dict(sorted(sus.answers.items()))}"
        )
        if real:
            rm = real["running"] / MIB
            print(
                f"Real gateway, same run: {rm:.0f} MiB running, {real['asleep'] / MIB:.0f} MiB suspended "
                f"(container {real['container']}), woken by a request in {real['wake_s']:.1f} s; "
                f"stand-in scale 1:{rm / args.standin_mb:.1f}. At {rm:.0f} MiB a gateway, 20 GiB serve "
                f"{int(20 * 1024 // rm)} accounts without suspend and about {int(20 * 1024 // rm * ratio)} with it."
            )
        await platform.close()
        await store.close()
    finally:
        stack.stop()
        await lr.cleanup()
        await tr.cleanup()
        remove_managed(label)


if __name__ == "__main__":
    asyncio.run(main())
