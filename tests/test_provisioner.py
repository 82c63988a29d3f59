"""The provisioner service as a process, driven by events, on real NATS, FerretDB and Docker."""

import asyncio
import stat
from pathlib import Path

import httpx
import pytest

from shared import subjects
from shared.events import (
    InstanceCommand,
    InstanceDelete,
    InstanceRequested,
    InstanceUpdate,
)
from shared.gateway import container_name, identity_headers
from tests.conftest import PLATFORM_ID, STANDIN_IMAGE, new_user


def request(fakes, user=None, image=None, **kw) -> InstanceRequested:
    return InstanceRequested(
        request_id=new_user("req"), user_id=user or new_user(), bot_token=fakes.bot(), image=image, **kw
    )


def containers_of(docker_client, user: str) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"zaki.user={user}"})


async def chat(port: int, user: str, text: str) -> str:
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers=identity_headers(user),
            json={"model": "openclaw", "messages": [{"role": "user", "content": text}]},
        )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.gateway
async def test_full_lifecycle_with_the_real_gateway(
    provisioner, platform, fakes, store, settings, docker_client
):
    ev = request(fakes)
    user = ev.user_id
    subject, ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=180)
    assert subject == subjects.INSTANCE_READY, ready
    assert (
        ready.host == "127.0.0.1"
        and ready.bot_username
        and set(ready.timings) >= {"config", "create", "ready"}
    )
    assert await chat(ready.port, user, "first words") == "echo: first words"

    # On disk: native config 0600 owned by the gateway's uid, seeded workspace.
    root = Path(settings.data_root) / "users" / user
    cfg = root / ".openclaw" / "openclaw.json"
    st = cfg.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 1000
    assert (root / "workspace" / "SOUL.md").exists()
    (root / "workspace" / "MEMORY.md").write_text("user's own memory")

    # In the store: only ciphertext.
    doc = await store.get_instance(user)
    assert doc["state"] == "running" and doc["bot_token_enc"].startswith("zk1.")
    assert ev.bot_token.get_secret_value() not in str(doc)

    # Update the model: config rewritten, gateway restarted, memory untouched.
    upd = InstanceUpdate(user_id=user, model="zaki/echo-2")
    subject, again = await platform.call(subjects.INSTANCE_UPDATE, upd, timeout=180)
    assert subject == subjects.INSTANCE_READY, again
    assert '"primary": "zaki/echo-2"' in cfg.read_text()
    assert (root / "workspace" / "MEMORY.md").read_text() == "user's own memory"
    assert await chat(again.port, user, "after update") == "echo: after update"

    subject, _ = await platform.call(subjects.INSTANCE_STOP, InstanceCommand(user_id=user), timeout=60)
    assert subject == subjects.INSTANCE_STOPPED
    assert containers_of(docker_client, user)[0].status == "exited"

    subject, started = await platform.call(
        subjects.INSTANCE_START, InstanceCommand(user_id=user), timeout=180
    )
    assert subject == subjects.INSTANCE_READY, started
    assert await chat(started.port, user, "back again") == "echo: back again"

    subject, deleted = await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=user), timeout=60)
    assert subject == subjects.INSTANCE_DELETED and deleted.purged is False
    assert containers_of(docker_client, user) == []
    assert await store.get_instance(user) is None
    assert await store.ports.count_documents({"user_id": user}) == 0
    assert not cfg.exists()  # the secrets went with the instance
    assert (root / "workspace" / "MEMORY.md").read_text() == "user's own memory"  # documented: kept


async def test_twenty_concurrent_requests_get_twenty_distinct_ports(
    provisioner, platform, fakes, docker_client
):
    events = [request(fakes, image=STANDIN_IMAGE) for _ in range(20)]
    outcomes = await asyncio.gather(
        *(platform.call(subjects.INSTANCE_REQUESTED, e, timeout=180) for e in events)
    )
    assert all(s == subjects.INSTANCE_READY for s, _ in outcomes), outcomes
    ports = [o.port for _, o in outcomes]
    assert len(set(ports)) == 20
    for e in events:
        assert len(containers_of(docker_client, e.user_id)) == 1
    await asyncio.gather(
        *(
            platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=e.user_id, purge=True))
            for e in events
        )
    )


