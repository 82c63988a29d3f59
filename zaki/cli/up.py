"""``zaki up [--demo]``: NATS, FerretDB, Docker and the four services on this machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from zaki.cli.common import say, write_private
from zaki.fake_world import fake_world_env

STANDIN_IMAGE = "zaki/standin-gateway:latest"
DEMO_LLM_KEY = "sk-demo-not-a-real-key"
# The platform's own processes, besides NATS, FerretDB and (with --demo) the fakes.
SERVICES = (
    "services.provisioner",
    "services.monitor",
    "services.gateway_proxy",
    "services.llm_broker",
    "services.dashboard",
    "services.backup",  # scheduled backups of the data folders (ZAKI_BACKUP_*)
    "services.waker",  # idle suspend, and wake on a Telegram message or a scheduled job
)


def register(sub: Any) -> None:
    up = sub.add_parser("up", help="run the whole platform on this machine")
    up.add_argument("--demo", action="store_true", help="use local fakes of Telegram and the LLM provider")
    up.add_argument("--no-build", action="store_true", help="do not build container images")
    up.add_argument("--proxy-port", type=int, default=8080)
    # `zaki up` starts from the operator's environment, not from what the last run wrote
    # (a --demo run's fakes and stand-in image must not leak into a plain run).
    up.set_defaults(fn=run, loads_env=False)


def secret_keys(state_dir: Path) -> str:
    """The key ring of this state folder: generated once, owner-only from its first byte."""
    from shared.crypto import KeyRing

    if os.environ.get("ZAKI_SECRET_KEYS"):
        return os.environ["ZAKI_SECRET_KEYS"]
    path = state_dir / "secret_keys"
    if not path.exists():
        write_private(path, KeyRing.new_key_spec(f"k{int(time.time())}"), replace=False)
    return path.read_text().strip()


def jwt_secret(state_dir: Path) -> str:
    """The secret the dashboard signs the proxy's session cookie with: generated once, owner-only."""
    import secrets

    if os.environ.get("ZAKI_JWT_SECRET"):
        return os.environ["ZAKI_JWT_SECRET"]
    path = state_dir / "jwt_secret"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(48), replace=False)
    return path.read_text().strip()


def write_env(state_dir: Path, env: dict[str, str]) -> None:
    """env.json holds the key ring and every setting: owner-only, like the key ring."""
    write_private(state_dir / "env.json", json.dumps(env, indent=1))


def allowed_images(demo: bool) -> str:
    """The stand-in echo gateway is a fake: only --demo allows it (and tests, which set
    ZAKI_ALLOWED_IMAGES themselves); a real platform runs only its real gateway image."""
    configured = os.environ.get("ZAKI_ALLOWED_IMAGES")
    if configured is not None:
        return configured
    return STANDIN_IMAGE if demo else ""


def previous_env(state_dir: Path) -> dict[str, str]:
    """What the last `zaki up` on this state folder wrote."""
    try:
        return json.loads((state_dir / "env.json").read_text())
    except (OSError, ValueError):
        return {}


def sticky_port(host: str, previous: str | None) -> int:
    """The port the last run used when it is still free: gateways' configs and the stored
    provider name it. Otherwise a new one."""
    from zaki.stack import free_port, port_open

    if previous and previous.isdigit() and not port_open(host, int(previous)):
        return int(previous)
    return free_port(host)


def demo_llm_port(bridge: str, previous: dict[str, str]) -> int:
    """The fake provider's port: the last --demo run's, so the provider the broker stored
    then still points at it."""
    from urllib.parse import urlsplit

    last = urlsplit(previous.get("ZAKI_LLM_BASE_URL", ""))
    same_fake = last.hostname == bridge and previous.get("ZAKI_LLM_API_KEY") == DEMO_LLM_KEY
    return sticky_port(bridge, str(last.port) if same_fake and last.port else None)


def warn_on_provider_drift(mongo_url: str, env: dict[str, str]) -> None:
    """Says when ZAKI_LLM_* disagree with the provider the broker stored on its first start."""
    from shared.crypto import KeyRing
    from shared.store import Store
    from zaki.cli.providers import seed_drift

    async def check() -> list[str]:
        store = Store(mongo_url, env.get("ZAKI_MONGO_DB", "zaki"))
        try:
            return await seed_drift(store, KeyRing.from_spec(env["ZAKI_SECRET_KEYS"]), env)
        finally:
            await store.close()

    for line in asyncio.run(check()):
        say(f"warning: {line}")


