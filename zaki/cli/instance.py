"""``zaki instance create|list|show|stop|start|restart|delete|update|upgrade|move|logs``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from typing import Any

from zaki.cli.audit import cli_actor
from zaki.cli.common import print_outcome, progress, with_platform, with_store

ACTIONS = [
    "create",
    "list",
    "show",
    "stop",
    "start",
    "restart",
    "delete",
    "update",
    "upgrade",
    "move",
    "logs",
]


def register(sub: Any) -> None:
    inst = sub.add_parser("instance", help="create and manage user instances")
    inst.add_argument("action", choices=ACTIONS)
    inst.add_argument("user", nargs="?")
    inst.add_argument("--user", dest="user_opt")
    inst.add_argument("--bot-token", help="Telegram bot token (or ZAKI_BOT_TOKEN)")
    inst.add_argument("--model")
    inst.add_argument("--image")
    inst.add_argument("--purge", action="store_true", help="with delete: also remove the workspace")
    inst.add_argument("--away-from", help="with move: the Swarm node to leave (default: its own)")
    inst.add_argument("--tail", type=int, default=100)
    inst.add_argument("--timeout", type=float, default=300)
    inst.set_defaults(fn=run, needs_user=lambda a: a.action != "list")


def run(args: argparse.Namespace) -> int:
    from shared import subjects
    from shared.events import (
        InstanceCommand,
        InstanceDelete,
        InstanceMove,
        InstanceRequested,
        InstanceUpdate,
        InstanceUpgrade,
    )

    action = args.action
    if action in ("list", "show"):
        return asyncio.run(with_store(lambda store, s: _list_instances(store, args.user)))
    if action == "logs":
        return _logs(args.user, args.tail)
    rid = uuid.uuid4().hex
    actor = cli_actor()  # who asked, for the audit trail
    if action == "create":
        token = args.bot_token or os.environ.get("ZAKI_BOT_TOKEN", "")
        event: Any = InstanceRequested(
            request_id=rid,
            user_id=args.user,
            bot_token=token,
            model=args.model,
            image=args.image,
            actor=actor,
        )
        subject = subjects.INSTANCE_REQUESTED
    elif action == "delete":
        event, subject = (
            InstanceDelete(request_id=rid, user_id=args.user, purge=args.purge, actor=actor),
            subjects.INSTANCE_DELETE,
        )
    elif action == "update":
        event = InstanceUpdate(
            request_id=rid, user_id=args.user, model=args.model, bot_token=args.bot_token, actor=actor
        )
        subject = subjects.INSTANCE_UPDATE
    elif action == "upgrade":
        event, subject = (
            InstanceUpgrade(request_id=rid, user_id=args.user, image=args.image, actor=actor),
            subjects.INSTANCE_UPGRADE,
        )
    elif action == "move":
        event, subject = (
            InstanceMove(request_id=rid, user_id=args.user, away_from=args.away_from, actor=actor),
            subjects.INSTANCE_MOVE,
        )
    else:
        event = InstanceCommand(request_id=rid, user_id=args.user, reason="zaki cli", actor=actor)
        subject = f"{subjects.PREFIX}.instance.{action}"

    async def call(client, settings):
        out_subject, outcome = await progress(
            f"{action} {args.user}", client.call(subject, event, timeout=args.timeout)
        )
        return print_outcome(out_subject, outcome)

    return asyncio.run(with_platform(call))


SECRET_FIELDS = {
    "bot_token_enc",
    "gateway_password_enc",
    "provider_key_enc",
    "broker_key_enc",
    "broker_key_hash",
}


async def _list_instances(store, user: str | None) -> int:
    docs = [await store.get_instance(user)] if user else await store.list_instances()
    docs = [d for d in docs if d]
    if user and not docs:
        print(f"no instance for {user}")
        return 1
    if user:
        doc = {
            k: (v.isoformat() if hasattr(v, "isoformat") else v)
            for k, v in docs[0].items()
            if k not in SECRET_FIELDS
        }
        print(json.dumps(doc, indent=1, default=str))
        return 0
    print(f"{'USER':<24} {'STATE':<12} {'HOST':<10} {'PORT':>6}  {'BOT':<20} IMAGE")
    for d in docs:
        print(
            f"{d['_id']:<24} {d['state']:<12} {d.get('docker_host', ''):<10} {d.get('port') or '':>6}  "
            f"{d.get('bot_username') or '':<20} {d.get('image', '')}"
        )
    return 0


def _logs(user: str, tail: int) -> int:
    import docker

    from shared.gateway import container_name
    from shared.logging import redact

    try:
        raw = docker.from_env().containers.get(container_name(user)).logs(tail=tail)
    except docker.errors.NotFound:
        print(f"no container for {user}")
        return 1
    for line in raw.decode("utf-8", "replace").splitlines():
        print(redact(line))
    return 0
