"""deploy/compose.yaml brought up here with docker-compose and the locally built stand-ins:
one instance goes request -> ready -> proxied chat -> delete, and Prometheus scrapes all."""

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from services.gateway_proxy import keys
from shared import subjects
from shared.client import PlatformClient
from shared.crypto import KeyRing
from shared.events import InstanceDelete, InstanceRequested
from shared.store import Store
from tests.conftest import STANDIN_IMAGE, new_user, require_tool
from tests.test_broker import call_from_container
from zaki.cleanup import remove_managed
from zaki.stack import free_network_pool, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")

pytestmark = require_tool(COMPOSE, "docker-compose")


def compose_command(project: str, *overrides: str) -> list[str]:
    """docker-compose on deploy/compose.yaml (plus overrides) with the local stand-ins."""
    files = [arg for name in ("compose.yaml", *overrides) for arg in ("-f", str(ROOT / "deploy" / name))]
    return [COMPOSE, "-p", project, "--env-file", str(ROOT / "deploy/local.env"), *files]


@pytest.fixture
def compose_stack(docker_client, fakes):
    project = f"zakitest{uuid.uuid4().hex[:6]}"
    ports = {
        k: str(free_port())
        for k in (
            "NATS_PORT",
            "NATS_MONITOR_PORT",
            "MONGO_PORT",
            "ZAKI_PROXY_PORT",
            "PROMETHEUS_PORT",
            "PROVISIONER_METRICS_PORT",
            "MONITOR_METRICS_PORT",
            "PROXY1_METRICS_PORT",
            "PROXY2_METRICS_PORT",
            "BROKER_METRICS_PORT",
            "DASHBOARD_METRICS_PORT",
            "WAKER_METRICS_PORT",
            "BACKUP_METRICS_PORT",
            "ZAKI_DASHBOARD_PORT",
        )
    }
    ports["ZAKI_BROKER_PORT"] = str(free_port(fakes.host))
    data_root = Path(f"/tmp/{project}-data")
    data_root.mkdir(mode=0o755)
    os.chown(data_root, 1000, 1000)
    prom_config = data_root.parent / f"{project}-prometheus.yml"
    prom_config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nrule_files: [rules.yml]\nscrape_configs:\n"
        + "".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: ['127.0.0.1:{ports[var]}']}}]\n"
            for job, var in (
                ("zaki-provisioner", "PROVISIONER_METRICS_PORT"),
                ("zaki-monitor", "MONITOR_METRICS_PORT"),
                ("zaki-gateway-proxy", "PROXY1_METRICS_PORT"),
                ("zaki-gateway-proxy-2", "PROXY2_METRICS_PORT"),
                ("zaki-llm-broker", "BROKER_METRICS_PORT"),
                ("zaki-dashboard", "DASHBOARD_METRICS_PORT"),
                ("zaki-waker", "WAKER_METRICS_PORT"),
                ("zaki-backup", "BACKUP_METRICS_PORT"),
            )
        )
    )
    env = {
        **os.environ,
        **ports,
        "ZAKI_MONGO_URL": f"mongodb://127.0.0.1:{ports['MONGO_PORT']}/",
        "ZAKI_NATS_URL": f"nats://127.0.0.1:{ports['NATS_PORT']}",
        "ZAKI_SECRET_KEYS": KeyRing.new_key_spec("c1"),
        "ZAKI_PLATFORM_ID": project,
        "ZAKI_DATA_ROOT": str(data_root),
        "ZAKI_ALLOWED_IMAGES": STANDIN_IMAGE,
        "ZAKI_NETWORK_POOL": free_network_pool(),
        "ZAKI_PORT_RANGE_START": "32100",
        "ZAKI_PORT_RANGE_END": "32199",
        "ZAKI_TELEGRAM_API_BASE": f"http://{fakes.host}:{fakes.tg_port}",
        "ZAKI_TELEGRAM_API_BASE_FOR_GATEWAYS": f"http://host.docker.internal:{fakes.tg_port}",
        "ZAKI_TELEGRAM_PRIVATE_NETWORK": "true",
        "ZAKI_LLM_BASE_URL": f"http://{fakes.host}:{fakes.llm_port}/v1",
        "ZAKI_BROKER_HTTP_HOSTS": f"{fakes.host}:{fakes.llm_port}",
        "ZAKI_BROKER_PRIVATE_HOSTS": f"{fakes.host}:{fakes.llm_port}",
        "ZAKI_LLM_API_KEY": "sk-compose-" + uuid.uuid4().hex,
        "ZAKI_BRIDGE_IP": fakes.host,
        "ZAKI_DEFAULT_MODEL": "zaki/echo-1",
        "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
        "PROMETHEUS_CONFIG": str(prom_config),
    }
    base = compose_command(project)
    up = subprocess.run([*base, "up", "-d"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    try:
        yield env, ports, base
    finally:
        logs = subprocess.run(
            [*base, "logs", "--no-color", "--tail", "30"], env=env, capture_output=True, text=True
        )
        print(logs.stdout[-6000:])
        subprocess.run([*base, "down", "-v"], env=env, capture_output=True, timeout=120)
        remove_managed(project, docker_client)
        shutil.rmtree(data_root, ignore_errors=True)
        prom_config.unlink(missing_ok=True)


async def test_compose_stack_runs_an_instance_end_to_end(compose_stack, fakes, docker_client):
    env, ports, _ = compose_stack
    data_root = Path(env["ZAKI_DATA_ROOT"])
    await asyncio.to_thread(wait_for_port, "127.0.0.1", int(ports["ZAKI_PROXY_PORT"]), None, "proxy", 120)
    await asyncio.to_thread(
        wait_for_port, "127.0.0.1", int(ports["PROVISIONER_METRICS_PORT"]), None, "provisioner", 120
    )
    await asyncio.sleep(2)  # consumers
    platform = await PlatformClient.connect(f"nats://127.0.0.1:{ports['NATS_PORT']}")
    store = Store(env["ZAKI_MONGO_URL"], "zaki")
    try:
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=new_user("cmp"), bot_token=fakes.bot(), image=STANDIN_IMAGE
        )
        subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
        assert subject == subjects.INSTANCE_READY, ready
        _, key = await keys.create_key(store, ev.user_id, {"chat"})
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{ports['ZAKI_PROXY_PORT']}", timeout=30
        ) as http:
            r = await http.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "openclaw", "messages": [{"role": "user", "content": "via compose"}]},
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "echo: via compose"
        # The compose LLM broker answers the gateway's container with its broker credential.
        config = json.loads((data_root / "users" / ev.user_id / ".openclaw" / "openclaw.json").read_text())
        provider = config["models"]["providers"]["zaki"]
        answer = await call_from_container(
            docker_client,
            ev.user_id,
            f"{provider['baseUrl']}/chat/completions",
            provider["apiKey"],
            "brokered",
        )
        assert answer["status"] == 200 and "echo: brokered" in answer["body"], answer

        # The compose provisioner enforces the egress policy: the broker is reachable from the
        # tenant's container, a host port bound to all interfaces is not (without the policy it
        # answers: the same listener is reached from the host).
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "0.0.0.0", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                assert (await http.get(f"http://{fakes.host}:{port}/")).text == "ok"
            refused = await call_from_container(
                docker_client, ev.user_id, f"http://host.docker.internal:{port}/", "x", "probe"
            )
            assert refused["status"] == 0, refused
        finally:
            server.close()
        subject, _ = await platform.call(
            subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True)
        )
        assert subject == subjects.INSTANCE_DELETED
        # Prometheus (the stand-in image) scrapes every service.
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}", timeout=10
        ) as http:
            for _ in range(30):
                targets = (await http.get("/api/v1/targets")).json()["data"]["activeTargets"]
                if len(targets) == 8 and all(t["health"] == "up" for t in targets):
                    break
                await asyncio.sleep(1)
            assert [t["health"] for t in targets] == ["up"] * 8, targets
    finally:
        await platform.close()
        await store.close()


