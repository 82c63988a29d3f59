"""``zaki usage [--user U]``: model calls and tokens per user and day, as the LLM broker counted them."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from zaki.cli.common import with_store


def register(sub: Any) -> None:
    usage = sub.add_parser("usage", help="model usage per user and day, as the LLM broker counted it")
    usage.add_argument("--user")
    usage.add_argument("--limit", type=int, default=50)
    usage.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    async def show(store, s) -> int:
        query = {"user_id": args.user} if args.user else {}
        print(f"{'USER':<24} {'DAY':<10} {'REQUESTS':>9} {'PROMPT':>10} {'COMPLETION':>11} {'TOKENS':>10}")
        async for d in store.usage.find(query).sort([("day", -1), ("user_id", 1)]).limit(args.limit):
            print(
                f"{d.get('user_id', ''):<24} {d.get('day', ''):<10} {d.get('requests', 0):>9} "
                f"{d.get('prompt_tokens', 0):>10} {d.get('completion_tokens', 0):>11} {d.get('tokens', 0):>10}"
            )
        return 0

    return asyncio.run(with_store(show))
