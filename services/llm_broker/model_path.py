"""Model-path health: can an instance's own gateway call its models?

The broker refuses a valid credential that arrives from outside its instance's network
(``wrong_network``). When such a call comes from inside the platform's tenant pool, the
gateway itself is (almost surely) on a network its record does not name: a stale network,
a platform restored from an older database. Every model call then fails while the
gateway's readiness probe still answers, so the monitor must hear of it.

The broker notes every source-checked call here (one dict lookup when nothing changed);
on a change (refused / ok again) it records the instance's state in the store's
``model_path`` collection (``Store.model_path``) and publishes an event. The monitor reads the collection and
keeps the instance unhealthy (``model_path_refused``) until a call passes again or its
container starts afresh.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from services.llm_broker.directory import BrokerClient
from shared import subjects
from shared.store import Store

log = logging.getLogger("zaki.broker")

# Core NATS (not persisted: the store holds the state) + ".<user>".
MODEL_PATH_SUBJECT = f"{subjects.PREFIX}.instance.model_path"
REFUSED, OK = "refused", "ok"
# A state this process recorded is written again after this long: another broker process,
# or the monitor (which drops a mark when the container starts afresh), may have changed it.
RECHECK_S = 30.0


class ModelPath:
    def __init__(self) -> None:
        self.store: Store | None = None  # None: not attached (notes are ignored)
        self.nc: Any = None
        self.pool: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
        self.known: dict[str, tuple[str, float]] = {}  # user -> (last state recorded here, when)
        self.tasks: set[asyncio.Task] = set()

    def attach(self, store: Store, nc: Any, network_pool: str) -> None:
        self.store, self.nc = store, nc
        self.pool = ipaddress.ip_network(network_pool) if network_pool else None

    def note(self, client: BrokerClient, source: str | None, refused: bool) -> None:
        """Called for every source-checked call; cheap unless the state changes."""
        if self.store is None:
            return
        if refused and not self._from_pool(source):
            return  # a copied credential used elsewhere says nothing about the gateway
        state = REFUSED if refused else OK
        now = time.monotonic()
        last = self.known.get(client.user_id)
        if last is not None and last[0] == state and now - last[1] < RECHECK_S:
            return
        self.known[client.user_id] = (state, now)
        if len(self.known) > 100_000:
            self.known = {client.user_id: (state, now)}
        task = asyncio.get_running_loop().create_task(self._record(client, state, source))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _from_pool(self, source: str | None) -> bool:
        try:
            return self.pool is None or ipaddress.ip_address(source or "") in self.pool
        except ValueError:
            return False

    async def _record(self, client: BrokerClient, state: str, source: str | None) -> None:
        assert self.store is not None
        marks = self.store.model_path
        try:
            now = datetime.now(UTC)
            if state == OK:
                # Only a refused mark of this instance changes; an ok user has no document.
                before = await marks.find_one_and_delete({"_id": client.user_id, "state": REFUSED})
                if before is None:
                    return
            else:
                before = await marks.find_one_and_update(
                    {"_id": client.user_id},
                    {
                        "$set": {
                            "instance_id": client.instance_id,
                            "state": REFUSED,
                            "source": source,
                            "subnet": str(client.subnet) if client.subnet else None,
                            "last_at": now,
                        },
                        "$setOnInsert": {"since": now},
                    },
                    upsert=True,
                )
                if before is not None and before.get("state") == REFUSED:
                    return  # another broker process already said so
            log.warning(
                "model path changed", extra={"user_id": client.user_id, "state": state, "source": source}
            )
            if self.nc is not None:
                body = {
                    "user_id": client.user_id,
                    "instance_id": client.instance_id,
                    "state": state,
                    "source": source,
                    "subnet": str(client.subnet) if client.subnet else None,
                    "at": now.isoformat(),
                }
                await self.nc.publish(f"{MODEL_PATH_SUBJECT}.{client.user_id}", json.dumps(body).encode())
        except Exception:
            self.known.pop(client.user_id, None)  # try again on the next call
            log.exception("could not record the model path", extra={"user_id": client.user_id})


TRACKER = ModelPath()
note = TRACKER.note