async def test_duplicate_request_id_and_second_request_create_nothing_new(
    provisioner, platform, fakes, docker_client, store
):
    ev = request(fakes, image=STANDIN_IMAGE)
    fut = platform.expect(ev.request_id)
    await platform.send(subjects.INSTANCE_REQUESTED, ev)
    await platform.send(subjects.INSTANCE_REQUESTED, ev)  # the same request, twice
    subject, first = await platform.wait(ev.request_id, fut, timeout=120)
    assert subject == subjects.INSTANCE_READY
    # Another request for the same user: answered with the current state.
    other = ev.model_copy(update={"request_id": new_user("req"), "event_id": "x2"})
    subject, current = await platform.call(subjects.INSTANCE_REQUESTED, other, timeout=60)
    assert subject == subjects.INSTANCE_READY and current.port == first.port
    assert current.instance_id == first.instance_id
    await asyncio.sleep(1)
    assert len(containers_of(docker_client, ev.user_id)) == 1
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))


@pytest.mark.parametrize(
    ("user_id", "token", "reason"),
    [
        ("../../etc", None, "invalid_user_id"),
        ("", None, "invalid_user_id"),
        ("a" * 10_000, None, "invalid_user_id"),
        ("ok\x00user", None, "invalid_user_id"),
        ("okuser", "not-a-token", "invalid_bot_token"),
        ("okuser", "123456:" + "A" * 35, "invalid_bot_token"),  # well-formed, unknown to Telegram
    ],
)
async def test_invalid_input_is_refused_before_disk_or_docker(
    provisioner, platform, fakes, settings, docker_client, user_id, token, reason
):
    import json

    rid = new_user("req")
    if user_id == "okuser":
        user_id = new_user()
    body = {"request_id": rid, "user_id": user_id, "bot_token": token or fakes.bot()}
    fut = platform.expect(rid)
    await platform.send(subjects.INSTANCE_REQUESTED, json.dumps(body).encode())
    subject, failed = await platform.wait(rid, fut, timeout=30)
    assert subject == subjects.INSTANCE_FAILED and failed.reason == reason
    users_dir = Path(settings.data_root) / "users"
    if user_id:
        assert not (users_dir.exists() and any(user_id[:60] in p.name for p in users_dir.iterdir()))
    assert not (users_dir.parent / "etc").exists() and not Path(settings.data_root, "etc").exists()
    # Docker's name filter matches substrings ("zaki-user-" for an empty id matches everyone's):
    # the exact name must not exist.
    name = container_name(user_id[:60])
    found = docker_client.containers.list(all=True, sparse=True, filters={"name": name})
    assert [c for c in found if c.attrs.get("Names") == [f"/{name}"]] == []
    if token:
        assert token not in failed.model_dump_json()


async def test_commands_for_unknown_users_fail_cleanly(provisioner, platform):
    subject, failed = await platform.call(
        subjects.INSTANCE_STOP, InstanceCommand(user_id=new_user()), timeout=30
    )
    assert subject == subjects.INSTANCE_FAILED and failed.reason == "not_found"


async def test_reconcile_removes_orphans_and_recreates_missing_containers(
    provisioner, platform, fakes, docker_client, store
):
    ev = request(fakes, image=STANDIN_IMAGE)
    subject, _ready = await platform.call(subjects.INSTANCE_REQUESTED, ev, timeout=120)
    assert subject == subjects.INSTANCE_READY
    # A labelled container nobody recorded: an orphan from a crash.
    orphan_user = new_user("orph")
    docker_client.containers.run(
        STANDIN_IMAGE,
        name=container_name(orphan_user),
        labels={"zaki.managed": PLATFORM_ID, "zaki.user": orphan_user, "zaki.instance": "ghost"},
        detach=True,
    )
    # The running instance's container vanishes behind the platform's back.
    docker_client.containers.get(container_name(ev.user_id)).remove(force=True)

    async def converged():
        # sparse: no inspect per container, which races with the orphan being removed meanwhile.
        listed = docker_client.containers.list(all=True, sparse=True)
        names = {n.lstrip("/") for c in listed for n in c.attrs.get("Names") or []}
        doc = await store.get_instance(ev.user_id)
        return (
            container_name(orphan_user) not in names
            and container_name(ev.user_id) in names
            and doc["state"] == "running"
        )

    from tests.conftest import eventually

    await eventually(converged, timeout=60, interval=0.5)
    await platform.call(subjects.INSTANCE_DELETE, InstanceDelete(user_id=ev.user_id, purge=True))


def test_data_root_layout_is_documented():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "users/<user>/.openclaw/openclaw.json" in readme
