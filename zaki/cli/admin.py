"""``zaki admin create|disable|enable|reset|list``: the dashboard's accounts from the operator's
shell. ``create`` makes an operator account (the first one comes from here); every action is
recorded in the audit collection with the actor ``cli``.

Also runnable alone: ``python -m zaki.cli.admin create root --password-stdin``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any

from zaki.cli.audit import record_action
from zaki.cli.common import say, with_store


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["create", "disable", "enable", "reset", "list"])
    p.add_argument("who", nargs="?", help="username (create) or username, e-mail or user id")
    p.add_argument("--email")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(fn=run)


def register(sub: Any) -> None:
    add_arguments(
        sub.add_parser("admin", help="dashboard accounts: create an operator, disable, enable, reset, list")
    )


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("the passwords differ")
    return first


async def _run(store: Any, s: Any, args: argparse.Namespace) -> int:
    from services.dashboard import accounts, admin
    from services.dashboard.errors import ApiError

    await accounts.ensure_indexes(store)
    try:
        if args.action == "create":
            doc = await admin.create_operator(
                store, args.who, args.email, _password(args), prefix=s.dashboard_user_prefix
            )
            say(f"operator account {doc['username']} created (user id {doc['_id']})")
        elif args.action in ("disable", "enable"):
            doc = await admin.set_disabled(store, admin.CLI_ACTOR, args.who, args.action == "disable")
            say(f"{doc['username']} {args.action}d")
        elif args.action == "reset":
            doc, temp = await admin.reset_password(store, admin.CLI_ACTOR, args.who)
            say(f"{doc['username']}: every session ended; temporary password (shown once):")
            print(temp)
        else:
            print(f"{'USER ID':<24} {'USERNAME':<32} {'ROLE':<9} STATE")
            for a in await accounts.list_accounts(store):
                state = "disabled" if a.get("disabled") else "active"
                print(f"{a['_id']:<24} {a['username']:<32} {a.get('role', 'user'):<9} {state}")
    except ApiError as e:
        say(f"{e.code}: {e.message}")
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.who:
        say("this action needs a username")
        return 2
    rc = asyncio.run(with_store(lambda store, s: _run(store, s, args)))
    if rc == 0 and args.action != "list":
        record_action(f"admin.{args.action}", None, {"account": args.who})
    return rc


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from zaki.cli.common import DEFAULT_STATE, load_env

    p = argparse.ArgumentParser(prog="zaki admin", description=__doc__)
    p.add_argument("--state-dir", default=str(DEFAULT_STATE))
    add_arguments(p)
    args = p.parse_args(argv)
    load_env(Path(args.state_dir))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
