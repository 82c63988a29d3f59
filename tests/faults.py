"""A whole platform of its own for fault tests: its own NATS, FerretDB and the four services,
so a test can kill any of them (or restart NATS, FerretDB, dockerd) without touching the
session's shared services. Load helpers report what was lost, which should be nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import docker
import httpx

from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.crypto import credential_hash, new_broker_credential
from shared.events import InstanceDelete, InstanceRequested
from shared.store import Store
from tests.conftest import STANDIN_IMAGE, _wait_consumers, new_bot_token, new_user, outside_world_env
from zaki.cleanup import remove_managed
from zaki.stack import REPO, Process, Stack, free_network_pool, free_port, wait_for_port

SERVICES = ("services.provisioner", "services.monitor", "services.gateway_proxy", "services.llm_broker")
# Instance ports stay below the kernel's ephemeral range (32768+), where a client socket could
# hold a port between the provisioner's check and Docker's bind.
_ranges = iter(range(29000, 32000, 100))


class FaultPlatform:
    def __init__(
        self, root: Path, fakes, keyring_spec: str, data_root: Path | None = None, **env: str
    ) -> None:
        self.stack = Stack(root / "stack")
        self.fakes_telegram = fakes.telegram
        self.nats_port, self.mongo_port = free_port(), free_port()
        self.nats = self.stack.start_nats(self.nats_port)
        self.mongo = self.stack.start_ferretdb(self.mongo_port)
        tag = uuid.uuid4().hex[:6]
        self.platform_id = f"fault-{tag}"
        port0 = next(_ranges)
        self.proxy_port = free_port()
        self.broker_port = free_port(fakes.host)
        self.data_root = data_root or root / "data"
        self.env = {
            "ZAKI_NATS_URL": self.nats.address,
            "ZAKI_MONGO_URL": self.mongo.address,
            "ZAKI_MONGO_DB": "zaki",
            "ZAKI_PLATFORM_ID": self.platform_id,
            "ZAKI_NETWORK_POOL": free_network_pool(),
            "ZAKI_SECRET_KEYS": keyring_spec,
            "ZAKI_DATA_ROOT": str(self.data_root),
            "ZAKI_GATEWAY_IMAGE": STANDIN_IMAGE,
            "ZAKI_PORT_RANGE_START": str(port0),
            "ZAKI_PORT_RANGE_END": str(port0 + 99),
            **outside_world_env(fakes, self.broker_port),
            "ZAKI_BUDGET_REQUESTS_PER_MINUTE": "100000",
            "ZAKI_PROXY_PORT": str(self.proxy_port),
            "ZAKI_RATE_LIMIT_RPS": "10000",
            "ZAKI_RATE_LIMIT_BURST": "10000",
            "ZAKI_RECONCILE_INTERVAL_S": "5",
            "ZAKI_STOP_TIMEOUT_S": "3",
            "ZAKI_PROBE_INTERVAL_S": "2",
            "ZAKI_DIE_GRACE_S": "2",
            **env,
        }
        self.procs: dict[str, Process] = {}
        self.metrics: dict[str, int] = {}
        self.store = Store(self.mongo.address, "zaki")

    # --- processes ------------------------------------------------------------------------------

    def start(self, module: str, **extra_env: str) -> Process:
        port = self.metrics.setdefault(module, free_port())
        p = self.stack.start_service(module, {**self.env, "ZAKI_METRICS_PORT": str(port), **extra_env})
        wait_for_port("127.0.0.1", port, p.proc, module, timeout=60)
        self.procs[module] = p
        return p

    async def start_all(self) -> None:
        for module in SERVICES:
            self.start(module)
        await self.ready()

    async def ready_consumers(self) -> None:
        await _wait_consumers(self.env["ZAKI_NATS_URL"], 7)

    async def ready(self) -> None:
        await self.ready_consumers()
        wait_for_port("127.0.0.1", self.proxy_port, self.procs["services.gateway_proxy"].proc, "proxy")
        wait_for_port(
            self.env["ZAKI_BROKER_HOST"], self.broker_port, self.procs["services.llm_broker"].proc, "broker"
        )

    def kill9(self, module: str) -> None:
        p = self.procs[module]
        os.killpg(p.proc.pid, signal.SIGKILL)  # the service and any worker it started
        p.proc.wait(10)
        self.stack.processes.remove(p)

    def restart_nats(self) -> None:
        self.nats.stop()
        self.stack.processes.remove(self.nats)
        self.nats = self.stack.start_nats(self.nats_port)

    def restart_ferretdb(self) -> None:
        self.mongo.stop()
        self.stack.processes.remove(self.mongo)
        self.mongo = self.stack.start_ferretdb(self.mongo_port)

    @staticmethod
    def restart_dockerd() -> None:
        subprocess.run(["pkill", "-TERM", "-x", "dockerd"], check=False)
        for _ in range(60):
            if subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode != 0:
                break
            time.sleep(0.5)
        subprocess.run(["bash", str(REPO / "scripts" / "docker.sh")], check=True, capture_output=True)

    async def close(self, docker_client: docker.DockerClient) -> None:
        await self.store.close()
        self.stack.stop()
        remove_managed(self.platform_id, docker_client)

    @property
    def broker_url(self) -> str:
        return f"http://{self.env['ZAKI_BROKER_HOST']}:{self.broker_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    # --- load -----------------------------------------------------------------------------------

    async def request(self, platform: PlatformClient, n: int) -> tuple[list[str], list[str]]:
        """Publishes *n* stand-in instance requests; returns their user ids and request ids."""
        events = [
            InstanceRequested(
                request_id=new_user("req"),
                user_id=new_user("f"),
                bot_token=new_bot_token(),
                image=STANDIN_IMAGE,
            )
            for _ in range(n)
        ]
        for ev in events:
            self.fakes_telegram.add_bot(ev.bot_token.get_secret_value(), f"bot{ev.user_id}")
        for ev in events:
            await platform.send(subjects.INSTANCE_REQUESTED, ev)
        return [ev.user_id for ev in events], [ev.request_id for ev in events]

    async def tenant(self, platform: PlatformClient) -> tuple[str, str, str, str]:
        """One running instance with an API key and a broker credential usable from this host."""
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=new_user("t"), bot_token=new_bot_token(), image=STANDIN_IMAGE
        )
        self.fakes_telegram.add_bot(ev.bot_token.get_secret_value(), "tenant")
        subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
        assert subject == subjects.INSTANCE_READY
        _, key = await keys.create_key(self.store, ev.user_id, {"chat"})
        async with httpx.AsyncClient() as http:
            host = (await http.get(f"{self.broker_url}/healthz")).json()["source"]
        credential = new_broker_credential()
        # A second record, reachable from this host, stands for a gateway calling the broker.
        caller = new_user("c")
        await self.store.create_instance(
            caller,
            {"instance_id": "c1", "broker_key_hash": credential_hash(credential), "subnet": f"{host}/32"},
        )
        await self.store.instances.update_one({"_id": caller}, {"$set": {"state": "running"}})
        return ev.user_id, key, caller, credential

    async def delete_all(self, platform: PlatformClient, users: list[str]) -> None:
        await asyncio.gather(
            *(
                platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True), 120)
                for u in users
            ),
            return_exceptions=True,
        )


@dataclass
class LoadReport:
    ok: int = 0
    lost: int = 0
    retried: int = 0  # attempts that met a refused connection or a 5xx and were tried again
    statuses: Counter = field(default_factory=Counter)


async def steady_load(url: str, headers: dict[str, str], body: dict, n: int, report: LoadReport) -> None:
    """*n* calls, a few in flight; a call that meets a dead server is retried (as a client
    would) for up to 60 s. ``lost`` counts calls that never succeeded."""

    async def one(http: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = await http.post(url, json=body, headers=headers)
                report.statuses[r.status_code] += 1
                if r.status_code == 200:
                    report.ok += 1
                    return
            except httpx.HTTPError:
                report.statuses["conn"] += 1
            if time.monotonic() > deadline:
                report.lost += 1
                return
            report.retried += 1
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(0, n, 4):
            await asyncio.gather(*(one(http) for _ in range(min(4, n - i))))
            await asyncio.sleep(0.1)  # spread over ~5 s, so the load spans the fault


async def usage_tokens(store: Store, user_id: str) -> int:
    return sum([int(d.get("tokens", 0)) async for d in store.usage.find({"user_id": user_id})])


async def check_converged(fp: FaultPlatform, docker_client: docker.DockerClient, users: list[str]) -> dict:
    """No duplicate or orphan container, one port per instance, every record running."""
    containers = docker_client.containers.list(all=True, filters={"label": f"zaki.managed={fp.platform_id}"})
    per_user = Counter(c.labels.get("zaki.user") for c in containers)
    records = {d["_id"]: d for d in await fp.store.list_instances() if d.get("instance_id") != "c1"}
    ports = [d async for d in fp.store.ports.find({})]
    return {
        "duplicates": [u for u, n in per_user.items() if n > 1],
        "orphans": [u for u in per_user if u not in records],
        "missing": [u for u in users if per_user.get(u) != 1],
        "not_running": [u for u in users if records.get(u, {}).get("state") != "running"],
        "ports_unique": len({p["port"] for p in ports}) == len(ports),
        "ports_per_instance": len(ports) == len(records),
    }


async def outcomes_in_stream(nats_url: str, request_ids: list[str], timeout: float) -> dict[str, str]:
    """request id -> outcome subject, read from the ZAKI_EVENTS stream (what any consumer of
    the platform's events will see, even one that was disconnected when it was published)."""
    import json

    import nats

    wanted = set(request_ids)
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(nats_url, max_reconnect_attempts=1)
        except Exception:
            await asyncio.sleep(1)
            continue
        try:
            sub = await nc.jetstream().subscribe(
                "zaki.instance.*", stream=subjects.EVENT_STREAM, ordered_consumer=True
            )
            while time.monotonic() < deadline and not wanted <= found.keys():
                try:
                    msg = await sub.next_msg(timeout=2)
                except TimeoutError:
                    break  # caught up: wait for more outcomes
                rid = json.loads(msg.data).get("request_id")
                if rid in wanted and msg.subject in (subjects.INSTANCE_READY, subjects.INSTANCE_FAILED):
                    found.setdefault(rid, msg.subject)
        finally:
            await nc.close()
        if wanted <= found.keys():
            break
        await asyncio.sleep(1)
    return found


class SlowDockerSocket:
    """A Unix socket in front of Docker's that holds every request for *delay* seconds:
    a daemon that answers slowly, as the monitor sees it."""

    def __init__(self, path: Path, delay: float, upstream: str = "/var/run/docker.sock") -> None:
        self.path, self.delay, self.upstream = path, delay, upstream
        self.server: asyncio.base_events.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
            try:
                while data := await src.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, self.delay), pipe(up_reader, writer, 0))

    async def start(self) -> str:
        self.server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        return f"unix://{self.path}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def restart_requests(nats_url: str, seconds: float) -> Counter:
    """Counts instance.restart commands per user over *seconds* (from the command stream's subject)."""
    import json

    import nats

    seen: Counter = Counter()
    nc = await nats.connect(nats_url)

    async def on_msg(msg) -> None:
        seen[json.loads(msg.data).get("user_id")] += 1

    await nc.subscribe(subjects.INSTANCE_RESTART, cb=on_msg)
    await asyncio.sleep(seconds)
    await nc.close()
    return seen
