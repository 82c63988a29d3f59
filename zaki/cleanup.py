"""Removes what one platform left on a Docker engine: its containers and networks, found by the
``zaki.managed=<platform id>`` label every one carries. Used by ``zaki down``-like teardowns in the
tests and benchmarks."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import docker
from docker.errors import APIError, NotFound


def remove_managed(platform_id: str, client: docker.DockerClient | None = None) -> int:
    """Force-removes the platform's containers (several at a time: each waits for its process to
    die and its network namespace to go), then its networks. Returns how many containers."""
    client = client or docker.from_env()
    label = {"label": f"zaki.managed={platform_id}"}
    containers = client.containers.list(all=True, filters=label, ignore_removed=True)

    def remove(c) -> None:
        with contextlib.suppress(NotFound):  # gone meanwhile (Docker's own restart, another cleanup)
            c.remove(force=True)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(remove, containers))
    for n in client.networks.list(filters=label):
        with contextlib.suppress(APIError):  # a container of another platform still attached
            n.remove()
    return len(containers)
