"""Model providers the broker calls: added, rotated and revoked without touching a gateway.

Each provider's key is sealed with the key ring (context ``provider:<name>:api_key``).
After every change a core NATS message tells each broker to drop its cached copy, and a
broker that still meets a 401 re-reads the key once, so a rotation takes effect on the
next call.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import nats

from shared import subjects
from shared.bus import nats_servers
from shared.crypto import KeyRing, provider_key_context
from shared.provider_url import ProviderURLError, URLPolicy, check_provider_url
from shared.settings import ZakiSettings
from shared.store import Store

log = logging.getLogger("zaki.broker")

NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
APIS = ("openai-completions", "openai-responses", "anthropic-messages")


class ProviderError(ValueError):
    pass


def _check(
    name: str, base_url: str | None = None, api: str | None = None, policy: URLPolicy | None = None
) -> None:
    if not NAME.match(name):
        raise ProviderError(f"provider name {name!r} must match {NAME.pattern}")
    if base_url is not None:
        try:
            check_provider_url(base_url, policy)  # the broker's own rule, checked again per call
        except ProviderURLError as e:
            raise ProviderError(str(e)) from None
    if api is not None and api not in APIS:
        raise ProviderError(f"api must be one of {', '.join(APIS)}")


async def add_provider(
    store: Store,
    keys: KeyRing,
    name: str,
    base_url: str,
    api: str,
    key: str,
    models: list[str],
    policy: URLPolicy | None = None,
) -> bool:
    """Adds a provider, or brings a revoked one back with the given settings and key.
    Returns True when it was a revoked provider re-added."""
    _check(name, base_url, api, policy)
    if not key:
        raise ProviderError("a provider needs an API key")
    fields = {
        "base_url": base_url,
        "api": api,
        "models": models,
        "key_enc": keys.encrypt(key, provider_key_context(name)),
    }
    if await store.add_provider(name, fields):
        return False
    if await store.readd_provider(name, fields):
        return True
    raise ProviderError(
        f"provider {name} exists; use update to change its base URL, API kind or models, rotate for its key"
    )


async def update_provider(
    store: Store,
    name: str,
    base_url: str | None = None,
    api: str | None = None,
    models: list[str] | None = None,
    policy: URLPolicy | None = None,
) -> dict[str, Any]:
    """Changes a provider in place (its name, and so every user's model reference, stays;
    its key stays too: rotate changes that). Returns the fields that changed."""
    _check(name, base_url, api, policy)
    doc = await store.get_provider(name)
    if doc is None:
        raise ProviderError(f"no provider named {name}")
    wanted = {"base_url": base_url, "api": api, "models": models}
    fields = {k: v for k, v in wanted.items() if v is not None and v != doc.get(k)}
    if fields and not await store.update_provider(name, fields):
        raise ProviderError(f"no provider named {name}")
    return fields


async def rotate_provider_key(store: Store, keys: KeyRing, name: str, key: str) -> None:
    _check(name)
    if not key:
        raise ProviderError("the new key is empty")
    fields = {"key_enc": keys.encrypt(key, provider_key_context(name)), "state": "active"}
    if not await store.update_provider(name, fields):
        raise ProviderError(f"no provider named {name}")


async def revoke_provider(store: Store, name: str) -> None:
    _check(name)
    if not await store.update_provider(name, {"state": "revoked", "key_enc": None}):
        raise ProviderError(f"no provider named {name}")


async def announce_change(nats_url: str, name: str) -> None:
    nc = await nats.connect(nats_servers(nats_url), connect_timeout=5, max_reconnect_attempts=2)
    try:
        await nc.publish(subjects.PROVIDER_CHANGED, name.encode())
        await nc.flush()
    finally:
        await nc.close()


def describe(doc: dict[str, Any]) -> dict[str, Any]:
    """A provider for display: never its key."""
    return {
        "name": doc["_id"],
        "state": doc.get("state"),
        "api": doc.get("api"),
        "base_url": doc.get("base_url"),
        "models": doc.get("models") or [],
        "version": doc.get("version"),
        "updated_at": str(doc.get("updated_at")),
    }


async def seed_default_provider(store: Store, keys: KeyRing, s: ZakiSettings) -> bool:
    """Creates the platform's default provider from ZAKI_LLM_* on first start (never overwrites)."""
    key = s.llm_api_key.get_secret_value()
    if not key or await store.get_provider(s.llm_provider_name) is not None:
        return False
    models = [m.strip() for m in s.llm_models.split(",") if m.strip()]
    policy = URLPolicy.from_settings(s)
    try:
        check_provider_url(s.llm_base_url, policy)
    except ProviderURLError as e:
        log.error("default provider not seeded: ZAKI_LLM_BASE_URL %s", e)
        return False
    try:
        await add_provider(store, keys, s.llm_provider_name, s.llm_base_url, s.llm_api, key, models, policy)
    except ProviderError:
        return False  # a concurrent broker seeded it first
    return True
