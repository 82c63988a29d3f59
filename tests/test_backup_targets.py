"""Backup targets: a full disk (a small tmpfs this test mounts) fails the backup with
backup.failed on NATS and leaves nothing partial; S3-compatible storage against a local moto
server on loopback (moto[server]: a well-kept, pure-Python S3 API server that starts in-process
in a thread, no container or download; MinIO would need its binary fetched)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.backup import core
from services.backup.errors import BackupError
from services.backup.ops import Backups
from services.backup.targets import LocalTarget, S3Target
from shared.crypto import KeyRing
from shared.settings import ZakiSettings
from tests.conftest import missing_tool, new_user
from tests.test_backup import make_folder


@pytest.fixture
def env(tmp_path: Path, keyring_spec: str) -> tuple[ZakiSettings, KeyRing, LocalTarget]:
    s = ZakiSettings(data_root=tmp_path / "data", backup_dir=tmp_path / "backups", secret_keys=keyring_spec)
    return s, KeyRing.from_spec(keyring_spec), LocalTarget(s.backup_dir)


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        missing_tool(f"mount tmpfs: {r.stderr.decode()[:200]}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_disk_full_on_the_target_fails_and_leaves_nothing(env, small_tmpfs, stack):
    import nats

    s, ring, _ = env
    user = new_user()
    folder = make_folder(s.data_root, user)
    (folder / "workspace" / "big.bin").write_bytes(os.urandom(4 << 20))
    target = LocalTarget(small_tmpfs)
    nc = await nats.connect(stack.nats.address)
    seen: list[dict] = []

    async def on(msg):
        seen.append(json.loads(msg.data))

    await nc.subscribe("zaki.backup.>", cb=on)

    async def publish(subject, ev):
        await nc.publish(subject, ev.model_dump_json().encode())

    try:
        with pytest.raises(BackupError) as e:
            await Backups(s, ring, target, publish).create(user, "i1", "scheduled")
        assert e.value.code == "disk_full"
        await nc.flush()
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.05)
    finally:
        await nc.close()
    assert seen and seen[0]["error"] == "disk_full" and seen[0]["user_id"] == user
    assert not any(p.is_file() for p in small_tmpfs.rglob("*"))  # no partial file left
    assert core.list_backups(target, user) == []


@pytest.fixture(scope="module")
def s3_server():
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        missing_tool("moto[server] (pip install -e '.[dev]')")
    from zaki.stack import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_target_against_a_local_s3_server(env, s3_server, tmp_path):
    s, ring, _ = env
    import boto3

    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket="zaki-test")
    s3s = s.model_copy(
        update={
            "backup_target": "s3",
            "backup_s3_endpoint": s3_server,
            "backup_s3_bucket": "zaki-test",
            "backup_s3_access_key": SecretStr("test"),
            "backup_s3_secret_key": SecretStr("test"),
        }
    )
    target = core.make_target(s3s)
    assert isinstance(target, S3Target)
    user = new_user()
    folder = make_folder(s.data_root, user, messages=500)
    (folder / "workspace" / "big.bin").write_bytes(os.urandom(20 << 20))  # a multipart upload
    m = core.create(s3s, ring, target, user, None, "manual")
    assert m.target == "s3" and m.stored_bytes > 20 << 20
    keys = {e.key for e in target.list()}
    assert keys == {core.data_key(user, m.backup_id), core.manifest_key(user, m.backup_id)}
    stats = core.unpack_backup(ring, target, m, tmp_path / "out")
    assert (tmp_path / "out" / "workspace" / "big.bin").read_bytes() == (
        folder / "workspace" / "big.bin"
    ).read_bytes()
    assert stats["sqlite_checked"]
    core.remove(target, m)
    assert target.list() == [] and core.list_backups(target, user) == []
    with contextlib.suppress(Exception):
        target.client.close()


def test_s3_an_interrupted_upload_leaves_no_object_and_a_dead_writers_parts_are_swept(env, s3_server):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket="zaki-sweep")
    target = S3Target("zaki-sweep", "zb", s3_server, "us-east-1", "test", "test")

    def dying():
        for _ in range(3):
            yield os.urandom(8 << 20)
        raise BackupError("the reader died", "read_error")

    with pytest.raises(BackupError):
        target.upload("u1/20260101T000000Z-aaaaaa.zbk", dying())
    assert target.list() == []
    assert client.list_multipart_uploads(Bucket="zaki-sweep").get("Uploads", []) == []  # aborted
    # A writer killed with -9 leaves its multipart upload open: the sweep aborts it.
    up = client.create_multipart_upload(Bucket="zaki-sweep", Key="zb/u1/20260101T000000Z-bbbbbb.zbk")
    client.upload_part(
        Bucket="zaki-sweep",
        Key="zb/u1/20260101T000000Z-bbbbbb.zbk",
        UploadId=up["UploadId"],
        PartNumber=1,
        Body=b"x",
    )
    time.sleep(1.1)  # the store records the start to the second
    assert target.sweep_partial(older_than_s=1) == 1
    assert client.list_multipart_uploads(Bucket="zaki-sweep").get("Uploads", []) == []
    assert target.list() == []
