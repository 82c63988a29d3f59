"""A private platform for a benchmark: NATS, FerretDB, the fake Bot API and model provider,
a provisioner and optionally a broker and a proxy, all torn down (containers included) at the
end. One place, so each benchmark names only the settings it varies."""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from shared.client import PlatformClient
from shared.crypto import KeyRing
from shared.store import Store
from zaki.cleanup import remove_managed
from zaki.fake_world import fake_world_env
from zaki.fakes import FakeLLM, FakeTelegram, bound_port, serve
from zaki.stack import Stack, docker_bridge_ip, free_network_pool, free_port, wait_for_port


@dataclass
class BenchPlatform:
    env: dict[str, str]
    platform: PlatformClient
    store: Store
    telegram: FakeTelegram
    metrics: str  # the provisioner's /metrics
    proxy: str | None  # http://127.0.0.1:port when started


@contextlib.asynccontextmanager
async def bench_platform(
    name: str, extra_env: dict[str, str], *, broker: bool = False, proxy: bool = False, ports: int = 1000
) -> AsyncIterator[BenchPlatform]:
    tmp = Path(tempfile.mkdtemp(prefix=f"zaki-bench-{name}-"))
    stack = Stack(tmp / "stack")
    bridge = docker_bridge_ip()
    llm, tg = FakeLLM(), FakeTelegram(accept_all=True)
    lr, tr = await serve(llm.app(), bridge, 0), await serve(tg.app(), bridge, 0)
    platform_id = f"bench{name}-{uuid.uuid4().hex[:6]}"
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
            "ZAKI_PORT_RANGE_START": "34000",
            "ZAKI_PORT_RANGE_END": str(34000 + ports - 1),
            **fake_world_env(bridge, bound_port(tr), bound_port(lr), broker_port, "sk-bench"),
            "ZAKI_READINESS_TIMEOUT_S": "300",
            **extra_env,
        }
        mport = free_port()
        p = stack.start_service("services.provisioner", {**env, "ZAKI_METRICS_PORT": str(mport)})
        wait_for_port("127.0.0.1", mport, p.proc, "provisioner")
        if broker:
            b = stack.start_service("services.llm_broker", {**env, "ZAKI_METRICS_PORT": str(free_port())})
            wait_for_port(bridge, broker_port, b.proc, "llm broker")
        proxy_url = None
        if proxy:
            proxy_port = free_port()
            px = stack.start_service("services.gateway_proxy", {**env, "ZAKI_PROXY_PORT": str(proxy_port)})
            wait_for_port("127.0.0.1", proxy_port, px.proc, "proxy")
            proxy_url = f"http://127.0.0.1:{proxy_port}"
        platform = await PlatformClient.connect(nats_addr)
        store = Store(mongo_addr, "zaki")
        try:
            yield BenchPlatform(env, platform, store, tg, f"http://127.0.0.1:{mport}/metrics", proxy_url)
        finally:
            await platform.close()
            await store.close()
    finally:
        stack.stop()
        await lr.cleanup()
        await tr.cleanup()
        remove_managed(platform_id)
