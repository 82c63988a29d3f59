"""Pre-started gateways for new users (issue 16.5).

A cold start is OpenClaw's whole boot (13-17 s here). With ``ZAKI_POOL_SIZE`` > 0 the
provisioner keeps that many gateways booted under slot identities (``pool.<hex>``: a port,
network and data folder of their own, a config without a Telegram channel and with a model
credential the broker does not know). A new user's request claims one:

1. the slot's port passes to the user in the store, its data folder is renamed to the user's
   (a symlink under the old name keeps Docker's own restarts of this container on the right
   folder until it is re-created), and the user's config is written over the slot's: OpenClaw
   hot-reloads identity, trusted proxy, Telegram and provider without a restart;
2. the container joins the user's network, leaves (and removes) the slot's, and takes the
   user's container name (``runtime.hand_over``);
3. it is running once it answers the user's identity on ``/v1/models`` and ``/readyz``.

The slot keeps its internal ``gateway.auth.password`` (a changed one restarts the gateway).
Its first deliberate restart (a stop and start, a wake, an upgrade) re-creates the container
on the user's own paths (``runtime._matches``). Anything that goes wrong before the hand-over
discards the slot and falls back to a cold start. Only new users are served: a wake needs
the user's own folder mounted, which is fixed when a container is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docker.errors import NotFound

from services.provisioner import metrics
from services.provisioner.base import Phase, ProvisionError, log
from services.provisioner.config import prepare_user_dirs, render_openclaw_config, write_config_atomically
from services.provisioner.lifecycle import Lifecycle
from services.provisioner.runtime import ContainerStatus, RuntimeError_
from shared.events import FailureReason
from shared.gateway import POOL_PREFIX, container_name, is_pool_slot
from shared.store import NoPortAvailable

SLOT_CPU_SHARES = 256  # against Docker's default 1024: a refill boot yields to users' gateways


@dataclass(frozen=True)
class Slot:
    slot_id: str
    instance_id: str  # the container's instance label: the claiming user's record takes it
    image: str


class Pooled(Lifecycle):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool_ready: dict[str, Slot] = {}
        self._claims: dict[str, Slot] = {}  # user id -> the slot its request took
        self._portless: dict[str, float] = {}  # slot id -> when first seen without its port
        self._pool_task: asyncio.Task | None = None
        self._refill_after = 0.0  # monotonic time before which no new slot starts

    # --- claiming -------------------------------------------------------------------------------

    def take_slot(self, user_id: str, image: str) -> Slot | None:
        """A ready slot for a new user of *image*, or None (no pool, another image, or a data
        folder kept from an earlier instance, which must be mounted as it is)."""
        if not self._pool_ready or image != self.s.gateway_image or self._users_dir(user_id).exists():
            return None
        slot_id = next(iter(self._pool_ready))
        slot = self._pool_ready.pop(slot_id)
        metrics.POOL_READY.set(len(self._pool_ready))
        self._claims[user_id] = slot
        return slot

    async def give_back(self, user_id: str) -> None:
        """The request did not get as far as using its slot. The slot is discarded, not given
        back: a record may already carry its instance id."""
        slot = self._claims.pop(user_id, None)
        if slot is not None:
            await self._discard(slot)

    async def _provision_and_start(self, doc: dict[str, Any], request_id: str, heal: bool = False) -> None:
        user_id = doc["_id"]
        slot = self._claims.get(user_id)
        if slot is None or slot.instance_id != doc["instance_id"] or doc.get("port"):
            self._claims.pop(user_id, None)
            return await super()._provision_and_start(doc, request_id, heal)
        try:
            await self._adopt(slot, doc)
        except (OSError, ProvisionError, RuntimeError_, KeyError, ValueError) as e:
            log.warning("pool slot not usable, starting cold", extra={"user_id": user_id, "error": str(e)})
            self._claims.pop(user_id, None)
            metrics.POOL_CLAIMS.labels("fallback").inc()
            await self._discard(slot)
            doc.pop("port", None)
            return await super()._provision_and_start(doc, request_id, heal)
        try:
            await super()._provision_and_start(doc, request_id, heal)
        finally:
            if self._claims.pop(user_id, None) is not None:  # failed before the hand-over
                await self._discard(slot)
            self.kick_pool()

    async def _adopt(self, slot: Slot, doc: dict[str, Any]) -> None:
        """The slot's port, password and data folder become the user's."""
        user_id = doc["_id"]
        slot_dir, user_dir = self._users_dir(slot.slot_id), self._users_dir(user_id)
        config = json.loads(await asyncio.to_thread((slot_dir / ".openclaw" / "openclaw.json").read_text))
        password = config["gateway"]["auth"]["password"]
        if user_dir.exists():
            raise ValueError("the user already has a data folder")
        port = await self.store.transfer_port(self.runtime.host_id, slot.slot_id, user_id)
        if port is None:
            raise ValueError("the slot has no port")
        await asyncio.to_thread(_move_folder, slot_dir, user_dir)
        fields = {"port": port, "gateway_password_enc": self.seal(user_id, "gateway_password", password)}
        await self.store.update_instance(user_id, fields, doc["instance_id"])
        doc.update(fields)

    async def _create_and_run(self, doc: dict[str, Any], request_id: str, timings: dict[str, float]) -> None:
        user_id = doc["_id"]
        slot = self._claims.get(user_id)
        if slot is None:
            return await super()._create_and_run(doc, request_id, timings)
        try:
            with Phase(timings, "claim"):
                await self.runtime.hand_over(slot.slot_id, user_id)
                # Claimed until renamed: maintenance must not take it for a surplus or stray slot.
                self._claims.pop(user_id, None)
                await self._wait_claimed(user_id, doc["port"])
            status = await self.runtime.status(container_name(user_id))
        except (RuntimeError_, ProvisionError, NotFound) as e:
            self._claims.pop(user_id, None)
            log.warning("pool claim failed, starting cold", extra={"user_id": user_id, "error": str(e)})
            metrics.POOL_CLAIMS.labels("fallback").inc()
            await self.runtime.remove(container_name(user_id))
            await self._discard(slot)
            return await super()._create_and_run(doc, request_id, timings)
        metrics.POOL_CLAIMS.labels("claimed").inc()
        self._refill_after = time.monotonic() + self.s.pool_refill_delay_s
        asyncio.get_running_loop().call_later(self.s.pool_refill_delay_s, self.kick_pool)
        log.info("claimed a pool slot", extra={"user_id": user_id, "slot": slot.slot_id})
        await self._mark_running(doc, request_id, status.container_id or "", slot.image)

    async def _wait_claimed(self, user_id: str, port: int) -> None:
        """Until the gateway serves the user (its config reloaded, its port on the user's
        network) and is ready (its channels started)."""
        deadline = time.monotonic() + self.s.readiness_timeout_s
        last = None
        while time.monotonic() < deadline:
            last = await self._probe(port, user_id, "/v1/models")
            if last.ok:
                last = await self._probe(port, user_id, "/readyz")
                if last.ok:
                    return
            await asyncio.sleep(0.1)
        raise ProvisionError(
            FailureReason.GATEWAY_NOT_READY, f"claimed gateway not serving its user (last probe: {last})"
        )

    # --- keeping the pool full ------------------------------------------------------------------

    async def close(self) -> None:
        if self._pool_task is not None:
            self._pool_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pool_task
        await super().close()

    def kick_pool(self) -> None:
        """Starts a maintenance pass unless one is running."""
        if self._pool_task is None or self._pool_task.done():
            self._pool_task = asyncio.create_task(self._maintain_pool_logged())

    async def _maintain_pool_logged(self) -> None:
        try:
            await self.maintain_pool()
        except Exception:
            log.exception("pool maintenance failed")

    async def maintain_pool(self) -> None:
        """Discards dead, surplus and outdated slots, adopts ready ones (after a restart of this
        provisioner), starts new ones up to ZAKI_POOL_SIZE, and removes leftovers."""
        # One maintainer per Docker host (several provisioner replicas may share it): the others
        # hold no ready slots, so their new users start cold.
        ttl = max(3 * self.s.reconcile_interval_s, 30.0)
        if not await self.store.hold_lease(f"pool:{self.runtime.host_id}", self.s.replica_id, ttl):
            self._pool_ready.clear()
            metrics.POOL_READY.set(0)
            return
        containers = await self.runtime.list_managed()
        alive = 0
        portless: dict[str, float] = {}
        for c in containers:
            # Claims are read afresh for each slot: one may be taken while this pass awaits.
            if not is_pool_slot(c.user_id) or c.user_id in {s.slot_id for s in self._claims.values()}:
                continue
            slot = Slot(c.user_id or "", c.instance_id or "", c.image or "")
            if not c.running or alive >= self.s.pool_size or c.image != self.s.gateway_image:
                self._pool_ready.pop(slot.slot_id, None)
                await self._discard(slot)
                continue
            port = await self.store.port_of(self.runtime.host_id, slot.slot_id)
            if port is None:
                # Its port went to a user but it was never handed over (a provisioner stopped
                # mid-claim): it holds the user's port, maybe the user's config and network.
                # Discarded once older than any claim lasts (another replica's may be under way).
                self._pool_ready.pop(slot.slot_id, None)
                portless[slot.slot_id] = self._portless.get(slot.slot_id, time.monotonic())
                if time.monotonic() - portless[slot.slot_id] >= self.s.readiness_timeout_s:
                    log.warning("discarding a slot whose claim never finished", extra={"slot": slot.slot_id})
                    await self._discard(slot)
                continue
            alive += 1
            if slot.slot_id not in self._pool_ready and (await self._probe(port, slot.slot_id, "/readyz")).ok:
                self._pool_ready[slot.slot_id] = slot
        self._portless = portless
        metrics.POOL_READY.set(len(self._pool_ready))
        await self._remove_leftovers(containers)
        for _ in range(self.s.pool_size - alive):
            if time.monotonic() < self._refill_after:
                break  # right after a claim: the new user's first turns come first
            await self._start_slot()
            metrics.POOL_READY.set(len(self._pool_ready))

    async def _start_slot(self) -> None:
        slot = Slot(POOL_PREFIX + secrets.token_hex(6), uuid.uuid4().hex, self.s.gateway_image)
        doc = {"_id": slot.slot_id, "instance_id": slot.instance_id, "image": slot.image}
        try:
            doc["port"] = await self.store.allocate_port(
                self.runtime.host_id,
                slot.slot_id,
                self.s.port_range_start,
                self.s.port_range_end,
                self.runtime.port_is_free,
            )
            gateway_ip = await self.runtime.ensure_network(
                slot.slot_id, self.subnet_for(doc["port"], pool_slot=True)
            )
            # A credential the broker does not know: a slot cannot spend anyone's budget.
            spec = await self._gateway_spec(
                doc, gateway_ip, secrets.token_urlsafe(32), "zk-pool-" + secrets.token_hex(16), ""
            )
            dirs = self._dirs(slot.slot_id)
            await asyncio.to_thread(prepare_user_dirs, dirs)
            await asyncio.to_thread(write_config_atomically, dirs.config, render_openclaw_config(spec))
            # A slot boots at a fifth of a gateway's CPU weight: users' traffic first.
            cspec = dataclasses.replace(self._container_spec(doc), cpu_shares=SLOT_CPU_SHARES)
            await self.runtime.create(cspec)
            await self.runtime.start(cspec.name)
            await self.wait_ready(slot.slot_id, doc["port"], cspec.name)
        except (NoPortAvailable, ProvisionError, RuntimeError_, OSError) as e:
            log.warning("could not start a pool slot", extra={"slot": slot.slot_id, "error": str(e)})
            await self._discard(slot)
            return
        self._pool_ready[slot.slot_id] = slot
        log.info("pool slot ready", extra={"slot": slot.slot_id})

    async def _discard(self, slot: Slot) -> None:
        """Removes a slot's container, network, port and folder (never a claimed user's folder:
        after the rename the slot's name is only a symlink to it)."""
        with contextlib.suppress(RuntimeError_):
            await self.runtime.remove(container_name(slot.slot_id))
        with contextlib.suppress(RuntimeError_):
            await self.runtime.remove_network(slot.slot_id)
        await self.store.release_port(self.runtime.host_id, slot.slot_id)
        path = self._users_dir(slot.slot_id)
        if path.is_dir() and not path.is_symlink():
            await asyncio.to_thread(shutil.rmtree, path, True)

    async def _remove_leftovers(self, containers: list[ContainerStatus]) -> None:
        """Slot folders without a container (a provisioner killed mid-start) and symlinks no
        container mounts through any more (the claimed container was re-created)."""
        users = self.s.data_root / "users"
        mounted = {Path(src).parent.name for c in containers for src in c.bind_sources}
        names = {c.user_id for c in containers}
        claimed = {s.slot_id for s in self._claims.values()}
        for entry in await asyncio.to_thread(_pool_entries, users):
            if entry.name in claimed or entry.name in names:
                continue
            if entry.is_symlink():
                if entry.name not in mounted:
                    entry.unlink(missing_ok=True)
            elif entry.name not in mounted:
                await self._discard(Slot(entry.name, "", ""))

    def _users_dir(self, user_id: str) -> Path:
        return self.s.data_root / "users" / user_id


def _pool_entries(users: Path) -> list[Path]:
    try:
        return [users / n for n in os.listdir(users) if is_pool_slot(n)]
    except FileNotFoundError:
        return []


def _move_folder(slot_dir: Path, user_dir: Path) -> None:
    """Renames the slot's folder to the user's; the old name stays as a relative symlink, so
    a restart of the still-running container (its bind paths name the slot) mounts it."""
    slot_dir.rename(user_dir)
    os.symlink(user_dir.name, slot_dir)
