"""Backups with the platform running: the provisioner (stand-in gateways), NATS, FerretDB and
Docker. Restore onto a running and a stopped instance, into another user, the backups taken
before every upgrade and delete, the backup service's schedule, metrics and events, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from services.backup import core
from services.backup.ops import Backups, platform_commander
from shared import subjects
from shared.events import (
    FailureReason,
    InstanceCommand,
    InstanceDelete,
    InstanceRequested,
    InstanceUpdate,
    InstanceUpgrade,
)
from shared.gateway import container_name, identity_headers
from tests.conftest import STANDIN_IMAGE, eventually, new_user
from zaki.stack import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent


async def make(platform, fakes) -> tuple[str, int]:
    ev = InstanceRequested(
        request_id=new_user("req"), user_id=new_user("b"), bot_token=fakes.bot(), image=STANDIN_IMAGE
    )
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY, ready
    return ev.user_id, ready.port  # type: ignore[attr-defined]


def folder(settings, user: str) -> Path:
    return Path(settings.data_root) / "users" / user


def seed(settings, user: str, memory: str, rows: int) -> None:
    """Memory and a gateway-like SQLite state, written as the gateway's uid would."""
    root = folder(settings, user)
    (root / "workspace" / "MEMORY.md").write_text(memory)
    db_path = root / ".openclaw" / "state" / "openclaw.sqlite"
    if not db_path.parent.is_dir():
        db_path.parent.mkdir(mode=0o700)
        os.chown(db_path.parent, 1000, 1000)
    con = sqlite3.connect(db_path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, body TEXT)")
    con.execute("DELETE FROM messages")
    con.executemany("INSERT INTO messages (body) VALUES (?)", [(f"m{i}",) for i in range(rows)])
    con.commit()
    con.close()
    for p in (root / "workspace" / "MEMORY.md", *db_path.parent.glob("openclaw.sqlite*")):
        os.chown(p, 1000, 1000)


def rows(settings, user: str) -> int:
    con = sqlite3.connect(folder(settings, user) / ".openclaw" / "state" / "openclaw.sqlite")
    try:
        return con.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        con.close()


async def ready(port: int, user: str) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        r = await http.get(f"http://127.0.0.1:{port}/readyz", headers=identity_headers(user))
        return r.status_code == 200


@pytest.fixture
def backups(settings) -> Backups:
    return Backups.from_settings(settings)


async def test_restore_onto_a_running_instance_stops_swaps_and_starts_it(
    provisioner, platform, fakes, settings, store, backups, docker_client
):
    user, _ = await make(platform, fakes)
    seed(settings, user, "remember: the user likes tea", 1000)
    config_before = (folder(settings, user) / ".openclaw" / "openclaw.json").read_bytes()
    m = await backups.create(user, None, "manual")
    seed(settings, user, "overwritten by mistake", 3)
    started_before = docker_client.containers.get(container_name(user)).attrs["State"]["StartedAt"]

    result = await backups.restore(user, m.backup_id, command=platform_commander(settings.nats_url))
    assert result["restarted"] is True and result["user_id"] == user
    print(f"\nrestore onto a running stand-in (stop, swap, start, ready): {result['seconds']:.2f} s")
    root = folder(settings, user)
    assert (root / "workspace" / "MEMORY.md").read_text() == "remember: the user likes tea"
    assert rows(settings, user) == 1000
    doc = await store.get_instance(user)
    assert doc["state"] == "running" and await ready(doc["port"], user)
    c = docker_client.containers.get(container_name(user))
    assert c.attrs["State"]["StartedAt"] != started_before  # stopped and started again
    # Ownership and modes as the provisioner lays them out; the config is the user's own.
    for p in (root, root / ".openclaw", root / "workspace", root / "workspace" / "MEMORY.md"):
        assert p.stat().st_uid == 1000, p
    assert root.stat().st_mode & 0o777 == 0o700
    cfg = root / ".openclaw" / "openclaw.json"
    assert cfg.stat().st_mode & 0o777 == 0o600 and json.loads(cfg.read_bytes()) == json.loads(config_before)
    assert not list((root.parent / ".backup-work").glob("restore-*"))  # the old folder is gone
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60)


