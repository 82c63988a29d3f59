"""The locally built real OpenClaw image, started with a rendered native config."""

import asyncio
import dataclasses
import secrets
import time

import httpx
import pytest

from services.provisioner.config import (
    BOOT_ENV,
    GatewaySpec,
    Provider,
    prepare_user_dirs,
    render_openclaw_config,
    user_dirs,
    write_config_atomically,
)
from services.provisioner.runtime import ContainerSpec, DockerRuntime
from shared.gateway import CONTAINER_STATE_DIR, CONTAINER_WORKSPACE, identity_headers, network_name
from shared.settings import ZakiSettings
from tests.conftest import REAL_IMAGE, STANDIN_IMAGE, eventually, new_user
from zaki.stack import free_port

pytestmark = pytest.mark.gateway


@pytest.fixture(scope="module")  # one real gateway (~1 GiB, 15+ s to boot) for the module's tests
async def real_gateway(fakes, state_dir, docker_client):
    user = new_user("gw")
    # This gateway calls the fake provider directly (no broker): the egress policy must allow it.
    allow = f"{fakes.host}/32:{fakes.llm_port},{fakes.host}/32:{fakes.tg_port}"
    runtime = DockerRuntime(settings=ZakiSettings(egress_allow=allow))
    gw_ip = await runtime.ensure_network(user)
    dirs = user_dirs(state_dir / "direct", user)
    prepare_user_dirs(dirs)
    password = secrets.token_urlsafe(24)
    spec = GatewaySpec(
        user_id=user,
        bot_token=fakes.bot(),
        model="zaki/echo-1",
        provider=Provider(
            "zaki",
            f"http://host.docker.internal:{fakes.llm_port}/v1",
            "openai-completions",
            "sk-x-1234567",
            (),
        ),
        trusted_proxy_ip=gw_ip,
        password=password,
        telegram_api_root=f"http://host.docker.internal:{fakes.tg_port}",
        telegram_private_network=True,
        telegram_allow_from=("4242",),
        # What the provisioner renders by default (ZAKI_GATEWAY_PLUGINS, ZAKI_GATEWAY_DREAMING).
        plugins=ZakiSettings().gateway_plugin_ids(),
        dreaming=ZakiSettings().gateway_dreaming,
    )
    write_config_atomically(dirs.config, render_openclaw_config(spec))
    port = free_port()
    cspec = ContainerSpec(
        user_id=user,
        instance_id="direct",
        image=REAL_IMAGE,
        host_port=port,
        publish_ip="127.0.0.1",
        network=network_name(user),
        binds={str(dirs.state): CONTAINER_STATE_DIR, str(dirs.workspace): CONTAINER_WORKSPACE},
        env={
            "OPENCLAW_CONFIG_PATH": f"{CONTAINER_STATE_DIR}/openclaw.json",
            "OPENCLAW_STATE_DIR": CONTAINER_STATE_DIR,
            **BOOT_ENV,
        },
    )
    await runtime.create(cspec)
    await runtime.start(cspec.name)
    yield user, port, password, cspec.name, spec.bot_token, dirs
    await runtime.remove(cspec.name)
    await runtime.remove_network(user)


