"""The monitor's pure rules: hysteresis, backoff, crash loops, partitioning, jitter, a swarm task's death."""

from services.monitor.health import HealthTracker, RestartPolicy, jitter_offset, owner
from services.monitor.tasks import TaskWatch, task_deaths
from shared.events import HealthState as H
from shared.gateway import container_name


def test_hysteresis_needs_n_failures_and_m_successes():
    t = HealthTracker(unhealthy_after=3, healthy_after=2)
    assert t.observe(True, 0.01) == H.HEALTHY
    assert t.observe(False, error="timeout") is None
    assert t.observe(False, error="timeout") is None
    assert t.observe(False, error="timeout") == H.UNREACHABLE
    assert t.observe(True, 0.01) is None  # one success does not heal
    assert t.observe(True, 0.01) == H.HEALTHY
    assert t.observe(False, error="http_503") is None
    assert t.observe(True, 0.01) is None  # a single blip never changed the state
    assert t.state == H.HEALTHY


def test_slow_answers_are_degraded_and_http_errors_unhealthy():
    t = HealthTracker(unhealthy_after=1, healthy_after=1, slow_s=0.5)
    assert t.observe(True, 0.9) == H.DEGRADED and t.reason == "slow"
    assert t.observe(False, error="http_503") == H.UNHEALTHY


def test_backoff_doubles_and_crash_loop_ends_restarts():
    p = RestartPolicy(base_s=2, max_s=10, max_restarts=3, window_s=100)
    assert p.decide(0) == "restart"
    p.record(0)
    assert p.decide(1) == "wait" and p.decide(2.1) == "restart"
    p.record(3)
    assert p.decide(6) == "wait" and p.decide(7.1) == "restart"  # 2 s, then 4 s
    p.record(8)
    assert p.decide(1000) == "restart"  # the window forgets old restarts
    p.record(1000), p.record(1020), p.record(1040)
    assert p.decide(1050) == "crashloop"


def test_tracker_stays_crashlooping_until_it_really_recovers():
    t = HealthTracker(unhealthy_after=1, healthy_after=2)
    t.force(H.CRASHLOOPING, "5 restarts")
    assert t.observe(False, error="refused") is None and t.state == H.CRASHLOOPING
    assert t.observe(True, 0.01) is None
    assert t.observe(True, 0.01) == H.HEALTHY


def test_rendezvous_partition_moves_only_the_dead_replicas_share():
    users = [f"user{i}" for i in range(2000)]
    three = {u: owner(u, ["a", "b", "c"]) for u in users}
    two = {u: owner(u, ["a", "b"]) for u in users}
    assert {three[u] for u in users} == {"a", "b", "c"}
    assert all(two[u] == three[u] for u in users if three[u] != "c")
    assert 500 < sum(v == "a" for v in three.values()) < 850


def test_jitter_is_stable_and_spread():
    offsets = [jitter_offset(f"u{i}", 10.0) for i in range(1000)]
    assert offsets[0] == jitter_offset("u0", 10.0)
    assert min(offsets) >= 0 and max(offsets) <= 8.0
    assert len({int(o) for o in offsets}) == 8  # spread over the whole window


def swarm_task(tid: str, state: str, user: str | None = "u1", platform: str = "p1", code: int = 1) -> dict:
    labels = {"zaki.managed": platform, "zaki.instance": "i1", **({"zaki.user": user} if user else {})}
    return {
        "ID": tid,
        "NodeID": "n2",
        "Spec": {"ContainerSpec": {"Labels": labels}},
        "Status": {"State": state, "ContainerStatus": {"ExitCode": code}},
    }


def test_a_swarm_task_that_failed_is_a_die_event_once():
    tasks = [
        swarm_task("t1", "failed", code=137),
        swarm_task("t2", "running"),  # its replacement
        swarm_task("t3", "shutdown"),  # stopped by the provisioner: not a death
        swarm_task("t4", "failed", platform="other"),  # another platform's
        swarm_task("t5", "failed", user=None),  # not a gateway (no user)
    ]
    events, seen = task_deaths(tasks, set(), "p1")
    assert [e["Action"] for e in events] == ["die"]
    attrs = events[0]["Actor"]["Attributes"]
    assert (attrs["zaki.user"], attrs["zaki.instance"], attrs["exitCode"], attrs["name"]) == (
        "u1", "i1", "137", container_name("u1")
    )  # fmt: skip
    assert seen == {"t1", "t5"}
    again, _ = task_deaths(tasks, seen, "p1")  # the swarm keeps old tasks: reported once
    assert again == []


async def test_the_first_read_of_the_task_list_is_history_not_news():
    class Runtime:
        def __init__(self) -> None:
            self.tasks = [swarm_task("old", "failed")]

        async def task_list(self) -> list[dict]:
            return self.tasks

    rt = Runtime()
    watch = TaskWatch(rt, "p1")
    assert await watch.poll() == []  # failed before the monitor started
    rt.tasks = [*rt.tasks, swarm_task("new", "failed")]
    assert [e["Actor"]["Attributes"]["zaki.user"] for e in await watch.poll()] == ["u1"]
    assert await watch.poll() == []
