"""A Docker Swarm of n nodes on this one machine, for tests and experiments (issue #18).

Each node is a container on the host engine running its own dockerd (image:
deploy/images/swarm-node). Node 1 is the manager; the host engine never joins or inits a
swarm. Root here lacks CAP_SYS_RESOURCE, so ``--privileged`` fails: a node gets every other
capability, no seccomp/AppArmor/masked paths, the host's cgroup v1 tree read-write (its
containers go under ``/<node>`` through ``--cgroup-parent``, removed by ``down``) and
``/var/lib/docker`` on a volume of its own (overlay2 cannot sit on overlay2).

Everything is labelled ``zaki.swarm-lab=<id>``; ``down(id)`` removes it all.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from zaki.stack import REPO, StackError, free_network_pool

LABEL = "zaki.swarm-lab"
CGROUP_ROOT = Path("/sys/fs/cgroup")
BUILD = REPO / "deploy" / "images" / "swarm-node" / "build.sh"
NODE_SECURITY = [
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined",
    "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
]  # fmt: skip


@dataclass(frozen=True)
class Node:
    name: str  # container name = nested hostname = cgroup parent
    ip: str  # on the lab network: where the host (the proxy) reaches published ports


@dataclass
class Lab:
    id: str
    network: str
    subnet: str  # the lab's /16: nodes in its first /24, swarm networks in its upper half
    nodes: list[Node] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds, by step

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    def node(self, i: int) -> Node:
        """Node *i*, counted from 1 like their names."""
        return self.nodes[i - 1]


def run(*args: str, input: bytes | None = None, timeout: float = 120, check: bool = True) -> str:
    p = subprocess.run(args, input=input, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).decode(errors="replace").strip()
        raise StackError(f"{' '.join(args[:6])}: exit {p.returncode}: {err}")
    return p.stdout.decode(errors="replace").strip()


def nd(node: Node | str, *args: str, timeout: float = 120, check: bool = True) -> str:
    """``docker <args>`` against a node's nested engine."""
    name = node.name if isinstance(node, Node) else node
    return run("docker", "exec", name, "docker", *args, timeout=timeout, check=check)


def node_image(progress: Callable[[str], None] = print) -> str:
    """Builds the node image if its recipe changed (seconds when cached); returns its ref."""
    progress("swarm lab: node image (deploy/images/swarm-node/build.sh)")
    return run("bash", str(BUILD), timeout=900)


