"""The control plane's NATS as a 3-node cluster, for real (issue 18): a platform (provisioner,
proxy) on three JetStream servers routed to each other (deploy/compose.nats-cluster.yaml's
layout, as processes: `Stack.start_nats_cluster`) with every stream replicated three times
(`ZAKI_STREAM_REPLICAS=3`). SIGKILL of the server that leads the command stream: the platform
keeps taking commands (a new user gets ready, an existing one answers a chat through the proxy and
is deleted), the stream elects another leader, and the killed server, started again, catches up."""

from __future__ import annotations

import asyncio
import signal

import httpx
import nats
import pytest

from services.gateway_proxy import keys
from shared import subjects
from shared.bus import ensure_streams, nats_servers
from shared.client import PlatformClient
from shared.events import InstanceDelete, InstanceRequested
from shared.store import Store
from tests.conftest import STANDIN_IMAGE, _wait_consumers, eventually, new_user
from tests.proxy_support import start_proxy
from tests.test_self_healing import PrivatePlatform, platform_env
from zaki.stack import Stack, free_network_pool, wait_for_port

pytestmark = pytest.mark.timeout(300)


async def stream_cluster(url: str, stream: str) -> tuple[str, dict[str, bool]]:
    """The stream's leader and, for each follower, whether it is current."""
    nc = await nats.connect(nats_servers(url), connect_timeout=3)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.cluster.leader, {r.name: bool(r.current) for r in info.cluster.replicas or []}
    finally:
        await nc.close()


async def jetstream_ready(url: str) -> bool:
    """The cluster has a meta leader: the streams can be made (replicated 3 times)."""
    try:
        await ensure_streams(url, replicas=3)
    except Exception:  # no meta leader yet, or a member still joining
        return False
    return True


async def test_the_platform_rides_out_the_loss_of_the_command_streams_leader(tmp_path, service_env, fakes):
    stack = Stack(tmp_path / "stack")
    members = stack.start_nats_cluster(3)
    url = ",".join(m.address for m in members)
    try:
        await eventually(lambda: jetstream_ready(url), timeout=60, interval=1)
        mongo = stack.start_ferretdb()
        env = platform_env(
            service_env, tmp_path, "natsc", free_network_pool(), url, mongo.address, ZAKI_STREAM_REPLICAS="3"
        )
        prov = stack.start_service("services.provisioner", env)
        wait_for_port("127.0.0.1", int(env["ZAKI_METRICS_PORT"]), prov.proc, "provisioner")
        await _wait_consumers(url, len(subjects.COMMANDS))
        proxy = start_proxy(stack, env, fastpath=True)
        platform = PrivatePlatform(stack, env, "")
        client = await PlatformClient.connect(url)
        store = Store(env["ZAKI_MONGO_URL"], "zaki")

        async def request(user: str) -> None:
            ev = InstanceRequested(
                request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
            )
            subject, outcome = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
            assert subject == subjects.INSTANCE_READY, outcome

        async def chat(user: str, key: str) -> str:
            body = {"model": "openclaw", "messages": [{"role": "user", "content": f"hi {user}"}]}
            async with httpx.AsyncClient(base_url=f"http://{proxy.address}", timeout=30) as http:
                r = await http.post(
                    "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                )
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        try:
            leader, followers = await stream_cluster(url, subjects.COMMAND_STREAM)
            assert len(followers) == 2, followers  # three copies of every command
            first = new_user("nc")
            await request(first)
            _, key = await keys.create_key(store, first, {"chat"})
            assert first in await chat(first, key)

            killed = next(m for m in members if m.name == leader)
            killed.proc.send_signal(signal.SIGKILL)
            killed.proc.wait(10)

            async def new_leader() -> bool:
                try:
                    now, _ = await stream_cluster(url, subjects.COMMAND_STREAM)
                except Exception:  # no leader during the election
                    return False
                return bool(now) and now != leader

            await eventually(new_leader, timeout=60, interval=1)
            second = new_user("nc")
            await request(second)  # a command published, stored and taken after the loss
            assert first in await chat(first, key)
            subject, outcome = await client.call(
                subjects.INSTANCE_DELETE, InstanceDelete(user_id=first, purge=True), timeout=120
            )
            assert subject == subjects.INSTANCE_DELETED, outcome

            # Started again on its store, the lost server catches up with what it missed.
            stack.restart_nats_member(killed)

            async def all_current() -> bool:
                try:
                    _, now = await stream_cluster(url, subjects.COMMAND_STREAM)
                except Exception:  # no leader yet
                    return False
                return len(now) == 2 and all(now.values())

            await eventually(all_current, timeout=60, interval=1)
            subject, outcome = await client.call(
                subjects.INSTANCE_DELETE, InstanceDelete(user_id=second, purge=True), timeout=120
            )
            assert subject == subjects.INSTANCE_DELETED, outcome
        finally:
            await client.close()
            await store.close()
            platform.stop()
    finally:
        stack.stop()
        await asyncio.sleep(0)
