"""Per-tenant disk limits (issue 13.10): one tenant cannot fill the shared data root. The
data root here is plain ext4 without project quotas, so the provisioner measures each
tenant's folder and stops an instance that is over ZAKI_TENANT_DISK_BYTES (or
ZAKI_TENANT_MAX_FILES) with a clear event; a start is refused until it is under."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.provisioner.quota import MAX_DEPTH, measure
from shared import subjects
from shared.client import PlatformClient
from shared.events import InstanceCommand, InstanceDelete, InstanceRequested
from shared.gateway import CONTAINER_WORKSPACE, container_name
from shared.store import Store
from tests.conftest import STANDIN_IMAGE, eventually, new_user
from tests.test_self_healing import PrivatePlatform, start_private_platform
from zaki.stack import free_network_pool

LIMIT = 16 << 20


@pytest.fixture(scope="module")
def quota_platform(tmp_path_factory, service_env: dict[str, str], docker_client) -> Iterator[PrivatePlatform]:
    p = start_private_platform(
        tmp_path_factory.mktemp("quota"),
        service_env,
        "quota",
        free_network_pool(),
        ZAKI_ALLOWED_IMAGES=STANDIN_IMAGE,
        ZAKI_TENANT_DISK_BYTES=str(LIMIT),
        ZAKI_TENANT_MAX_FILES="5000",
    )
    yield p
    p.stack.stop()


async def test_a_tenant_that_fills_its_folder_is_stopped_and_not_started_again(
    quota_platform, fakes, docker_client
):
    p = quota_platform
    client = await PlatformClient.connect(p.env["ZAKI_NATS_URL"])
    store = Store(p.env["ZAKI_MONGO_URL"], "zaki")
    try:
        user = new_user("dq")
        ev = InstanceRequested(
            request_id=new_user("req"), user_id=user, bot_token=fakes.bot(), image=STANDIN_IMAGE
        )
        subject, _ = await client.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
        assert subject == subjects.INSTANCE_READY
        await asyncio.sleep(2.5)  # reconcile passes over a folder under its limit: left running
        assert (await store.get_instance(user))["state"] == "running"

        # The agent writes 24 MiB into its workspace from inside its container.
        c = docker_client.containers.get(container_name(user))
        fill = f"require('fs').writeFileSync('{CONTAINER_WORKSPACE}/dump.bin', Buffer.alloc(24 << 20, 7))"
        assert c.exec_run(["node", "-e", fill], user="1000:1000").exit_code == 0

        def stopped_events():
            return [b for _, b in client.events(subjects.INSTANCE_STOPPED) if b["user_id"] == user]

        (event,) = await eventually(stopped_events, timeout=30, interval=0.2)
        assert event["reason"] == "disk_quota_exceeded"
        assert f"more than {LIMIT} bytes" in event["message"] and "ZAKI_TENANT_DISK_BYTES" in event["message"]
        doc = await store.get_instance(user)
        assert doc["state"] == "stopped" and doc["stop_reason"] == "disk_quota_exceeded"
        c.reload()
        assert c.status == "exited"

        # A start is refused while the folder is over its limit; the record stays stopped.
        subject, failed = await client.call(
            subjects.INSTANCE_START, InstanceCommand(user_id=user), timeout=60
        )
        assert subject == subjects.INSTANCE_FAILED and failed.reason == "disk_quota_exceeded", failed
        assert (await store.get_instance(user))["state"] == "stopped"

        (p.data_root / "users" / user / "workspace" / "dump.bin").unlink()  # the operator frees space
        subject, _ = await client.call(subjects.INSTANCE_START, InstanceCommand(user_id=user), timeout=120)
        assert subject == subjects.INSTANCE_READY
        assert (await store.get_instance(user))["stop_reason"] is None
        await client.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True))
    finally:
        await client.close()
        await store.close()


# --- the walk, without Docker -------------------------------------------------------------------


def test_measure_counts_like_du_and_stops_at_the_limit(tmp_path: Path):
    root = tmp_path / "tenant"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x" * (1 << 20))
    (root / "sparse").open("wb").truncate(1 << 30)  # 1 GiB of nothing occupies no block
    u = measure(root)
    assert 1 << 20 <= u.bytes < 2 << 20 and u.files == 4 and u.over is None
    over = measure(root, max_bytes=1 << 19)
    assert over.over and "more than 524288 bytes" in over.over
    for i in range(50):
        (root / f"n{i}").touch()
    assert "more than 20 files" in measure(root, max_files=20).over
    assert measure(root, max_files=20).files == 21  # stopped as soon as it was over
    assert measure(tmp_path / "absent").bytes == 0


def test_measure_never_follows_a_link_out_of_the_tenant_folder(tmp_path: Path):
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "big").write_bytes(b"y" * (4 << 20))
    (outside / "secret").write_bytes(b"z" * (4 << 20))  # reachable only through the symlink
    root = tmp_path / "tenant"
    root.mkdir()
    (root / "link").symlink_to(outside)  # the tenant points at something of the host's
    (root / "hard").hardlink_to(outside / "big")
    (root / "hard2").hardlink_to(outside / "big")  # the same inode twice counts once
    u = measure(root)
    assert 4 << 20 <= u.bytes < 5 << 20  # the hard link's blocks (they are the tenant's too), once
    # The folder itself swapped for a link: not followed either.
    swapped = tmp_path / "swapped"
    swapped.symlink_to(outside)
    assert measure(swapped).bytes == 0


def test_measure_refuses_a_tree_nested_deeper_than_any_gateway_makes(tmp_path: Path):
    root = tmp_path / "tenant"
    d = root
    for _ in range(MAX_DEPTH + 2):
        d = d / "d"
    os.makedirs(d)
    assert "deeper than" in measure(root).over
