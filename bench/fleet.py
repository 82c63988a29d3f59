"""Fleet upgrade time (issue 17): N stand-in instances moved to a new image, in one run on a
private platform (NATS, FerretDB, provisioner, monitor of its own):

1. baseline: N ``instance.upgrade`` commands published at once, straight to the provisioner,
   until all N outcomes are in (no canary, no gate: the fastest the platform can swap images);
2. ``zaki fleet upgrade --image ... --canary ... --waves ... --soak-s ...`` (the CLI runner, a
   subprocess) on the same instances to a second new image: wall time to completion, and per
   wave the upgrades and the soak (from the runner's ``zaki.fleet.*`` events);
3. (skipped with ``--no-rollback``) the same CLI to an image that never gets ready: time until
   the canary fails the gate and the rollout halts, and until every instance runs its previous
   image again.

``--rounds`` repeats 1 and 2 alternately (the commands move every instance to image A, the
runner to image B), since other work shares this machine; the load average is printed.
The new images are the stand-in committed with an ENV change (``docker commit``, no
registry), so each upgrade is a real container swap of the same start-up cost.

    python bench/fleet.py [--instances 20] [--soak 5] [--rounds 2] [--canary 5%] [--waves 25%,50%,100%]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provisioner import STANDIN, token
from shared import subjects
from shared.client import PlatformClient
from shared.crypto import KeyRing
from shared.events import InstanceDelete, InstanceRequested, InstanceUpgrade
from shared.store import Store
from zaki.cleanup import remove_managed
from zaki.fake_world import fake_world_env
from zaki.fakes import FakeLLM, FakeTelegram, bound_port, serve
from zaki.stack import Stack, docker_bridge_ip, free_network_pool, free_port, wait_for_port

# Tags of this bench's own (tests/test_fleet.py has its own): removed at the end.
NEXT_A = "zaki/standin-gateway:bench-fleet-a"
NEXT_B = "zaki/standin-gateway:bench-fleet-b"
NEVER = "zaki/standin-gateway:bench-fleet-never"
MONITOR_ENV = {  # as tests/conftest.py: quick probes, so health is fresh within a short soak
    "ZAKI_PROBE_INTERVAL_S": "1",
    "ZAKI_PROBE_TIMEOUT_S": "1",
    "ZAKI_UNHEALTHY_AFTER": "2",
    "ZAKI_HEALTHY_AFTER": "1",
    "ZAKI_RESTART_BACKOFF_BASE_S": "1",
    "ZAKI_CRASHLOOP_RESTARTS": "3",
    "ZAKI_CRASHLOOP_WINDOW_S": "120",
    "ZAKI_DIE_GRACE_S": "1.5",
    "ZAKI_HEALTH_WRITE_INTERVAL_S": "1",
    "ZAKI_SUMMARY_INTERVAL_S": "2",
}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def commit(client: docker.DockerClient, tag: str, change: str) -> None:
    repo, _, name = tag.partition(":")
    c = client.containers.create(STANDIN)
    try:
        c.commit(repo, name, changes=[change])
    finally:
        c.remove(force=True)


async def wait_consumers(client: PlatformClient, timeout: float = 60) -> None:
    """Until the provisioner's durable consumers exist (it then takes commands)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the stream does not exist yet
            if len(await client.js.consumers_info(subjects.COMMAND_STREAM)) >= len(subjects.COMMANDS):
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("provisioner consumers did not appear")


