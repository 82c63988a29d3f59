"""The provisioner's hook: a backup before every upgrade and every delete.

ZAKI_BACKUP_BEFORE_CHANGE: "required" (default; the command fails with reason backup_failed
when the backup does, and nothing is changed; but a delete whose backup failed for a reason the
tenant controls goes on, its folder kept aside: services/backup/keep.py), "best_effort" (logged, the command goes on), "off".
A user without a data folder has nothing to lose: no backup, no failure.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.backup.core import make_target, user_folder
from services.backup.errors import BackupError
from services.backup.keep import keep_folder
from services.backup.ops import Backups

log = logging.getLogger("zaki.backup")

# Failures a tenant can cause from its own folder (a reader spun or crashed on what it planted).
# A delete is not refused for them (its folder is kept aside); an upgrade still is.
TENANT_CAUSED = ("timeout", "read_error")


async def before_change(prov: Any, doc: dict[str, Any], reason: str) -> None:
    """*prov*: the provisioner (settings ``s``, key ring ``keys``, ``publish``)."""
    from services.provisioner.base import ProvisionError
    from shared.events import FailureReason

    s = prov.s
    if s.backup_before_change == "off" or not user_folder(s, doc["_id"]).is_dir():
        return
    try:
        await Backups(s, prov.keys, make_target(s), prov.publish).create(
            doc["_id"], doc.get("instance_id"), reason
        )
    except BackupError as e:
        if s.backup_before_change == "required" and reason == "pre_delete" and e.code in TENANT_CAUSED:
            # The tenant could make its own backup fail at will and so never be deleted: the
            # delete goes on, its folder kept aside instead (backup.failed already published).
            try:
                kept = await asyncio.to_thread(keep_folder, s, doc["_id"], user_folder(s, doc["_id"]))
            except OSError as err:  # nothing kept: refused like any failed backup
                log.warning("cannot keep the folder aside", extra={"user_id": doc["_id"], "error": str(err)})
            else:
                log.warning(
                    "backup before delete failed (tenant-caused); folder kept aside, delete goes on",
                    extra={"user_id": doc["_id"], "error": e.code, "kept": str(kept)},
                )
                return
        if s.backup_before_change == "required":
            what = reason.removeprefix("pre_")
            raise ProvisionError(
                FailureReason.BACKUP_FAILED, f"the backup before the {what} failed ({e.code}): {e}"
            ) from None
        log.warning("backup before change failed; going on", extra={"user_id": doc["_id"], "error": e.code})
    except Exception:  # a bug must not leave the command undelivered forever: fail it like any backup
        log.exception("backup before change crashed", extra={"user_id": doc["_id"]})
        if s.backup_before_change == "required":
            raise ProvisionError(FailureReason.BACKUP_FAILED, "the backup before the change failed") from None
