"""``zaki keys create|list|revoke`` (API keys of the gateway proxy) and ``zaki keys rotate``
(re-encrypt every stored secret under the newest key)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from zaki.cli.audit import record_action
from zaki.cli.common import say, with_store


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="API keys (create/list/revoke) and secret re-encryption (rotate)")
    keys.add_argument("action", choices=["create", "list", "revoke", "rotate"])
    keys.add_argument("--user")
    keys.add_argument("--scopes", default="chat,tools,ws")
    keys.add_argument("--expires-days", type=float)
    keys.add_argument("--key-id")
    keys.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "rotate":
        rc = asyncio.run(_rotate())
        record_action("keys.rotate")
        return rc
    from services.gateway_proxy import keys as api_keys

    rc = asyncio.run(with_store(lambda store, s: api_keys.cli(store, args)))
    if rc == 0 and args.action != "list":  # never the key itself: its id and scopes
        record_action(f"keys.{args.action}", args.user, {"key_id": args.key_id, "scopes": args.scopes})
    return rc


async def _rotate() -> int:
    from services.provisioner.service import rotate_instance_secrets
    from shared.crypto import KeyRing
    from shared.settings import ZakiSettings
    from shared.store import Store

    s = ZakiSettings()
    store = Store(s.mongo_url, s.mongo_db)
    try:
        ring = KeyRing.from_spec(s.secret_keys.get_secret_value())
        changed = await rotate_instance_secrets(store, ring)
    finally:
        await store.close()
    say(f"re-encrypted {changed} instance record(s) under key {ring.primary_kid}")
    return 0