class Steps:
    """The runner's ``zaki.fleet.<step>`` events as they arrive, stamped on this clock."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str, dict]] = []

    async def subscribe(self, client: PlatformClient) -> None:
        async def on(msg) -> None:
            self.seen.append((time.perf_counter(), msg.subject.rsplit(".", 1)[-1], json.loads(msg.data)))

        await client.nc.subscribe(f"{subjects.FLEET}.>", cb=on)

    def of(self, rid: str) -> list[tuple[float, str, dict]]:
        return [x for x in self.seen if x[2].get("rollout_id") == rid]


def waves(steps: list[tuple[float, str, dict]]) -> list[dict]:
    """Per wave: its size, the upgrades (wave start -> last outcome) and the rest up to the
    gate's verdict (the soak, or a failure seen at once)."""
    out: list[dict] = []
    cur: dict | None = None
    for t, step, body in steps:
        if step == "wave_started":
            cur = {"wave": body["wave"], "size": body["size"], "t0": t, "last": t}
        elif cur and step in ("instance_upgraded", "instance_failed", "instance_recorded"):
            cur["last"] = t
        elif cur and step in ("gate_passed", "gate_failed"):
            cur |= {"upgrade": cur["last"] - cur["t0"], "gate": t - cur["last"], "verdict": step}
            out.append(cur)
            cur = None
    return out


async def make_instances(platform: PlatformClient, n: int) -> list[str]:
    async def one(i: int) -> str:
        ev = InstanceRequested(
            request_id=uuid.uuid4().hex,
            user_id=f"fl{i}x{uuid.uuid4().hex[:6]}",
            bot_token=token(),
            image=STANDIN,
        )
        subject, out = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=600)
        if subject != subjects.INSTANCE_READY:
            raise RuntimeError(f"{ev.user_id}: {subject} {out}")
        return ev.user_id

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def baseline(platform: PlatformClient, users: list[str], image: str) -> dict:
    """Every upgrade command at once, straight to the provisioner; until every outcome."""

    async def one(user: str) -> tuple[str, float]:
        t = time.perf_counter()
        cmd = InstanceUpgrade(user_id=user, image=image, reason="bench baseline")
        subject, _ = await platform.call(subjects.INSTANCE_UPGRADE, cmd, timeout=600)
        return subject, time.perf_counter() - t

    t0 = time.perf_counter()
    got = await asyncio.gather(*(one(u) for u in users))
    wall = time.perf_counter() - t0
    lat = [s for _, s in got]
    ok = sum(subject == subjects.INSTANCE_READY for subject, _ in got)
    return {"wall": wall, "p50": statistics.median(lat), "max": max(lat), "ok": ok}


async def fleet_cli(env: dict[str, str], steps: Steps, *args: str) -> dict:
    """``zaki fleet upgrade`` as an operator runs it; wall time from spawn to exit."""
    t0 = time.perf_counter()
    n0 = len(steps.seen)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "zaki.cli", "--state-dir", "/nonexistent", "fleet", "upgrade", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **env},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 900)
    wall = time.perf_counter() - t0
    await asyncio.sleep(0.5)  # the last events on their way
    mine = steps.seen[n0:]
    rid = next((b["rollout_id"] for _, s, b in mine if s == "started"), None)
    if rid is None:
        raise RuntimeError(f"no rollout started (exit {proc.returncode}): {err.decode()[-2000:]}")
    mine = steps.of(rid)
    started = next(t for t, s, _ in mine if s == "started")
    # Its summary line: "rollout <id>: <state> {<status>: <count>}"
    last = next((x for x in reversed(out.decode().splitlines()) if x.startswith(f"rollout {rid}: ")), "")
    last = last.split(": ", 1)[-1]
    return {"t0": t0, "wall": wall, "rc": proc.returncode, "steps": mine, "waves": waves(mine),
            "startup": started - t0, "final": last}  # fmt: skip


