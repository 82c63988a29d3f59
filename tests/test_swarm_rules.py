"""The Swarm runtime's rules that need no lab: its settings, the node guard's spec, a reaped
service's status (issue 18; the lab itself: tests/test_swarm_lab.py)."""

from __future__ import annotations

import pytest

from services.provisioner.swarm_runtime import NODE_LABEL, SwarmRuntime
from shared.settings import ZakiSettings


def test_a_stopped_service_whose_tasks_were_reaped_reads_exited_not_created() -> None:
    """Swarm drops the tasks of a service scaled to 0: with none left, a service that was once
    placed (pinned to its node) is a stopped gateway, one never placed is a created one."""
    from services.provisioner.swarm_runtime import _status

    def svc(labels: dict[str, str]) -> dict:
        spec = {"ContainerSpec": {"Image": "zaki/gw:1", "Mounts": []}}
        mode = {"Replicated": {"Replicas": 0}}
        return {"Spec": {"Name": "zaki-user-u", "Labels": labels, "TaskTemplate": spec, "Mode": mode}}

    assert _status(svc({}), []).state == "created"
    stopped = _status(svc({NODE_LABEL: "n1"}), [])
    assert (stopped.exists, stopped.state, stopped.running) == (True, "exited", False)


def test_the_swarm_runtime_setting_refuses_what_it_cannot_run() -> None:
    """ZAKI_RUNTIME=swarm without its manager, or with swap suspend or the pool (both need one
    engine's pause/update/network-connect on the gateway's own container), fails at start with
    a typed error naming the setting, instead of at a user's first suspend or claim."""
    from pydantic import ValidationError

    from services.provisioner.app import make_runtime
    from services.provisioner.runtime import DockerRuntime

    for bad, named in (
        ({"egress_policy": "off"}, "ZAKI_SWARM_MANAGER_URL"),
        ({"swarm_manager_url": "tcp://m:2375"}, "ZAKI_SWARM_GUARD_IMAGE"),
        (
            {"swarm_manager_url": "tcp://m:2375", "egress_policy": "off", "suspend_mode": "swap"},
            "ZAKI_SUSPEND_MODE",
        ),
        ({"swarm_manager_url": "tcp://m:2375", "egress_policy": "off", "pool_size": 2}, "no pool"),
        (
            {"swarm_manager_url": "tcp://m:2375", "egress_policy": "off", "swarm_node_addresses": "n1"},
            "swarm_node_addresses",
        ),
    ):
        with pytest.raises(ValidationError, match=named):
            ZakiSettings(runtime="swarm", **bad)
    s = ZakiSettings(
        runtime="swarm",
        swarm_manager_url="tcp://m:2375",
        swarm_node_addresses="n1=10.0.0.1",
        egress_policy="off",
    )
    assert s.swarm_nodes() == {"n1": "10.0.0.1"}  # make_runtime with it: the end-to-end test above
    assert isinstance(make_runtime(ZakiSettings()), DockerRuntime)


def test_the_node_guard_gets_the_policy_settings_and_no_secret() -> None:
    """With the egress policy on, the swarm runtime runs the node guard from the settings'
    image with only what the policy is made of (never a key, a password or a database URL),
    and places tenants only on nodes whose guard was healthy; with it off, neither."""
    from services.provisioner.app import make_runtime
    from services.provisioner.swarm_guard import (
        POLICY_SETTINGS,
        guard_spec,
        guarded_constraint,
        guarded_nodes,
    )

    secrets = {"secret_keys": "k1:" + "A" * 43, "llm_api_key": "sk-provider", "jwt_secret": "jwt-" + "s" * 28}
    s = ZakiSettings(
        runtime="swarm", swarm_manager_url="tcp://m:2375", swarm_guard_image="zaki/services:x",
        mongo_url="mongodb://user:pw@db:27017/", platform_id="p1", broker_port=8123, **secrets,
    )  # fmt: skip
    rt = make_runtime(s)
    assert isinstance(rt, SwarmRuntime) and rt.guard == guard_spec(s)
    env = rt.guard.env
    assert set(env) == {f"ZAKI_{k.upper()}" for k in POLICY_SETTINGS} | {"ZAKI_METRICS_PORT"}
    assert (env["ZAKI_EGRESS_POLICY"], env["ZAKI_BROKER_PORT"], rt.guard.image) == (
        "enforce",
        "8123",
        "zaki/services:x",
    )
    for value in (*secrets.values(), "pw@db"):
        assert not any(value in v for v in env.values())
    assert rt._constraints(None) == [guarded_constraint("p1")]
    assert rt._constraints("n1") == ["node.id==n1", guarded_constraint("p1")]  # pinned, and guarded
    off = make_runtime(s.model_copy(update={"egress_policy": "off"}))
    assert isinstance(off, SwarmRuntime) and off.guard is None and off._constraints(None) == []

    def task(node: str, state: str, desired: str = "running") -> dict:
        return {"NodeID": node, "DesiredState": desired, "Status": {"State": state}}

    # "starting": its health check has not passed yet; a task on its way out does not count.
    tasks = [
        task("a", "running"),
        task("b", "starting"),
        task("c", "running", "shutdown"),
        task("d", "failed"),
    ]
    assert guarded_nodes(tasks) == {"a"}
