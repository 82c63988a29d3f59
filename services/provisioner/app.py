"""The provisioner's edges: JetStream consumers in, events out, Docker and MongoDB wired up.

One durable pull consumer per command subject (explicit acks), shared by every
replica. A malformed command is acked and copied, redacted, to the dead-letter
subject with its reason; a transient failure is redelivered with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import nats
from faststream import FastStream
from faststream.middlewares import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from services.provisioner import metrics
from services.provisioner.node_router import HOPS_HEADER, MAX_HOPS, TRIED_HEADER, NodeRouter
from services.provisioner.routing import command_of, durable_for, node_subject
from services.provisioner.runtime import DockerRuntime, GatewayRuntime
from services.provisioner.service import Provisioner, ProvisionError, Retry
from services.provisioner.telegram import TelegramClient
from shared import audit, subjects
from shared.bus import MalformedEvent, dead_letter_for, decode_event, ensure_streams, nats_servers, to_json
from shared.crypto import KeyRing
from shared.events import COMMAND_MODELS, Event, FailureReason, InstanceFailed, InstanceRequested
from shared.logging import redact
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.provisioner")

MAX_ATTEMPTS = 6
HEARTBEAT_S = 5.0

# Which field of instance.requested made it invalid -> the reason in instance.failed.
_FIELD_REASONS = {
    "user_id": FailureReason.INVALID_USER_ID,
    "bot_token": FailureReason.INVALID_BOT_TOKEN,
    "provider.base_url": FailureReason.INVALID_PROVIDER_URL,
}


@dataclass
class ProvisionerApp:
    settings: ZakiSettings
    broker: NatsBroker
    app: FastStream
    service: Provisioner | None = None
    store: Store | None = None
    router: NodeRouter | None = None  # one provisioner per swarm node (ZAKI_SWARM_NODE)
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def publish(self, subject: str, event: Event) -> None:
        await self.broker.publish(to_json(event), subject, stream=subjects.EVENT_STREAM)
        await audit.outcome(subject, event)  # every outcome in the audit trail (issue 17.4)

    async def notify(self, subject: str, data: bytes) -> None:
        await self.broker.publish(data, subject)  # core NATS: heard by every live subscriber

    async def dead_letter(self, subject: str, data: bytes, err: MalformedEvent) -> None:
        metrics.DEAD_LETTERS.labels(subject).inc()
        log.warning("dead-lettered a malformed event", extra={"subject": subject, "reason": err.reason})
        await self.broker.publish(
            to_json(dead_letter_for(subject, data, err)),
            subjects.dead_letter_subject(subject),
            stream=subjects.DEAD_LETTER_STREAM,
        )
        if subject == subjects.INSTANCE_REQUESTED:
            await self._fail_malformed_request(data, err)

    async def _fail_malformed_request(self, data: bytes, err: MalformedEvent) -> None:
        """Tells the requester why, when the request carries enough to address an answer."""
        import json

        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("request_id"), str):
            return
        reason = FailureReason.INVALID_REQUEST
        for fld, r in _FIELD_REASONS.items():
            if err.error.startswith(f"{fld}:") or f"; {fld}:" in err.error:
                reason = r
                break
        user = obj.get("user_id")
        await self.publish(
            subjects.INSTANCE_FAILED,
            InstanceFailed(
                request_id=redact(obj["request_id"][:128]),
                user_id=redact(user[:64]) if isinstance(user, str) else "",
                reason=reason,
                message=err.error[:1000],
            ),
        )

    async def handle(self, subject: str, msg: NatsMessage, forwarded: bool = False) -> None:
        """*forwarded*: taken from this replica's node subject, where another replica sent it (its
        audit entry is written). It runs here unless the user's gateway is on another node (a
        wrong or stale forward): then it goes there, at most MAX_HOPS times in all."""
        try:
            if subject not in COMMAND_MODELS:  # a node subject may carry any last token
                raise MalformedEvent("unknown_command", f"no command {subject.rsplit('.', 1)[-1]!r}")
            event = decode_event(COMMAND_MODELS[subject], msg.body)
        except MalformedEvent as err:
            await self.dead_letter(subject, msg.body, err)
            await msg.ack()
            return
        assert self.service is not None
        meta = msg.raw_message.metadata
        if (meta.num_delivered or 1) == 1 and not forwarded:
            await audit.command(subject, event)  # who asked, once per command (issue 17.4)
        admission: contextlib.AbstractAsyncContextManager[str | None] = contextlib.nullcontext()
        if self.router is not None:
            try:  # a header anyone may set: bounded, and a bad one ends the forwarding
                hops = min(max(int((msg.headers or {}).get(HOPS_HEADER, "0")[:3]), 0), MAX_HOPS)
            except ValueError:
                hops = MAX_HOPS
            tried = {n for n in (msg.headers or {}).get(TRIED_HEADER, "").split(",") if n}
            node, new = await self.router.target(subject, event.user_id, forwarded=forwarded)
            if node != self.router.here and hops < MAX_HOPS:
                await self.router.forward(node, subject, msg.body, meta.sequence.stream, hops + 1, tried)
                await msg.ack()
                return
            if new and hops < MAX_HOPS:  # chosen here, perhaps by two replicas at once
                admission = self.router.admit(tried)
        async with admission as elsewhere:
            if elsewhere is not None:
                assert self.router is not None
                here = self.router.here
                await self.router.forward(
                    elsewhere, subject, msg.body, meta.sequence.stream, hops + 1, tried | {here}
                )
                await msg.ack()
                return
            await self._run(subject, event, msg)

    async def _run(self, subject: str, event: Event, msg: NatsMessage) -> None:
        assert self.service is not None
        beat = asyncio.create_task(self._heartbeat(msg))
        attempt = msg.raw_message.metadata.num_delivered or 1
        try:
            if isinstance(event, InstanceRequested):
                await self.service.handle_requested(event)
            else:
                await self.service.handle_command(subject.rsplit(".", 1)[-1], event)  # type: ignore[arg-type]
        except Retry as e:
            await self._retry_or_fail(msg, event, attempt, FailureReason.TELEGRAM_UNREACHABLE, str(e))
            return
        except Exception as e:
            log.exception("command handler crashed", extra={"subject": subject, "attempt": attempt})
            await self._retry_or_fail(msg, event, attempt, FailureReason.INTERNAL, type(e).__name__)
            return
        finally:
            beat.cancel()
        await msg.ack()

    async def _retry_or_fail(
        self, msg: NatsMessage, event: Event, attempt: int, reason: FailureReason, text: str
    ):
        if attempt < MAX_ATTEMPTS:
            await msg.nack(delay=min(2.0**attempt, 60.0))
            return
        assert self.service is not None
        await self.service.fail(
            getattr(event, "request_id", ""), getattr(event, "user_id", ""), ProvisionError(reason, text)
        )
        await msg.ack()

    @staticmethod
    async def _heartbeat(msg: NatsMessage) -> None:
        # Long provisioning (a real gateway takes ~15 s) must not hit the ack deadline.
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                await asyncio.sleep(HEARTBEAT_S)
                await msg.in_progress()

    async def start(self) -> None:
        s = self.settings
        await ensure_streams(s.nats_url, s.stream_replicas)
        self.audit_nc = await nats.connect(nats_servers(s.nats_url), max_reconnect_attempts=-1)
        audit.install(self.audit_nc, s.audit_retention_days, s.stream_replicas)
        self.store = Store(s.mongo_url, s.mongo_db)
        await self.store.ensure_indexes()
        runtime = make_runtime(s)
        if s.swarm_node:
            js = self.audit_nc.jetstream()
            self.router = NodeRouter(s.swarm_node, self.store, runtime, js, s.gateway_memory)
        self.service = Provisioner(
            s,
            self.store,
            runtime,
            KeyRing.from_spec(s.secret_keys.get_secret_value()),
            TelegramClient(s.telegram_api_base, s.telegram_timeout_s),
            self.publish,
            self.notify,
        )
        self.service.nodes = self.router

    async def after_start(self) -> None:
        assert self.audit_nc is not None
        await self.audit_nc.subscribe(subjects.PROVIDER_CHANGED, cb=self._provider_changed)
        self.tasks.append(asyncio.create_task(self._reconcile_loop()))
        self.tasks.append(asyncio.create_task(self._consumer_stats_loop()))

    async def _provider_changed(self, msg: Msg) -> None:
        """``zaki providers update`` announces a change like a rotation: gateways using that
        provider get a hot-reloaded config (core NATS: a missed notice is caught up by the next
        start, restart or update, which write the config anyway)."""
        assert self.service is not None
        try:
            await self.service.provider_changed(msg.data.decode()[:64])
        except Exception:
            log.exception("rewriting configs after a provider change failed")

    async def _consumer_stats_loop(self, interval: float = 15.0) -> None:
        """Exports the command consumers' backlog and redeliveries for alerting."""
        nc = await nats.connect(nats_servers(self.settings.nats_url), max_reconnect_attempts=-1)
        js = nc.jetstream()
        try:
            while True:
                try:
                    for info in await js.consumers_info(subjects.COMMAND_STREAM):
                        name = info.name or ""
                        metrics.CONSUMER_PENDING.labels(name).set(info.num_pending or 0)
                        metrics.CONSUMER_REDELIVERED.labels(name).set(info.num_redelivered or 0)
                except Exception:
                    log.exception("reading consumer stats failed")
                await asyncio.sleep(interval)
        finally:
            await nc.close()

    async def _reconcile_loop(self) -> None:
        assert self.service is not None
        while True:
            try:
                actions = await self.service.reconcile()
                if any(actions.values()):
                    log.info("reconciled", extra=actions)
            except Exception:
                log.exception("reconcile failed")
            await asyncio.sleep(self.settings.reconcile_interval_s)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.service is not None:
            await self.service.close()
            await self.service.telegram.close()
        if self.store is not None:
            await self.store.close()
        if getattr(self, "audit_nc", None) is not None:
            await self.audit_nc.close()


