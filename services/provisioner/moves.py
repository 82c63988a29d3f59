"""``instance.move``: a user's gateway onto another node (a drain, a node gone; ``ZAKI_RUNTIME=swarm``).

Shared storage (every node mounts the same data root): backed up, stopped, unpinned and started
wherever the swarm places it.

Per-node disks (one provisioner per node, ``ZAKI_SWARM_NODE``): the folder travels as a backup
(the backup issue's mechanism; its target must be one every node reaches: S3, or a shared
``ZAKI_BACKUP_DIR``). The replica of the node it leaves stops it, backs it up (after the stop:
nothing written before the move is lost), keeps its folder aside (``users/.kept``, as a delete
does), marks the record as moving and hands the move to the chosen node's replica, which puts
the backup in place as the folder on its own disk and starts it there. Every command of that user
waits, refused as ``restore_in_progress``, until it lands. A move away from a node that is down
restores the user's last backup: what was written since is out of reach with that node's disk.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

from services.backup.core import make_target, user_folder
from services.backup.errors import BackupError
from services.backup.hooks import before_change
from services.backup.keep import keep_folder
from services.backup.ops import Backups
from services.provisioner.base import ProvisionError, S, log
from services.provisioner.capacity import NodeCapacity
from services.provisioner.pool import Pooled
from services.provisioner.routing import node_of
from services.provisioner.runtime import RuntimeError_
from shared import subjects
from shared.events import FailureReason, InstanceCommand, InstanceMove, InstanceStopped
from shared.gateway import container_name

LIVE = (S.RUNNING, S.STARTING)  # started again where it lands


class Moves(Pooled):
    nodes: Any = None  # the NodeRouter, with one provisioner per node (app.py sets it)

    async def _move(self, cmd: InstanceCommand) -> None:
        assert isinstance(cmd, InstanceMove)
        if not self.runtime.has_nodes:  # refused before anything stops
            raise ProvisionError(
                FailureReason.INVALID_REQUEST, "moving to another node needs ZAKI_RUNTIME=swarm"
            )
        doc = await self._existing(cmd)
        try:
            if cmd.away_from:  # a node that is not one is refused before anything stops
                await self.runtime.node_id(cmd.away_from)
        except RuntimeError_ as e:
            raise ProvisionError(FailureReason.INVALID_REQUEST, str(e)) from None
        if self.nodes is None:
            await self._move_on_shared_storage(cmd, doc)
        else:
            await self._move_across_disks(cmd, doc)

    async def _move_across_disks(self, cmd: InstanceMove, doc: dict[str, Any]) -> None:
        """Which half runs here, from one read of the nodes: out from the node the gateway is on,
        in on the node the record says it goes to (or away from a node that is down)."""
        nodes = await self.runtime.node_capacity()
        here = self.nodes.here
        address = next((n.address for n in nodes if n.node == here), "")
        on = node_of(doc, nodes)
        if doc.get("host") == address and not doc.get("move"):
            await self._move_out(cmd, doc, nodes)
        elif (doc.get("move") or {}).get("to") == here or (on is not None and on.down):
            await self._move_in(cmd, doc, address)  # sent here to land, or away from a node that is down
        else:  # never restore over a gateway that runs elsewhere (a stale or forged forward)
            raise ProvisionError(
                FailureReason.INVALID_REQUEST,
                "this move belongs to another node's provisioner; nothing changed",
            )

    async def _move_on_shared_storage(self, cmd: InstanceMove, doc: dict[str, Any]) -> None:
        """A backup first (nothing moves if it fails), stopped, unpinned, and started again
        wherever the swarm places it; the record names the new node (``host``), which the proxy
        and the monitor follow. A stopped instance only loses its pin: it lands elsewhere at its
        next start."""
        name = container_name(cmd.user_id)
        await before_change(self, doc, "pre_move")
        was_running = doc["state"] in LIVE
        try:
            if was_running:
                doc = await self._transition(cmd.request_id, cmd.user_id, S.STARTING)
                await self.runtime.stop(name, self.s.stop_timeout_s)
            await self.runtime.unpin(name, cmd.away_from)
        except RuntimeError_ as e:
            raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        log.info("moving", extra={"user_id": cmd.user_id, "away_from": cmd.away_from or doc.get("host", "")})
        if was_running:
            await self._provision_and_start(doc, cmd.request_id)
        else:
            await self._answer_unchanged(cmd.request_id, doc)

    def _backups(self) -> Backups:
        return Backups(self.s, self.keys, make_target(self.s), self.publish)

    async def _move_out(self, cmd: InstanceMove, doc: dict[str, Any], nodes: list[NodeCapacity]) -> None:
        """On the node it leaves: the node it goes to is chosen before anything stops (none with
        room: ``no_capacity``, nothing changed); a failed backup starts it again here."""
        here = self.nodes.here
        to = await self.nodes.choose(nodes, {here, cmd.away_from or here})
        if to is None:
            raise ProvisionError(
                FailureReason.DOCKER,
                "no_capacity: no other node with a provisioner has room for this gateway",
            )
        name, folder = container_name(cmd.user_id), user_folder(self.s, cmd.user_id)
        was_running = doc["state"] in LIVE
        try:
            if was_running:
                doc = await self._transition(cmd.request_id, cmd.user_id, S.STARTING)
                await self.runtime.stop(name, self.s.stop_timeout_s)
        except RuntimeError_ as e:
            raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        backup_id = None
        if folder.is_dir():
            try:
                backup_id = (
                    await self._backups().create(cmd.user_id, doc["instance_id"], "pre_move")
                ).backup_id
            except BackupError as e:
                await self.fail(
                    cmd.request_id,
                    cmd.user_id,
                    ProvisionError(
                        FailureReason.BACKUP_FAILED, f"nothing moved: the backup failed ({e.code}): {e}"
                    ),
                )
                if was_running:  # it runs again where its folder is
                    await self._provision_and_start(doc, cmd.request_id, heal=True)
                return
        try:
            await self.runtime.remove(name)  # a service pinned here: the new one is made there
        except RuntimeError_ as e:
            raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        move = {"to": to, "from": here, "backup_id": backup_id, "state": doc["state"]}
        await self.store.update_instance(cmd.user_id, {"move": move}, doc["instance_id"])
        if folder.is_dir():  # kept aside for ZAKI_DELETE_GRACE_DAYS, like a deleted user's
            await asyncio.to_thread(keep_folder, self.s, cmd.user_id, folder)
            await asyncio.to_thread(shutil.rmtree, folder, True)
        log.info("moving out", extra={"user_id": cmd.user_id, "to": to, "backup_id": backup_id})
        await self.nodes.send(to, subjects.INSTANCE_MOVE, cmd, f"move-{cmd.request_id}-{doc['instance_id']}")

    async def _move_in(self, cmd: InstanceMove, doc: dict[str, Any], address: str) -> None:
        """On the node it goes to: the backup becomes its folder on this disk, the record names
        this node, and it starts here if it ran. A failure leaves the record moving (a move sent
        again tries again) and the backup untouched."""
        move = doc.get("move") or {}
        here = self.nodes.here
        if not move:
            log.warning("moving off a node that is down: its last backup", extra={"user_id": cmd.user_id})
        if move.get("backup_id") or not move:  # none: it had no folder yet
            try:
                got = await self._backups().put_in_place(cmd.user_id, move.get("backup_id"))
            except BackupError as e:
                raise ProvisionError(
                    FailureReason.BACKUP_FAILED,
                    f"the move to {here} cannot restore the backup ({e.code}): {e}",
                ) from None
            log.info("moved in", extra={"user_id": cmd.user_id, "backup_id": got["backup_id"], "node": here})
        try:
            await self.runtime.remove(container_name(cmd.user_id))  # pinned to the node left
        except RuntimeError_ as e:
            raise ProvisionError(FailureReason.DOCKER, str(e)) from None
        state = move.get("state", doc["state"])
        fields = {"move": None, "host": address}
        if state in LIVE and doc["state"] != S.STARTING:
            doc = await self._transition(cmd.request_id, cmd.user_id, S.STARTING, fields)
        else:
            await self.store.update_instance(cmd.user_id, fields, doc["instance_id"])
            doc = {**doc, **fields}
        if state in LIVE:
            await self._provision_and_start(doc, cmd.request_id)
        else:
            await self._answer_unchanged(cmd.request_id, doc)

    async def _answer_unchanged(self, request_id: str, doc: dict[str, Any]) -> None:
        """The outcome of a command that left the gateway as it was: stopped, or as it is."""
        if doc["state"] == S.STOPPED:
            event = InstanceStopped(request_id=request_id, user_id=doc["_id"], instance_id=doc["instance_id"])
            await self.publish(subjects.INSTANCE_STOPPED, event)
        else:
            await self._answer_current(request_id, doc)
