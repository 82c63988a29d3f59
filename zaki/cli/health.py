"""``zaki health``: every instance's health, as a table."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from zaki.cli.common import with_store


def register(sub: Any) -> None:
    sub.add_parser("health", help="every instance's health").set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    from services.monitor.cli import print_health

    return asyncio.run(with_store(lambda store, s: print_health(store)))
