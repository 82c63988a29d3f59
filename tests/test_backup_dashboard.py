"""The dashboard's backup routes: an operator lists, creates, verifies and restores any user's
backups (audited); a user downloads their own data and nobody else's."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

from tests.test_dashboard_api import PASSWORD, Browser, new_name, shared_dashboard, signed_up, zaki_admin


def seed(settings, user_id: str, memory: str) -> Path:
    root = Path(settings.data_root) / "users" / user_id
    (root / "workspace").mkdir(parents=True, exist_ok=True)
    (root / ".openclaw").mkdir(exist_ok=True)
    (root / "workspace" / "MEMORY.md").write_text(memory)
    (root / ".openclaw" / "openclaw.json").write_text('{"gateway": {"auth": {"password": "secret"}}}')
    for p in (root, root / "workspace", root / ".openclaw", *root.rglob("*")):
        os.lchown(p, 1000, 1000)
    return root


async def test_operator_backup_routes_and_a_users_own_export(stack, service_env, settings, store) -> None:
    dashboard = shared_dashboard(stack, service_env)
    root_name = new_name("root")
    r = await asyncio.to_thread(
        zaki_admin, service_env, "create", root_name, "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert r.returncode == 0, r.stderr
    async with await signed_up(dashboard.address) as user, Browser(dashboard.address) as op:
        uid = user.user["id"]
        folder = seed(settings, uid, "tea, not coffee")
        # A user's export: their folder as tar.gz, without the gateway's config.
        r = await user.http.get("/api/agent/export")
        assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
        with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
            names = tar.getnames()
            assert tar.extractfile("workspace/MEMORY.md").read() == b"tea, not coffee"
        assert ".openclaw/openclaw.json" not in names
        # Operator routes are for operators only.
        assert (await user.http.post(f"/api/admin/backups/{uid}")).status_code == 403
        assert (await op.login(root_name)).status_code == 200
        r = await op.http.post(f"/api/admin/backups/{uid}")
        assert r.status_code == 201, r.text
        bid = r.json()["backup_id"]
        listed = (await op.http.get("/api/admin/backups", params={"user": uid})).json()["backups"]
        assert [b["backup_id"] for b in listed] == [bid]
        r = await op.http.post(f"/api/admin/backups/{uid}/verify", json={"backup_id": bid})
        assert r.status_code == 200 and r.json()["ok"] is True
        (folder / "workspace" / "MEMORY.md").write_text("lost")
        r = await op.http.post(f"/api/admin/backups/{uid}/restore", json={"backup_id": bid})
        assert r.status_code == 200 and r.json()["restarted"] is False, r.text
        assert (folder / "workspace" / "MEMORY.md").read_text() == "tea, not coffee"
        records = (await op.http.get("/api/admin/audit")).json()["records"]
        assert {"backup.create", "backup.restore"} <= {x["action"] for x in records if x["target"] == uid}
        # Typed refusals.
        r = await op.http.post(f"/api/admin/backups/{uid}/verify", json={"backup_id": "not-an-id"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"
        r = await op.http.post(
            f"/api/admin/backups/{uid}/verify", json={"backup_id": "20260101T000000Z-abcdef"}
        )
        assert r.status_code == 404
