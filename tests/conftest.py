"""Fixtures on real services: NATS with JetStream, FerretDB, the local Docker engine,
the platform's own processes, and local fakes of Telegram and an LLM provider."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn

import docker
import nats
import nats.js.errors
import pytest

from shared import subjects
from shared.bus import nats_servers
from shared.client import PlatformClient
from shared.crypto import KeyRing
from shared.settings import ZakiSettings
from shared.store import Store
from zaki.cleanup import remove_managed
from zaki.fake_world import fake_world_env
from zaki.fakes import FakeLLM, FakeTelegram, bound_port, serve
from zaki.stack import (
    Process,
    Stack,
    docker_bridge_ip,
    ensure_docker,
    free_network_pool,
    free_port,
    wait_for_port,
)

REAL_IMAGE = "zaki/openclaw-gateway:2026.9.6"
STANDIN_IMAGE = "zaki/standin-gateway:latest"
SESSION = uuid.uuid4().hex[:6]
# The proxy tests' shared fixtures (recorder, plane) live with their helpers.
pytest_plugins = ["tests.proxy_support", "tests.swarm_lab_fixtures"]
PLATFORM_ID = f"test-{SESSION}"


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def missing_tool(what: str) -> NoReturn:
    """A tool a test needs is missing. Locally the test is skipped; under CI=true it fails,
    because setup installs every tool there and a skip would hide a missing install step."""
    why = f"{what} is missing: scripts/setup.sh installs it"
    if on_ci():
        pytest.fail(f"{why} (CI=true: a missing tool fails, it never skips)", pytrace=False)
    pytest.skip(why)


def require_tool(found: object, what: str) -> pytest.MarkDecorator:
    """A mark for a test or module (``pytestmark``) that needs a tool: *found* is its path (or
    anything falsy when it is missing). The one rule for missing tools: see missing_tool."""
    return pytest.mark.requires_tool(what, bool(found))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires_tool(what, found): see tests/conftest.py require_tool")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires_tool"):
        what, found = mark.args
        if not found:
            missing_tool(what)


def new_user(prefix: str = "u") -> str:
    """A user id unique to this test session (cleanup finds them by the session tag)."""
    return f"{prefix}{SESSION}{uuid.uuid4().hex[:8]}"


def new_bot_token() -> str:
    return f"{uuid.uuid4().int % 10**9 + 10**9}:{uuid.uuid4().hex}{uuid.uuid4().hex[:5]}"


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zaki")


@pytest.fixture(scope="session")
def stack(state_dir: Path) -> Iterator[Stack]:
    s = Stack(state_dir / "stack")
    s.nats = s.start_nats()  # type: ignore[attr-defined]
    s.mongo = s.start_ferretdb()  # type: ignore[attr-defined]
    yield s
    s.stop()
    # The session's provisioner may have (re)started a gateway after docker_client's cleanup ran
    # (its reconcile heals until the process stops): what the session platform left goes now.
    with contextlib.suppress(docker.errors.DockerException):
        remove_managed(PLATFORM_ID)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    ensure_docker()
    client = docker.from_env()
    yield client
    # sparse=True: no inspect per container, which races with containers going away meanwhile.
    for c in client.containers.list(all=True, sparse=True, filters={"label": "zaki.managed"}):
        if SESSION in ((c.attrs.get("Labels") or {}).get("zaki.user") or ""):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                c.remove(force=True)
    for n in client.networks.list(filters={"label": "zaki.managed"}):
        if SESSION in (n.attrs.get("Labels") or {}).get("zaki.user", ""):
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                n.remove()


@pytest.fixture(scope="session")
def bridge_ip(docker_client: docker.DockerClient) -> str:
    return docker_bridge_ip()


class Fakes:
    def __init__(self, llm: FakeLLM, telegram: FakeTelegram, host: str, llm_port: int, tg_port: int) -> None:
        self.llm, self.telegram, self.host = llm, telegram, host
        self.llm_port, self.tg_port = llm_port, tg_port

    def bot(self, username: str | None = None) -> str:
        token = new_bot_token()
        self.telegram.add_bot(token, username or f"bot{token[:6]}")
        return token


@pytest.fixture(scope="session")
async def fakes(bridge_ip: str) -> AsyncIterator[Fakes]:
    """Fakes listen on the Docker bridge address: reachable from the host and from gateway containers."""
    llm, tg = FakeLLM(), FakeTelegram()
    lr = await serve(llm.app(), bridge_ip, 0)
    tr = await serve(tg.app(), bridge_ip, 0)
    yield Fakes(llm, tg, bridge_ip, bound_port(lr), bound_port(tr))
    await lr.cleanup()
    await tr.cleanup()


@pytest.fixture(scope="session")
def keyring_spec() -> str:
    return KeyRing.new_key_spec("k1")


def outside_world_env(fakes: Fakes, broker_port: int) -> dict[str, str]:
    """Settings that point a platform at the local fakes of Telegram and a model provider."""
    return fake_world_env(
        fakes.host, fakes.tg_port, fakes.llm_port, broker_port, "sk-platform-" + uuid.uuid4().hex
    )


@pytest.fixture(scope="session")
def service_env(stack: Stack, fakes: Fakes, keyring_spec: str, state_dir: Path) -> dict[str, str]:
    port0 = 23000 + (int(SESSION, 16) % 40) * 100
    broker_port = free_port(fakes.host)
    return {
        "ZAKI_NATS_URL": stack.nats.address,  # type: ignore[attr-defined]
        "ZAKI_MONGO_URL": stack.mongo.address,  # type: ignore[attr-defined]
        "ZAKI_MONGO_DB": "zaki",
        "ZAKI_PLATFORM_ID": PLATFORM_ID,
        "ZAKI_NETWORK_POOL": free_network_pool(),  # one no other network on this daemon overlaps
        "ZAKI_SECRET_KEYS": keyring_spec,
        "ZAKI_DATA_ROOT": str(state_dir / "data"),
        "ZAKI_GATEWAY_IMAGE": REAL_IMAGE,
        "ZAKI_ALLOWED_IMAGES": f"{STANDIN_IMAGE},zaki/standin-gateway:canary",
        "ZAKI_PORT_RANGE_START": str(port0),
        "ZAKI_PORT_RANGE_END": str(port0 + 99),
        **outside_world_env(fakes, broker_port),
        "ZAKI_READINESS_TIMEOUT_S": "120",
        "ZAKI_RECONCILE_INTERVAL_S": "5",
        "ZAKI_STOP_TIMEOUT_S": "5",
    }


@pytest.fixture
def settings(service_env: dict[str, str]) -> ZakiSettings:
    return ZakiSettings(**{k.removeprefix("ZAKI_").lower(): v for k, v in service_env.items()})


@pytest.fixture(scope="session")
def broker(stack: Stack, service_env: dict[str, str]) -> Process:
    """The LLM broker: every gateway's model calls go through it."""
    metrics_port = free_port()
    p = stack.start_service("services.llm_broker", {**service_env, "ZAKI_METRICS_PORT": str(metrics_port)})
    wait_for_port(service_env["ZAKI_BROKER_HOST"], int(service_env["ZAKI_BROKER_PORT"]), p.proc, "llm broker")
    p.address = f"http://127.0.0.1:{metrics_port}/metrics"
    return p