def run(args: argparse.Namespace) -> int:
    from zaki.stack import (
        Stack,
        StackError,
        build_ferretdb,
        docker_bridge_ip,
        ensure_docker,
        ensure_images,
        free_port,
        port_open,
        wait_for_port,
    )

    state_dir = Path(args.state_dir).resolve()
    previous = previous_env(state_dir)
    stack = Stack(state_dir)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    # `kill` stops everything as cleanly as Ctrl-C; SIGINT is set explicitly because a shell
    # that starts us in the background would otherwise leave it ignored.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        say("checking the Docker engine...")
        ensure_docker(say)
        if not args.no_build:
            ensure_images(say)
        build_ferretdb(say)
        nats_port = 4222 if not port_open("127.0.0.1", 4222) else free_port()
        mongo_port = 27017 if not port_open("127.0.0.1", 27017) else free_port()
        say("starting NATS (JetStream) and FerretDB...")
        nats = stack.start_nats(nats_port)
        mongo = stack.start_ferretdb(mongo_port)
        env = {
            "ZAKI_NATS_URL": nats.address,
            "ZAKI_MONGO_URL": mongo.address,
            "ZAKI_SECRET_KEYS": secret_keys(state_dir),
            "ZAKI_DATA_ROOT": os.environ.get("ZAKI_DATA_ROOT", str(state_dir / "data")),
            "ZAKI_PROXY_PORT": os.environ.get("ZAKI_PROXY_PORT", str(args.proxy_port)),
            "ZAKI_ALLOWED_IMAGES": allowed_images(args.demo),
            "ZAKI_JWT_SECRET": jwt_secret(state_dir),
            "ZAKI_DASHBOARD_PORT": os.environ.get("ZAKI_DASHBOARD_PORT", "8095"),
            # zaki up runs exactly one broker: budget reservations can stay in its memory.
            "ZAKI_BROKER_RESERVATIONS": os.environ.get("ZAKI_BROKER_RESERVATIONS", "process"),
            # The dashboard lives on its own origin, never the proxy's (README: Dashboard).
            "ZAKI_DASHBOARD_PUBLIC_ORIGIN": os.environ.get(
                "ZAKI_DASHBOARD_PUBLIC_ORIGIN",
                f"http://127.0.0.1:{os.environ.get('ZAKI_DASHBOARD_PORT', '8095')}",
            ),
        }
        # The LLM broker listens on the Docker bridge address: gateway containers reach it
        # (as host.docker.internal), nothing beyond this machine does.
        bridge_ip = docker_bridge_ip()
        broker_port = int(
            os.environ.get("ZAKI_BROKER_PORT") or sticky_port(bridge_ip, previous.get("ZAKI_BROKER_PORT"))
        )
        env.update(
            ZAKI_BROKER_HOST=bridge_ip,
            ZAKI_BROKER_PORT=str(broker_port),
            ZAKI_BROKER_URL_FOR_GATEWAYS=f"http://host.docker.internal:{broker_port}",
        )
        if args.demo:
            llm_port = demo_llm_port(bridge_ip, previous)
            tg_port = free_port(bridge_ip)
            fake = stack.spawn(
                "fakes",
                [
                    sys.executable,
                    "-m",
                    "zaki.fakes",
                    "--host",
                    bridge_ip,
                    "--llm-port",
                    str(llm_port),
                    "--telegram-port",
                    str(tg_port),
                ],
            )
            wait_for_port(bridge_ip, tg_port, fake.proc, "demo fakes")
            env.update(fake_world_env(bridge_ip, tg_port, llm_port, broker_port, DEMO_LLM_KEY, os.environ))
        env = {**{k: v for k, v in os.environ.items() if k.startswith("ZAKI_")}, **env}
        write_env(state_dir, env)
        warn_on_provider_drift(mongo.address, env)
        metrics = {}
        for module in SERVICES:
            port = free_port()
            metrics[module] = port
            stack.start_service(module, {**env, "ZAKI_METRICS_PORT": str(port)})
        for module, port in metrics.items():
            wait_for_port("127.0.0.1", port, None, module, timeout=60)
        proxy_port = int(env["ZAKI_PROXY_PORT"])
        wait_for_port("127.0.0.1", proxy_port, None, "gateway proxy", timeout=60)
        rows = [
            ("NATS (JetStream)", nats.address),
            ("FerretDB (MongoDB wire)", mongo.address),
            ("Docker engine", "local socket"),
            ("gateway proxy", f"http://127.0.0.1:{proxy_port}"),
            ("LLM broker (gateways only)", f"http://{bridge_ip}:{broker_port}"),
            ("dashboard (pages and API)", f"http://127.0.0.1:{env['ZAKI_DASHBOARD_PORT']}"),
            *(
                (f"{m.rsplit('.', 1)[-1]} metrics", f"http://127.0.0.1:{p}/metrics")
                for m, p in metrics.items()
            ),
            ("logs", str(state_dir / "logs")),
        ]
        if args.demo:
            rows.append(("demo fakes", "Telegram and LLM stand-ins (--demo)"))
        say("Zaki is up:")
        for name, where in rows:
            print(f"  {name:<26} {where}", flush=True)
        say("Ctrl-C stops everything.")
        while True:
            for p in stack.processes:
                if p.proc.poll() is not None:
                    raise StackError(f"{p.name} exited with code {p.proc.returncode}; see {p.log_path}")
            time.sleep(1)
    except KeyboardInterrupt:
        say("stopping...")
        return 0
    except StackError as e:
        say(f"error: {e}")
        return 1
    finally:
        stack.stop()
        say("stopped.")
