"""Can a pre-started ("pooled") real OpenClaw gateway be claimed for a user by a hot reload?
(issue 16.5). An experiment, not a feature: it prints what it saw.

1. Starts a gateway as pool slot S (its own network, data folder and config, hardened like the
   provisioner's) and lists the state files its processes hold open once it is ready.
2. Claims it for user U: connects U's network, rewrites openclaw.json with U's config
   (trustedProxies, password, allowUsers/identityScopes, Telegram bot token, provider key),
   then reads the gateway's [reload] log lines and checks which identity it now serves and
   which bot it polls.

    python bench/pool_probe.py [--new-password]
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.boot import base_env, wait_ready
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
from zaki.fakes import FakeLLM, FakeTelegram, bound_port, serve
from zaki.stack import docker_bridge_ip, free_port


def spec_for(user: str, gw_ip: str, llm_port: int, tg_port: int) -> GatewaySpec:
    return GatewaySpec(
        user_id=user,
        bot_token=f"{uuid.uuid4().int % 10**9 + 10**9}:{uuid.uuid4().hex}",
        model="zaki/echo-1",
        provider=Provider(
            "zaki",
            f"http://host.docker.internal:{llm_port}/v1",
            "openai-completions",
            "sk-" + secrets.token_hex(8),
            (),
        ),
        trusted_proxy_ip=gw_ip,
        password=secrets.token_urlsafe(24),
        telegram_api_root=f"http://host.docker.internal:{tg_port}",
        telegram_private_network=True,
        allowed_origins=(f"https://{user}.zaki.test",),  # as the provisioner sets (public origin)
    )


async def chat_as(http: httpx.AsyncClient, port: int, user: str) -> int:
    body = {"model": "openclaw", "messages": [{"role": "user", "content": "who are you"}]}
    r = await http.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=identity_headers(user)
    )
    return r.status_code


async def main() -> None:
    bridge = docker_bridge_ip()
    llm, tg = FakeLLM(), FakeTelegram(accept_all=True)
    lr, tr = await serve(llm.app(), bridge, 0), await serve(tg.app(), bridge, 0)
    allow = f"{bridge}/32:{bound_port(lr)},{bridge}/32:{bound_port(tr)}"
    runtime = DockerRuntime(
        platform_id=f"bpool-{uuid.uuid4().hex[:6]}", settings=ZakiSettings(egress_allow=allow)
    )
    client = docker.from_env()
    slot, user = f"slot{uuid.uuid4().hex[:8]}", f"user{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="zaki-pool-probe-"))
    name = None
    try:
        slot_ip = await runtime.ensure_network(slot)
        user_ip = await runtime.ensure_network(user)
        dirs = user_dirs(tmp, slot)
        prepare_user_dirs(dirs)
        slot_spec = spec_for(slot, slot_ip, bound_port(lr), bound_port(tr))
        write_config_atomically(dirs.config, render_openclaw_config(slot_spec))
        port = free_port()
        cspec = ContainerSpec(
            user_id=slot,
            instance_id="pool",
            image="zaki/openclaw-gateway:2026.9.6",
            host_port=port,
            publish_ip="127.0.0.1",
            network=network_name(slot),
            binds={str(dirs.state): CONTAINER_STATE_DIR, str(dirs.workspace): CONTAINER_WORKSPACE},
            env=base_env(),
        )
        await runtime.create(cspec)
        name = cspec.name
        await runtime.start(name)
        async with httpx.AsyncClient(timeout=60) as http:
            await wait_ready(http, port, slot)
            print("slot ready; chat as slot:", await chat_as(http, port, slot))
            c = client.containers.get(name)
            out = c.exec_run(
                [
                    "sh",
                    "-c",
                    "for p in /proc/[0-9]*; do ls -l $p/fd 2>/dev/null; done | grep -o '/home/node/[^ ]*' | sort -u",
                ]
            ).output.decode()
            print("state files held open by the slot's processes:\n  " + "\n  ".join(out.split()))
            # Claim for the user.
            client.networks.get(network_name(user)).connect(c)
            user_spec = spec_for(user, user_ip, bound_port(lr), bound_port(tr))
            if "--new-password" not in sys.argv:
                # A changed gateway.auth.password restarts the gateway (SIGUSR2, seen with
                # --new-password): a claim must adopt the slot's internal password.
                user_spec = dataclasses.replace(user_spec, password=slot_spec.password)
            t0 = time.time()
            write_config_atomically(dirs.config, render_openclaw_config(user_spec))
            await asyncio.sleep(15)
            logs = c.logs(since=int(t0) - 1).decode(errors="replace")
            print("gateway log after the claim:")
            for line in logs.splitlines():
                if any(k in line for k in ("reload", "restart", "telegram", "ready")):
                    print("  " + line.strip()[:220])
            c.reload()
            nets = list(c.attrs["NetworkSettings"]["Networks"])
            print("networks:", nets, "published:", c.attrs["NetworkSettings"]["Ports"])
            for who in (slot, user):
                try:
                    print(f"chat as {who}:", await chat_as(http, port, who))
                except httpx.HTTPError as e:
                    print(f"chat as {who}: {type(e).__name__}")
            # The published port follows the slot network; drop it and ask again.
            client.networks.get(network_name(slot)).disconnect(c)
            await asyncio.sleep(2)
            for who in (slot, user):
                try:
                    print(f"after leaving the slot network, chat as {who}:", await chat_as(http, port, who))
                except httpx.HTTPError as e:
                    print(f"after leaving the slot network, chat as {who}: {type(e).__name__}")
            polled = {tg.bot_id(b) for b, _ in tg.polls}
            print(
                "bots polled:",
                {
                    "slot": tg.bot_id(slot_spec.bot_token) in polled,
                    "user": tg.bot_id(user_spec.bot_token) in polled,
                },
            )
    finally:
        if name:
            await runtime.remove(name)
        await runtime.remove_network(slot)
        await runtime.remove_network(user)
        await lr.cleanup()
        await tr.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