def make_runtime(s: ZakiSettings) -> GatewayRuntime:
    """The runtime ZAKI_RUNTIME names: this Docker engine, or services on a Docker Swarm."""
    if s.runtime == "swarm":
        from services.provisioner.swarm_guard import guard_spec
        from services.provisioner.swarm_runtime import SwarmRuntime

        assert s.swarm_manager_url is not None  # the settings refuse a swarm without it
        return SwarmRuntime(
            s.swarm_manager_url,
            s.docker_host_id,
            s.platform_id,
            s.swarm_nodes(),
            s.swarm_proxy_address,
            guard=guard_spec(s),
            node=s.swarm_node,
        )
    return DockerRuntime(s.docker_host_id, s.docker_url, s.platform_id, settings=s)


def build_app(settings: ZakiSettings) -> ProvisionerApp:
    broker = NatsBroker(
        nats_servers(settings.nats_url),
        middlewares=[NatsPrometheusMiddleware(registry=REGISTRY, app_name="provisioner")],
        logger=logging.getLogger("zaki.provisioner.broker"),
        max_reconnect_attempts=-1,
    )
    app = FastStream(broker, logger=logging.getLogger("zaki.provisioner.app"))
    pa = ProvisionerApp(settings, broker, app)

    def handler_for(subject: str):
        # FastStream reads a handler's parameters as the message body: only `msg` here.
        async def handler(msg: NatsMessage) -> None:
            await pa.handle(subject, msg)

        return handler

    for subject in COMMAND_MODELS:
        kind = subject.rsplit(".", 1)[-1]
        broker.subscriber(
            subject,
            stream=JStream(name=subjects.COMMAND_STREAM, declare=False),
            # A durable push consumer with a queue group: replicas share the work.
            durable=f"{subjects.PROVISIONER_DURABLE}-{kind}",
            queue=f"{subjects.PROVISIONER_DURABLE}-{kind}",
            config=ConsumerConfig(ack_wait=20, max_ack_pending=256),
            ack_policy=AckPolicy.MANUAL,
            max_workers=8,
            title=f"provisioner:{kind}",
            description=f"Handles {subject} commands.",
        )(handler_for(subject))

    if settings.swarm_node:  # what the other replicas forward to this node
        node = settings.swarm_node

        async def node_handler(msg: NatsMessage) -> None:
            await pa.handle(command_of(msg.raw_message.subject), msg, forwarded=True)

        broker.subscriber(
            node_subject(node, "*"),
            stream=JStream(name=subjects.COMMAND_STREAM, declare=False),
            durable=durable_for(node),
            queue=durable_for(node),
            config=ConsumerConfig(ack_wait=20, max_ack_pending=256),
            ack_policy=AckPolicy.MANUAL,
            max_workers=8,
            title=f"provisioner:node:{node}",
            description=f"Commands for the gateways on node {node}.",
        )(node_handler)

    app.on_startup(pa.start)
    app.after_startup(pa.after_start)
    app.on_shutdown(pa.stop)
    return pa
