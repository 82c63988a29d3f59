"""What the broker needs to know, cached: which instance a credential belongs to, and the
providers' upstream addresses and (decrypted) keys. Both caches are short-lived and are
also dropped at once by events (an instance deleted, a provider key rotated)."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any

from shared.crypto import KeyRing, credential_hash, instance_secret_context, provider_key_context
from shared.logging import redact
from shared.state import InstanceState
from shared.store import Store

INSTANCE_TTL_S = 10.0
MISS_TTL_S = 5.0
PROVIDER_TTL_S = 30.0
MAX_ENTRIES = 100_000

# States whose gateway may call a model: a stopped, failed or deleted one may not.
LIVE_STATES = {InstanceState.STARTING.value, InstanceState.RUNNING.value}


@dataclass(frozen=True)
class BrokerClient:
    """An instance, as identified by its broker credential."""

    user_id: str
    instance_id: str
    state: str
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    budget: dict[str, Any] | None
    own_provider: dict[str, Any] | None  # bring-your-own-key settings (no key)
    own_key_enc: str | None

    def allows_source(self, ip: str | None) -> bool:
        if self.subnet is None:
            return True
        try:
            return ip is not None and ipaddress.ip_address(ip) in self.subnet
        except ValueError:
            return False


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    api: str
    key: str
    version: int  # 0 for a user's own key


class ProviderUnavailable(Exception):
    pass


class Directory:
    def __init__(self, store: Store, keys: KeyRing) -> None:
        self.store = store
        self.keys = keys
        self._clients: dict[str, tuple[float, BrokerClient | None]] = {}
        self._providers: dict[str, tuple[float, Upstream | None]] = {}

    # --- instances ------------------------------------------------------------------------------

    async def client(self, credential: str) -> BrokerClient | None:
        h = credential_hash(credential)
        now = time.monotonic()
        hit = self._clients.get(h)
        if hit is not None and hit[0] > now:
            return hit[1]
        doc = await self.store.instances.find_one({"broker_key_hash": h})
        client = self._client(doc) if doc else None
        if len(self._clients) > MAX_ENTRIES:
            self._clients.clear()
        self._clients[h] = (now + (INSTANCE_TTL_S if client else MISS_TTL_S), client)
        return client

    @staticmethod
    def _client(doc: dict[str, Any]) -> BrokerClient:
        subnet = ipaddress.ip_network(doc["subnet"]) if doc.get("subnet") else None
        return BrokerClient(
            user_id=doc["_id"],
            instance_id=doc.get("instance_id", ""),
            state=doc.get("state", ""),
            subnet=subnet,
            budget=doc.get("budget"),
            own_provider=doc.get("provider"),
            own_key_enc=doc.get("provider_key_enc"),
        )

    def forget_all(self) -> None:
        self._clients.clear()
        self._providers.clear()

    def forget_user(self, user_id: str) -> None:
        for h, (_, c) in list(self._clients.items()):
            if c is not None and c.user_id == user_id:
                del self._clients[h]

    # --- providers ------------------------------------------------------------------------------

    async def upstream(self, client: BrokerClient, name: str) -> Upstream:
        own = client.own_provider
        if own and own.get("name") == name:
            # The user's own provider: only ever used for this user's calls.
            key = ""
            if client.own_key_enc:
                key = self.keys.decrypt(
                    client.own_key_enc, instance_secret_context(client.user_id, "provider_key")
                )
                redact.register(key)
            return Upstream(name, own["base_url"], own.get("api", "openai-completions"), key, 0)
        now = time.monotonic()
        hit = self._providers.get(name)
        if hit is None or hit[0] <= now:
            doc = await self.store.get_provider(name)
            up = None
            if doc is not None and doc.get("state") == "active":
                key = self.keys.decrypt(doc["key_enc"], provider_key_context(name))
                redact.register(key)
                up = Upstream(
                    name, doc["base_url"], doc.get("api", "openai-completions"), key, doc["version"]
                )
            hit = self._providers[name] = (now + PROVIDER_TTL_S, up)
        if hit[1] is None:
            raise ProviderUnavailable(name)
        return hit[1]

    def forget_provider(self, name: str | None = None) -> None:
        if name is None:
            self._providers.clear()
        else:
            self._providers.pop(name, None)
