"""A wake that fails (issue 16) on the real provisioner with a stand-in gateway: the gateway
refuses to start after its sleep, and the wake ends like a failed start (instance.failed with
the reason, the record failed, no container left), not with a crashed command handler and a
record stuck in ``starting`` that holds every request until its timeout."""

from __future__ import annotations

import json

import docker
import pytest

from shared import subjects
from shared.events import InstanceWake
from shared.gateway import container_name
from shared.state import InstanceState
from tests.test_suspend import delete, make, suspend


async def test_a_wake_whose_gateway_will_not_start_fails_cleanly(
    provisioner, platform, fakes, settings, store, docker_client
):
    user, _, _ = await make(platform, fakes)
    try:
        await suspend(platform, user)
        # The stand-in reads this at start: it exits 78, as OpenClaw does on a config it refuses.
        faults = settings.data_root / "users" / user / ".openclaw" / "standin-faults.json"
        faults.write_text(json.dumps({"exit_code": 78}))
        subject, ev = await platform.call(subjects.INSTANCE_WAKE, InstanceWake(user_id=user), timeout=120)
        assert subject == subjects.INSTANCE_FAILED, ev
        assert ev.reason == "gateway_not_ready" and "exit 78" in ev.message, ev  # type: ignore[attr-defined]
        doc = await store.get_instance(user)
        assert doc["state"] == InstanceState.FAILED and "exit 78" in doc["last_error"], doc
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(container_name(user))  # no orphan restarting forever
    finally:
        await delete(platform, user)