async def test_a_start_during_a_restore_is_refused_until_the_folder_is_in_place(
    provisioner, platform, fakes, settings, store, backups, docker_client
):
    """A user's start arriving between the restore's stop and its swap would run the gateway on
    the folder being thrown away (its writes lost): the provisioner refuses it while the restore
    holds its claim; the restore's own start then brings the agent up on the restored folder."""
    user, _ = await make(platform, fakes)
    seed(settings, user, "the good copy", 10)
    m = await backups.create(user, None, "manual")
    seed(settings, user, "overwritten by mistake", 3)
    real = platform_commander(settings.nats_url)
    answers: list[tuple[str, str | None]] = []

    async def command(kind: str, who: str) -> None:
        await real(kind, who)
        if kind == "stop":  # the user presses start right after the restore stopped the agent
            subject, ev = await platform.call(
                subjects.INSTANCE_START, InstanceCommand(user_id=who), timeout=60
            )
            answers.append((subject, getattr(ev, "reason", None)))
            assert docker_client.containers.get(container_name(who)).status != "running"

    result = await backups.restore(user, m.backup_id, command=command)
    assert answers == [(subjects.INSTANCE_FAILED, FailureReason.RESTORING)], answers
    assert result["restarted"] is True and rows(settings, user) == 10
    doc = await store.get_instance(user)
    assert doc["state"] == "running" and await ready(doc["port"], user) and "restoring_until" not in doc
    # One restore at a time; a claim left by a restore that died runs out by itself.
    first = await store.claim_restore(user, 60)
    assert first and await store.claim_restore(user, 60) is None
    expired = {"$set": {"restoring_until": datetime.now(UTC) - timedelta(seconds=1)}}
    await store.instances.update_one({"_id": user}, expired)
    second = await store.claim_restore(user, 60)
    assert second and second != first
    await store.release_restore(user, first)  # a restore whose lease ran out frees nothing of the next one's
    assert "restoring_until" in await store.get_instance(user)
    await store.release_restore(user, second)
    assert "restoring_until" not in await store.get_instance(user)
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60)


async def test_restore_onto_a_stopped_instance_leaves_it_stopped(
    provisioner, platform, fakes, settings, store, backups
):
    user, _ = await make(platform, fakes)
    seed(settings, user, "v1", 10)
    m = await backups.create(user, None, "manual")
    subject, _ = await platform.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=user), timeout=60)
    assert subject == subjects.INSTANCE_STOPPED
    seed(settings, user, "v2", 20)
    result = await backups.restore(user, m.backup_id)  # no commander needed: nothing runs
    assert result["restarted"] is False
    assert (folder(settings, user) / "workspace" / "MEMORY.md").read_text() == "v1" and rows(
        settings, user
    ) == 10
    assert (await store.get_instance(user))["state"] == "stopped"
    # It starts on the restored folder, with a config rendered for it.
    subject, ev = await platform.call(subjects.INSTANCE_START, InstanceCommand(user_id=user), timeout=120)
    assert subject == subjects.INSTANCE_READY and await ready(ev.port, user)
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60)


async def test_restore_into_another_user_keeps_that_users_own_config(
    provisioner, platform, fakes, settings, store, backups
):
    source, _ = await make(platform, fakes)
    target, _ = await make(platform, fakes)
    seed(settings, source, "source memory", 42)
    source_cfg = (folder(settings, source) / ".openclaw" / "openclaw.json").read_text()
    target_cfg = (folder(settings, target) / ".openclaw" / "openclaw.json").read_text()
    m = await backups.create(source, None, "manual")
    result = await backups.restore(
        source, m.backup_id, into=target, command=platform_commander(settings.nats_url)
    )
    assert result["user_id"] == target and result["source_user"] == source
    assert (folder(settings, target) / "workspace" / "MEMORY.md").read_text() == "source memory"
    assert rows(settings, target) == 42
    cfg = (folder(settings, target) / ".openclaw" / "openclaw.json").read_text()
    assert cfg != source_cfg and json.loads(cfg)["gateway"] == json.loads(target_cfg)["gateway"]
    doc = await store.get_instance(target)
    assert doc["state"] == "running" and await ready(doc["port"], target)
    for u in (source, target):
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True), timeout=60)


async def test_a_backup_is_taken_before_every_upgrade_and_delete(
    provisioner, platform, fakes, settings, store, backups, docker_client
):
    docker_client.images.get(STANDIN_IMAGE).tag("zaki/standin-gateway", "canary")
    user, _ = await make(platform, fakes)
    seed(settings, user, "before the upgrade", 7)
    subject, _ = await platform.call(
        subjects.INSTANCE_UPGRADE,
        InstanceUpgrade(user_id=user, image="zaki/standin-gateway:canary"),
        timeout=120,
    )
    assert subject == subjects.INSTANCE_READY
    assert [m.reason for m in await backups.list(user)] == ["pre_upgrade"]
    subject, _ = await platform.call(
        subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60
    )
    assert subject == subjects.INSTANCE_DELETED and not folder(settings, user).exists()
    ms = await backups.list(user)
    assert [m.reason for m in ms] == ["pre_upgrade", "pre_delete"] and ms[-1].expires_at
    # Within the grace the deleted user's agent comes back (no instance: the folder only).
    await backups.restore(user, None)
    assert (folder(settings, user) / "workspace" / "MEMORY.md").read_text() == "before the upgrade"
    assert rows(settings, user) == 7
    shutil.rmtree(folder(settings, user))


