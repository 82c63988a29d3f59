"""``zaki audit [--user U] [--since 2h|2026-11-27T09:00] [--actor cli|dashboard:ID]``: replays the
audit trail (the ZAKI_AUDIT stream, shared/audit.py), oldest first. And the CLI's own actor."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import re
import socket
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(sub: Any) -> None:
    p = sub.add_parser("audit", help="replay the audit trail: who asked for what, and what came of it")
    p.add_argument("--user", dest="audit_user", help="only records about this user")
    p.add_argument("--since", type=parse_since, help="a duration back (30m, 2h, 7d) or an ISO time")
    p.add_argument("--actor", help="cli, dashboard, api_key or platform, optionally kind:id")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="one JSON record per line")
    p.set_defaults(fn=run)


def parse_since(text: str) -> datetime:
    """``30m``, ``2h``, ``7d`` back from now, or an ISO 8601 time (UTC when no zone)."""
    m = re.fullmatch(r"(\d{1,7})([smhd])", text.strip())
    if m:
        return datetime.now(UTC) - timedelta(seconds=int(m[1]) * _UNITS[m[2]])
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since: {text!r} is neither a duration (2h) nor an ISO time"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def cli_actor(reason: str | None = None):
    """The operator at this terminal: their login name and host, made safe for the actor id."""
    from shared.events import Actor, ActorKind

    try:
        who = getpass.getuser()
    except Exception:
        who = "unknown"
    ident = re.sub(r"[^A-Za-z0-9_.@:-]", "_", f"{who}@{socket.gethostname()}")[:64].lstrip("_.@:-")
    return Actor(kind=ActorKind.CLI, id=ident or "operator", reason=reason)


def record_action(name: str, target: str | None = None, detail: dict[str, Any] | None = None) -> None:
    """Puts a CLI operator's action (keys, providers, accounts) in the audit trail; a trail that
    cannot be reached is said, not fatal (the action is done)."""
    asyncio.run(_record_action(name, target, detail))


async def _record_action(name: str, target: str | None, detail: dict[str, Any] | None) -> None:
    import nats

    from shared import audit
    from shared.bus import nats_servers
    from shared.settings import ZakiSettings

    s = ZakiSettings()
    try:
        nc = await nats.connect(nats_servers(s.nats_url), connect_timeout=3, max_reconnect_attempts=0)
    except Exception as e:
        print(
            f"[zaki] audit trail unreachable ({type(e).__name__}): {name} not recorded there", file=sys.stderr
        )
        return
    try:
        audit.install(nc, s.audit_retention_days, s.stream_replicas)
        await audit.action(cli_actor(), name, target, detail)
    finally:
        await nc.close()


def format_record(r: dict[str, Any]) -> str:
    a = r.get("actor") or {}
    who = f"{a.get('kind')}:{a.get('id')}" if a else "-"
    d = r.get("detail") or {}
    extra = d.get("reason") or d.get("message") or d.get("image") or ""
    return (
        f"{r['at'][:19]}  {r['kind']:<8} {r['subject']:<36} {r.get('user_id') or '-':<24} {who:<32} {extra}"
    )


def run(args: argparse.Namespace) -> int:
    if args.actor and args.actor.partition(":")[0] not in ("cli", "dashboard", "api_key", "platform"):
        print("--actor must be cli, dashboard, api_key or platform (optionally kind:id)")
        return 2
    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    import nats

    from shared import audit
    from shared.bus import nats_servers
    from shared.settings import ZakiSettings

    nc = await nats.connect(nats_servers(ZakiSettings().nats_url), connect_timeout=5)
    try:
        rows = await audit.read(nc.jetstream(), args.since, args.audit_user, args.actor, args.limit)
    finally:
        await nc.close()
    for r in rows:
        print(json.dumps(r) if args.json else format_record(r))
    return 0