async def back_on(store: Store, users: list[str], image: str, timeout: float = 300) -> float:
    """Until every record runs *image* again; returns perf_counter() then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        docs = [await store.get_instance(u) for u in users]
        if all(d and d["state"] == "running" and d["image"] == image for d in docs):
            return time.perf_counter()
        await asyncio.sleep(0.5)
    raise TimeoutError(f"not every instance back on {image}")


def report(
    args: argparse.Namespace,
    bases: list[dict],
    fls: list[dict],
    rb: dict | None,
    loads: list[tuple[str, str]],
) -> None:
    n = args.instances
    print(f"\nFleet upgrade of {n} stand-in instances, one run, {len(fls)} round(s) (2 cores, shared)")
    print("load average 1/5/15 min: " + "; ".join(f"{k} {v}" for k, v in loads))
    print(
        "| scenario | round | wall s | upgrade work s (no soak) | soak + gates s | per upgrade p50 / max s | result |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for r, (base, fl) in enumerate(zip(bases, fls, strict=True), 1):
        print(
            f"| baseline: {n} `instance.upgrade` at once | {r} | {base['wall']:.1f} | {base['wall']:.1f} | - | "
            f"{base['p50']:.1f} / {base['max']:.1f} | ready {base['ok']}/{n} |"
        )
        print(
            f"| `zaki fleet upgrade` canary {args.canary}, waves {args.waves}, soak {args.soak:g} s, "
            f"parallel {args.parallel} | {r} | {fl['wall']:.1f} | {fl['work']:.1f} | {fl['soak']:.1f} | - | "
            f"{fl['final']} |"
        )
    if rb:
        print(
            f"| never-ready image, canary {args.canary}: halted / all back on the previous image | - | "
            f"{rb['wall']:.1f} / {rb['back']:.1f} | {rb['work']:.1f} | {rb['soak']:.1f} | - | {rb['final']} |"
        )
    startup = ", ".join(f"{fl['startup']:.1f}" for fl in fls)
    print(
        f"\nPer wave of `zaki fleet upgrade`, each round (CLI start-up to the runner's first event: {startup} s)"
    )
    print("| wave | instances | upgrades s | soak + gate s | wave total s |")
    print("|---:|---:|---:|---:|---:|")
    for i, w in enumerate(fls[0]["waves"]):
        per = [fl["waves"][i] for fl in fls]
        print(
            f"| {i + 1}{' (canary)' if i == 0 else ''} | {w['size']} | "
            + " | ".join(", ".join(f"{x[k]:.1f}" for x in per) for k in ("upgrade", "gate", "total"))
            + " |"
        )
    b = statistics.median(x["wall"] for x in bases)
    f = statistics.median(x["wall"] for x in fls)
    fw = statistics.median(x["wall"] - x["soak"] for x in fls)
    print(
        f"\nMedians: baseline {b:.1f} s, fleet {f:.1f} s ({f / b:.1f}x); fleet without its soaks "
        f"{fw:.1f} s ({fw / b:.1f}x)."
    )


def summed(fl: dict) -> dict:
    """The fleet run's upgrade work and soak time, over its waves."""
    for w in fl["waves"]:
        w["total"] = w["upgrade"] + w["gate"]
    return fl | {"work": sum(w["upgrade"] for w in fl["waves"]), "soak": sum(w["gate"] for w in fl["waves"])}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=20)
    ap.add_argument("--soak", type=float, default=5.0, help="seconds each wave is watched (--soak-s)")
    ap.add_argument("--canary", default="5%")
    ap.add_argument("--waves", default="25%,50%,100%")
    ap.add_argument("--parallel", type=int, default=4, help="upgrades at once within a wave (CLI default)")
    ap.add_argument("--rounds", type=int, default=2, help="baseline + fleet pairs, alternating")
    ap.add_argument("--no-rollback", dest="rollback", action="store_false", help="skip the never-ready run")
    args = ap.parse_args()
    loads0 = load()
    tmp = Path(tempfile.mkdtemp(prefix="zaki-bench-fleet-"))
    stack = Stack(tmp / "stack")
    dk = docker.from_env()
    bridge = docker_bridge_ip()
    llm, tg = FakeLLM(), FakeTelegram(accept_all=True)
    lr, tr = await serve(llm.app(), bridge, 0), await serve(tg.app(), bridge, 0)
    label = f"benchf-{uuid.uuid4().hex[:6]}"
    users: list[str] = []
    platform: PlatformClient | None = None
    store: Store | None = None
    t_start = time.perf_counter()
    try:
        for tag, change in ((NEXT_A, "ENV STANDIN_FLEET=a"), (NEXT_B, "ENV STANDIN_FLEET=b"),
                            (NEVER, "ENV STANDIN_EXIT_CODE=3")):  # fmt: skip
            commit(dk, tag, change)
        nats_addr, mongo_addr = stack.start_nats().address, stack.start_ferretdb().address
        broker_port = free_port(bridge)
        port0 = 37000 + (free_port() % 50) * 60
        env = {
            "ZAKI_NATS_URL": nats_addr,
            "ZAKI_MONGO_URL": mongo_addr,
            "ZAKI_SECRET_KEYS": KeyRing.new_key_spec("b"),
            "ZAKI_DATA_ROOT": str(tmp / "data"),
            "ZAKI_PLATFORM_ID": label,
            "ZAKI_NETWORK_POOL": free_network_pool(),
            "ZAKI_ALLOWED_IMAGES": ",".join((STANDIN, NEXT_A, NEXT_B, NEVER)),
            "ZAKI_PORT_RANGE_START": str(port0),
            "ZAKI_PORT_RANGE_END": str(port0 + 59),
            **fake_world_env(bridge, bound_port(tr), bound_port(lr), broker_port, "sk-bench"),
            "ZAKI_RECONCILE_INTERVAL_S": "3600",  # nothing but the commands changes instances
            "ZAKI_READINESS_TIMEOUT_S": "60",
            "ZAKI_FLEET_LEASE_S": "3",
        }
        mport = free_port()
        p = stack.start_service("services.provisioner", {**env, "ZAKI_METRICS_PORT": str(mport)})
        wait_for_port("127.0.0.1", mport, p.proc, "provisioner")
        monport = free_port()
        mon = stack.start_service(
            "services.monitor",
            {**env, **MONITOR_ENV, "ZAKI_REPLICA_ID": "bench-mon", "ZAKI_METRICS_PORT": str(monport)},
        )
        wait_for_port("127.0.0.1", monport, mon.proc, "monitor")
        platform = await PlatformClient.connect(nats_addr)
        store = Store(mongo_addr, "zaki")
        await wait_consumers(platform)
        steps = Steps()
        await steps.subscribe(platform)

        t = time.perf_counter()
        users = await make_instances(platform, args.instances)
        print(f"[fleet] {len(users)} instances ready in {time.perf_counter() - t:.0f} s", flush=True)
        loads = [("start", loads0)]
        cli = ("--canary", args.canary, "--soak-s", str(args.soak), "--parallel", str(args.parallel),
               "--timeout", "300")  # fmt: skip
        bases, fls = [], []
        for r in range(1, args.rounds + 1):  # each round: A by commands, then B by the runner
            bases.append(await baseline(platform, users, NEXT_A))
            loads.append((f"after baseline {r}", load()))
            print(f"[fleet] round {r} baseline: {bases[-1]['wall']:.1f} s", flush=True)
            await asyncio.sleep(3)  # the monitor sees the new incarnations before the runner looks
            fls.append(summed(await fleet_cli(env, steps, "--image", NEXT_B, "--waves", args.waves, *cli)))
            loads.append((f"after fleet {r}", load()))
            if fls[-1]["rc"] != 0:
                raise RuntimeError(f"fleet upgrade did not complete: {fls[-1]['final']}")
            print(f"[fleet] round {r} fleet upgrade: {fls[-1]['wall']:.1f} s", flush=True)
        rb = None
        if args.rollback:
            rb = summed(await fleet_cli(env, steps, "--image", NEVER, "--waves", "100%", *cli))
            rb["back"] = await back_on(store, users, NEXT_B) - rb["t0"]
            loads.append(("end", load()))
            print(f"[fleet] never-ready rollout: {rb['final']} after {rb['wall']:.1f} s", flush=True)
        report(args, bases, fls, rb, loads)
        print(f"\n(whole run {time.perf_counter() - t_start:.0f} s)")
    finally:
        if platform is not None:
            await asyncio.gather(
                *(platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True), 180)
                  for u in users),
                return_exceptions=True,
            )  # fmt: skip
            await platform.close()
        if store is not None:
            await store.close()
        stack.stop()
        await lr.cleanup()
        await tr.cleanup()
        remove_managed(label, dk)
        for tag in (NEXT_A, NEXT_B, NEVER):
            with contextlib.suppress(docker.errors.APIError):
                dk.images.remove(tag)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