async def test_a_failing_backup_refuses_the_delete(provisioner, platform, fakes, settings, store):
    """ZAKI_BACKUP_BEFORE_CHANGE=required: the backup target is unwritable, the delete is refused
    with reason backup_failed and the instance runs on untouched."""
    user, _ = await make(platform, fakes)
    target_dir = Path(settings.data_root) / "backups" / user
    target_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    target_dir.write_text("not a folder")  # the user's backup folder cannot be created
    try:
        subject, ev = await platform.call(
            subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60
        )
        assert subject == subjects.INSTANCE_FAILED and ev.reason == "backup_failed", ev
        assert (await store.get_instance(user))["state"] == "running"
        assert (folder(settings, user) / "workspace").is_dir()
    finally:
        target_dir.unlink()
    subject, _ = await platform.call(
        subjects.INSTANCE_DELETE, InstanceDelete(user_id=user, purge=True), timeout=60
    )
    assert subject == subjects.INSTANCE_DELETED


async def test_the_backup_service_schedules_publishes_and_exports_aggregates(
    stack, service_env, provisioner, platform, fakes, settings, store, backups
):
    import nats

    user, _ = await make(platform, fakes)
    quiet, _ = await make(platform, fakes)
    # Its own interval (0: never), set by the instance.update command.
    subject, _ = await platform.call(
        subjects.INSTANCE_UPDATE, InstanceUpdate(user_id=quiet, backup_interval_s=0), timeout=60
    )
    assert subject == subjects.INSTANCE_READY and (await store.get_instance(quiet))["backup_interval_s"] == 0
    seen: list[dict] = []
    nc = await nats.connect(stack.nats.address)

    async def on(msg):
        seen.append({"subject": msg.subject, **json.loads(msg.data)})

    await nc.subscribe("zaki.backup.>", cb=on)
    await nc.flush()  # the subscription is on the server before the service can publish
    port = free_port()
    p = stack.start_service(
        "services.backup",
        {
            **service_env,
            "ZAKI_METRICS_PORT": str(port),
            "ZAKI_BACKUP_INTERVAL_S": "3600",
            "ZAKI_BACKUP_SWEEP_S": "1",
        },
    )
    try:
        wait_for_port("127.0.0.1", port, p.proc, "backup service")
        await eventually(
            lambda: any(m.reason == "scheduled" for m in core.list_backups(backups.target, user)), 60
        )
        await eventually(
            lambda: any(e["user_id"] == user and e["subject"] == subjects.BACKUP_COMPLETED for e in seen)
        )
        assert core.list_backups(backups.target, quiet) == []
        # A sweep that did work logs its counts ("created" once crashed the logging call).
        await eventually(lambda: "backup sweep" in p.log_path.read_text(), 10)
        assert "backup sweep failed" not in p.log_path.read_text()

        def metrics() -> str:
            return httpx.get(f"http://127.0.0.1:{port}/metrics").text

        await eventually(lambda: "zaki_backup_instances_without_recent_backup 0.0" in metrics(), 30)
        text = metrics()
        assert 'zaki_backup_runs_total{outcome="ok",reason="scheduled"}' in text
        assert "zaki_backup_oldest_good_age_seconds" in text and user not in text  # no per-user labels
        # One due backup per interval: another sweep adds none.
        n = len(core.list_backups(backups.target, user))
        await __import__("asyncio").sleep(2.5)
        assert len(core.list_backups(backups.target, user)) == n
    finally:
        p.stop()
        await nc.close()
    for u in (user, quiet):
        await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=u, purge=True), timeout=60)


