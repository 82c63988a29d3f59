"""The locally built real OpenClaw image, started with a rendered native config."""

import asyncio
import secrets
import time

import httpx
import pytest

from services.provisioner.config import (
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
from tests.conftest import REAL_IMAGE, new_user
from zaki.stack import free_port

pytestmark = pytest.mark.gateway


@pytest.fixture
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
        },
    )
    await runtime.create(cspec)
    await runtime.start(cspec.name)
    yield user, port, password, cspec.name
    await runtime.remove(cspec.name)
    await runtime.remove_network(user)


async def test_real_gateway_ready_auth_and_chat(real_gateway, fakes, docker_client):
    user, port, password, name = real_gateway
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