def broker_url(service_env: dict[str, str]) -> str:
    return f"http://{service_env['ZAKI_BROKER_HOST']}:{service_env['ZAKI_BROKER_PORT']}"


@pytest.fixture
def host_net(broker: Process, service_env: dict[str, str]) -> str:
    """The address this host's calls to the broker come from (the broker says), as a network:
    an instance record with this subnet may call the broker from the test itself."""
    import httpx

    return f"{httpx.get(broker_url(service_env) + '/healthz').json()['source']}/32"


@pytest.fixture(scope="session")
def provisioner(
    stack: Stack, service_env: dict[str, str], docker_client: docker.DockerClient, broker: Process
) -> Process:
    metrics_port = free_port()
    p = stack.start_service("services.provisioner", {**service_env, "ZAKI_METRICS_PORT": str(metrics_port)})
    wait_for_port("127.0.0.1", metrics_port, p.proc, "provisioner")
    p.address = f"http://127.0.0.1:{metrics_port}/metrics"
    asyncio.run(_wait_consumers(service_env["ZAKI_NATS_URL"], 7))
    return p


async def _wait_consumers(url: str, n: int, timeout: float = 30) -> None:
    """Waits until the service's durable consumers exist (it is then ready for commands)."""
    nc = await nats.connect(nats_servers(url))
    try:
        js = nc.jetstream()
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                if len(await js.consumers_info(subjects.COMMAND_STREAM)) >= n:
                    return
            except nats.js.errors.NotFoundError:  # the stream does not exist yet
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("provisioner consumers did not appear")
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


@pytest.fixture
async def store(service_env: dict[str, str]) -> AsyncIterator[Store]:
    s = Store(service_env["ZAKI_MONGO_URL"], service_env["ZAKI_MONGO_DB"])
    await s.ensure_indexes()
    yield s
    await s.close()


@pytest.fixture
async def platform(stack: Stack) -> AsyncIterator[PlatformClient]:
    c = await PlatformClient.connect(stack.nats.address)  # type: ignore[attr-defined]
    yield c
    await c.close()


