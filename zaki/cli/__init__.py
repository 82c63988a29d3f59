"""The ``zaki`` command: run the platform on one machine, check it, and drive it.

zaki up [--demo]            start NATS, FerretDB, Docker and the four services
zaki doctor                 check every dependency, say how to fix what is missing
zaki instance create|list|show|stop|start|restart|delete|logs
zaki keys create|list|revoke   per-user API keys for the gateway proxy
zaki keys rotate            re-encrypt every stored secret under the newest key
zaki providers add|update|rotate|revoke|list   model providers the LLM broker calls
zaki usage [--user U]       model calls and tokens per user and day
zaki health                 every instance's health, as a table
zaki admin create|disable|enable|reset|list   dashboard accounts (operators)
zaki backup create|list|restore|verify USER [ID]   backups of users' data folders
zaki audit [--user U] [--since 2h] [--actor cli]   who asked for what, and what came of it
zaki fleet upgrade|status|resume|abort   fleet upgrades in canary waves
zaki swarm drain NODE       move every user off a Swarm node (ZAKI_RUNTIME=swarm)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from zaki.cli import admin, audit, backup, doctor, fleet, health, instance, keys, providers, swarm, up, usage
from zaki.cli.common import DEFAULT_STATE, load_env, say

# One module per command group, in the order `zaki --help` lists them.
GROUPS = (up, doctor, instance, keys, health, providers, usage, admin, backup, audit, fleet, swarm)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zaki", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--state-dir", default=os.environ.get("ZAKI_STATE_DIR", str(DEFAULT_STATE)))
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if getattr(args, "user_opt", None):
        args.user = args.user_opt
    needs_user = getattr(args, "needs_user", None)
    if needs_user is not None and needs_user(args) and not args.user:
        p.error("this action needs a user id")
    if getattr(args, "loads_env", True):
        load_env(Path(args.state_dir))
    from pydantic import ValidationError

    try:
        return args.fn(args)
    except ValidationError as e:
        for err in e.errors():
            say(f"invalid {'.'.join(map(str, err['loc']))}: {err['msg']}")
        return 2