def _wait_engine(node: Node, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nd(node, "info", "--format", "{{.ServerVersion}}", check=False, timeout=10):
            return
        state = run("docker", "inspect", "-f", "{{.State.Running}}", node.name, check=False)
        if state != "true":
            logs = run("docker", "logs", "--tail", "20", node.name, check=False)
            raise StackError(f"{node.name} exited before its dockerd answered: {logs}")
        time.sleep(0.3)
    raise StackError(f"{node.name}: nested dockerd did not answer within {timeout:.0f} s")


def api_dir(lab_id: str) -> Path:
    """Host folder with a folder per node holding that node's API socket (no TCP listener)."""
    return Path(tempfile.gettempdir()) / f"zlab-{lab_id}-api"


def api_url(lab: Lab, node: Node) -> str:
    """A node's Docker API from the host, e.g. for the docker SDK's ``base_url``."""
    return f"unix://{api_dir(lab.id) / node.name / 'docker.sock'}"


def _start_node(
    lab: Lab, i: int, image: str, dockerd_args: Sequence[str], shared_dirs: Sequence[str], own_dir: str | None
) -> Node:
    name = f"zlab-{lab.id}-n{i}"
    sock_dir = api_dir(lab.id) / name
    sock_dir.mkdir(parents=True, exist_ok=True)
    # Host folders every node sees at the same path (bind mounts of services, e.g. data folders).
    shared = [a for d in shared_dirs for a in ("-v", f"{d}:{d}:rw")]
    if own_dir:  # this node's own disk: no other node sees it
        shared += ["-v", f"{own_dir}:{own_dir}:rw"]
    net = ipaddress.ip_network(lab.subnet)
    # Nested bridges (docker0, docker_gwbridge) in 10.N.64.0/18: inside the lab's /16, so no
    # nested address shadows a host network; each node has its own netns, so they may repeat.
    local_pool = f"{net.network_address + 64 * 256}/18"
    run("docker", "volume", "create", "--label", f"{LABEL}={lab.id}", f"{name}-docker")
    run(
        "docker", "run", "-d", "--name", name, "--hostname", name,
        "--label", f"{LABEL}={lab.id}", "--network", lab.network,
        # Tasks use the images loaded on the node; never ask a registry (none is reachable).
        "-e", "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1",
        *NODE_SECURITY,
        "-v", f"{CGROUP_ROOT}:{CGROUP_ROOT}:rw", "-v", f"{name}-docker:/var/lib/docker",
        # /run on tmpfs: a killed node starts again without its engine's stale pid files.
        "--tmpfs", "/run", "-v", f"{sock_dir}:/run/zlab-api", *shared,
        image, "-H", "unix:///run/zlab-api/docker.sock",  # besides the entrypoint's own
        f"--cgroup-parent=/{name}", "--storage-driver=overlay2",
        f"--default-address-pool=base={local_pool},size=24",
        "--log-driver=json-file", "--log-opt=max-size=1m", *dockerd_args,
    )  # fmt: skip
    ip = run(
        "docker",
        "inspect",
        "-f",
        f'{{{{(index .NetworkSettings.Networks "{lab.network}").IPAddress}}}}',
        name,
    )
    return Node(name, ip)


def up(
    n: int = 3,
    images: Sequence[str] = (),
    lab_id: str | None = None,
    progress: Callable[[str], None] = print,
    dockerd_args: Sequence[str] = (),
    shared_dirs: Sequence[str] = (),
    node_dirs: Sequence[str] = (),
) -> Lab:
    """Starts *n* nodes, makes a swarm of them (node 1 manages) and loads *images* onto each.
    *dockerd_args* go to every nested dockerd: e.g. ``--node-generic-resource=mem_mb=2048``, a
    capacity the scheduler counts down (every node here sees the host's whole memory).
    *shared_dirs*: host folders mounted at the same path in every node; *node_dirs*: one host
    folder per node, mounted (same path) in that node only, as its own disk. Each node's API is
    also a socket on the host (``api_url``).
    On any failure everything made so far is removed."""
    lab_id = lab_id or uuid.uuid4().hex[:6]
    image = node_image(progress)
    subnet = free_network_pool()
    net = ipaddress.ip_network(subnet)
    lab = Lab(lab_id, f"zlab-{lab_id}", subnet)
    try:
        t0 = time.monotonic()
        nodes_net = f"{net.network_address}/24"
        gw = str(net.network_address + 1)
        # --internal: no route out of the lab, so nothing in it (a pull, a tenant, a resolver
        # fallback to 8.8.8.8) can send a packet past this machine; the host still reaches nodes.
        run("docker", "network", "create", "--internal", "--label", f"{LABEL}={lab_id}",
            "--subnet", nodes_net, "--gateway", gw, lab.network)  # fmt: skip
        own = [*node_dirs, *[None] * n][:n]
        lab.nodes = [
            _start_node(lab, i, image, dockerd_args, shared_dirs, own[i - 1]) for i in range(1, n + 1)
        ]
        for node in lab.nodes:
            _wait_engine(node)
        lab.timings["engines"] = time.monotonic() - t0
        progress(f"swarm lab {lab_id}: {n} engines answer after {lab.timings['engines']:.1f} s")
        m = lab.manager
        # Swarm networks in the upper half of the lab's /16, a /28 each (2,048 tenant overlays).
        pool = f"{net.network_address + 128 * 256}/17"
        nd(m, "swarm", "init", "--advertise-addr", m.ip, "--default-addr-pool", pool,
           "--default-addr-pool-mask-length", "28")  # fmt: skip
        token = nd(m, "swarm", "join-token", "-q", "worker")
        for node in lab.nodes[1:]:
            nd(node, "swarm", "join", "--token", token, "--advertise-addr", node.ip, f"{m.ip}:2377")
        for i, node in enumerate(lab.nodes, 1):
            nd(m, "node", "update", "--label-add", f"zaki.node=n{i}", node.name)
        lab.timings["swarm"] = time.monotonic() - t0
        progress(f"swarm lab {lab_id}: swarm of {n} ready after {lab.timings['swarm']:.1f} s")
        if images:
            lab.timings.update(load_images(lab, images))
            progress(f"swarm lab {lab_id}: images loaded in {lab.timings['images']:.1f} s")
    except BaseException:
        down(lab_id)
        raise
    return lab


def load_images(lab: Lab, images: Sequence[str]) -> dict[str, float]:
    """``docker save`` once, ``docker load`` on every node at the same time (no registry is
    reachable here). Returns the seconds taken: save, and load (all nodes)."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="zlab-") as d:
        tar = Path(d) / "images.tar"
        run("docker", "save", "-o", str(tar), *images, timeout=600)
        t1 = time.monotonic()

        def load(node: Node) -> None:
            with tar.open("rb") as f:
                p = subprocess.run(["docker", "exec", "-i", node.name, "docker", "load", "-q"],
                                   stdin=f, capture_output=True, timeout=600)  # fmt: skip
            if p.returncode != 0:
                raise StackError(f"docker load on {node.name}: {p.stderr.decode(errors='replace')}")

        with ThreadPoolExecutor(len(lab.nodes)) as pool:
            list(pool.map(load, lab.nodes))
    t2 = time.monotonic()
    return {"image_save": t1 - t0, "image_load": t2 - t1, "images": t2 - t0}


def node_memory_mb(node: Node) -> dict[str, float]:
    """A node's memory from the host's cgroups: its engine (the node container's own cgroup)
    and its nested containers (``/<node>``). rss: anonymous memory; usage: with page cache."""
    cid = run("docker", "inspect", "-f", "{{.Id}}", node.name)
    out: dict[str, float] = {}
    for part, rel in (("engine", f"docker/{cid}"), ("containers", node.name)):
        stat = CGROUP_ROOT / "memory" / rel / "memory.stat"
        usage = CGROUP_ROOT / "memory" / rel / "memory.usage_in_bytes"
        if not stat.exists():
            out[f"{part}_rss"] = out[f"{part}_usage"] = 0.0
            continue
        fields = dict(line.split() for line in stat.read_text().splitlines())
        out[f"{part}_rss"] = int(fields.get("total_rss", 0)) / 2**20
        out[f"{part}_usage"] = int(usage.read_text()) / 2**20
    return out


def _remove_cgroups(prefix: str) -> list[str]:
    """Removes ``/<controller>/<prefix>*`` subtrees (deepest first); returns what it could not
    (still populated). The nested engines' containers are gone once their node is."""
    left: list[str] = []
    for ctrl in CGROUP_ROOT.iterdir():
        if not ctrl.is_dir() or ctrl.is_symlink():
            continue
        for top in ctrl.glob(f"{prefix}*"):
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for d in [*dirs, top]:
                for _ in range(50):  # processes of a killed node take a moment to exit
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)
                else:
                    left.append(str(d))
    return left


def down(lab_id: str) -> None:
    """Removes the lab's node containers, their volumes and cgroups, and its network."""
    sel = f"label={LABEL}={lab_id}"
    names = run("docker", "ps", "-aq", "--filter", sel, check=False).split()
    if names:
        run("docker", "rm", "-f", "-v", *names, check=False, timeout=120)
    for vol in run("docker", "volume", "ls", "-q", "--filter", sel, check=False).split():
        run("docker", "volume", "rm", "-f", vol, check=False)
    for net in run("docker", "network", "ls", "-q", "--filter", sel, check=False).split():
        run("docker", "network", "rm", net, check=False)
    shutil.rmtree(api_dir(lab_id), ignore_errors=True)
    left = _remove_cgroups(f"zlab-{lab_id}-")
    if left:
        raise StackError(f"swarm lab {lab_id}: cgroups still populated: {left[:5]}")


def labs() -> list[str]:
    """Ids of labs with something left on the host engine (a killed run's)."""
    ids = set()
    for kind in ("ps -a", "volume ls", "network ls"):
        out = run("docker", *kind.split(), "--filter", f"label={LABEL}",
                  "--format", f'{{{{.Label "{LABEL}"}}}}', check=False)  # fmt: skip
        ids.update(out.split())
    return sorted(ids)


if __name__ == "__main__":  # python -m zaki.swarm_lab [up N | down ID | ls]
    import sys

    cmd = sys.argv[1:] or ["ls"]
    if cmd[0] == "up":
        lab = up(int(cmd[1]) if len(cmd) > 1 else 3, images=cmd[2:])
        print(lab.id, *(f"{x.name}={x.ip}" for x in lab.nodes), lab.timings)
    elif cmd[0] == "down":
        for i in cmd[1:]:
            down(i)
    else:
        print("\n".join(labs()))
