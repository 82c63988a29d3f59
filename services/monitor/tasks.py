"""Gateways that exit on any node of a Swarm (issue 18, ``ZAKI_RUNTIME=swarm``). Docker's event
stream is per engine: a manager reports services and nodes, never a container dying on another
node. So the monitor reads the manager's task list every ZAKI_SWARM_TASK_POLL_S and turns each of
the platform's tasks that failed by itself (a non-zero exit; the swarm restarts it on its node)
into the ``die`` event it already handles on one engine: reported ``exited`` with its exit code,
counted towards crash-loop detection, a restart requested if the swarm did not restart it. Exit
137 may be the kernel's OOM killer or a SIGKILL: a task does not say which, so no ``oom`` here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from services.provisioner.networks import INSTANCE_LABEL, MANAGED_LABEL, USER_LABEL
from shared.gateway import container_name

FAILED = "failed"  # a task whose container exited non-zero (or could not start)


def task_deaths(
    tasks: Iterable[Mapping[str, Any]], seen: set[str], platform_id: str
) -> tuple[list[dict[str, Any]], set[str]]:
    """Docker-style ``die`` events for the platform's failed tasks not in *seen*, and the ids of
    every failed task listed (the next *seen*: the swarm keeps a few old tasks per service)."""
    events, failed = [], set()
    for t in tasks:
        labels = ((t.get("Spec") or {}).get("ContainerSpec") or {}).get("Labels") or {}
        status = t.get("Status") or {}
        if labels.get(MANAGED_LABEL) != platform_id or status.get("State") != FAILED:
            continue
        failed.add(t["ID"])
        user = labels.get(USER_LABEL)
        if t["ID"] in seen or not user:
            continue
        cs = status.get("ContainerStatus") or {}
        attributes = {
            "name": container_name(user),
            USER_LABEL: user,
            INSTANCE_LABEL: labels.get(INSTANCE_LABEL, ""),
            "exitCode": str(cs.get("ExitCode", "")),
            "node": t.get("NodeID", ""),
        }
        events.append({"Type": "container", "Action": "die", "Actor": {"Attributes": attributes}})
    return events, failed


class TaskWatch:
    def __init__(self, runtime: Any, platform_id: str) -> None:
        self.runtime = runtime  # a SwarmRuntime: task_list(), status()
        self.platform_id = platform_id
        self.seen: set[str] | None = None  # None until the first read: older failures are history

    async def poll(self) -> list[dict[str, Any]]:
        events, failed = task_deaths(await self.runtime.task_list(), self.seen or set(), self.platform_id)
        first, self.seen = self.seen is None, failed
        return [] if first else events

    async def state(self, user_id: str) -> str:
        """Like a container's state: running, restarting (the swarm starts a new task), exited, missing."""
        status = await self.runtime.status(container_name(user_id))
        return status.state if status.exists else "missing"