async def test_real_gateway_ready_auth_and_chat(real_gateway, fakes, docker_client):
    user, port, password, name, *_ = real_gateway
    base = f"http://127.0.0.1:{port}"
    headers = identity_headers(user)
    async with httpx.AsyncClient(timeout=60) as http:
        deadline = time.monotonic() + 120
        while True:
            try:
                r = await http.get(f"{base}/readyz", headers=headers)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway not ready within 120 s"
            await asyncio.sleep(0.5)
        assert r.json()["ready"] is True

        body = {"model": "openclaw", "messages": [{"role": "user", "content": "hello foundation"}]}
        # Refused: no proxy attribution, another user's identity, a bearer with a wrong secret.
        r = await http.post(f"{base}/v1/chat/completions", json=body)
        assert r.status_code in (401, 403)
        wrong_user = {**headers, "x-forwarded-user": "mallory@zaki.local"}
        assert (
            await http.post(f"{base}/v1/chat/completions", json=body, headers=wrong_user)
        ).status_code == 401
        r = await http.post(
            f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {password}x"}
        )
        assert r.status_code in (401, 403)

        r = await http.post(f"{base}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: hello foundation"
    assert any(b.get("stream") for b in fakes.llm.calls)  # the gateway really called our fake LLM

    attrs = docker_client.containers.get(name).attrs
    bindings = attrs["HostConfig"]["PortBindings"]["18789/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
    assert attrs["HostConfig"]["CapDrop"] == ["ALL"]
    assert attrs["HostConfig"]["ReadonlyRootfs"] is True
    assert attrs["Config"]["User"] == "1000:1000"
    assert "no-new-privileges:true" in attrs["HostConfig"]["SecurityOpt"]


async def _ready(port: int, user: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            return (
                await http.get(f"http://127.0.0.1:{port}/readyz", headers=identity_headers(user))
            ).is_success
        except httpx.HTTPError:
            return False


async def test_real_gateway_loads_only_the_platforms_plugins_and_answers_telegram(
    real_gateway, fakes, docker_client
):
    """Boot time (issue 16.5): the rendered plugins.allow keeps OpenClaw from loading its other
    13 default plugins (browser, canvas, computer use, unused providers, ...); with them gone
    and dreaming off the gateway still gets ready, and a Telegram message gets the model's answer.
    BOOT_ENV: no respawned launcher process, the compile cache used in place."""
    user, port, _, name, token, dirs = real_gateway
    await eventually(lambda: _ready(port, user), timeout=300, interval=0.5)  # a loaded 2-core host
    logs = docker_client.containers.get(name).logs().decode(errors="replace")
    listening = next(line for line in logs.splitlines() if "http server listening" in line)
    assert "(2 plugins: memory-core, telegram;" in listening, listening
    # BOOT_ENV: no openclaw.mjs launcher respawned itself to wrap the gateway (tini's child is
    # the gateway), and Node's compile cache sits where the platform put it.
    top = docker_client.containers.get(name).top(ps_args="-eo pid,ppid,args")["Processes"]
    tini = next(pid for pid, _, args in top if args.startswith("/usr/bin/tini"))
    assert [ppid for _, ppid, args in top if args == "openclaw-gateway"] == [tini], top
    tg = fakes.telegram
    await eventually(lambda: tg.polling(token), timeout=60)
    tg.inject_message(token, "hello lean gateway", chat_id=4242)
    answers = await eventually(
        lambda: [m for m in tg.answers(token) if "hello lean gateway" in m["text"]], timeout=120
    )
    assert str(answers[0]["chat_id"]) == "4242"
    docker_client.containers.get(name).stop(timeout=30)  # Node writes its compile cache at exit
    cache = dirs.state / "cache" / "node-compile"
    assert not (cache / "openclaw").exists() and any(cache.glob("v*/*")), list(cache.iterdir())


def test_rendered_config_turns_dreaming_off_and_allows_only_the_listed_plugins():
    spec = GatewaySpec(
        user_id="u1",
        bot_token="123:abc",
        model="zaki/echo-1",
        provider=Provider("zaki", "http://broker:1/v1", "openai-completions", "sk-x", ()),
        trusted_proxy_ip="10.0.0.1",
        password="p" * 24,
        plugins=("telegram", "memory-core"),
        dreaming=False,
    )
    plugins = render_openclaw_config(spec)["plugins"]
    assert plugins["allow"] == ["telegram", "memory-core"]
    assert plugins["entries"]["memory-core"]["config"]["dreaming"] == {"enabled": False}
    # OpenClaw's defaults when the settings ask for them: no plugins block at all.
    default = dataclasses.replace(spec, plugins=(), dreaming=True)
    assert "plugins" not in render_openclaw_config(default)


def _image_healthcheck(docker_client, image: str) -> dict:
    return docker_client.images.get(image).attrs["Config"]["Healthcheck"]


async def test_the_real_gateway_passes_its_images_own_cheap_health_check(real_gateway, docker_client):
    """Docker's check is bash's /dev/tcp every 30 s, not a Node start every 10 s (~0.15 CPU-s each,
    bench/healthcheck_cost.py); run inside the real gateway, it passes."""
    name = real_gateway[3]
    check = _image_healthcheck(docker_client, REAL_IMAGE)
    assert check["Test"][:3] == ["CMD", "bash", "-c"] and "node" not in " ".join(check["Test"])
    assert check["Interval"] == 30 * 10**9
    container = docker_client.containers.get(name)
    if container.status != "running":  # the test before stops it (Node writes its compile cache)
        container.start()

    async def passes() -> bool:
        return (await asyncio.to_thread(container.exec_run, check["Test"][1:])).exit_code == 0

    await eventually(passes, timeout=120, interval=1)  # /healthz answers once the gateway listens


async def test_the_stand_ins_health_check_fails_a_gateway_that_stops_answering(docker_client):
    """The same command (the image's own) turns a hung gateway unhealthy: the monitor acts on
    Docker's `health_status: unhealthy`. Interval and timeout shortened here, the command kept."""
    check = _image_healthcheck(docker_client, STANDIN_IMAGE)
    assert check["Test"] == _image_healthcheck(docker_client, REAL_IMAGE)["Test"]
    fast = {"test": check["Test"], "interval": 10**9, "timeout": 10**9, "retries": 2}
    containers = {
        hang: docker_client.containers.run(
            STANDIN_IMAGE,
            detach=True,
            name=f"zaki-hc-{new_user('h')}",
            healthcheck=fast,
            environment={"STANDIN_HANG_AFTER_MS": "4000"} if hang else {},
            labels={"zaki.test": "healthcheck"},
        )
        for hang in (False, True)
    }
    try:

        def status(c) -> str:
            c.reload()
            return c.attrs["State"]["Health"]["Status"]

        async def both_healthy() -> bool:
            return all(status(c) == "healthy" for c in containers.values())

        await eventually(both_healthy, timeout=30, interval=0.5)

        async def hung_is_unhealthy() -> bool:
            return status(containers[True]) == "unhealthy"

        await eventually(hung_is_unhealthy, timeout=30, interval=0.5)
        assert status(containers[False]) == "healthy"
    finally:
        for c in containers.values():
            c.remove(force=True)
