"""``zaki providers add|rotate|revoke|list``: the model provider keys the LLM broker attaches."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from zaki.cli.common import say, with_store


def register(sub: Any) -> None:
    prov = sub.add_parser(
        "providers", help="model provider keys the LLM broker uses (add/rotate/revoke/list)"
    )
    prov.add_argument("action", choices=["add", "rotate", "revoke", "list"])
    prov.add_argument("name", nargs="?")
    prov.add_argument("--base-url", help="the provider's API root, e.g. https://api.openai.com/v1")
    prov.add_argument(
        "--api",
        default="openai-completions",
        choices=["openai-completions", "openai-responses", "anthropic-messages"],
    )
    prov.add_argument("--models", help="comma-separated model ids")
    prov.add_argument("--key-env", help="read the key from this environment variable (default: stdin)")
    prov.set_defaults(fn=run)


def _read_key(args: argparse.Namespace) -> str:
    """Provider keys come from stdin or an environment variable, never from argv (ps shows argv)."""
    if args.key_env:
        return os.environ.get(args.key_env, "").strip()
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("provider API key: ").strip()
    return sys.stdin.readline().strip()


def run(args: argparse.Namespace) -> int:
    from services.llm_broker import providers as prov

    async def act(store, s) -> int:
        from shared.crypto import KeyRing

        if args.action == "list":
            for doc in await store.list_providers():
                print(json.dumps(prov.describe(doc)))
            return 0
        if not args.name:
            say("this action needs a provider name")
            return 2
        keys = KeyRing.from_spec(s.secret_keys.get_secret_value())
        try:
            if args.action == "add":
                models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
                await prov.add_provider(
                    store, keys, args.name, args.base_url or "", args.api, _read_key(args), models
                )
            elif args.action == "rotate":
                await prov.rotate_provider_key(store, keys, args.name, _read_key(args))
            else:
                await prov.revoke_provider(store, args.name)
        except prov.ProviderError as e:
            say(f"error: {e}")
            return 1
        await prov.announce_change(s.nats_url, args.name)
        say(f"provider {args.name}: {args.action} done; brokers use it from the next call")
        return 0

    return asyncio.run(with_store(act))
