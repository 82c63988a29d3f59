"""The node guard on a Docker Swarm (issue 18): one global service of the platform's own image
(services/node_guard) that keeps the tenants' egress chains in every node's kernel, and the
node label that says a node's guard has been healthy. Tenants are placed only on labelled
nodes (``guarded_constraint``), so no gateway runs on a node before its tenants are fenced in.
The label is only ever added: the chains stay in the kernel while a guard restarts, and swarm would stop
every task on a node whose label went away (its constraint enforcer)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

import docker
from docker.errors import NotFound
from docker.types import (
    ContainerSpec,
    DriverConfig,
    Healthcheck,
    Mount,
    RestartPolicy,
    ServiceMode,
    TaskTemplate,
)

from services.provisioner.networks import RuntimeError_, require_ours
from shared.settings import ZakiSettings

GUARDED = "guarded"
# Who runs a guard service. Not the managed label: reconcile would take the guard for a user's
# orphaned gateway.
GUARD_OWNER = "zaki.guard"


def guard_label(platform_id: str) -> str:
    """The node label that says this platform's guard has applied its chains there (one
    platform per swarm: two guards with different policies would rebuild the same chains)."""
    return f"zaki.egress.{platform_id}"


def guarded_constraint(platform_id: str) -> str:
    return f"node.labels.{guard_label(platform_id)}=={GUARDED}"


SPEC_LABEL = "zaki.guard-spec"  # a hash of image and settings: a change updates the service
# What the guard's policy is made of (services/provisioner/egress.py build_policy).
POLICY_SETTINGS = (
    "egress_policy",
    "egress_allow",
    "egress_dns",
    "broker_host",
    "broker_port",
    "telegram_private_network",
    "telegram_api_base_for_gateways",
    "node_guard_interval_s",
)
PEERS_ENV = "ZAKI_NODE_GUARD_PEERS"  # every node's address: blocked for tenants like their own node's
_S = 10**9  # nanoseconds


@dataclass(frozen=True)
class GuardSpec:
    image: str
    env: dict[str, str] = field(default_factory=dict)
    health_interval_s: float = 2.0

    def with_peers(self, addresses: list[str]) -> GuardSpec:
        """The spec with every node's address: a node with a public address is no less another
        tenant's (its published ports) or the platform's than a private one."""
        return replace(self, env={**self.env, PEERS_ENV: ",".join(sorted(set(addresses)))})

    @property
    def digest(self) -> str:
        text = json.dumps([self.image, sorted(self.env.items()), self.health_interval_s])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def guard_spec(s: ZakiSettings) -> GuardSpec | None:
    """The guard this platform's settings ask for (None: egress policy off)."""
    if s.egress_policy != "enforce" or not s.swarm_guard_image:
        return None
    env = {
        f"ZAKI_{k.upper()}": str(getattr(s, k) if getattr(s, k) is not None else "") for k in POLICY_SETTINGS
    }
    env["ZAKI_METRICS_PORT"] = "0"  # on the node's own network: no listener
    return GuardSpec(s.swarm_guard_image, env)


def guard_name(platform_id: str) -> str:
    return f"zaki-node-guard-{platform_id}"


def guard_template(spec: GuardSpec, platform_id: str) -> TaskTemplate:
    """Root in the node's network namespace with NET_ADMIN and NET_RAW only (iptables), a
    read-only root file system; healthy only while the jumps are in the kernel."""
    container = ContainerSpec(
        spec.image,
        args=["services.node_guard"],
        env=spec.env,
        user="0:0",
        labels={GUARD_OWNER: platform_id},
        read_only=True,
        cap_drop=["ALL"],
        cap_add=["NET_ADMIN", "NET_RAW"],
        mounts=[Mount("/run", None, type="tmpfs"), Mount("/tmp", None, type="tmpfs")],
        healthcheck=Healthcheck(
            test=["CMD", "python3", "-m", "services.node_guard", "--check"],
            interval=int(spec.health_interval_s * _S),
            timeout=10 * _S,
            retries=2,
            start_period=30 * _S,
        ),
    )
    return TaskTemplate(
        container,
        restart_policy=RestartPolicy(condition="any", delay=2 * _S),
        log_driver=DriverConfig("json-file", {"max-size": "10m", "max-file": "3"}),
        networks=["host"],
    )


def ensure_guard(client: docker.DockerClient, spec: GuardSpec, platform_id: str) -> None:
    """Creates the global guard service, or updates it when its image or settings changed."""
    name = guard_name(platform_id)
    labels = {GUARD_OWNER: platform_id, SPEC_LABEL: spec.digest}
    others = {
        (s["Spec"].get("Labels") or {}).get(GUARD_OWNER)
        for s in client.api.services(filters={"label": GUARD_OWNER})
    } - {platform_id}
    if others:  # two guards would rebuild the same chains with their own policies, in turns
        raise RuntimeError_(
            f"the node guard of platform {sorted(others)[0]} runs on this swarm: one platform per swarm"
        )
    try:
        svc = client.api.inspect_service(name)
    except NotFound:
        client.api.create_service(
            guard_template(spec, platform_id), name=name, labels=labels, mode=ServiceMode("global")
        )
        return
    have = svc["Spec"].get("Labels") or {}
    require_ours("service", name, have, platform_id, owner_label=GUARD_OWNER)
    if have.get(SPEC_LABEL) != spec.digest:
        client.api.update_service(
            svc["ID"],
            svc["Version"]["Index"],
            task_template=guard_template(spec, platform_id),
            name=name,
            labels=labels,
            mode=ServiceMode("global"),
        )


def guarded_nodes(tasks: list[dict[str, Any]]) -> set[str]:
    """The nodes where a guard task runs healthy (a task with a health check reads "starting"
    until it passes). Pure."""
    return {
        t["NodeID"]
        for t in tasks
        if t.get("NodeID") and t["DesiredState"] == "running" and t["Status"]["State"] == "running"
    }


def label_guarded_nodes(client: docker.DockerClient, platform_id: str) -> set[str]:
    """Labels every node whose guard runs healthy; returns the ids of all labelled nodes."""
    try:
        svc = client.api.inspect_service(guard_name(platform_id))
    except NotFound:
        return set()
    healthy = guarded_nodes(client.api.tasks(filters={"service": svc["ID"]}))
    labelled = set()
    for node in client.api.nodes():
        spec = node["Spec"]
        if spec.get("Labels", {}).get(guard_label(platform_id)) == GUARDED:
            labelled.add(node["ID"])
        elif node["ID"] in healthy:
            spec.setdefault("Labels", {})[guard_label(platform_id)] = GUARDED
            client.api.update_node(node["ID"], node["Version"]["Index"], spec)
            labelled.add(node["ID"])
    return labelled
