"""What every part of the provisioner shares: its errors, its dependencies and the small
helpers around the instance record (sealing secrets, transitions, outcome events).

The provisioner is split by concern into layers that build on this one:
``lifecycle`` (config, create, start, readiness, cleanup), ``commands`` (the command
handlers) and ``reconcile`` (Docker brought in line with the records, self-healing,
capacity); ``service.Provisioner`` is the whole.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from docker.utils import parse_bytes

from services.provisioner import metrics
from services.provisioner.config import UserDirs, user_dirs
from services.provisioner.runtime import GatewayRuntime
from services.provisioner.telegram import TelegramClient
from shared import subjects
from shared.crypto import KeyRing, instance_secret_context
from shared.events import Event, FailureReason, InstanceCommand, InstanceFailed, InstanceReady
from shared.logging import redact
from shared.probe import AioProber
from shared.settings import ZakiSettings
from shared.state import IllegalTransition, InstanceState
from shared.store import Store, utcnow

log = logging.getLogger("zaki.provisioner")
S = InstanceState

Publish = Callable[[str, Event], Awaitable[None]]
# Core NATS, not persisted: notices every live process must hear now (a revoked API key).
Notify = Callable[[str, bytes], Awaitable[None]]


async def _no_notify(subject: str, data: bytes) -> None:
    return None


def restore_blocks(kind: str, doc: dict[str, Any] | None, now: datetime) -> bool:
    """Whether a command of *kind* must wait for a restore in progress (see Store.claim_restore)."""
    until = (doc or {}).get("restoring_until")
    return kind != "stop" and until is not None and until > now


class ProvisionError(Exception):
    """Ends a command with ``instance.failed``."""

    def __init__(self, reason: FailureReason, message: str, logs: list[str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.logs = logs or []


class Retry(Exception):
    """A transient failure: the command should be redelivered later."""


@dataclass
class Phase:
    timings: dict[str, float]
    name: str

    def __enter__(self) -> Phase:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.t0
        self.timings[self.name] = round(elapsed, 3)
        metrics.PHASE_SECONDS.labels(self.name).observe(elapsed)


def _bytes(size: str) -> int:
    """Docker-style sizes (2g, 1536m, 512k or bytes), read as the runtimes read them."""
    return parse_bytes(size.strip())


_ctx = instance_secret_context


class ProvisionerBase:
    def __init__(
        self,
        settings: ZakiSettings,
        store: Store,
        runtime: GatewayRuntime,
        keyring: KeyRing,
        telegram: TelegramClient,
        publish: Publish,
        notify: Notify = _no_notify,
    ) -> None:
        self.s = settings
        self.store = store
        self.runtime = runtime
        self.keys = keyring
        self.telegram = telegram
        self.publish = publish
        self.notify = notify
        self.prober: AioProber | None = None  # made on first use, inside the event loop
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def close(self) -> None:
        if self.prober is not None:
            await self.prober.close()

    def seal(self, user_id: str, field: str, value: str) -> str:
        return self.keys.encrypt(value, _ctx(user_id, field))

    def unseal(self, user_id: str, field: str, sealed: str) -> str:
        value = self.keys.decrypt(sealed, _ctx(user_id, field))
        redact.register(value)
        return value

    async def fail(self, request_id: str, user_id: str, err: ProvisionError) -> None:
        metrics.REQUESTS.labels("failed", err.reason.value).inc()
        log.warning(
            "command failed", extra={"user_id": user_id, "request_id": request_id, "reason": err.reason.value}
        )
        await self.publish(
            subjects.INSTANCE_FAILED,
            InstanceFailed(
                request_id=request_id,
                user_id=user_id[:64],
                reason=err.reason,
                message=redact(str(err))[:1000],
                logs=[redact(line)[:500] for line in err.logs[-20:]],
            ),
        )

    def subnet_for(self, port: int, pool_slot: bool = False) -> str | None:
        """Each instance's network gets its own small subnet, indexed by its port (unique per
        Docker host), so networks never collide and never exhaust Docker's default pools. A
        pool slot's comes from the second half, so that the user who claims the slot can have
        the subnet of its port while the slot's network still holds the container."""
        if not self.s.network_pool:
            return None
        pool = ipaddress.ip_network(self.s.network_pool)
        index = port - self.s.port_range_start
        if pool_slot:
            index += self.s.port_range_end - self.s.port_range_start + 1
        size = 2 ** (32 - self.s.network_prefix)
        if index < 0 or (index + 1) * size > pool.num_addresses:
            raise ProvisionError(FailureReason.NO_PORT, f"network pool {pool} too small for port {port}")
        return f"{pool.network_address + index * size}/{self.s.network_prefix}"

    def _dirs(self, user_id: str) -> UserDirs:
        return user_dirs(self.s.data_root, user_id)

    def _ready_event(self, doc: dict[str, Any], request_id: str, timings: dict[str, float]) -> InstanceReady:
        return InstanceReady(
            request_id=request_id,
            user_id=doc["_id"],
            instance_id=doc["instance_id"],
            docker_host=doc["docker_host"],
            host=doc["host"],
            port=doc["port"],
            bot_username=doc.get("bot_username"),
            image=doc["image"],
            timings=timings,
        )

    async def _answer_current(self, request_id: str, doc: dict[str, Any]) -> None:
        state = doc["state"]
        if state == S.RUNNING:
            await self.publish(subjects.INSTANCE_READY, self._ready_event(doc, request_id, {}))
        elif state in (S.REQUESTED, S.PROVISIONING, S.STARTING):
            log.info("request joins an instance in progress", extra={"user_id": doc["_id"], "state": state})
        else:
            await self.fail(
                request_id,
                doc["_id"],
                ProvisionError(
                    FailureReason.ILLEGAL_TRANSITION, f"the user already has an instance in state {state}"
                ),
            )

    async def _transition(
        self,
        request_id: str,
        user_id: str,
        target: InstanceState,
        fields: dict[str, Any] | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        try:
            return await self.store.transition(user_id, target, set_fields=fields, **kw)
        except IllegalTransition as e:
            raise ProvisionError(FailureReason.ILLEGAL_TRANSITION, str(e)) from None

    async def _refuse_while_restoring(self, kind: str, user_id: str) -> None:
        """Called under the user's lock: a command that would start, change or delete the
        gateway while its folder is being swapped by a restore is refused (the restore's own
        stop goes through; it releases its claim before its own start)."""
        doc = await self.store.get_instance(user_id)
        if restore_blocks(kind, doc, utcnow()):
            raise ProvisionError(
                FailureReason.RESTORING, "a restore of this agent's data is in progress; retry shortly"
            )
        if kind != "move" and doc is not None and doc.get("move"):  # its folder is a backup in transit
            raise ProvisionError(
                FailureReason.RESTORING, "this agent is moving to another node; retry shortly"
            )

    async def _existing(self, cmd: InstanceCommand) -> dict[str, Any]:
        doc = await self.store.get_instance(cmd.user_id)
        if doc is None:
            raise ProvisionError(FailureReason.NOT_FOUND, f"no instance for user {cmd.user_id}")
        return doc
