"""Idle suspend and wake, the parts without a gateway: the idle rule, the scheduled-work rule
(a real SQLite state file in OpenClaw's schema), activity recording on the real store, the
fake Bot API's Telegram semantics, and the Telegram wake poller against it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from services.waker import cron
from services.waker.asks import SUSPEND, WAKE, PendingAsks
from services.waker.idle import MIN_SLEEP_S, decide, due_wakes, effective_idle_s
from services.waker.poller import TelegramWakePoller, backoff_s, retry_after_s
from services.waker.service import Waker
from shared import activity, subjects
from shared.bus import to_json
from shared.crypto import KeyRing, instance_secret_context
from shared.events import (
    InstanceSuspend,
    InstanceSuspended,
    InstanceUpdate,
    InstanceWake,
    InstanceWoken,
    WakeReason,
)
from shared.settings import ZakiSettings
from shared.state import InstanceState
from tests.conftest import new_bot_token, new_user
from zaki.fakes import FakeTelegram, bound_port, serve

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def ago(s: float) -> datetime:
    return NOW - timedelta(seconds=s)


# --- the idle rule ---------------------------------------------------------------------------------


def test_idle_rule():
    assert effective_idle_s(None, 1800) == 1800
    assert effective_idle_s(0, 1800) == 0  # the instance's own 0 means never
    assert effective_idle_s(60, 0) == 60  # an instance may opt in when the platform default is off
    # Never below two activity flushes and a second: a request in flight is seen only at a flush.
    assert effective_idle_s(4, 900, flush_s=5) == 11 and effective_idle_s(0, 900, flush_s=5) == 0
    assert effective_idle_s(None, 3, flush_s=5) == 11 and effective_idle_s(60, 900, flush_s=5) == 60
    assert decide(NOW, 0, None, ago(10**6)).why == "never"
    d = decide(NOW, 600, ago(599), ago(5000))
    assert not d.suspend and d.why == "active" and d.check_at == NOW + timedelta(seconds=1)
    d = decide(NOW, 600, ago(601), ago(5000))
    assert d.suspend and d.why == "idle" and round(d.idle_s) == 601 and d.wake_at is None
    # Just started (the platform touched it) and nobody has used it yet: not idle.
    assert not decide(NOW, 600, None, ago(30)).suspend
    assert decide(NOW, 600, None, ago(601)).suspend
    assert decide(NOW, 600, None, None).suspend


def test_scheduled_work_rule():
    # A job in an hour: suspend, wake a minute before it.
    d = decide(NOW, 600, ago(700), None, NOW + timedelta(hours=1), lead_s=60)
    assert d.suspend and d.wake_at == NOW + timedelta(minutes=59)
    # A job too close to be worth the sleep: stay up, look again after it.
    job = NOW + timedelta(seconds=60 + MIN_SLEEP_S - 1)
    d = decide(NOW, 600, ago(700), None, job, lead_s=60)
    assert not d.suspend and d.why == "job_soon" and d.check_at == job
    # An overdue job (missed while something else happened): stay up.
    assert not decide(NOW, 600, ago(700), None, ago(5), lead_s=60).suspend
    assert due_wakes(NOW, {"a": ago(1), "b": NOW + timedelta(seconds=1), "c": None}) == ["a"]


# --- asks in flight -----------------------------------------------------------------------------------


def test_an_ask_is_pending_until_its_outcome_and_at_most_reask_s():
    asks = PendingAsks(reask_s=60)
    asks.asked("u", SUSPEND, "r1", now=0)
    assert asks.pending("u", SUSPEND, 1) and not asks.pending("u", WAKE, 1)
    assert asks.outcome(subjects.INSTANCE_SUSPENDED, "u", "r1") == [SUSPEND]
    assert not asks.pending("u", SUSPEND, 2)  # the next suspend goes out at once
    # Declined (answered "ready") or failed: answered all the same.
    asks.asked("u", SUSPEND, "r2", now=2)
    assert asks.outcome(subjects.INSTANCE_READY, "u", "r2") == [SUSPEND]
    asks.asked("u", WAKE, "r3", now=3)
    assert asks.outcome(subjects.INSTANCE_FAILED, "u", "r3") == [WAKE]
    # Another command's outcome: a wake by someone else, a stop, a delete end the ask too...
    asks.asked("u", WAKE, "r4", now=4)
    assert asks.outcome(subjects.INSTANCE_READY, "other-user", "r4") == []
    assert asks.outcome(subjects.INSTANCE_WOKEN, "u", "proxy-request") == [WAKE]
    # ...but not a suspend published just after the waker saw the sleeper asleep and asked.
    asks.asked("u", WAKE, "r5", now=5)
    assert asks.outcome(subjects.INSTANCE_SUSPENDED, "u", "earlier-suspend") == []
    assert asks.outcome("zaki.instance.health.u", "u", "r5") == []  # not an outcome
    assert asks.pending("u", WAKE, 64.9)
    # The outcome was lost (a provisioner crash): asked again after reask_s, not never.
    assert not asks.pending("u", WAKE, 65) and len(asks) == 0
    asks.asked("u", SUSPEND, "r8", now=66)  # a suspend: not ended by a start that found it running
    assert asks.outcome(subjects.INSTANCE_READY, "u", "a-start") == []
    assert asks.outcome(subjects.INSTANCE_STOPPED, "u", "a-stop") == [SUSPEND]  # a stop does
    asks.asked("gone", SUSPEND, "r6", now=70)
    asks.prune(129)
    assert len(asks) == 1
    asks.prune(130)
    assert len(asks) == 0
    asks.asked("u", WAKE, "r7", now=0)
    asks.forget("u", WAKE)  # never sent
    assert not asks.pending("u", WAKE, 1)


# --- the gateway's scheduled jobs, from its state database -----------------------------------------

SCHEMA = """CREATE TABLE cron_jobs (store_key TEXT NOT NULL, job_id TEXT NOT NULL, name TEXT NOT NULL,
enabled INTEGER NOT NULL, payload_kind TEXT NOT NULL, job_json TEXT NOT NULL,
state_json TEXT NOT NULL DEFAULT '{}', updated_at INTEGER NOT NULL, PRIMARY KEY (store_key, job_id)) STRICT"""


def make_state(tmp_path: Path, jobs: list[tuple[int, dict, dict]], wal: bool = True) -> Path:
    """A gateway state folder whose cron rows are, with *wal*, only in the write-ahead log
    (copied while the writer is still open, as a running gateway leaves them)."""
    state = tmp_path / ".openclaw"
    (state / "state").mkdir(parents=True)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    conn = sqlite3.connect(scratch / "openclaw.sqlite")
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(SCHEMA)
    for i, (enabled, job, st) in enumerate(jobs):
        conn.execute(
            "INSERT INTO cron_jobs VALUES ('primary', ?, 'j', ?, ?, ?, ?, 0)",
            (f"job{i}", enabled, job.get("payload_kind", "agentTurn"), json.dumps(job), json.dumps(st)),
        )
    conn.commit()
    for f in scratch.iterdir():
        if not f.name.endswith("-shm"):
            shutil.copy(f, state / "state" / f.name)
    conn.close()
    return state


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def test_next_job_from_the_state_database(tmp_path: Path):
    soon, later = NOW + timedelta(hours=2), NOW + timedelta(hours=5)
    state = make_state(
        tmp_path,
        [
            (1, {"schedule": {"kind": "cron", "expr": "0 * * * *"}}, {"nextRunAtMs": ms(later)}),
            (1, {"schedule": {"kind": "at"}}, {"nextRunAtMs": ms(soon)}),
            (0, {"schedule": {"kind": "at"}}, {"nextRunAtMs": ms(NOW + timedelta(minutes=5))}),  # disabled
            (1, {"schedule": {"kind": "every"}}, {"nextRunAtMs": "garbage"}),
            (1, {"schedule": {"kind": "every"}}, {"nextRunAtMs": True}),
        ],
    )
    assert cron.next_job_at(state, NOW) == soon  # read through the WAL, not only the main file
    # The main file alone has no rows yet: they were read from the write-ahead log.
    (state / "state" / "openclaw.sqlite-wal").unlink()
    assert cron.next_job_at(state, NOW) is None


def test_heartbeats_do_not_wake_a_sleeper_unless_asked(tmp_path: Path):
    beat, daily = NOW + timedelta(minutes=30), NOW + timedelta(hours=15)
    state = make_state(
        tmp_path,
        [
            (1, {"payload_kind": "heartbeat", "schedule": {"kind": "every"}}, {"nextRunAtMs": ms(beat)}),
            (1, {"schedule": {"kind": "cron", "expr": "0 3 * * *"}}, {"nextRunAtMs": ms(daily)}),
        ],
    )
    assert cron.next_job_at(state, NOW) == daily  # OpenClaw's 30-min heartbeat would keep it up
    assert cron.next_job_at(state, NOW, heartbeat=True) == beat


def test_next_job_none_and_always_on(tmp_path: Path):
    assert cron.next_job_at(tmp_path / "absent", NOW) is None
    (tmp_path / "empty").mkdir()
    assert cron.next_job_at(tmp_path / "empty", NOW) is None
    state = make_state(tmp_path / "s", [(1, {"schedule": {"kind": "stream"}}, {})], wal=False)
    assert cron.next_job_at(state, NOW) == NOW  # a job watching a command keeps the gateway up


def test_hostile_state_files_are_refused(tmp_path: Path):
    target = tmp_path / "secret.sqlite"
    make_state(tmp_path / "real", [(1, {}, {"nextRunAtMs": ms(NOW)})], wal=False)
    (tmp_path / "real" / ".openclaw" / "state" / "openclaw.sqlite").rename(target)
    # The database is a symlink to a file elsewhere on the host.
    s1 = tmp_path / "a" / ".openclaw"
    (s1 / "state").mkdir(parents=True)
    (s1 / "state" / "openclaw.sqlite").symlink_to(target)
    with pytest.raises(cron.CronUnreadable):
        cron.next_job_at(s1, NOW)
    # The state folder is a symlink.
    s2 = tmp_path / "b" / ".openclaw"
    s2.mkdir(parents=True)
    (s2 / "state").symlink_to(target.parent)
    with pytest.raises(cron.CronUnreadable):
        cron.next_job_at(s2, NOW)
    # A FIFO would block a naive reader forever.
    s3 = tmp_path / "c" / ".openclaw"
    (s3 / "state").mkdir(parents=True)
    os.mkfifo(s3 / "state" / "openclaw.sqlite")
    with pytest.raises(cron.CronUnreadable):
        cron.next_job_at(s3, NOW)
    # Not a database at all.
    s4 = tmp_path / "d" / ".openclaw"
    (s4 / "state").mkdir(parents=True)
    (s4 / "state" / "openclaw.sqlite").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(cron.CronUnreadable):
        cron.next_job_at(s4, NOW)


# --- backoff ---------------------------------------------------------------------------------------


def test_backoff_and_retry_after():
    assert backoff_s(1, lambda: 1.0) == 1.0 and backoff_s(1, lambda: 0.0) == 0.5
    assert backoff_s(4, lambda: 1.0) == 8.0
    assert backoff_s(50, lambda: 1.0) == 60.0  # capped
    assert retry_after_s({"ok": False, "parameters": {"retry_after": 7}}, 1.0) == 7.0
    assert retry_after_s({"parameters": {"retry_after": "7"}}, 1.5) == 1.5  # not a number: ours
    assert retry_after_s({"parameters": {"retry_after": 10**9}}, 1.0) == 3600.0
    assert retry_after_s(None, 2.0) == 2.0


# --- activity on the real store ----------------------------------------------------------------------


async def test_activity_is_recorded_in_batches(store):
    u1, u2, u3 = new_user(), new_user(), new_user()
    rec = activity.ActivityRecorder("proxy")
    rec.touch(u1)
    rec.opened(u2)  # a WebSocket: active at every flush while it stays open
    assert await rec.flush(store.db) == 2
    first = await activity.last_active(store.db, [u1, u2, u3])
    assert set(first) == {u1, u2}
    await asyncio.sleep(0.05)
    assert await rec.flush(store.db) == 1  # only the open connection
    second = await activity.last_active(store.db, [u1, u2])
    assert second[u1] == first[u1] and second[u2] > first[u2]
    rec.closed(u2)
    await rec.flush(store.db)
    assert await rec.flush(store.db) == 0  # closed: nothing more to say
    # $max: a late flush of an older timestamp never moves last-seen back.
    old = activity.ActivityRecorder("broker")
    old._seen[u1] = time.time() - 3600
    await old.flush(store.db)
    assert (await activity.last_active(store.db, [u1]))[u1] == second[u1]
    doc = await store.db[activity.COLLECTION].find_one({"_id": u1})
    assert "last_proxy_at" in doc and "last_broker_at" in doc


async def test_activity_kept_when_the_store_fails(store):
    rec = activity.ActivityRecorder("proxy")
    user = new_user()
    rec.touch(user)

    class Broken:
        def __getitem__(self, name):
            raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await rec.flush(Broken())
    assert await rec.flush(store.db) == 1  # the batch survived for the next flush
    assert user in await activity.last_active(store.db, [user])


# --- the fake Bot API behaves like Telegram where waking depends on it --------------------------------


@pytest.fixture
async def tg():
    fake = FakeTelegram(accept_all=True, max_poll_s=5)
    runner = await serve(fake.app(), "127.0.0.1", 0)
    fake.base = f"http://127.0.0.1:{bound_port(runner)}"  # type: ignore[attr-defined]
    yield fake
    await runner.cleanup()


async def get_updates(http: httpx.AsyncClient, base: str, token: str, **params) -> httpx.Response:
    return await http.post(f"{base}/bot{token}/getUpdates", json=params, timeout=30)


async def test_fake_keeps_updates_until_confirmed_and_refuses_two_pollers(tg):
    token = new_bot_token()
    async with httpx.AsyncClient() as http:
        uid = tg.inject_message(token, "hi")
        for _ in range(2):  # no offset: nothing is confirmed
            body = (await get_updates(http, tg.base, token)).json()
            assert [u["update_id"] for u in body["result"]] == [uid]
        assert (await get_updates(http, tg.base, token, offset=uid + 1)).json()["result"] == []
        assert tg.unconfirmed(token) == []
        # A long poll returns as soon as a message arrives.
        t0 = time.monotonic()
        poll = asyncio.create_task(get_updates(http, tg.base, token, timeout=5))
        await asyncio.sleep(0.3)
        uid2 = tg.inject_message(token, "again")
        assert [u["update_id"] for u in (await poll).json()["result"]] == [uid2]
        assert time.monotonic() - t0 < 2
        # Two concurrent long polls: the older one is ended with 409 Conflict, and it is recorded.
        await get_updates(http, tg.base, token, offset=uid2 + 1)
        first = asyncio.create_task(get_updates(http, tg.base, token, timeout=5))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(get_updates(http, tg.base, token, timeout=1))
        assert (await first).status_code == 409
        assert (await second).status_code == 200
        assert tg.conflicts_for(token) == 1


# --- the wake poller against the fake Bot API ----------------------------------------------------------


async def test_poller_wakes_once_and_leaves_the_update_for_the_gateway(tg):
    token = new_bot_token()
    woken: list[str] = []
    poller = TelegramWakePoller(tg.base, _append(woken), _always(True), poll_timeout_s=2)
    try:
        assert poller.watch("alice", token)
        assert not poller.watch("alice", token)  # one task per bot
        await _until(lambda: tg.polling(token))
        uid = tg.inject_message(token, "wake up")
        await _until(lambda: woken)
        await asyncio.sleep(2.5)  # longer than a poll: it would have polled again by now
        assert woken == ["alice"]
        assert "alice" not in poller.watching() and not tg.polling(token)
        assert all(
            "offset" not in p and "allowed_updates" not in p for b, p in tg.polls if b == tg.bot_id(token)
        )
        assert tg.unconfirmed(token) == [uid]  # Telegram still holds it for the gateway
        # The gateway's own first poll reads the very message that woke it, with no conflict.
        async with httpx.AsyncClient() as http:
            body = (await get_updates(http, tg.base, token, timeout=0)).json()
        assert [u["update_id"] for u in body["result"]] == [uid]
        assert tg.conflicts_for(token) == 0
    finally:
        await poller.close()


async def test_release_ends_a_poll_in_flight_without_a_conflict(tg):
    token = new_bot_token()
    woken: list[str] = []
    poller = TelegramWakePoller(tg.base, _append(woken), _always(True), poll_timeout_s=5)
    try:
        poller.watch("bob", token)
        await _until(lambda: tg.polling(token))
        assert await poller.release("bob")
        assert not await poller.release("bob")
        async with httpx.AsyncClient() as http:  # the gateway starts polling right away
            r = await get_updates(http, tg.base, token, timeout=1)
        assert r.status_code == 200 and tg.conflicts_for(token) == 0 and woken == []
    finally:
        await poller.close()


async def test_poller_honours_retry_after_and_backs_off(tg):
    token = new_bot_token()
    bid = tg.bot_id(token)
    tg.scripted[bid] = [(429, {"retry_after": 2}), (502, None)]
    woken: list[str] = []
    poller = TelegramWakePoller(tg.base, _append(woken), _always(True), poll_timeout_s=2)
    try:
        poller.watch("carol", token)
        await _until(lambda: len([b for b, _ in tg.polls if b == bid]) >= 2, timeout=10)
        times = [t for t in _poll_times(tg, bid)]
        assert times[1] - times[0] >= 1.9  # waited what Telegram said
        tg.inject_message(token, "hello")
        await _until(lambda: woken, timeout=10)
        assert woken == ["carol"]
    finally:
        await poller.close()


async def test_poller_stops_when_the_instance_is_no_longer_suspended(tg):
    token = new_bot_token()
    state = {"suspended": True}

    async def still(user_id: str) -> bool:
        return state["suspended"]

    poller = TelegramWakePoller(tg.base, _append([]), still, poll_timeout_s=1)
    try:
        poller.watch("dave", token)
        await _until(lambda: tg.polling(token))
        state["suspended"] = False
        await _until(lambda: "dave" not in poller.watching(), timeout=5)
    finally:
        await poller.close()


# --- the waker service on the real store ----------------------------------------------------------------


async def test_waker_polls_sleepers_and_asks_for_one_wake(tg, store, keyring_spec, tmp_path):
    keyring = KeyRing.from_spec(keyring_spec)
    user, token = new_user("w"), new_bot_token()
    host = "waker-" + user
    await store.create_instance(
        user,
        {
            "instance_id": "i1",
            "docker_host": host,
            "bot_token_enc": keyring.encrypt(token, instance_secret_context(user, "bot_token")),
        },
    )
    await store.instances.update_one({"_id": user}, {"$set": {"state": "suspended", "asleep": False}})
    sent: list[tuple[str, object]] = []

    async def publish(subject, event):
        sent.append((subject, event))

    s = ZakiSettings(
        telegram_api_base=tg.base, docker_host_id=host, data_root=tmp_path, waker_poll_timeout_s=2
    )
    waker = Waker(s, store, keyring, publish)
    try:
        await waker.sync_suspended()
        assert waker.poller.watching() == set()  # its container may still be stopping: not yet
        await store.instances.update_one({"_id": user}, {"$set": {"asleep": True}})
        await waker.sync_suspended()
        assert waker.poller.watching() == {user}
        # The provisioner releases the bot before it changes a sleeper (here: an update that leaves
        # it asleep). That is no wake: the next sync polls the bot again.
        assert await waker.release(user) and waker.poller.watching() == set()
        await waker.sync_suspended()
        assert waker.poller.watching() == {user}
        tg.inject_message(token, "are you there?")
        await _until(lambda: sent)
        await waker.sync_suspended()  # a sync right after the wake does not poll the bot again
        await asyncio.sleep(0.5)
        assert [s for s, _ in sent] == [subjects.INSTANCE_WAKE]
        ev = sent[0][1]
        assert isinstance(ev, InstanceWake) and ev.user_id == user and ev.cause == WakeReason.TELEGRAM
        # The audit trail says who asked (issue 17.4): the platform's waker, and why.
        assert ev.actor is not None and (ev.actor.kind, ev.actor.id, ev.actor.reason) == (
            "platform",
            "waker",
            "wake: telegram",
        )
        assert tg.conflicts_for(token) == 0 and len(tg.unconfirmed(token)) == 1
        assert user in await activity.last_active(store.db, [user])
        # Until the provisioner answers, that wake is pending: a due job asks for none.
        await store.instances.update_one({"_id": user}, {"$set": {"wake_at": datetime.now(UTC)}})
        await waker.sync_suspended()
        assert len(sent) == 1
        # Woken, then suspended again at once (the record as it was): its due job wakes it now.
        woken = InstanceWoken(request_id=ev.request_id, user_id=user, instance_id="i1", reason=ev.cause)
        assert waker.on_outcome(subjects.INSTANCE_WOKEN, to_json(woken)) == ["wake"]
        sent.clear()
        await waker.sync_suspended()
        assert [(s, e.cause) for s, e in sent] == [(subjects.INSTANCE_WAKE, WakeReason.SCHEDULE)]
    finally:
        await waker.close()


async def test_waker_asks_to_suspend_only_idle_gateways(store, keyring_spec, tmp_path):
    keyring = KeyRing.from_spec(keyring_spec)
    host = "idle-" + new_user()
    users = {k: new_user(k) for k in ("idle", "busy", "never", "cron")}
    for kind, user in users.items():
        await store.create_instance(user, {"instance_id": "i1", "docker_host": host})
        fields = {"state": InstanceState.RUNNING.value, "updated_at": datetime.now(UTC) - timedelta(hours=2)}
        if kind == "never":
            fields["idle_suspend_s"] = 0
        await store.instances.update_one({"_id": user}, {"$set": fields})
    rec = activity.ActivityRecorder("proxy")
    rec.touch(users["busy"])
    await rec.flush(store.db)
    make_state(
        tmp_path / "users" / users["cron"],
        [(1, {"schedule": {"kind": "at"}}, {"nextRunAtMs": ms(datetime.now(UTC) + timedelta(seconds=90))})],
    )
    sent: list[tuple[str, object]] = []

    async def publish(subject, event):
        sent.append((subject, event))

    waker = Waker(
        ZakiSettings(docker_host_id=host, data_root=tmp_path, idle_suspend_s=600), store, keyring, publish
    )
    try:
        assert await waker.sweep_idle() == 1
        assert await waker.sweep_idle() == 0  # asked already: not again at every sweep
        [(subject, ev)] = sent
        assert subject == subjects.INSTANCE_SUSPEND and isinstance(ev, InstanceSuspend)
        assert ev.user_id == users["idle"] and ev.idle_s >= 600
        assert ev.actor is not None and (ev.actor.kind, ev.actor.id) == ("platform", "waker")
        assert ev.actor.reason is not None and ev.actor.reason.startswith("idle ")
        # Suspended, woken and idle again for its idle time (the record as it was): once the
        # provisioner's answer is in, the next suspend is asked for at the next sweep.
        done = InstanceSuspended(
            request_id=ev.request_id, user_id=ev.user_id, instance_id="i1", reason=ev.cause
        )
        assert waker.on_outcome(subjects.INSTANCE_SUSPENDED, to_json(done)) == ["suspend"]
        assert await waker.sweep_idle() == 1 and len(waker.asks) == 1
    finally:
        await waker.close()


# --- helpers ---------------------------------------------------------------------------------------------


def _append(into: list[str]):
    async def on_update(user_id: str) -> None:
        into.append(user_id)

    return on_update


def _always(value: bool):
    async def check(user_id: str) -> bool:
        return value

    return check


def _poll_times(tg: FakeTelegram, bid: str) -> list[float]:
    return [t for (b, _), t in zip(tg.polls, tg.poll_times, strict=True) if b == bid]


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.05)


async def test_a_model_call_through_the_broker_is_activity(
    broker, store, service_env, keyring_spec, host_net
):
    from tests.conftest import broker_url, eventually
    from tests.test_broker import chat_body, fake_instance

    user, cred = await fake_instance(store, keyring_spec, host_net)
    assert await activity.last_active(store.db, [user]) == {}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(
            f"{broker_url(service_env)}/p/zaki/chat/completions",
            headers={"Authorization": f"Bearer {cred}"},
            json=chat_body("keep me awake"),
        )
    assert r.status_code == 200, r.text

    async def recorded():
        return await store.db[activity.COLLECTION].find_one(
            {"_id": user, "last_broker_at": {"$exists": True}}
        )

    await eventually(recorded, timeout=15)  # flushed within ZAKI_ACTIVITY_FLUSH_S


# --- the waker process on the real platform: each transition is asked for at once ---------------


@pytest.fixture
def waker_service(stack, service_env, provisioner):
    """A waker process for one test (it would suspend other tests' idle gateways)."""
    from tests.test_suspend import WAKER_ENV
    from zaki.stack import free_port, wait_for_port

    port = free_port()
    p = stack.start_service("services.waker", {**service_env, **WAKER_ENV, "ZAKI_METRICS_PORT": str(port)})
    wait_for_port("127.0.0.1", port, p.proc, "waker")
    yield p
    p.stop()


async def test_a_sleeper_woken_and_suspended_within_a_minute_is_woken_again_by_telegram(
    waker_service, platform, fakes, store
):
    """The waker used to keep every wake it asked for, and every release the provisioner asked
    of it, for REASK_S (60 s) whatever happened next: a sleeper woken by Telegram and suspended
    again, or a sleeper whose settings were updated, was not polled, so not woken, for up to a
    minute. Now the ask ends with its outcome. No timing is measured: each wake only has to
    happen before a deadline (30 s) well below those 60 s."""
    from tests.conftest import eventually
    from tests.test_suspend import events_for, make, suspend

    user, token, _ = await make(platform, fakes)
    tg = fakes.telegram
    api = f"http://{fakes.host}:{fakes.tg_port}/bot{token}/getUpdates"

    async def message_wakes_it(n: int) -> None:
        """A message to the sleeper's bot wakes it (its *n*-th wake); the gateway (a stand-in
        that does not poll Telegram) is then taken to have read it."""
        uid = tg.inject_message(token, f"message {n}")
        woken = await eventually(lambda: len(events_for(platform, subjects.INSTANCE_WOKEN, user)) == n, 30)
        assert (
            woken
            and [w["reason"] for w in events_for(platform, subjects.INSTANCE_WOKEN, user)] == ["telegram"] * n
        )
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.post(api, json={"offset": uid + 1, "timeout": 0})).status_code == 200

    try:
        await suspend(platform, user)
        await message_wakes_it(1)  # the waker asked for this wake, and the provisioner released the bot
        await suspend(platform, user)  # within the minute
        await message_wakes_it(2)
        # An update of a sleeper: the provisioner releases the bot, changes the record and
        # answers "suspended". The waker polls the bot again at once: a message still wakes it.
        await suspend(platform, user)
        subject, _ = await platform.call(
            subjects.INSTANCE_UPDATE, InstanceUpdate(user_id=user, idle_suspend_s=0), timeout=30
        )
        assert subject == subjects.INSTANCE_SUSPENDED
        await message_wakes_it(3)
        assert tg.conflicts_for(token) == 0
    finally:
        from tests.test_suspend import delete

        await delete(platform, user)
