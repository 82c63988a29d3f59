"""Per-user API keys: shown once, stored only as a hash, scoped, expiring, revocable.

A key looks like ``zk_<key id>_<secret>``; the store keeps ``sha256(secret)`` under the
key id. The secret is 256 random bits, so a fast hash is enough (no password stretching).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.store import Store, utcnow
from shared.validation import check_user_id

SCOPES = frozenset({"chat", "tools", "ws", "ui"})  # ui: the gateway's Control UI in a browser
PREFIX = "zk_"


class KeyError_(ValueError):
    pass


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    user_id: str
    scopes: frozenset[str]
    expires_at: datetime | None
    revoked: bool

    def usable(self, now: datetime | None = None) -> bool:
        now = now or datetime.now(UTC)
        return not self.revoked and (self.expires_at is None or self.expires_at > now)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(presented: str) -> tuple[str, str] | None:
    """Splits ``zk_<id>_<secret>``; None when it is not of that form."""
    if not presented.startswith(PREFIX):
        return None
    key_id, sep, secret = presented[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 16 or len(secret) < 32:
        return None
    return key_id, secret


async def create_key(
    store: Store, user_id: str, scopes: set[str], expires_in: timedelta | None = None
) -> tuple[str, str]:
    """Returns (key id, the full key). The full key is never stored and cannot be shown again."""
    check_user_id(user_id)
    unknown = set(scopes) - SCOPES
    if unknown or not scopes:
        raise KeyError_(f"scopes must be a non-empty subset of {sorted(SCOPES)}")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32).replace("_", "-")
    await store.api_keys.insert_one(
        {
            "_id": key_id,
            "user_id": user_id,
            "hash": _hash(secret),
            "scopes": sorted(scopes),
            "created_at": utcnow(),
            "expires_at": utcnow() + expires_in if expires_in else None,
            "revoked": False,
        }
    )
    return key_id, f"{PREFIX}{key_id}_{secret}"


def _to_key(doc: dict[str, Any]) -> ApiKey:
    return ApiKey(
        key_id=doc["_id"],
        user_id=doc["user_id"],
        scopes=frozenset(doc.get("scopes", ())),
        expires_at=doc.get("expires_at"),
        revoked=bool(doc.get("revoked")),
    )


async def lookup(store: Store, key_id: str, secret: str) -> ApiKey | None:
    doc = await store.api_keys.find_one({"_id": key_id})
    if doc is None or not hmac.compare_digest(doc["hash"], _hash(secret)):
        return None
    return _to_key(doc)


async def revoke(store: Store, key_id: str) -> bool:
    res = await store.api_keys.update_one(
        {"_id": key_id}, {"$set": {"revoked": True, "revoked_at": utcnow()}}
    )
    return res.matched_count == 1


async def list_keys(store: Store, user_id: str | None = None) -> list[ApiKey]:
    query = {"user_id": user_id} if user_id else {}
    return [_to_key(d) async for d in store.api_keys.find(query)]


async def cli(store: Store, args: Any) -> int:
    """``zaki keys create|list|revoke``."""
    import nats

    from shared import subjects
    from shared.bus import nats_servers
    from shared.settings import ZakiSettings

    if args.action == "create":
        if not args.user:
            print("--user is required")
            return 2
        expires = timedelta(days=args.expires_days) if args.expires_days else None
        key_id, key = await create_key(store, args.user, set(args.scopes.split(",")), expires)
        print(f"key id: {key_id}\nAPI key (shown once, store it now): {key}")
        return 0
    if args.action == "list":
        for k in await list_keys(store, args.user):
            state = "revoked" if k.revoked else ("expired" if not k.usable() else "active")
            print(
                f"{k.key_id}  {k.user_id:<24} {','.join(sorted(k.scopes)):<14} {state:<8} expires {k.expires_at or '-'}"
            )
        return 0
    if args.action == "revoke":
        if not args.key_id or not await revoke(store, args.key_id):
            print("no such key")
            return 1
        # Tell every proxy to drop it from its cache now, not at the cache's expiry.
        nc = await nats.connect(nats_servers(ZakiSettings().nats_url))
        await nc.publish(subjects.APIKEY_REVOKED, args.key_id.encode())
        await nc.flush()
        await nc.close()
        print(f"revoked {args.key_id}")
        return 0
    return 2
