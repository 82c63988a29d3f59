"""The audit trail (issue 17.4): every command with who asked, every outcome, in the ZAKI_AUDIT
stream, secrets redacted, replayed by ``zaki audit`` with --user/--since/--actor filters.
On the session's platform (provisioner, dashboard; the stand-in gateway image)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import nats
import pytest
from pydantic import ValidationError

from shared import audit, subjects
from shared.events import Actor, ActorKind, InstanceCommand, InstanceRequested
from tests.conftest import STANDIN_IMAGE, eventually, new_user
from tests.test_dashboard_api import PASSWORD, shared_dashboard, signed_up
from zaki.cli.audit import parse_since

pytestmark = pytest.mark.timeout(300)


# --- the rules, without I/O ---------------------------------------------------------------------


def test_records_drop_secrets_and_redact_the_rest():
    token = "123456789:" + "A" * 35
    ev = InstanceRequested(
        request_id="r1",
        user_id="u1",
        bot_token=token,
        actor=Actor(kind=ActorKind.CLI, id="ops@host", reason=f"because {token}"),
    )
    rec = audit.record("command", subjects.INSTANCE_REQUESTED, actor=ev.actor, user_id="u1", detail=dict(ev))
    text = json.dumps(rec)
    assert token not in text and "[REDACTED]" in text
    assert rec["detail"]["bot_token"] == "[REDACTED]" and rec["actor"]["kind"] == "cli"
    big = audit.record("action", "x", actor=None, detail={"blob": "y" * 20_000})
    assert len(json.dumps(big)) < audit.MAX_DETAIL + 500


def test_actor_is_validated_and_bounded():
    with pytest.raises(ValidationError):
        Actor(kind="root", id="x")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Actor(kind=ActorKind.CLI, id="a b")
    with pytest.raises(ValidationError):
        Actor(kind=ActorKind.CLI, id="x" * 65)
    with pytest.raises(ValidationError):
        InstanceCommand(user_id="u", actor={"kind": "cli", "id": "x", "extra": 1})


def test_filters_and_since():
    rec = {"user_id": "u1", "actor": {"kind": "dashboard", "id": "d1"}}
    assert audit.matches(rec, "u1", "dashboard") and audit.matches(rec, None, "dashboard:d1")
    assert not audit.matches(rec, "u2", None) and not audit.matches(rec, None, "dashboard:d2")
    assert not audit.matches(rec, None, "cli") and not audit.matches({"actor": None}, None, "cli")
    assert abs((datetime.now(UTC) - parse_since("2h")) - timedelta(hours=2)) < timedelta(seconds=5)
    assert parse_since("2026-11-27T09:00") == datetime(2026, 11, 27, 9, tzinfo=UTC)


# --- on the platform ----------------------------------------------------------------------------


def zaki(service_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zaki.cli", "--state-dir", "/nonexistent", *args],
        capture_output=True, text=True, env={**os.environ, **service_env}, timeout=240,
    )  # fmt: skip


def replay(service_env: dict[str, str], *args: str) -> list[dict]:
    r = zaki(service_env, "audit", "--json", *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


async def raw_stream(url: str) -> bytes:
    """Every message of the audit stream, as stored."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.AUDIT_STREAM)
        # Its own stream, its own subjects, its own retention (ZAKI_AUDIT_RETENTION_DAYS, 400).
        assert info.config.max_age == 400 * 86400
        assert set(info.config.subjects) == {f"{subjects.AUDIT}.>", f"{subjects.FLEET}.>"}
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                out.append((await js.get_msg(subjects.AUDIT_STREAM, seq)).data or b"")
            except nats.js.errors.NotFoundError:
                continue
        return b"\n".join(out)
    finally:
        await nc.close()


async def test_cli_and_dashboard_commands_appear_with_actor_and_outcome(
    provisioner, stack, service_env, fakes, store, docker_client
):
    dashboard = shared_dashboard(stack, service_env)
    t0 = datetime.now(UTC)
    # A command from the CLI: create on the stand-in image.
    user, cli_token = new_user("au"), fakes.bot()
    r = await asyncio.to_thread(
        zaki, service_env, "instance", "create", user, "--bot-token", cli_token, "--image", STANDIN_IMAGE
    )
    assert r.returncode == 0, r.stderr
    rows = await asyncio.to_thread(replay, service_env, "--user", user)
    cmd = next(x for x in rows if x["kind"] == "command")
    assert cmd["subject"] == subjects.INSTANCE_REQUESTED and cmd["actor"]["kind"] == "cli"
    ready = next(x for x in rows if x["kind"] == "outcome")
    assert ready["subject"] == subjects.INSTANCE_READY and ready["request_id"] == cmd["request_id"]
    assert ready["actor"] == cmd["actor"]  # the outcome is joined to who asked

    # A command from the dashboard: an account creates its agent, then restarts it.
    dash_token = fakes.bot()
    async with await signed_up(dashboard.address) as b:
        me = b.user["id"]
        assert (await b.http.post("/api/agent", json={"bot_token": dash_token})).status_code == 202

        async def running() -> bool:
            doc = await store.get_instance(me)
            return doc is not None and doc["state"] == "running"

        await eventually(running, timeout=120)
        r2 = await b.http.post("/api/agent/restart")
        assert r2.status_code == 202, r2.text
        restart_id = r2.json()["request_id"]

        def restarted() -> list[dict]:
            rows = replay(service_env, "--actor", f"dashboard:{me}")
            return [x for x in rows if x["request_id"] == restart_id and x["kind"] == "outcome"] and rows

        rows = await eventually(lambda: asyncio.to_thread(restarted), timeout=120, interval=1)
        kinds = {(x["kind"], x["subject"]) for x in rows if x["user_id"] == me}
        assert ("command", subjects.INSTANCE_REQUESTED) in kinds
        assert ("command", subjects.INSTANCE_RESTART) in kinds and (
            "outcome",
            subjects.INSTANCE_READY,
        ) in kinds
        assert all(x["actor"] == {"kind": "dashboard", "id": me, "reason": None} for x in rows)
        await b.http.request(
            "DELETE", "/api/me", json={"password": PASSWORD, "confirm": b.user["username"], "purge": True}
        )

    # Filters: --actor cli does not show the dashboard's; --since after everything shows nothing.
    cli_rows = await asyncio.to_thread(replay, service_env, "--actor", "cli", "--since", t0.isoformat())
    assert user in {x["user_id"] for x in cli_rows} and me not in {x["user_id"] for x in cli_rows}
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert await asyncio.to_thread(replay, service_env, "--user", user, "--since", future) == []
    assert zaki(service_env, "audit", "--actor", "root").returncode == 2

    # The CLI's other actions too: an API key made for the user (the key itself never recorded).
    made = await asyncio.to_thread(zaki, service_env, "keys", "create", "--user", user, "--scopes", "chat")
    assert made.returncode == 0, made.stderr
    api_key = made.stdout.split("store it now): ")[1].split()[0]
    rows = await asyncio.to_thread(replay, service_env, "--user", user, "--actor", "cli")
    assert any(x["kind"] == "action" and x["subject"] == "keys.create" for x in rows)

    # No bot token or API key, in any form, anywhere in the stream.
    raw = await raw_stream(service_env["ZAKI_NATS_URL"])
    assert api_key.encode() not in raw
    assert cli_token.encode() not in raw and dash_token.encode() not in raw
    assert cli_token.split(":")[1].encode() not in raw and dash_token.split(":")[1].encode() not in raw
    zaki(service_env, "instance", "delete", user, "--purge")
