"""A small client for systems (and the ``zaki`` CLI) that drive the platform over NATS:
publish a command, then wait for its outcome event."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
from nats.aio.client import Client as NATS

from shared import subjects
from shared.bus import nats_servers, to_json
from shared.events import OUTCOME_MODELS, Event


class OutcomeTimeout(Exception):
    pass


class PlatformClient:
    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self._waiters: dict[str, asyncio.Future[tuple[str, Event]]] = {}
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._sub = None

    @classmethod
    async def connect(cls, url: str) -> PlatformClient:
        client = cls(await nats.connect(nats_servers(url), connect_timeout=5))
        # Core subscription: every outcome published to JetStream is also seen here, live.
        client._sub = await client.nc.subscribe(f"{subjects.PREFIX}.instance.>", cb=client._on_msg)
        return client

    async def _on_msg(self, msg) -> None:
        model = OUTCOME_MODELS.get(msg.subject)
        try:
            body = json.loads(msg.data)
        except ValueError:
            return
        self.seen.append((msg.subject, body))
        if model is None:
            return
        fut = self._waiters.get(body.get("request_id", ""))
        if fut is not None and not fut.done():
            fut.set_result((msg.subject, model.model_validate(body)))

    async def send(self, subject: str, event: Event | bytes) -> None:
        data = event if isinstance(event, bytes) else to_json(event)
        await self.js.publish(subject, data)

    async def call(self, subject: str, event: Event, timeout: float = 180.0) -> tuple[str, Event]:
        """Publishes a command and waits for the outcome with the same request id."""
        request_id = getattr(event, "request_id", None)
        if not request_id:
            raise ValueError("commands need a request_id to be awaited")
        fut = self.expect(request_id)
        await self.send(subject, event)
        return await self.wait(request_id, fut, timeout)

    def expect(self, request_id: str) -> asyncio.Future[tuple[str, Event]]:
        fut = self._waiters.get(request_id)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._waiters[request_id] = fut
        return fut

    async def wait(
        self, request_id: str, fut: asyncio.Future[tuple[str, Event]] | None = None, timeout: float = 180.0
    ) -> tuple[str, Event]:
        fut = fut or self.expect(request_id)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise OutcomeTimeout(f"no outcome for request {request_id} within {timeout:.0f} s") from None
        finally:
            if fut.done():
                self._waiters.pop(request_id, None)

    def events(self, subject_prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
        return [(s, b) for s, b in self.seen if s.startswith(subject_prefix)]

    async def close(self) -> None:
        await self.nc.close()
