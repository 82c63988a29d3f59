"""The provisioner's domain logic: events in, gateways and outcomes out.

Every step is idempotent and recorded in the instance record, so a redelivered
command after a crash picks up where the last attempt stopped. The runtime is the
only thing that touches Docker; the store's conditional updates are the only way
an instance changes state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.provisioner import metrics
from services.provisioner.config import (
    GatewaySpec,
    Provider,
    UserDirs,
    prepare_user_dirs,
    render_openclaw_config,
    user_dirs,
    write_config_atomically,
)
from services.provisioner.runtime import ContainerSpec, GatewayRuntime, RuntimeError_
from services.provisioner.telegram import InvalidBotToken, TelegramClient, TelegramUnavailable
from shared import subjects
from shared.crypto import KeyRing, credential_hash, instance_secret_context, new_broker_credential
from shared.events import (
    Event,
    FailureReason,
    InstanceCommand,
    InstanceDelete,
    InstanceDeleted,
    InstanceFailed,
    InstanceReady,
    InstanceRequested,
    InstanceStopped,
    InstanceUpdate,
    InstanceUpgrade,
    ProviderSettings,
)
from shared.gateway import CONTAINER_STATE_DIR, CONTAINER_WORKSPACE, container_name, network_name
from shared.logging import redact
from shared.probe import AioProber
from shared.settings import ZakiSettings
from shared.state import IllegalTransition, InstanceState
from shared.store import NoPortAvailable, Store

log = logging.getLogger("zaki.provisioner")
S = InstanceState

Publish = Callable[[str, Event], Awaitable[None]]


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
    """Docker-style sizes: 2g, 1536m, 512k or bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    size = size.strip().lower()
    return int(float(size[:-1]) * units[size[-1]]) if size[-1:] in units else int(size)


_ctx = instance_secret_context