def test_cli_create_list_verify(provisioner, service_env, settings, tmp_path):
    user = new_user("c")
    root = folder(settings, user)
    (root / "workspace").mkdir(parents=True)
    (root / "workspace" / "SOUL.md").write_text("cli soul")
    env = {**os.environ, **service_env, "ZAKI_STATE_DIR": str(tmp_path)}

    def zaki(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "zaki.cli", "backup", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )

    made = zaki("create", user)
    assert made.returncode == 0, made.stderr
    bid = json.loads(made.stdout)["backup_id"]
    listed = zaki("list", user, "--json")
    assert [r["backup_id"] for r in json.loads(listed.stdout)] == [bid]
    ok = zaki("verify", user, bid)
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    data = Path(settings.data_root) / "backups" / user / f"{bid}.zbk"
    raw = bytearray(data.read_bytes())
    raw[-20] ^= 0xFF
    data.write_bytes(raw)
    bad = zaki("verify", user, bid)
    assert bad.returncode == 1 and "auth_failed" in bad.stderr
    assert zaki("verify", "../etc", bid).returncode == 2  # a typed refusal, not a path
    assert zaki("restore", user, "not-an-id").returncode == 2


async def sessions_of(port: int, user: str) -> list[str]:
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            f"http://127.0.0.1:{port}/tools/invoke",
            headers=identity_headers(user),
            json={"tool": "sessions_list", "args": {}},
        )
    assert r.status_code == 200, r.text
    return [x["key"] for x in r.json()["result"]["details"]["sessions"]]


@pytest.mark.gateway
async def test_a_real_gateways_sessions_survive_a_restore_into_a_new_user(
    provisioner, platform, fakes, settings, backups
):
    """One real gateway at a time: a chat, a backup, the user deleted; the backup restored into a
    new user whose gateway then starts on it and still has the session."""
    source = new_user("g")
    ev = InstanceRequested(request_id=new_user("req"), user_id=source, bot_token=fakes.bot())
    subject, ready_ev = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=240)
    assert subject == subjects.INSTANCE_READY, ready_ev
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(
            f"http://127.0.0.1:{ready_ev.port}/v1/chat/completions",
            headers=identity_headers(source),
            json={
                "model": "openclaw",
                "user": "alice",
                "messages": [{"role": "user", "content": "marker 4711"}],
            },
        )
    assert r.status_code == 200 and "marker 4711" in r.text, r.text
    assert "agent:main:openai-user:alice" in await sessions_of(ready_ev.port, source)
    m = await backups.create(
        source, ready_ev.instance_id if hasattr(ready_ev, "instance_id") else None, "manual"
    )
    assert any(p.endswith("openclaw-agent.sqlite") for p in m.sqlite), (m.sqlite, m.sqlite_raw, m.skipped)
    subject, _ = await platform.call(
        subjects.INSTANCE_DELETE, InstanceDelete(user_id=source, purge=True), timeout=60
    )
    assert subject == subjects.INSTANCE_DELETED

    print(f"\nreal gateway backup after a chat: {m.seconds:.2f} s, {m.stored_bytes} bytes stored")
    target = new_user("g")
    await backups.restore(source, m.backup_id, into=target)
    ev = InstanceRequested(request_id=new_user("req"), user_id=target, bot_token=fakes.bot())
    subject, ready_ev = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=240)
    assert subject == subjects.INSTANCE_READY, ready_ev
    assert "agent:main:openai-user:alice" in await sessions_of(ready_ev.port, target)
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=target, purge=True), timeout=60)


async def test_a_user_runs_one_export_at_a_time(stack, service_env, settings):
    """Each export runs a reader over the whole folder: a second one of the same user while the
    first streams is refused (409 export_in_progress); once the first ends, the next may run."""
    from tests.test_dashboard_api import shared_dashboard, signed_up

    dashboard = shared_dashboard(stack, service_env)
    async with await signed_up(dashboard.address) as user:
        uid = user.user["id"]
        root = Path(settings.data_root) / "users" / uid
        (root / "workspace").mkdir(parents=True, exist_ok=True)
        # Incompressible and larger than the socket buffers: the first export stays in flight
        # while this test reads no further than its first chunk.
        (root / "workspace" / "big.bin").write_bytes(os.urandom(48 << 20))
        for p in (root, root / "workspace", root / "workspace" / "big.bin"):
            os.lchown(p, 1000, 1000)
        async with user.http.stream("GET", "/api/agent/export") as first:
            assert first.status_code == 200
            async for _ in first.aiter_raw():
                break
            r = await user.http.get("/api/agent/export")
            assert r.status_code == 409 and r.json()["error"]["code"] == "export_in_progress", r.status_code

        async def again() -> bool:
            r = await user.http.get("/api/agent/export")
            return r.status_code == 200 and len(r.content) > 48 << 20

        await eventually(again, 60, 1)
        shutil.rmtree(root)
