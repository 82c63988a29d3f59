"""Bringing one gateway up: its config and secrets on disk, its network and port, its
container, its readiness; and, when that fails, leaving nothing behind.

Every step is idempotent and recorded in the instance record, so a redelivered command
after a crash picks up where the last attempt stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import Any

from services.provisioner import metrics
from services.provisioner.base import Phase, ProvisionerBase, ProvisionError, S, _bytes, log, restore_blocks
from services.provisioner.config import (
    BOOT_ENV,
    GatewaySpec,
    Provider,
    gateway_env,
    prepare_user_dirs,
    render_openclaw_config,
    write_config_atomically,
)
from services.provisioner.healing import HEALABLE, next_heal
from services.provisioner.quota import Usage, measure
from services.provisioner.runtime import ContainerSpec, RuntimeError_
from shared import subjects
from shared.crypto import credential_hash, new_broker_credential
from shared.events import FailureReason, ProviderSettings
from shared.gateway import CONTAINER_STATE_DIR, CONTAINER_WORKSPACE, container_name, network_name
from shared.logging import redact
from shared.probe import AioProber, ProbeResult
from shared.state import IllegalTransition
from shared.store import NoPortAvailable, utcnow


class Lifecycle(ProvisionerBase):
    async def _provider(self, doc: dict[str, Any], credential: str) -> Provider:
        """The provider as this gateway sees it: the LLM broker's address and the instance's
        broker credential. The real provider key (the platform's, or the user's own) stays
        with the broker."""
        p = doc.get("provider")
        if p:
            # Not re-validated: the gateway needs only name, api and models. A stored base_url
            # that today's rules refuse (an older record, tighter settings) must not keep the
            # gateway (and its Telegram channel) down; the broker refuses its calls with a reason.
            own = ProviderSettings.model_construct(**p)
            name, api, models = own.name, own.api, tuple(own.models)
        else:
            name = self.s.llm_provider_name
            stored = await self.store.get_provider(name)
            api = (stored or {}).get("api") or self.s.llm_api
            extra = (stored or {}).get("models") or [m for m in self.s.llm_models.split(",") if m.strip()]
            models = (self.s.default_model.split("/", 1)[-1], *(m.strip() for m in extra))
        base_url = f"{self.s.broker_url_for_gateways.rstrip('/')}/p/{name}"
        return Provider(name, base_url, api, credential, models)

    async def _gateway_spec(
        self,
        doc: dict[str, Any],
        gateway_ip: str,
        password: str,
        credential: str,
        bot_token: str,
        telegram_enabled: bool = True,
    ) -> GatewaySpec:
        """What goes into the gateway's openclaw.json (a pool slot's too: no bot token)."""
        model = doc.get("model") or self.s.default_model
        provider = await self._provider(doc, credential)
        if "/" not in model:
            model = f"{provider.name}/{model}"
        tg_root = self.s.telegram_api_base_for_gateways or self.s.telegram_api_base
        return GatewaySpec(
            user_id=doc["_id"],
            bot_token=bot_token,
            model=model,
            provider=provider,
            trusted_proxy_ip=gateway_ip,
            password=password,
            allowed_origins=tuple(self.s.proxy_public_origins()),
            telegram_api_root=None if tg_root.rstrip("/") == "https://api.telegram.org" else tg_root,
            telegram_allow_from=tuple(doc.get("telegram_allow_from") or ()),
            telegram_private_network=self.s.telegram_private_network,
            plugins=self.s.gateway_plugin_ids(),
            dreaming=self.s.gateway_dreaming,
            telegram_enabled=telegram_enabled,
        )

    async def _write_config(
        self, doc: dict[str, Any], gateway_ip: str, telegram_enabled: bool = True
    ) -> dict[str, Any]:
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
        bot_token = self.unseal(user_id, "bot_token", doc["bot_token_enc"])
        spec = await self._gateway_spec(doc, gateway_ip, password, credential, bot_token, telegram_enabled)
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
            env={**gateway_env(), **BOOT_ENV, **self._heap_cap()},
            memory=self.s.gateway_memory,
            cpus=self.s.gateway_cpus,
            pids_limit=self.s.gateway_pids_limit,
        )

    def _heap_cap(self) -> dict[str, str]:
        """V8 grows its heap until the kernel OOM-kills the whole container; capped below the
        memory limit, a leak ends in a clean heap-exhaustion exit that Docker restarts."""
        mib = int(_bytes(self.s.gateway_memory) * self.s.gateway_heap_ratio) >> 20
        return {"NODE_OPTIONS": f"--max-old-space-size={mib}"} if mib > 0 else {}

    async def disk_usage(self, user_id: str) -> Usage | None:
        """The tenant's data folder against its limits; None when no limit is set."""
        if not (self.s.tenant_disk_bytes or self.s.tenant_max_files):
            return None
        root = self._dirs(user_id).root
        return await asyncio.to_thread(measure, root, self.s.tenant_disk_bytes, self.s.tenant_max_files)

    async def _refuse_over_quota(self, user_id: str) -> None:
        usage = await self.disk_usage(user_id)
        if usage is not None and usage.over:
            raise ProvisionError(
                FailureReason.DISK_QUOTA,
                f"{usage.over}: not started; free space in the workspace or ask the operator",
            )

    async def _provision_and_start(self, doc: dict[str, Any], request_id: str, heal: bool = False) -> None:
        """Port, network, config, container, readiness. On failure the container is removed, the
        port freed and the record marked failed; *heal* (the instance was running and fails on the
        platform's side) lets reconcile retry it, and is kept across retries; otherwise it is cleared."""
        user_id = doc["_id"]
        # Every way to a running gateway passes here (a command, a re-request, reconcile's
        # heal and re-create): none while a restore is swapping the folder.
        if restore_blocks("start", doc, utcnow()):
            raise ProvisionError(
                FailureReason.RESTORING, "a restore of this agent's data is in progress; retry shortly"
            )
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
                if not heal:
                    fields["heal"] = None
            if doc["state"] != S.STARTING:
                doc = await self._transition(request_id, user_id, S.STARTING, fields)
            else:
                await self.store.update_instance(user_id, fields, doc["instance_id"])
            await self._create_and_run(doc, request_id, timings)
        except ProvisionError as e:
            await self._cleanup_failed(user_id, doc.get("instance_id"), e, heal)
            raise
        except RuntimeError_ as e:
            err = ProvisionError(FailureReason.DOCKER, str(e))
            await self._cleanup_failed(user_id, doc.get("instance_id"), err, heal)
            raise err from None
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
        await self._mark_running(doc, request_id, cid, spec.image)

    async def _mark_running(self, doc: dict[str, Any], request_id: str, cid: str, image: str) -> None:
        doc.update(
            await self._transition(
                request_id,
                doc["_id"],
                S.RUNNING,
                # The image that got ready is what an upgrade rolls back to.
                {
                    "container_id": cid,
                    # Where it answers: this engine's publish address, or its Swarm node.
                    "host": await self.runtime.address(container_name(doc["_id"])),
                    "last_error": None,
                    "last_good_image": image,
                    "stop_reason": None,
                    "auto_attempt_at": None,
                },
            )
        )

    async def _probe(self, port: int, user_id: str, path: str) -> ProbeResult:
        """One probe of a gateway on this host, as *user_id* (the prober is made on first use)."""
        if self.prober is None:
            self.prober = AioProber(concurrency=64)
        host = await self.runtime.address(container_name(user_id))
        return await self.prober.probe(host, port, user_id, path, timeout=2.0)

    async def wait_ready(self, user_id: str, port: int, name: str) -> None:
        deadline = time.monotonic() + self.s.readiness_timeout_s
        delay = 0.25
        first = await self.runtime.status(name)
        while True:
            result = await self._probe(port, user_id, "/readyz")
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

    async def _cleanup_failed(
        self, user_id: str, instance_id: str | None, err: ProvisionError, heal: bool = False
    ) -> None:
        """Leaves no running orphan: removes the container, frees the port, marks the record
        failed; with *heal*, when and how often reconcile retries it (see healing.py)."""
        try:
            await self.runtime.remove(container_name(user_id))
        except RuntimeError_:
            log.exception("could not remove a failed container", extra={"user_id": user_id})
        await self.store.release_port(self.runtime.host_id, user_id)
        fields: dict[str, Any] = {
            "last_error": f"{err.reason.value}: {redact(str(err))[:500]}",
            "auto_attempt_at": None,
        }
        if heal and err.reason in HEALABLE:
            current = await self.store.get_instance(user_id)
            fields["heal"] = next_heal((current or {}).get("heal"), err.reason, utcnow(), self.s)
        else:
            fields["heal"] = None
        with contextlib.suppress(IllegalTransition):
            await self.store.transition(
                user_id, S.FAILED, instance_id=instance_id, set_fields=fields, unset_fields=["port"]
            )
