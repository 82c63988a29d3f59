"""The Swarm lab (zaki/swarm_lab.py) as one fixture for the session: three Docker engines in
containers on this machine, made a swarm, with the stand-in gateway and the services image
loaded (the node guard's). Shared by tests/test_swarm_lab.py and tests/test_swarm_per_node.py,
so the lab is made once (about 45 s); removed at the end of the session."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import STANDIN_IMAGE
from zaki import swarm_lab
from zaki.stack import ensure_images

SERVICES_IMAGE = "zaki/services:latest"  # the node guard's image (scripts/setup.sh builds it)


@pytest.fixture(scope="session")
def data_root() -> Iterator[Path]:
    """A host folder every node mounts at the same path: the users' data folders (bind mounts)."""
    d = Path(tempfile.mkdtemp(prefix="zlab-data-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def node_disks() -> Iterator[list[Path]]:
    """A host folder per node, mounted in that node only: its own disk (one provisioner each)."""
    disks = [Path(tempfile.mkdtemp(prefix=f"zlab-disk{i}-")) for i in (1, 2, 3)]
    try:
        yield disks
    finally:
        for d in disks:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def lab(data_root: Path, node_disks: list[Path]) -> Iterator[swarm_lab.Lab]:
    if subprocess.run(["docker", "image", "inspect", STANDIN_IMAGE], capture_output=True).returncode:
        ensure_images(which="standin")
    t0 = time.monotonic()
    made = swarm_lab.up(
        3,
        images=[STANDIN_IMAGE, SERVICES_IMAGE],
        shared_dirs=[str(data_root)],
        node_dirs=[str(d) for d in node_disks],
        dockerd_args=["--no-new-privileges"],
    )
    made.timings["up_total"] = time.monotonic() - t0
    assert made.id in swarm_lab.labs()
    # The host engine itself is never part of the swarm.
    host_swarm = subprocess.run(
        ["docker", "info", "-f", "{{.Swarm.LocalNodeState}}"], capture_output=True, text=True
    )
    assert host_swarm.stdout.strip() == "inactive"
    try:
        yield made
    finally:
        t1 = time.monotonic()
        swarm_lab.down(made.id)
        print(f"swarm lab {made.id} removed in {time.monotonic() - t1:.1f} s")
        assert made.id not in swarm_lab.labs()
