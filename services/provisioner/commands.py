"""The command handlers: ``instance.requested`` and the lifecycle commands (stop, start,
restart, update, upgrade, delete). One command per user at a time (a per-user lock)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from typing import Any

from services.backup.hooks import before_change
from services.provisioner import metrics
from services.provisioner.base import ProvisionError, Retry, S, log
from services.provisioner.healing import HEALABLE
from services.provisioner.moves import Moves
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
    InstanceUpgradeRolledBack,
    StopReason,
)
from shared.gateway import container_name
from shared.logging import redact

# States from which a request, start or restart provisions the instance anew.
GIVEN_UP = (S.FAILED, S.CRASHLOOPING)


class Commands(Moves):
    async def handle_requested(self, ev: InstanceRequested) -> None:
        async with self._locks[ev.user_id]:
            try:
                await self._requested(ev)
            except ProvisionError as e:
                await self.fail(ev.request_id, ev.user_id, e)

    async def _requested(self, ev: InstanceRequested) -> None:
        seen = await self.store.claim_request(ev.request_id, ev.user_id, "requested")
        doc = await self.store.get_instance(ev.user_id)
        if doc is not None and doc.get("request_id") != ev.request_id and doc["state"] not in GIVEN_UP:
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
        await self._refuse_over_quota(ev.user_id)  # a data folder kept from an earlier instance

        slot = self.take_slot(ev.user_id, image) if doc is None else None
        try:
            await self._requested_provision(
                ev, doc, image, token, bot_username, slot.instance_id if slot else None
            )
        finally:
            await self.give_back(ev.user_id)  # a slot not used by now is discarded

    async def _requested_provision(
        self,
        ev: InstanceRequested,
        doc: dict[str, Any] | None,
        image: str,
        token: str,
        bot_username: str,
        instance_id: str | None,
    ) -> None:
        if doc is None:
            doc = await self.store.create_instance(
                ev.user_id,
                {
                    "instance_id": instance_id or uuid.uuid4().hex,
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
            "backup_interval_s": ev.backup_interval_s,  # None: ZAKI_BACKUP_INTERVAL_S (services/backup)
            "request_id": ev.request_id,
        }
        if ev.provider and ev.provider.api_key:
            fields["provider_key_enc"] = self.seal(
                ev.user_id, "provider_key", ev.provider.api_key.get_secret_value()
            )
        if doc["state"] in (S.REQUESTED, *GIVEN_UP):
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
            "move": self._move,
        }[kind]
        async with self._locks[cmd.user_id]:
            try:
                await self._refuse_while_restoring(kind, cmd.user_id)
                await handler(cmd)
                metrics.COMMANDS.labels(kind, "ok").inc()
            except ProvisionError as e:
                metrics.COMMANDS.labels(kind, "failed").inc()
                await self.fail(cmd.request_id, cmd.user_id, e)

    async def _stop(self, cmd: InstanceCommand) -> None:
        await self._stop_instance(cmd)

    async def _stop_instance(
        self, cmd: InstanceCommand, reason: StopReason | None = None, message: str = ""
    ) -> None:
        """A user's stop (*reason* None) or the platform's own (disk limits). Either way the
        platform never retries a stopped instance: ``heal`` is cleared."""
        doc = await self._existing(cmd)
        fields: dict[str, Any] = {"heal": None, "stop_reason": reason.value if reason else None}
        if reason is not None:
            fields["last_error"] = f"{reason.value}: {message}"[:600]
        if doc["state"] != S.STOPPED:
            if doc["state"] != S.STOPPING:
                doc = await self._transition(cmd.request_id, cmd.user_id, S.STOPPING, fields)
            try:
                await self.runtime.stop(container_name(cmd.user_id), self.s.stop_timeout_s)
            except RuntimeError_ as e:
                raise ProvisionError(FailureReason.DOCKER, str(e)) from None
            doc = await self._transition(cmd.request_id, cmd.user_id, S.STOPPED, fields)
        await self.publish(
            subjects.INSTANCE_STOPPED,
            InstanceStopped(
                request_id=cmd.request_id,
                user_id=cmd.user_id,
                instance_id=doc["instance_id"],
                reason=reason,
                message=message,
            ),
        )

    async def _start(self, cmd: InstanceCommand) -> None:
        doc = await self._existing(cmd)
        if doc["state"] == S.RUNNING:
            await self._answer_current(cmd.request_id, doc)
            return
        await self._refuse_over_quota(cmd.user_id)
        if doc["state"] in GIVEN_UP or not doc.get("port"):
            doc = await self._transition(cmd.request_id, cmd.user_id, S.PROVISIONING)
        await self._provision_and_start(doc, cmd.request_id)

    async def _restart(self, cmd: InstanceCommand, heal: bool | None = None) -> None:
        """*heal*: whether reconcile retries a failure (healing.py). By default, when the
        instance was running and the restart does not carry new input (an update)."""
        doc = await self._existing(cmd)
        if doc["state"] not in (S.RUNNING, S.STARTING, *GIVEN_UP):
            raise ProvisionError(
                FailureReason.ILLEGAL_TRANSITION, f"cannot restart an instance that is {doc['state']}"
            )
        if heal is None:
            heal = doc["state"] in (S.RUNNING, S.STARTING) and not isinstance(cmd, InstanceUpdate)
        log.info("restarting", extra={"user_id": cmd.user_id, "reason": cmd.reason or ""})
        if doc["state"] == S.RUNNING:
            doc = await self._transition(cmd.request_id, cmd.user_id, S.STARTING)
        try:
            await self.runtime.stop(container_name(cmd.user_id), self.s.stop_timeout_s)
        except RuntimeError_ as e:
            raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        if doc["state"] in GIVEN_UP or not doc.get("port"):
            doc = await self._transition(cmd.request_id, cmd.user_id, S.PROVISIONING)
        await self._provision_and_start(doc, cmd.request_id, heal=heal)

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
        if cmd.backup_interval_s is not None:  # the backup service reads it
            fields["backup_interval_s"] = cmd.backup_interval_s
        await self.store.update_instance(cmd.user_id, fields, doc["instance_id"])
        if not gateway_changed:
            await self._answer_unchanged(cmd.request_id, {**doc, **fields})
            return
        if doc["state"] in (S.RUNNING, S.STARTING, *GIVEN_UP):
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
        await before_change(self, doc, "pre_upgrade")  # services/backup: nothing changes if it fails
        good = doc.get("last_good_image") or doc.get("image") or self.s.gateway_image
        await self.store.update_instance(cmd.user_id, {"image": cmd.image}, doc["instance_id"])
        if doc["state"] not in (S.RUNNING, S.STARTING, *GIVEN_UP):
            return  # stopped: the new image is used on the next start
        try:
            # A new image needs a new container (create() replaces one whose image differs);
            # the data folder carries over. Its failure is not healed: the old image is.
            await self._restart(cmd, heal=False)
        except ProvisionError as e:
            if e.reason not in HEALABLE or good == cmd.image:
                raise
            current = await self.store.get_instance(cmd.user_id)
            if current is None or current["state"] != S.FAILED:
                raise  # it failed before the new container was tried: nothing to roll back
            await self._roll_back(cmd, doc["instance_id"], good, e)

    async def _roll_back(
        self, cmd: InstanceUpgrade, instance_id: str, good: str, err: ProvisionError
    ) -> None:
        """The new image missed readiness (the record is failed, its container removed): the
        last good image goes back on the record and starts again, healed like any running
        instance if even that fails."""
        log.warning(
            "upgrade rolled back",
            extra={"user_id": cmd.user_id, "image": cmd.image, "reason": err.reason.value},
        )
        metrics.COMMANDS.labels("upgrade", "rolled_back").inc()
        doc = await self._transition(
            cmd.request_id, cmd.user_id, S.PROVISIONING, {"image": good}, instance_id=instance_id
        )
        await self.publish(
            subjects.INSTANCE_UPGRADE_ROLLED_BACK,
            InstanceUpgradeRolledBack(
                request_id=cmd.request_id,
                user_id=cmd.user_id,
                instance_id=instance_id,
                failed_image=cmd.image,
                image=good,
                reason=err.reason,
                message=redact(str(err))[:1000],
                logs=[redact(line)[:500] for line in err.logs[-20:]],
            ),
        )
        await self._provision_and_start(doc, cmd.request_id, heal=True)

    async def _delete(self, cmd: InstanceCommand) -> None:
        purge = isinstance(cmd, InstanceDelete) and cmd.purge
        doc = await self._existing(cmd)
        if doc["state"] != S.DELETING:
            await before_change(self, doc, "pre_delete")  # restorable for ZAKI_DELETE_GRACE_DAYS
            doc = await self._transition(cmd.request_id, cmd.user_id, S.DELETING)
        await self._revoke_credentials(cmd.user_id)
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

    async def _revoke_credentials(self, user_id: str) -> None:
        """A deleted instance takes its user's API keys and dashboard sessions with it, so a
        user id created again later inherits nothing. Proxies drop the keys from their caches
        on the same notice as ``zaki keys revoke`` sends."""
        key_ids = await self.store.revoke_user_keys(user_id)
        sessions = await self.store.revoke_user_sessions(user_id)
        for key_id in key_ids:
            await self.notify(subjects.APIKEY_REVOKED, key_id.encode())
        if key_ids or sessions:
            log.info(
                "credentials revoked with the instance",
                extra={"user_id": user_id, "api_keys": len(key_ids), "sessions": sessions},
            )

    async def provider_changed(self, name: str) -> int:
        """The platform's provider changed (``zaki providers update``: API kind, model list).
        Every gateway of this Docker host that uses it gets its config rewritten, which OpenClaw
        hot-reloads (``models.*``): no restart. Users with their own provider are not touched.
        Returns how many configs were rewritten."""
        if name != self.s.llm_provider_name:
            return 0  # gateways are configured with the platform's default provider only
        live = (S.RUNNING, S.STARTING, S.STOPPED, S.SUSPENDED)
        rewritten = 0
        for doc in await self.store.list_instances(states=list(live), docker_host=self.runtime.host_id):
            if doc.get("provider"):
                continue
            async with self._locks[doc["_id"]]:
                fresh = await self.store.get_instance(doc["_id"])
                if fresh is None or fresh["state"] not in live or fresh.get("provider"):
                    continue
                try:
                    await self._write_config(fresh, fresh.get("gateway_ip") or "")
                except ProvisionError as e:
                    log.error("config not rewritten", extra={"user_id": fresh["_id"], "error": str(e)})
                    continue
                rewritten += 1
        log.info("provider changed: configs rewritten", extra={"provider": name, "instances": rewritten})
        return rewritten
