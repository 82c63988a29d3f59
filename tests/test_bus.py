"""JetStream on a real nats-server: durable delivery, redelivery, dead letters."""

import asyncio
import json

import nats
import pytest
from nats.js.api import ConsumerConfig

from shared import subjects
from shared.bus import ensure_streams, to_json
from shared.events import DeadLetter, InstanceRequested
from tests.conftest import eventually, new_bot_token, new_user
from zaki.stack import Stack


@pytest.fixture
async def lone_nats(tmp_path):
    """A private NATS server: work-queue streams allow only one consumer per subject."""
    s = Stack(tmp_path / "nats")
    p = s.start_nats()
    await ensure_streams(p.address)
    nc = await nats.connect(p.address)
    yield nc
    await nc.close()
    s.stop()


async def test_durable_delivery_redelivery_and_work_queue_retention(lone_nats):
    js = lone_nats.jetstream()
    ev = InstanceRequested(request_id="r1", user_id="alice", bot_token=new_bot_token())
    await js.publish(subjects.INSTANCE_REQUESTED, to_json(ev))
    sub = await js.pull_subscribe(
        subjects.INSTANCE_REQUESTED, durable="test-provisioner", config=ConsumerConfig(ack_wait=1.0)
    )
    (first,) = await sub.fetch(1, timeout=5)
    assert InstanceRequested.model_validate_json(first.data).request_id == "r1"
    assert first.metadata.num_delivered == 1
    # Not acked: delivered again after ack_wait, to the same durable consumer.
    await asyncio.sleep(1.5)
    (again,) = await sub.fetch(1, timeout=5)
    assert again.metadata.num_delivered == 2 and again.data == first.data
    await again.ack_sync()
    # Work-queue retention: once handled, the bot token is no longer stored on the server.
    info = await js.stream_info(subjects.COMMAND_STREAM)
    assert info.state.messages == 0


async def test_ensure_streams_is_idempotent(lone_nats):
    await ensure_streams(lone_nats.connected_url.geturl())
    info = await lone_nats.jetstream().stream_info(subjects.COMMAND_STREAM)
    # The commands, and the node subjects one provisioner per swarm node takes forwards from.
    assert set(info.config.subjects) == {*subjects.COMMANDS, subjects.NODE_COMMANDS}


async def test_malformed_events_go_to_dead_letter_with_reason(provisioner, platform):
    js = platform.js
    dead: list[DeadLetter] = []

    async def on_dead(msg):
        dead.append(DeadLetter.model_validate_json(msg.data))

    sub = await platform.nc.subscribe(f"{subjects.DEAD_LETTER}.>", cb=on_dead)
    token = new_bot_token()
    rid = new_user("req")
    await js.publish(subjects.INSTANCE_REQUESTED, b"{not json")
    await js.publish(subjects.INSTANCE_STOP, json.dumps({"user_id": "a/../../etc"}).encode())
    await js.publish(
        subjects.INSTANCE_REQUESTED,
        json.dumps({"request_id": rid, "user_id": "../../etc", "bot_token": token}).encode(),
    )
    await js.publish(
        subjects.INSTANCE_REQUESTED,
        json.dumps({"request_id": "v9", "user_id": "bob", "bot_token": token, "schema_version": 9}).encode(),
    )
    await eventually(lambda: len(dead) >= 4, timeout=30)
    await sub.unsubscribe()
    reasons = {(d.subject, d.reason) for d in dead}
    assert (subjects.INSTANCE_REQUESTED, "not_json") in reasons
    assert (subjects.INSTANCE_STOP, "invalid_schema") in reasons
    assert (subjects.INSTANCE_REQUESTED, "unsupported_version") in reasons
    traversal = next(
        d for d in dead if "../../etc" in d.payload_excerpt and d.subject == subjects.INSTANCE_REQUESTED
    )
    assert "user_id" in traversal.error
    # The dead letter keeps the evidence but never the secret.
    assert all(token not in d.model_dump_json() for d in dead)
    # The requester is told why, with a typed reason.
    failed = await eventually(
        lambda: [b for s, b in platform.events(subjects.INSTANCE_FAILED) if b["request_id"] == rid],
        timeout=10,
    )
    assert failed[0]["reason"] == "invalid_user_id"
    # Every malformed message was acked: nothing waits in the command stream.
    await eventually(
        lambda: _stream_empty(js),
        timeout=10,
    )


async def _stream_empty(js) -> bool:
    return (await js.stream_info(subjects.COMMAND_STREAM)).state.messages == 0
