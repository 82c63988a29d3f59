"""How the suite shares this machine's two cores (scripts/test.sh runs it in two phases).

Phase one runs everything but the exclusive modules on two pytest-xdist workers, each with a
session platform of its own. Most of the suite waits (on idle timers, probe rounds, soak
windows), so two lanes finish in a little over half the time. Modules that boot real gateways
or use host-wide things (swap, the CLI's default ports) are one group, so one worker runs them
one after another: two real boots at once on two cores slowed both past their timeouts.

Phase two runs the exclusive modules alone, one after another: they restart or pause the
Docker daemon, turn the host engine into a Swarm manager, remove the host's firewall jump, or
read the logs of every earlier run; nothing else may run beside them.

The rule lives here only: the marks below are what scripts/test.sh selects on."""

from __future__ import annotations

import os

import pytest

# Module -> why it must run alone (phase two).
EXCLUSIVE = {
    "test_faults": "restarts, pauses and slows the Docker daemon and the control plane",
    "test_swarm_lab": "turns the host engine into a Swarm manager and starts Docker-in-Docker nodes",
    "test_compose": "runs the compose stack, which publishes fixed host ports",
    "test_egress": "removes the host's DOCKER-USER jump to see the provisioner put it back",
    "test_zz_no_secrets_in_logs": "reads the logs of every earlier run, so it runs after them",
}
# Modules kept on one worker beside those that boot a real gateway (the `gateway` mark).
HOST_WIDE = {
    "test_suspend_swap": "turns its swap file off and on: another lane's swap would make it lie",
    "test_pool_swap_real": "adds swap to the host",
    "test_cli_up": "runs `zaki up` the way test_first_hour does",
}
SERIAL_GROUP = "one-at-a-time"


def worker() -> tuple[int, int]:
    """(this worker's index, how many workers) under pytest-xdist; (0, 1) otherwise."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return (int(name.removeprefix("gw")) if name.startswith("gw") else 0), count


def my_share(choices: range) -> list[int]:
    """This worker's part of *choices* (network octets, port blocks): workers never pick the
    same one, so two session platforms never race for a subnet or a port block."""
    index, count = worker()
    return [c for c in choices if c % count == index]


def module_of(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module else ""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "exclusive: runs alone in the suite's second phase (tests/lanes.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    serial = {module_of(i) for i in items if i.get_closest_marker("gateway")} | set(HOST_WIDE)
    for item in items:
        module = module_of(item)
        if module in EXCLUSIVE:
            item.add_marker(pytest.mark.exclusive)
        # --dist loadgroup sends each group to one worker as a whole: a module's fixtures are
        # made once, and the serial group's real boots never overlap.
        item.add_marker(pytest.mark.xdist_group(SERIAL_GROUP if module in serial else module))
