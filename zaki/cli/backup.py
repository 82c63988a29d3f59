"""``zaki backup create|list|restore|verify USER [ID]``: backups of a user's data folder.

Runs on the host that holds the data folders (it reads them confined, as root) and reaches the
backup target with the same settings as the backup service. ``restore`` stops a running
instance, swaps its folder and starts it again through the provisioner; ``--into`` restores
into another user. Exit codes: 0 done, 1 failed (the error's code is printed), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from typing import Any

from zaki.cli.common import say

ACTIONS = ["create", "list", "restore", "verify"]


def register(sub: Any) -> None:
    p = sub.add_parser("backup", help="back up, list, verify and restore users' data folders")
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("user", nargs="?")
    p.add_argument("backup_id", nargs="?", help="default: the newest good backup")
    p.add_argument("--into", help="with restore: the user to restore into (default: the same)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=run, needs_user=lambda a: a.action != "list")


def run(args: argparse.Namespace) -> int:
    from services.backup.errors import BackupError, InvalidInput

    try:
        return asyncio.run(_run(args))
    except InvalidInput as e:
        say(f"invalid input: {e}")
        return 2
    except BackupError as e:
        say(f"{args.action} failed ({e.code}): {e}")
        if args.json:
            print(json.dumps({"ok": False, "error": e.code, "message": str(e)}))
        return 1


async def _run(args: argparse.Namespace) -> int:
    from services.backup.ops import Backups, platform_commander
    from shared.settings import ZakiSettings

    s = ZakiSettings()
    publish, close = await _publisher(s)
    try:
        b = Backups.from_settings(s, publish)
        if args.action == "list":
            rows = [asdict(m) for m in await b.list(args.user)]
            if args.json:
                print(json.dumps(rows, indent=1))
            else:
                print(f"{'USER':<24} {'BACKUP ID':<24} {'REASON':<12} {'SIZE':>10}  CREATED")
                for r in rows:
                    print(
                        f"{r['user_id']:<24} {r['backup_id']:<24} {r['reason']:<12} "
                        f"{r['stored_bytes']:>10}  {r['created_at']}"
                    )
            return 0
        if args.action == "create":
            from shared.store import Store

            store = Store(s.mongo_url, s.mongo_db)
            try:  # only to record the instance id: a backup does not need the store
                doc = await asyncio.wait_for(store.get_instance(args.user), 5)
            except Exception:
                say("the store is unreachable: the backup records no instance id")
                doc = None
            finally:
                await store.close()
            out: dict[str, Any] = asdict(await b.create(args.user, (doc or {}).get("instance_id"), "manual"))
        elif args.action == "verify":
            out = await b.verify(args.user, args.backup_id)
        else:
            out = await b.restore(args.user, args.backup_id, args.into, platform_commander(s.nats_url))
        print(json.dumps({"ok": True, **out}, indent=1, default=str))
        return 0
    finally:
        await close()


async def _publisher(s: Any) -> tuple[Any, Any]:
    """Publishes backup events when NATS answers; a CLI backup still works without it."""
    import nats

    from shared.bus import nats_servers, to_json

    try:

        async def quiet(e: Exception) -> None:
            return None

        nc = await asyncio.wait_for(
            nats.connect(nats_servers(s.nats_url), connect_timeout=3, allow_reconnect=False, error_cb=quiet),
            5,
        )
    except Exception:
        say("NATS unreachable: no backup events are published")

        async def none() -> None:
            return None

        return None, none
    js = nc.jetstream()

    async def publish(subject: str, ev: Any) -> None:
        await js.publish(subject, to_json(ev), timeout=5)

    return publish, nc.close
