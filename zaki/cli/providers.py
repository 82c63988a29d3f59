"""``zaki providers add|update|rotate|revoke|list``: the model providers the LLM broker calls.

``update`` changes a provider's base URL, API kind or model list in place (its name, and so
every user's model reference, stays); ``add`` of a revoked provider brings it back. Every change
is announced on core NATS so each broker uses it from the next call, no gateway restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from zaki.cli.audit import record_action
from zaki.cli.common import say, with_store

APIS = ["openai-completions", "openai-responses", "anthropic-messages"]


def register(sub: Any) -> None:
    prov = sub.add_parser(
        "providers", help="model provider keys the LLM broker uses (add/update/rotate/revoke/list)"
    )
    prov.add_argument("action", choices=["add", "update", "rotate", "revoke", "list"])
    prov.add_argument("name", nargs="?")
    prov.add_argument("--base-url", help="the provider's API root, e.g. https://api.openai.com/v1")
    prov.add_argument("--api", choices=APIS, help="the provider's API kind (add: openai-completions)")
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


def _models(raw: str | None) -> list[str] | None:
    return None if raw is None else [m.strip() for m in raw.split(",") if m.strip()]


def run(args: argparse.Namespace) -> int:
    from services.llm_broker import providers as prov

    async def act(store, s) -> int:
        from shared.crypto import KeyRing
        from shared.provider_url import URLPolicy

        if args.action == "list":
            for doc in await store.list_providers():
                print(json.dumps(prov.describe(doc)))
            return 0
        if not args.name:
            say("this action needs a provider name")
            return 2
        keys = KeyRing.from_spec(s.secret_keys.get_secret_value())
        policy = URLPolicy.from_settings(s)
        done = args.action
        try:
            if args.action == "add":
                readded = await prov.add_provider(
                    store,
                    keys,
                    args.name,
                    args.base_url or "",
                    args.api or APIS[0],
                    _read_key(args),
                    _models(args.models) or [],
                    policy,
                )
                done = "re-added (it was revoked)" if readded else "add"
            elif args.action == "update":
                changed = await prov.update_provider(
                    store, args.name, args.base_url, args.api, _models(args.models), policy
                )
                if not changed:
                    say(f"provider {args.name}: nothing to change")
                    return 0
                done = f"update of {', '.join(sorted(changed))}"
            elif args.action == "rotate":
                await prov.rotate_provider_key(store, keys, args.name, _read_key(args))
            else:
                await prov.revoke_provider(store, args.name)
        except prov.ProviderError as e:
            say(f"error: {e}")
            return 1
        await prov.announce_change(s.nats_url, args.name)
        say(f"provider {args.name}: {done} done; brokers use it from the next call")
        return 0

    rc = asyncio.run(with_store(act))
    if rc == 0 and args.action != "list":  # the name and URL, never the key
        record_action(f"providers.{args.action}", None, {"provider": args.name, "base_url": args.base_url})
    return rc


# The ZAKI_* variables that seed the platform's provider, and the stored field each one sets.
SEED_VARS = {"ZAKI_LLM_BASE_URL": "base_url", "ZAKI_LLM_API": "api", "ZAKI_LLM_MODELS": "models"}


async def seed_drift(store: Any, keys: Any, env: dict[str, str]) -> list[str]:
    """What the environment says about the platform's provider that its stored record does
    not: the broker seeds the provider once and ignores ZAKI_LLM_* afterwards, so a changed
    variable would otherwise be silently ignored. Only variables that are set are compared."""
    from shared.crypto import provider_key_context
    from shared.settings import ZakiSettings

    name = env.get("ZAKI_LLM_PROVIDER_NAME") or ZakiSettings.model_fields["llm_provider_name"].default
    doc = await store.get_provider(name)
    if doc is None:
        return []
    if doc.get("state") == "revoked":
        return [f"provider {name} is revoked: ZAKI_LLM_* do not bring it back (zaki providers add {name})"]
    drift = []
    for var, field in SEED_VARS.items():
        if var not in env:
            continue
        want: Any = _models(env[var]) if field == "models" else env[var]
        if want != doc.get(field):
            flag = field.replace("_", "-")
            value = ",".join(want) if field == "models" else want
            drift.append(
                f"{var} differs from provider {name}'s stored {field}: the stored one is used "
                f"(zaki providers update {name} --{flag} {value!r} to change it)"
            )
    key = env.get("ZAKI_LLM_API_KEY")
    if key and doc.get("key_enc"):
        try:
            same = keys.decrypt(doc["key_enc"], provider_key_context(name)) == key
        except Exception:  # a key ring that cannot open it: say so, never show either key
            same = False
        if not same:
            drift.append(
                f"ZAKI_LLM_API_KEY differs from provider {name}'s stored key: the stored one is used "
                f"(zaki providers rotate {name} --key-env ZAKI_LLM_API_KEY to change it)"
            )
    return drift