class Provisioner:
    def __init__(
        self,
        settings: ZakiSettings,
        store: Store,
        runtime: GatewayRuntime,
        keyring: KeyRing,
        telegram: TelegramClient,
        publish: Publish,
    ) -> None:
        self.s = settings
        self.store = store
        self.runtime = runtime
        self.keys = keyring
        self.telegram = telegram
        self.publish = publish
        self.prober: AioProber | None = None  # made on first use, inside the event loop
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def close(self) -> None:
        if self.prober is not None:
            await self.prober.close()

    # --- helpers -------------------------------------------------------------------------------

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

    def subnet_for(self, port: int) -> str | None:
        """Each instance's network gets its own small subnet, indexed by its port (unique per
        Docker host), so networks never collide and never exhaust Docker's default pools."""
        if not self.s.network_pool:
            return None
        pool = ipaddress.ip_network(self.s.network_pool)
        index = port - self.s.port_range_start
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

    # --- instance.requested ------------------------------------------------------------------

    async def handle_requested(self, ev: InstanceRequested) -> None:
        async with self._locks[ev.user_id]:
            try:
                await self._requested(ev)
            except ProvisionError as e:
                await self.fail(ev.request_id, ev.user_id, e)

    async def _requested(self, ev: InstanceRequested) -> None:
        seen = await self.store.claim_request(ev.request_id, ev.user_id, "requested")
        doc = await self.store.get_instance(ev.user_id)
        if doc is not None and doc.get("request_id") != ev.request_id and doc["state"] != S.FAILED:
            # A second request for a user who already has an instance: answer with what exists.
            # (A failed instance is provisioned again: that is what a new request asks for.)
            await self._answer_current(ev.request_id, doc)
            return
        if doc is not None and (
            doc["state"] == S.RUNNING or (seen and seen.get("outcome") and doc["state"] == S.FAILED)
        ):
            # Already done (perhaps a crash came between `running` and the outcome): answer, do not redo.
            await self._answer_current(ev.request_id, doc)
            await self.store.set_request_outcome(ev.request_id, {"state": doc["state"]})
            return

        image = ev.image or self.s.gateway_image
        if image not in self.s.images():
            raise ProvisionError(
                FailureReason.INVALID_REQUEST, f"image {image} is not allowed on this platform"
            )
        # Check the token before anything touches disk or Docker.
        token = ev.bot_token.get_secret_value()
        try:
            bot_username = await self.telegram.get_me(token)
        except InvalidBotToken as e:
            raise ProvisionError(FailureReason.INVALID_BOT_TOKEN, str(e)) from None
        except TelegramUnavailable as e:
            raise Retry(str(e)) from None

        if doc is None:
            doc = await self.store.create_instance(
                ev.user_id,
                {
                    "instance_id": uuid.uuid4().hex,
                    "request_id": ev.request_id,
                    "docker_host": self.runtime.host_id,
                    "host": self.s.gateway_publish_ip,
                    "image": image,
                },
            )
            if doc is None:  # lost a race with another replica
                current = await self.store.get_instance(ev.user_id)
                if current is not None:
                    await self._answer_current(ev.request_id, current)
                return
        fields = {
            "bot_token_enc": self.seal(ev.user_id, "bot_token", token),
            "bot_username": bot_username,
            "model": ev.model or self.s.default_model,
            "provider": ev.provider.model_dump(exclude={"api_key"}) if ev.provider else None,
            "telegram_allow_from": list(ev.telegram_allow_from),
            "budget": ev.budget.model_dump(exclude_none=True) if ev.budget else None,
            "request_id": ev.request_id,
        }
        if ev.provider and ev.provider.api_key:
            fields["provider_key_enc"] = self.seal(
                ev.user_id, "provider_key", ev.provider.api_key.get_secret_value()
            )
        if doc["state"] in (S.REQUESTED, S.FAILED):
            doc = await self._transition(ev.request_id, ev.user_id, S.PROVISIONING, fields)
        else:
            await self.store.update_instance(ev.user_id, fields, doc["instance_id"])
            doc = {**doc, **fields}
        await self._provision_and_start(doc, ev.request_id)

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

    async def _provider(self, doc: dict[str, Any], credential: str) -> Provider:
        """The provider as this gateway sees it: the LLM broker's address and the instance's
        broker credential. The real provider key (the platform's, or the user's own) stays
        with the broker."""
        p = doc.get("provider")
        if p:
            own = ProviderSettings.model_validate(p)
            name, api, models = own.name, own.api, tuple(own.models)
        else:
            name = self.s.llm_provider_name
            stored = await self.store.get_provider(name)
            api = (stored or {}).get("api") or self.s.llm_api
            extra = (stored or {}).get("models") or [m for m in self.s.llm_models.split(",") if m.strip()]
            models = (self.s.default_model.split("/", 1)[-1], *(m.strip() for m in extra))
        base_url = f"{self.s.broker_url_for_gateways.rstrip('/')}/p/{name}"
        return Provider(name, base_url, api, credential, models)

    async def _write_config(self, doc: dict[str, Any], gateway_ip: str) -> dict[str, Any]:
        """Renders and writes the native config; returns the fields to record."""
        user_id = doc["_id"]
        fields: dict[str, Any] = {}
        if doc.get("gateway_password_enc"):
            password = self.unseal(user_id, "gateway_password", doc["gateway_password_enc"])
        else:
            password = secrets.token_urlsafe(32)
            redact.register(password)
            fields["gateway_password_enc"] = self.seal(user_id, "gateway_password", password)
        if doc.get("broker_key_enc"):
            credential = self.unseal(user_id, "broker_key", doc["broker_key_enc"])
        else:
            credential = new_broker_credential()
            redact.register(credential)
            fields["broker_key_enc"] = self.seal(user_id, "broker_key", credential)
            fields["broker_key_hash"] = credential_hash(credential)
        model = doc.get("model") or self.s.default_model
        provider = await self._provider(doc, credential)
        if "/" not in model:
            model = f"{provider.name}/{model}"
        tg_root = self.s.telegram_api_base_for_gateways or self.s.telegram_api_base
        spec = GatewaySpec(
            user_id=user_id,
            bot_token=self.unseal(user_id, "bot_token", doc["bot_token_enc"]),
            model=model,
            provider=provider,
            trusted_proxy_ip=gateway_ip,
            password=password,
            allowed_origins=tuple(self.s.proxy_public_origins()),
            telegram_api_root=None if tg_root.rstrip("/") == "https://api.telegram.org" else tg_root,
            telegram_allow_from=tuple(doc.get("telegram_allow_from") or ()),
            telegram_private_network=self.s.telegram_private_network,
        )
        dirs = self._dirs(user_id)
        try:
            await asyncio.to_thread(prepare_user_dirs, dirs)
            await asyncio.to_thread(write_config_atomically, dirs.config, render_openclaw_config(spec))
        except OSError as e:
            raise ProvisionError(
                FailureReason.DISK, f"cannot write the gateway config: {e.strerror}"
            ) from None
        fields["gateway_ip"] = gateway_ip
        # The broker only honours this instance's credential from inside this network.
        fields["subnet"] = self.subnet_for(doc["port"]) if doc.get("port") else None
        return fields

    def _container_spec(self, doc: dict[str, Any]) -> ContainerSpec:
        dirs = self._dirs(doc["_id"])
        return ContainerSpec(
            user_id=doc["_id"],
            instance_id=doc["instance_id"],
            image=doc.get("image") or self.s.gateway_image,
            host_port=doc["port"],
            publish_ip=self.s.gateway_publish_ip,
            network=network_name(doc["_id"]),
            binds={str(dirs.state): CONTAINER_STATE_DIR, str(dirs.workspace): CONTAINER_WORKSPACE},
            env={
                "HOME": "/home/node",
                "OPENCLAW_HOME": "/home/node",
                "OPENCLAW_STATE_DIR": CONTAINER_STATE_DIR,
                "OPENCLAW_CONFIG_PATH": f"{CONTAINER_STATE_DIR}/openclaw.json",
                "OPENCLAW_WORKSPACE_DIR": CONTAINER_WORKSPACE,
                "XDG_CACHE_HOME": f"{CONTAINER_STATE_DIR}/cache",
            },
            memory=self.s.gateway_memory,
            cpus=self.s.gateway_cpus,
            pids_limit=self.s.gateway_pids_limit,
        )

    async def _provision_and_start(self, doc: dict[str, Any], request_id: str) -> None:
        user_id = doc["_id"]
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        try:
            with Phase(timings, "config"):
                if not doc.get("port"):
                    try:
                        port = await self.store.allocate_port(
                            self.runtime.host_id,
                            user_id,
                            self.s.port_range_start,
                            self.s.port_range_end,
                            self.runtime.port_is_free,
                        )
                    except NoPortAvailable as e:
                        raise ProvisionError(FailureReason.NO_PORT, str(e)) from None
                    await self.store.update_instance(user_id, {"port": port}, doc["instance_id"])
                    doc["port"] = port
                gateway_ip = await self.runtime.ensure_network(user_id, self.subnet_for(doc["port"]))
                fields = await self._write_config(doc, gateway_ip)
            if doc["state"] != S.STARTING:
                doc = await self._transition(request_id, user_id, S.STARTING, fields)
            else:
                await self.store.update_instance(user_id, fields, doc["instance_id"])
            await self._create_and_run(doc, request_id, timings)
        except ProvisionError:
            await self._cleanup_failed(user_id, doc.get("instance_id"), str(request_id))
            raise
        except RuntimeError_ as e:
            await self._cleanup_failed(user_id, doc.get("instance_id"), str(request_id))
            raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        timings["total"] = round(time.perf_counter() - t_start, 3)
        metrics.REQUESTS.labels("ready", "").inc()
        await self.publish(subjects.INSTANCE_READY, self._ready_event(doc, request_id, timings))
        await self.store.set_request_outcome(request_id, {"state": S.RUNNING.value})

    async def _create_and_run(self, doc: dict[str, Any], request_id: str, timings: dict[str, float]) -> None:
        spec = self._container_spec(doc)
        with Phase(timings, "create"):
            cid = await self.runtime.create(spec)
        with Phase(timings, "start"):
            status = await self.runtime.status(spec.name)
            if not status.running:
                await self.runtime.start(spec.name)
        with Phase(timings, "ready"):
            await self.wait_ready(doc["_id"], doc["port"], spec.name)
        doc.update(
            await self._transition(
                request_id, doc["_id"], S.RUNNING, {"container_id": cid, "last_error": None}
            )
        )

    async def wait_ready(self, user_id: str, port: int, name: str) -> None:
        deadline = time.monotonic() + self.s.readiness_timeout_s
        delay = 0.25
        first = await self.runtime.status(name)
        while True:
            if self.prober is None:
                self.prober = AioProber(concurrency=64)
            result = await self.prober.probe(self.s.gateway_publish_ip, port, user_id, "/readyz", timeout=2.0)
            if result.ok:
                return
            status = await self.runtime.status(name)
            if status.exists and status.exit_code == 78 and status.state in ("exited", "restarting"):
                raise ProvisionError(
                    FailureReason.GATEWAY_NOT_READY,
                    "the gateway refused its config (exit 78)",
                    await self.runtime.logs(name, 30),
                )
            if status.restart_count - first.restart_count >= 3:
                raise ProvisionError(
                    FailureReason.GATEWAY_NOT_READY,
                    f"the gateway keeps exiting (exit code {status.exit_code}, OOM killed: {status.oom_killed})",
                    await self.runtime.logs(name, 30),
                )
            if time.monotonic() >= deadline:
                raise ProvisionError(
                    FailureReason.GATEWAY_NOT_READY,
                    f"gateway not ready after {self.s.readiness_timeout_s:.0f} s (last probe: {result.error})",
                    await self.runtime.logs(name, 30),
                )
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)  # a local probe is cheap; being late to notice is not

    async def _cleanup_failed(self, user_id: str, instance_id: str | None, reason: str) -> None:
        """Leaves no running orphan: removes the container, frees the port, marks the record failed."""
        try:
            await self.runtime.remove(container_name(user_id))
        except RuntimeError_:
            log.exception("could not remove a failed container", extra={"user_id": user_id})
        await self.store.release_port(self.runtime.host_id, user_id)
        with contextlib.suppress(IllegalTransition):
            await self.store.transition(
                user_id,
                S.FAILED,
                instance_id=instance_id,
                set_fields={"last_error": reason},
                unset_fields=["port"],
            )

    # --- lifecycle commands --------------------------------------------------------------------

    async def _existing(self, cmd: InstanceCommand) -> dict[str, Any]:
        doc = await self.store.get_instance(cmd.user_id)
        if doc is None:
            raise ProvisionError(FailureReason.NOT_FOUND, f"no instance for user {cmd.user_id}")
        return doc

    async def handle_command(self, kind: str, cmd: InstanceCommand) -> None:
        handler = {
            "stop": self._stop,
            "start": self._start,
            "restart": self._restart,
            "delete": self._delete,
            "update": self._update,
            "upgrade": self._upgrade,
        }[kind]
        async with self._locks[cmd.user_id]:
            try:
                await handler(cmd)
                metrics.COMMANDS.labels(kind, "ok").inc()
            except ProvisionError as e:
                metrics.COMMANDS.labels(kind, "failed").inc()
                await self.fail(cmd.request_id, cmd.user_id, e)

    async def _stop(self, cmd: InstanceCommand) -> None:
        doc = await self._existing(cmd)
        if doc["state"] != S.STOPPED:
            if doc["state"] != S.STOPPING:
                doc = await self._transition(cmd.request_id, cmd.user_id, S.STOPPING)
            try:
                await self.runtime.stop(container_name(cmd.user_id), self.s.stop_timeout_s)
            except RuntimeError_ as e:
                raise ProvisionError(FailureReason.DOCKER, str(e)) from None
            doc = await self._transition(cmd.request_id, cmd.user_id, S.STOPPED)
        await self.publish(
            subjects.INSTANCE_STOPPED,
            InstanceStopped(request_id=cmd.request_id, user_id=cmd.user_id, instance_id=doc["instance_id"]),
        )

    async def _start(self, cmd: InstanceCommand) -> None:
        doc = await self._existing(cmd)
        if doc["state"] == S.RUNNING:
            await self._answer_current(cmd.request_id, doc)
            return
        if doc["state"] == S.FAILED or not doc.get("port"):
            doc = await self._transition(cmd.request_id, cmd.user_id, S.PROVISIONING)
        await self._provision_and_start(doc, cmd.request_id)

    async def _restart(self, cmd: InstanceCommand) -> None:
        doc = await self._existing(cmd)
        if doc["state"] not in (S.RUNNING, S.STARTING, S.FAILED):
            raise ProvisionError(
                FailureReason.ILLEGAL_TRANSITION, f"cannot restart an instance that is {doc['state']}"
            )
        log.info("restarting", extra={"user_id": cmd.user_id, "reason": cmd.reason or ""})
        if doc["state"] == S.RUNNING:
            doc = await self._transition(cmd.request_id, cmd.user_id, S.STARTING)
        try:
            await self.runtime.stop(container_name(cmd.user_id), self.s.stop_timeout_s)
        except RuntimeError_ as e:
            raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        if doc["state"] == S.FAILED or not doc.get("port"):
            doc = await self._transition(cmd.request_id, cmd.user_id, S.PROVISIONING)
        await self._provision_and_start(doc, cmd.request_id)

    async def _update(self, cmd: InstanceCommand) -> None:
        assert isinstance(cmd, InstanceUpdate)
        doc = await self._existing(cmd)
        fields: dict[str, Any] = {}
        if cmd.bot_token is not None:
            token = cmd.bot_token.get_secret_value()
            try:
                fields["bot_username"] = await self.telegram.get_me(token)
            except InvalidBotToken as e:
                raise ProvisionError(FailureReason.INVALID_BOT_TOKEN, str(e)) from None
            except TelegramUnavailable as e:
                raise Retry(str(e)) from None
            fields["bot_token_enc"] = self.seal(cmd.user_id, "bot_token", token)
        if cmd.model is not None:
            fields["model"] = cmd.model
        if cmd.provider is not None:
            fields["provider"] = cmd.provider.model_dump(exclude={"api_key"})
            if cmd.provider.api_key:
                fields["provider_key_enc"] = self.seal(
                    cmd.user_id, "provider_key", cmd.provider.api_key.get_secret_value()
                )
        gateway_changed = bool(fields)
        if cmd.budget is not None:
            # The broker enforces budgets: no config change, no restart.
            fields["budget"] = cmd.budget.model_dump(exclude_none=True)
        await self.store.update_instance(cmd.user_id, fields, doc["instance_id"])
        if not gateway_changed:
            if doc["state"] == S.STOPPED:
                await self.publish(
                    subjects.INSTANCE_STOPPED,
                    InstanceStopped(
                        request_id=cmd.request_id, user_id=cmd.user_id, instance_id=doc["instance_id"]
                    ),
                )
            else:
                await self._answer_current(cmd.request_id, {**doc, **fields})
            return
        if doc["state"] in (S.RUNNING, S.STARTING, S.FAILED):
            await self._restart(cmd)
        else:  # stopped: the new config is used on the next start
            await self._write_config({**doc, **fields}, doc.get("gateway_ip") or "")

    async def _upgrade(self, cmd: InstanceCommand) -> None:
        assert isinstance(cmd, InstanceUpgrade)
        if cmd.image not in self.s.images():
            raise ProvisionError(
                FailureReason.INVALID_REQUEST, f"image {cmd.image} is not allowed on this platform"
            )
        doc = await self._existing(cmd)
        await self.store.update_instance(cmd.user_id, {"image": cmd.image}, doc["instance_id"])
        if doc["state"] in (S.RUNNING, S.STARTING, S.FAILED):
            # A new image needs a new container (create() replaces one whose image differs);
            # the data folder carries over.
            await self._restart(cmd)

    async def _delete(self, cmd: InstanceCommand) -> None:
        purge = isinstance(cmd, InstanceDelete) and cmd.purge
        doc = await self._existing(cmd)
        if doc["state"] != S.DELETING:
            doc = await self._transition(cmd.request_id, cmd.user_id, S.DELETING)
        try:
            await self.runtime.remove(container_name(cmd.user_id))
            await self.runtime.remove_network(cmd.user_id)
        except RuntimeError_ as e:
            raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        await self.store.release_port(self.runtime.host_id, cmd.user_id)
        dirs = self._dirs(cmd.user_id)
        # The gateway's config holds its secrets: it never outlives the instance.
        for name in ("openclaw.json", "openclaw.json.last-good"):
            (dirs.state / name).unlink(missing_ok=True)
        if purge:
            await asyncio.to_thread(shutil.rmtree, dirs.root, True)
        await self.store.remove_instance(cmd.user_id, doc["instance_id"])
        await self.publish(
            subjects.INSTANCE_DELETED,
            InstanceDeleted(
                request_id=cmd.request_id, user_id=cmd.user_id, instance_id=doc["instance_id"], purged=purge
            ),
        )

    # --- reconcile -----------------------------------------------------------------------------

    async def reconcile(self) -> dict[str, int]:
        """Brings Docker in line with the records of this Docker host. Safe to run concurrently."""
        actions = {"removed_orphan": 0, "recreated": 0}
        records = {d["_id"]: d for d in await self.store.list_instances(docker_host=self.runtime.host_id)}
        for c in await self.runtime.list_managed():
            doc = records.get(c.user_id or "")
            if doc is None or doc.get("instance_id") != c.instance_id or doc["state"] == S.DELETING:
                if doc is not None and doc["state"] in (S.REQUESTED, S.PROVISIONING, S.STARTING):
                    continue  # being provisioned right now
                log.info("removing orphan container", extra={"container": c.name})
                await self.runtime.remove(c.name)
                actions["removed_orphan"] += 1
        containers = {c.name: c for c in await self.runtime.list_managed()}
        for user_id, doc in records.items():
            if doc["state"] == S.RUNNING and container_name(user_id) not in containers:
                async with self._locks[user_id]:
                    log.info("recreating a missing container", extra={"user_id": user_id})
                    cmd = InstanceCommand(user_id=user_id, reason="reconcile: container missing")
                    try:
                        await self._transition(cmd.request_id, user_id, S.STARTING)
                        fresh = await self.store.get_instance(user_id)
                        if fresh is not None:
                            await self._provision_and_start(fresh, cmd.request_id)
                            actions["recreated"] += 1
                    except ProvisionError as e:
                        await self.fail(cmd.request_id, user_id, e)
        for action, n in actions.items():
            metrics.RECONCILE_ACTIONS.labels(action).inc(n)
        by_state = {s.value: 0 for s in InstanceState}
        for doc in await self.store.list_instances(docker_host=self.runtime.host_id):
            by_state[doc["state"]] = by_state.get(doc["state"], 0) + 1
        for state, n in by_state.items():
            metrics.INSTANCES.labels(state).set(n)
        await self._capacity_metrics(sum(by_state.values()) - by_state[S.DELETED.value])
        return actions

    async def _capacity_metrics(self, instances: int) -> None:
        """Docker host capacity (ports, memory) and store latency, for the infrastructure dashboard."""
        metrics.PORTS_CAPACITY.set(self.s.port_range_end - self.s.port_range_start + 1)
        metrics.PORTS_USED.set(await self.store.ports.count_documents({"docker_host": self.runtime.host_id}))
        with contextlib.suppress(Exception):
            metrics.HOST_MEMORY.set(await self.runtime.memory_total())
        metrics.MEMORY_RESERVED.set(instances * _bytes(self.s.gateway_memory))
        t0 = time.perf_counter()
        await self.store.ping()
        metrics.STORE_PING.set(time.perf_counter() - t0)


SECRET_FIELDS = ("bot_token", "gateway_password", "provider_key", "broker_key")


async def rotate_instance_secrets(store: Store, keyring: KeyRing) -> int:
    """Re-encrypts every instance secret under the primary key; returns how many records changed.

    Each record is rewritten on its own (a versioned single-document write), so running
    gateways are untouched and a concurrent provisioner never loses an update.
    """
    changed = 0
    for doc in await store.list_instances():
        fields = {}
        for name in SECRET_FIELDS:
            sealed = doc.get(f"{name}_enc")
            if sealed:
                new = keyring.reseal(sealed, _ctx(doc["_id"], name))
                if new is not None:
                    fields[f"{name}_enc"] = new
        if fields and await store.update_instance(doc["_id"], fields, doc["instance_id"]):
            changed += 1
    return changed
