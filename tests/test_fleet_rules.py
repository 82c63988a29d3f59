"""Fleet upgrades without a platform (issue 17.2): the planner, the gate, the rule for what an
error is, the answer counts the proxy and the broker keep for the gate, the progress printer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.fleet import plan as fp
from services.fleet.plan import Observation, PlanError, Status
from shared.activity import ActivityRecorder, Counts, is_error, prune_traffic, traffic_since
from tests.conftest import broker_url, eventually, new_user
from zaki.stack import free_port

# --- the planner and the gate -------------------------------------------------------------------


def test_shares_and_waves_are_parsed_or_refused():
    assert fp.parse_share("5%") == 0.05 and fp.parse_share("0.5") == 0.5 and fp.parse_share("100%") == 1
    assert fp.parse_waves("25%,50%,100%") == [0.25, 0.5, 1.0]
    assert fp.parse_waves("50%") == [0.5, 1.0]  # the last wave is always everyone
    for bad in ("0%", "150%", "abc", "-5%", ""):
        with pytest.raises(PlanError):
            fp.parse_share(bad)
    with pytest.raises(PlanError):
        fp.parse_waves("50%,25%")


def test_plan_cuts_the_fleet_into_a_canary_and_cumulative_waves():
    users = [f"u{i:02d}" for i in range(20)]
    groups = fp.plan(users, 0.05, [0.25, 0.5, 1.0], seed="r1")
    assert [len(g) for g in groups] == [1, 4, 5, 10]
    assert sorted(u for g in groups for u in g) == users  # each exactly once
    assert groups == fp.plan(list(reversed(users)), 0.05, [0.25, 0.5, 1.0], seed="r1")  # stable
    canaries = {tuple(fp.plan(users, 0.05, [1.0], seed=f"r{i}")[0]) for i in range(10)}
    assert len(canaries) > 1  # a sample that changes with the rollout, not always the same user
    assert [len(g) for g in fp.plan(["a"], 0.05, [0.25, 1.0])] == [1]
    assert [len(g) for g in fp.plan(["a", "b", "c"], 0.05, [0.25, 0.5, 1.0])] == [1, 1, 1]
    assert [len(g) for g in fp.plan(users, 1.0, [1.0])] == [20]
    with pytest.raises(PlanError):
        fp.plan([], 0.05, [1.0])


def test_the_gate_reads_outcomes_records_and_health():
    up = Observation(Status.UPGRADED, "running", "img:2", "healthy")
    assert fp.gate({"a": up, "b": up}, "img:2").ok
    cases = {
        "failed": Observation(Status.FAILED, "running", "img:1"),
        "crashlooping": Observation(Status.UPGRADED, "crashlooping", "img:2"),
        "failed state": Observation(Status.UPGRADED, "failed", "img:2"),
        "wrong image": Observation(Status.UPGRADED, "running", "img:1"),
        "unhealthy": Observation(Status.UPGRADED, "running", "img:2", "unhealthy"),
        "unreachable": Observation(Status.UPGRADED, "running", "img:2", "unreachable"),
        "unfinished": Observation(Status.UPGRADING, "starting", "img:2"),
    }
    for name, bad in cases.items():
        verdict = fp.gate({"a": up, "b": bad}, "img:2")
        assert not verdict.ok and len(verdict.reasons) == 1 and verdict.reasons[0].startswith("b:"), name
    assert fp.gate({"a": up, "b": cases["failed"]}, "img:2", max_failures=1).ok
    deleted = Observation(Status.UPGRADED, None, None)
    skipped = Observation(Status.SKIPPED, "stopped", "img:1")
    assert fp.gate({"a": up, "d": deleted, "s": skipped}, "img:2").ok
    statuses = {"a": Status.UPGRADED, "b": Status.FAILED, "c": Status.UPGRADING, "d": Status.PENDING}
    assert fp.to_revert(statuses) == ["a", "c"]
    assert fp.progress_line(5, 20, 20) == "[#####...............] 5/20"


def test_the_gate_halts_on_error_rates_judged_from_enough_answers():
    limits = fp.Limits(max_proxy_5xx_rate=0.1, max_broker_error_rate=0.2, min_samples=20)

    def up(proxy=(0, 0), broker=(0, 0), status=Status.UPGRADED) -> Observation:
        return Observation(status, "running", "img:2", "healthy", Counts(*proxy), Counts(*broker))

    assert fp.gate({"a": up((100, 10), (100, 20))}, "img:2", limits=limits).ok  # at the limits
    verdict = fp.gate({"a": up((100, 11))}, "img:2", limits=limits)
    assert not verdict.ok and verdict.reasons == ["a: proxy 5xx rate 11/100 (11.0%) above 10.0%"]
    verdict = fp.gate({"a": up(broker=(30, 7))}, "img:2", limits=limits)
    assert not verdict.ok and verdict.reasons[0].startswith("a: broker error rate 7/30")
    # Below the minimum sample count nothing is judged: 1 error in 2 answers is no verdict.
    assert fp.gate({"a": up((2, 1), (19, 19))}, "img:2", limits=limits).ok
    # Judged per instance: one busy or hostile tenant (its own provider failing, its agent
    # stopped under load) is one bad instance, excused by max_failures like any other, and
    # never outweighs the others' clean answers.
    hostile, clean = up((1000, 900), (500, 500)), up((60, 0), (60, 0))
    assert fp.gate({"h": hostile, "a": clean, "b": clean}, "img:2", max_failures=1, limits=limits).ok
    verdict = fp.gate({"h": hostile, "a": clean, "b": clean}, "img:2", limits=limits)
    assert not verdict.ok and all(r.startswith("h: ") for r in verdict.reasons), verdict
    # Two instances with 10 answers each are no sample: each is judged on its own answers.
    assert fp.gate({"a": up((10, 3)), "b": up((10, 3))}, "img:2", limits=limits).ok
    # Only instances running the new image count (a parked or failed one answers nothing of it).
    assert fp.gate({"a": up((100, 50), status=Status.RECORDED)}, "img:2", limits=limits).ok
    assert not fp.gate({"a": up((100, 50))}, "img:2").ok  # the defaults apply without limits
    for bad in ({"max_proxy_5xx_rate": 1.5}, {"max_broker_error_rate": -0.1}, {"min_samples": 0}):
        with pytest.raises(PlanError):
            fp.Limits(**bad)


def test_one_rule_says_which_answers_are_errors():
    assert [s for s in (200, 101, 304, 400, 401, 404, 429, 499, 500, 502, 503, 504) if is_error(s)] == [
        500,
        502,
        503,
        504,
    ]


def test_a_record_says_whether_an_upgrade_settled():
    rec = {"state": "running", "image": "img:2", "last_good_image": "img:2"}
    assert fp.settled(rec, "img:2") == fp.READY
    assert fp.settled({**rec, "last_good_image": "img:1"}, "img:2") is None  # not ready on it yet
    assert fp.settled({**rec, "state": "starting"}, "img:2") is None
    assert fp.settled(rec, "img:3") is None and fp.settled(None, "img:2") is None
    for parked in ("stopped", "suspended"):
        assert fp.settled({"state": parked, "image": "img:2"}, "img:2") == fp.RECORDED
        assert fp.settled({"state": parked, "image": "img:1"}, "img:2") is None
    assert fp.to_revert({"s": Status.RECORDED, "k": Status.SKIPPED}) == ["s"]


async def test_answer_counts_are_flushed_per_user_and_read_since_a_time(store):
    rec, a, b = ActivityRecorder("proxy"), new_user("t"), new_user("t")
    rec.answered(a, 200)
    rec.answered(a, 502)
    rec.answered(b, 200)
    t0 = datetime.now(UTC)
    await rec.flush(store.db)
    assert await traffic_since(store.db, {a: t0, b: t0}) == {}  # begun before t0: left out whole
    for status in (200, 500, 503, 404):
        rec.answered(a, status)
    await rec.flush(store.db)
    await rec.flush(store.db)  # nothing new: nothing written
    since = {a: t0, b: t0}
    assert await traffic_since(store.db, since) == {a: {"proxy": Counts(4, 2)}}
    earlier = t0 - timedelta(minutes=1)
    assert (await traffic_since(store.db, {a: earlier}))[a]["proxy"] == Counts(6, 3)
    await prune_traffic(store.db, keep_s=0)
    assert await traffic_since(store.db, {a: earlier}) == {}


async def test_the_broker_counts_model_calls_and_failed_ones_per_instance(
    broker, store, service_env, keyring_spec, host_net
):
    """A provider's 5xx is a failed call: the fake provider answers 500 to a body it cannot
    parse (aiohttp's own error page), 200 to a chat."""
    import httpx

    from tests.test_broker import chat_body, fake_instance

    user, cred = await fake_instance(store, keyring_spec, host_net)
    url = f"{broker_url(service_env)}/p/zaki/chat/completions"
    async with httpx.AsyncClient(timeout=30) as http:
        auth = {"Authorization": f"Bearer {cred}"}
        statuses = [(await http.post(url, headers=auth, json=chat_body("hi"))).status_code for _ in range(2)]
        bad = await http.post(url, headers={**auth, "Content-Type": "application/json"}, content=b"{not json")
        statuses.append(bad.status_code)
    assert statuses == [200, 200, 500]
    since = {user: datetime.now(UTC) - timedelta(minutes=5)}

    async def counted():
        return (await traffic_since(store.db, since)).get(user)

    assert await eventually(counted, timeout=30, interval=0.5) == {"broker": Counts(3, 1)}


@pytest.mark.parametrize("fastpath", [True, False], ids=["fastpath", "aiohttp"])
async def test_the_proxy_counts_answers_and_5xx_per_tenant(stack, service_env, store, fastpath):
    """On both planes: a tenant whose gateway answers (200s) and one whose gateway is not
    there (the proxy's own 502s)."""
    import httpx

    from tests.proxy_support import Recorder, start_proxy, tenant_on

    rec = Recorder()
    await rec.start()
    proxy = start_proxy(stack, service_env, fastpath, ZAKI_ACTIVITY_FLUSH_S="0.5", ZAKI_WAKE_TIMEOUT_S="1")
    since = datetime.now(UTC)
    try:
        ok, ok_key = await tenant_on(store, rec, {"chat"})
        gone, gone_key = await tenant_on(store, rec, {"chat"})
        await store.instances.update_one({"_id": gone}, {"$set": {"port": free_port()}})  # nobody there
        # A stopped agent: the proxy's own 503 says nothing of an image and is not counted (a
        # tenant stopping its agent under load would otherwise fail a rollout's gate).
        stopped, stopped_key = await tenant_on(store, rec, {"chat"})
        await store.instances.update_one({"_id": stopped}, {"$set": {"state": "stopped"}})
        async with httpx.AsyncClient(base_url=f"http://{proxy.address}", timeout=30) as http:
            got = [
                (await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code
                for key in (ok_key, ok_key, ok_key, gone_key, gone_key, stopped_key)
            ]
        assert got[:3] == [200, 200, 200] and all(is_error(x) for x in got[3:]), got  # 502/503 by plane

        async def counted():
            found = await traffic_since(store.db, {ok: since, gone: since, stopped: since})
            return found if sum(c.calls for per in found.values() for c in per.values()) >= 5 else None

        found = await eventually(counted, timeout=30, interval=0.3)
        assert found == {ok: {"proxy": Counts(3, 0)}, gone: {"proxy": Counts(2, 2)}}
        await asyncio.sleep(1.5)  # three flushes later: still nothing for the stopped agent
        assert await traffic_since(store.db, {ok: since, gone: since, stopped: since}) == found
    finally:
        proxy.stop()
        stack.processes.remove(proxy)
        await rec.stop()
        users = [locals().get(u) for u in ("ok", "gone", "stopped")]
        await store.instances.delete_many({"_id": {"$in": users}})


# --- on a private platform ----------------------------------------------------------------------


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from zaki.cli.fleet import Printer

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    doc = {
        "_id": "r1",
        "wave": 1,
        "state": "running",
        "groups": [{"users": ["a"]}, {"users": ["b", "c", "d"]}],
        "instances": {"a": {"status": "upgraded"}, "b": {"status": "upgrading"}, "c": {"status": "pending"},
                      "d": {"status": "pending"}},
    }  # fmt: skip
    tty, plain = Tty(), io.StringIO()
    Printer(tty)(doc, "wave_started")
    Printer(plain)(doc, "wave_started")
    assert tty.getvalue().startswith("\r[#######") and "1/4" in tty.getvalue() and "\n" not in tty.getvalue()
    assert plain.getvalue().startswith("r1 wave 2/2 running wave_started 1/4") and plain.getvalue().endswith(
        "\n"
    )
