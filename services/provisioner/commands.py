"""The command handlers: ``instance.requested`` and the lifecycle commands (stop, start,
restart, update, upgrade, delete). One command per user at a time (a per-user lock)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from typing import Any

from services.provisioner import metrics
from services.provisioner.base import ProvisionError, Retry, S, log
from services.provisioner.lifecycle import Lifecycle
from services.provisioner.runtime import RuntimeError_
from services.provisioner.telegram import InvalidBotToken, TelegramUnavailable
from shared import subjects
from shared.events import (
    FailureReason,
    InstanceCommand,
    InstanceDelete,
    InstanceDeleted,
    InstanceRequested,
    InstanceStopped,
    InstanceUpdate,
    InstanceUpgrade,
)
from shared.gateway import container_name


class Commands(Lifecycle):
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
            "idle_suspend_s": ev.idle_suspend_s,  # None: ZAKI_IDLE_SUSPEND_S (services/waker)
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
        if cmd.idle_suspend_s is not None:  # the waker reads it: no restart either
            fields["idle_suspend_s"] = cmd.idle_suspend_s
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