async def test_nats_cluster_variant_replicates_the_streams(docker_client):
    import nats

    from shared.bus import ensure_streams

    project = f"zakinats{uuid.uuid4().hex[:6]}"
    ports = {
        k: str(free_port())
        for k in (
            "NATS_PORT",
            "NATS_PORT_2",
            "NATS_PORT_3",
            "NATS_MONITOR_PORT",
            "NATS_CLUSTER_PORT_1",
            "NATS_CLUSTER_PORT_2",
            "NATS_CLUSTER_PORT_3",
        )
    }
    env = {**os.environ, **ports, "ZAKI_SECRET_KEYS": "unused"}
    base = compose_command(project, "compose.nats-cluster.yaml")
    up = await asyncio.to_thread(
        subprocess.run,
        [*base, "up", "-d", "nats", "nats-2", "nats-3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr
    urls = ",".join(f"nats://127.0.0.1:{ports[k]}" for k in ("NATS_PORT", "NATS_PORT_2", "NATS_PORT_3"))
    try:
        for k in ("NATS_PORT", "NATS_PORT_2", "NATS_PORT_3"):
            await asyncio.to_thread(wait_for_port, "127.0.0.1", int(ports[k]), None, "nats", 60)
        for _ in range(60):  # the JetStream meta group elects a leader
            try:
                await ensure_streams(urls, replicas=3)
                break
            except Exception:
                await asyncio.sleep(1)
        nc = await nats.connect(urls.split(","))
        info = await nc.jetstream().stream_info("ZAKI_COMMANDS")
        await nc.close()
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader and len(info.cluster.replicas) == 2
    finally:
        await asyncio.to_thread(
            subprocess.run, [*base, "down", "-v"], env=env, capture_output=True, timeout=120
        )
