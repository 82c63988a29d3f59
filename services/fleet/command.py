"""One ``instance.upgrade`` command of a rollout, and how the runner learns its end.

The outcome event is the fast path, but not the only one: an outcome published while the
runner's NATS connection was down (a NATS restart mid-wave) is gone, and a stopped or
suspended instance gets none at all (the provisioner only puts the image on its record). So
while it waits the runner also reads the record (``plan.settled``), and the command itself is
published with ``Nats-Msg-Id`` = its request id: a publish retried across a NATS restart, or
the same request asked again by ``resume`` within the stream's duplicate window, is stored
once, so the provisioner does the upgrade once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.fleet.plan import RECORDED, settled
from shared import subjects
from shared.bus import to_json
from shared.client import OutcomeTimeout, PlatformClient
from shared.events import Event, InstanceUpgrade
from shared.store import Store

log = logging.getLogger("zaki.fleet")

POLL_S = 1.0


async def _publish(client: PlatformClient, cmd: InstanceUpgrade, deadline: float) -> None:
    """Publishes until JetStream acknowledges it (NATS may be restarting) or *deadline*."""
    while True:
        try:
            await client.js.publish(
                subjects.INSTANCE_UPGRADE,
                to_json(cmd),
                timeout=5,
                headers={"Nats-Msg-Id": f"fleet-upgrade-{cmd.request_id}"},
            )
            return
        except Exception as e:  # no connection, no responders, no ack: NATS is not back yet
            if time.monotonic() >= deadline:
                raise OutcomeTimeout(f"upgrade of {cmd.user_id} not accepted: {type(e).__name__}") from None
            log.info(
                "upgrade command not accepted yet", extra={"user_id": cmd.user_id, "error": type(e).__name__}
            )
            await asyncio.sleep(POLL_S)


async def upgrade(
    client: PlatformClient, store: Store, cmd: InstanceUpgrade, timeout: float
) -> tuple[str, Event | None]:
    """Sends *cmd*; returns its outcome ``(subject, event)``, or what the record shows once it
    settled: ``(instance.ready, None)`` running and ready on the image, ``(RECORDED, None)``
    parked with the image on its record. Raises ``OutcomeTimeout`` after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    fut = client.expect(cmd.request_id)
    try:
        await _publish(client, cmd, deadline)
        while True:
            try:
                return await client.wait(cmd.request_id, fut, timeout=POLL_S)
            except OutcomeTimeout:
                pass
            record = await store.get_instance(cmd.user_id)
            end = settled(record, cmd.image)
            if end is not None:
                return (subjects.INSTANCE_READY if end != RECORDED else RECORDED), None
            if time.monotonic() >= deadline:
                raise OutcomeTimeout(f"no outcome for the upgrade of {cmd.user_id} within {timeout:.0f} s")
    finally:
        fut.cancel()  # a parked instance's never comes: no waiter left behind