async def eventually(check, timeout: float = 30.0, interval: float = 0.2):
    """Polls an (async) predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def assert_metrics(url: str, *names: str) -> None:
    """Scrapes a service's /metrics and requires every named series."""
    import httpx

    async with httpx.AsyncClient() as http:
        text = (await http.get(url)).text
    missing = [n for n in names if n not in text]
    assert not missing, missing


def node_series(text: str) -> dict[str, dict[str, float]]:
    """The provisioner's capacity per node (zaki_node_*) in a /metrics text: by series, then node."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("zaki_node_"):
                out.setdefault(sample.name, {})[sample.labels["node"]] = sample.value
    return out


def all_log_text(state_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (state_dir / "stack" / "logs").glob("*.log"))


JWT_SECRET = "test-jwt-secret-" + SESSION * 4


@pytest.fixture(scope="session")
def proxy(stack: Stack, service_env: dict[str, str], provisioner: Process) -> Process:
    port = free_port()
    env = {
        **service_env,
        "ZAKI_PROXY_PORT": str(port),
        "ZAKI_JWT_SECRET": JWT_SECRET,
        "ZAKI_RATE_LIMIT_RPS": "50",
        "ZAKI_RATE_LIMIT_BURST": "60",
        "ZAKI_MAX_BODY_BYTES": str(1 << 20),
        "ZAKI_MAX_WEBSOCKETS_PER_TENANT": "3",
        "ZAKI_METRICS_PORT": str(free_port()),
    }
    p = stack.start_service("services.gateway_proxy", env)
    wait_for_port("127.0.0.1", port, p.proc, "gateway proxy")
    p.address = f"http://127.0.0.1:{port}"
    p.metrics = f"http://127.0.0.1:{env['ZAKI_METRICS_PORT']}/metrics"  # type: ignore[attr-defined]
    return p


MONITOR_ENV = {
    "ZAKI_PROBE_INTERVAL_S": "1",
    # The production timeout: at 1 s a real gateway busy just after its ready (session projection,
    # start-up maintenance) missed two probes on a loaded machine and was restarted mid-test.
    "ZAKI_PROBE_TIMEOUT_S": "2",
    "ZAKI_UNHEALTHY_AFTER": "2",
    "ZAKI_HEALTHY_AFTER": "1",
    "ZAKI_RESTART_BACKOFF_BASE_S": "1",
    "ZAKI_CRASHLOOP_RESTARTS": "3",
    "ZAKI_CRASHLOOP_WINDOW_S": "120",
    "ZAKI_DIE_GRACE_S": "1.5",
    "ZAKI_HEALTH_WRITE_INTERVAL_S": "1",
    "ZAKI_SUMMARY_INTERVAL_S": "2",
}


def start_monitor(stack: Stack, service_env: dict[str, str], replica: str, **extra: str) -> Process:
    port = free_port()
    p = stack.start_service(
        "services.monitor",
        {**service_env, **MONITOR_ENV, **extra, "ZAKI_REPLICA_ID": replica, "ZAKI_METRICS_PORT": str(port)},
    )
    wait_for_port("127.0.0.1", port, p.proc, "monitor")
    p.address = f"http://127.0.0.1:{port}/metrics"
    return p


@pytest.fixture(scope="session")
def monitor(stack: Stack, service_env: dict[str, str], provisioner: Process) -> Process:
    return start_monitor(stack, service_env, "mon-a")


def operator_connect(
    request_id: str, client_id: str = "cli", mode: str = "cli", platform: str = "linux"
) -> str:
    """OpenClaw's WebSocket ``connect`` frame for an operator client (no auth: the proxy vouches)."""
    import json

    params = {
        "minProtocol": 4,
        "maxProtocol": 4,
        "client": {"id": client_id, "version": "0.1.0", "platform": platform, "mode": mode},
        "role": "operator",
        "scopes": ["operator.read", "operator.write"],
        "caps": [],
    }
    return json.dumps({"type": "req", "id": request_id, "method": "connect", "params": params})


@contextlib.contextmanager
def swap_space(size_gib: int = 3) -> Iterator[Path]:
    """Swap on this machine for ZAKI_SUSPEND_MODE=swap tests: a swap file of their own,
    switched on for the module and off (its pages read back) and removed after. Swap is a
    host setting; without the permission (swapon) this is a missing tool."""
    path = Path(f"/var/tmp/zaki-test-swap-{SESSION}-{uuid.uuid4().hex[:4]}")
    subprocess.run(["fallocate", "-l", f"{size_gib}G", str(path)], check=True)
    path.chmod(0o600)
    subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
    on = subprocess.run(["swapon", str(path)], capture_output=True, text=True)
    if on.returncode != 0:
        path.unlink()
        missing_tool(f"swap (swapon: {on.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["swapoff", str(path)], capture_output=True)
        path.unlink(missing_ok=True)
