"""MongoDB access through PyMongo's async client (``pymongo.AsyncMongoClient``).

Every write that matters is a single-document atomic operation or guarded by a
unique index, never a multi-document transaction: correct on a MongoDB replica
set and on FerretDB, which has no transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import DuplicateKeyError

from shared.state import IllegalTransition, InstanceState, sources_of

log = logging.getLogger("zaki.store")


_UNSET = object()  # marks a field to $unset in a versioned write
# A write claim this old whose version never landed belongs to a dead writer. Far longer than
# one update takes, shorter than the provisioner's redelivery backoff reaches.
STALE_CLAIM_S = 15.0


def utcnow() -> datetime:
    return datetime.now(UTC)


class NoPortAvailable(Exception):
    pass


class Store:
    def __init__(self, url: str, db: str) -> None:
        self.client: AsyncMongoClient = AsyncMongoClient(url, tz_aware=True, serverSelectionTimeoutMS=10_000)
        self.db = self.client[db]
        self.instances = self.db["instances"]
        self.ports = self.db["ports"]
        self.requests = self.db["requests"]
        self.api_keys = self.db["api_keys"]
        self.leases = self.db["leases"]
        self.journal = self.db["instance_journal"]
        self.providers = self.db["providers"]
        self.usage = self.db["usage"]
        self.budget_events = self.db["budget_events"]
        # Written by the broker, read by the monitor: instances whose model calls are refused.
        self.model_path = self.db["model_path"]

    async def ensure_indexes(self) -> None:
        # Instances are keyed by user id (_id): one live instance per user by construction.
        await self.instances.create_index([("state", ASCENDING)], name="by_state")
        await self.instances.create_index([("docker_host", ASCENDING)], name="by_docker_host")
        await self.ports.create_index(
            [("docker_host", ASCENDING), ("port", ASCENDING)], unique=True, name="one_owner_per_port"
        )
        await self.ports.create_index([("user_id", ASCENDING)], name="by_user")
        await self.api_keys.create_index([("user_id", ASCENDING)], name="by_user")
        await self.journal.create_index([("user_id", ASCENDING)], name="by_user")
        await self.instances.create_index([("broker_key_hash", ASCENDING)], name="by_broker_key")
        await self.usage.create_index([("user_id", ASCENDING), ("month", ASCENDING)], name="by_user_month")
        # Answer counts (shared/activity.py): pruned and read by time, read by user for the fleet gate.
        await self.db["traffic"].create_index([("at", ASCENDING)], name="by_at")
        await self.db["traffic"].create_index([("user_id", ASCENDING), ("at", ASCENDING)], name="by_user_at")

    async def ping(self) -> None:
        await self.client.admin.command("ping")

    async def close(self) -> None:
        await self.client.close()

    # --- instances -------------------------------------------------------------------------

    async def get_instance(self, user_id: str) -> dict[str, Any] | None:
        return await self.instances.find_one({"_id": user_id})

    async def list_instances(
        self, states: Iterable[str] | None = None, docker_host: str | None = None
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {}
        if states is not None:
            query["state"] = {"$in": list(states)}
        if docker_host is not None:
            query["docker_host"] = docker_host
        return [doc async for doc in self.instances.find(query)]

    async def create_instance(self, user_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """Inserts a ``requested`` record; None when the user already has one."""
        now = utcnow()
        doc = {"_id": user_id, "state": InstanceState.REQUESTED.value, "created_at": now, "updated_at": now}
        doc.update(fields)
        doc["version"] = 1
        try:
            await self.instances.insert_one(doc)
        except DuplicateKeyError:
            return None
        return doc

    async def _versioned_write(
        self,
        user_id: str,
        decide: Callable[[dict[str, Any]], dict[str, Any] | None],
        note: dict[str, Any],
        attempts: int = 20,
    ) -> dict[str, Any] | None:
        """Applies one change to an instance record, serialized through a unique claim.

        ``decide`` sees the current record and returns the fields to $set (or None to give
        up). The writer that inserts the claim ``<user>:<version+1>`` is the only one
        allowed to write that version, so concurrent writers never both win, on MongoDB
        and on FerretDB alike (whose SQLite backend does not make a conditional update
        atomic against another connection). The claims double as an audit journal.
        """
        for _ in range(attempts):
            doc = await self.get_instance(user_id)
            if doc is None:
                return None
            fields = decide(doc)
            if fields is None:
                return None
            version = int(doc.get("version", 1))
            claim = {"_id": f"{user_id}:{version + 1}", "user_id": user_id, "at": utcnow(), **note}
            try:
                await self.journal.insert_one(claim)
            except DuplicateKeyError:
                await self._drop_stale_claim(claim["_id"])
                await asyncio.sleep(random.uniform(0.001, 0.01))
                continue
            fields = {**fields, "version": version + 1, "updated_at": utcnow()}
            unset = {k: "" for k, v in fields.items() if v is _UNSET}
            update: dict[str, Any] = {"$set": {k: v for k, v in fields.items() if v is not _UNSET}}
            if unset:
                update["$unset"] = unset
            try:
                res = await self.instances.update_one({"_id": user_id, "version": version}, update)
            except Exception:
                # The claim is ours and the write did not happen (or we cannot know): give the
                # version back, best effort; a claim left behind goes stale and is dropped.
                with contextlib.suppress(Exception):
                    await self.journal.delete_one({"_id": claim["_id"]})
                raise
            if res.matched_count == 1:
                doc.update(update["$set"])
                for k in unset:
                    doc.pop(k, None)
                return doc
            # The record was replaced (deleted and re-created) under us: start over.
        raise RuntimeError(f"instance {user_id}: too much write contention")

    async def _drop_stale_claim(self, claim_id: str) -> None:
        """A claim whose writer died between the claim and the write (a crash, a database
        restart) would block that version forever. Once it is older than any live write can
        be and the record never reached that version, it is removed."""
        claim = await self.journal.find_one({"_id": claim_id})
        if claim is None or (utcnow() - claim["at"]).total_seconds() < STALE_CLAIM_S:
            return
        user_id, _, version = claim_id.rpartition(":")
        doc = await self.instances.find_one({"_id": user_id}, {"version": 1})
        if doc is not None and int(doc.get("version", 1)) < int(version):
            log.warning("dropping a stale write claim", extra={"user_id": user_id, "claim": claim_id})
            await self.journal.delete_one({"_id": claim_id, "at": claim["at"]})

    async def transition(
        self,
        user_id: str,
        target: InstanceState,
        *,
        instance_id: str | None = None,
        set_fields: dict[str, Any] | None = None,
        unset_fields: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Moves an instance to *target* if the move is legal from its current state, or raises."""
        allowed = set(sources_of(target))
        seen: dict[str, Any] = {}

        def decide(doc: dict[str, Any]) -> dict[str, Any] | None:
            seen["state"] = doc.get("state")
            if doc.get("state") not in allowed or (
                instance_id is not None and doc.get("instance_id") != instance_id
            ):
                return None
            return {"state": target.value, **(set_fields or {}), **{f: _UNSET for f in unset_fields}}

        doc = await self._versioned_write(user_id, decide, {"to": target.value})
        if doc is None:
            err = IllegalTransition(user_id, seen.get("state"), target)
            log.warning("refused state transition", extra={"user_id": user_id, "error": str(err)})
            raise err
        return doc

    async def update_instance(
        self, user_id: str, set_fields: dict[str, Any], instance_id: str | None = None
    ) -> bool:
        def decide(doc: dict[str, Any]) -> dict[str, Any] | None:
            if instance_id is not None and doc.get("instance_id") != instance_id:
                return None
            return dict(set_fields)

        return await self._versioned_write(user_id, decide, {"fields": sorted(set_fields)}) is not None

    async def remove_instance(self, user_id: str, instance_id: str) -> bool:
        res = await self.instances.delete_one({"_id": user_id, "instance_id": instance_id})
        if res.deleted_count == 1:
            await self.journal.delete_many({"user_id": user_id})
        return res.deleted_count == 1

    # --- restores (services/backup) ----------------------------------------------------------

    async def claim_restore(self, user_id: str, lease_s: float) -> str | None:
        """Marks *user_id*'s instance as being restored for at most *lease_s* (a restore that
        dies frees it by itself); the provisioner refuses all but a stop meanwhile. Returns the
        claim's token (for release_restore), or None when another restore holds it or there is
        no instance. A versioned write: two restores never both win, nor undo a state change."""
        token, now = uuid.uuid4().hex, utcnow()

        def decide(doc: dict[str, Any]) -> dict[str, Any] | None:
            held = doc.get("restoring_until")
            if held is not None and held > now:
                return None
            return {"restoring_until": now + timedelta(seconds=lease_s), "restore_token": token}

        done = await self._versioned_write(user_id, decide, {"restore": "claim"})
        return token if done is not None else None

    async def release_restore(self, user_id: str, token: str) -> None:
        """Ends the claim *token* names (never a newer restore's, taken after this one's lease ran out)."""

        def decide(doc: dict[str, Any]) -> dict[str, Any] | None:
            if doc.get("restore_token") != token:
                return None
            return {"restoring_until": _UNSET, "restore_token": _UNSET}

        await self._versioned_write(user_id, decide, {"restore": "release"})

    # --- ports -----------------------------------------------------------------------------

    async def allocate_port(
        self,
        docker_host: str,
        user_id: str,
        start: int,
        end: int,
        is_free: Callable[[int], Awaitable[bool]] | None = None,
    ) -> int:
        """Claims a free port in [start, end] for *user_id*; the unique index settles races."""
        existing = await self.ports.find_one({"docker_host": docker_host, "user_id": user_id})
        if existing:
            return int(existing["port"])
        taken = {d["port"] async for d in self.ports.find({"docker_host": docker_host}, {"port": 1})}
        candidates = [p for p in range(start, end + 1) if p not in taken]
        # Start at a random point so concurrent allocators rarely collide.
        if candidates:
            k = random.randrange(len(candidates))
            candidates = candidates[k:] + candidates[:k]
        for port in candidates:
            if is_free is not None and not await is_free(port):
                continue
            try:
                await self.ports.insert_one(
                    {
                        "_id": f"{docker_host}:{port}",
                        "docker_host": docker_host,
                        "port": port,
                        "user_id": user_id,
                        "claimed_at": utcnow(),
                    }
                )
            except DuplicateKeyError:
                continue
            return port
        raise NoPortAvailable(f"no free port in {start}-{end} on {docker_host}")

    async def hold_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Takes or renews the exclusive lease *name* for *ttl_s*; False while another holds it."""
        now = utcnow()
        try:
            await self.leases.update_one(
                {"_id": name, "$or": [{"holder": holder}, {"expires_at": {"$lt": now}}]},
                {"$set": {"holder": holder, "expires_at": now + timedelta(seconds=ttl_s)}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return True

    async def port_of(self, docker_host: str, owner: str) -> int | None:
        doc = await self.ports.find_one({"docker_host": docker_host, "user_id": owner})
        return int(doc["port"]) if doc else None

    async def transfer_port(self, docker_host: str, from_owner: str, to_owner: str) -> int | None:
        """Hands *from_owner*'s port to *to_owner* (a claimed pool slot's); None if it has none."""
        doc = await self.ports.find_one_and_update(
            {"docker_host": docker_host, "user_id": from_owner},
            {"$set": {"user_id": to_owner, "claimed_at": utcnow()}},
        )
        return int(doc["port"]) if doc else None

    async def release_port(self, docker_host: str, user_id: str) -> int:
        res = await self.ports.delete_many({"docker_host": docker_host, "user_id": user_id})
        return res.deleted_count

    # --- request ids (idempotency) -----------------------------------------------------------

    async def claim_request(self, request_id: str, user_id: str, kind: str) -> dict[str, Any] | None:
        """Records a request id; returns the earlier record when it was seen before."""
        try:
            await self.requests.insert_one(
                {"_id": request_id, "user_id": user_id, "kind": kind, "at": utcnow(), "outcome": None}
            )
        except DuplicateKeyError:
            return await self.requests.find_one({"_id": request_id})
        return None

    async def set_request_outcome(self, request_id: str, outcome: dict[str, Any]) -> None:
        await self.requests.update_one({"_id": request_id}, {"$set": {"outcome": outcome}})

    # --- a user's credentials (ended when the instance is deleted) ----------------------------------

    async def revoke_user_keys(self, user_id: str) -> list[str]:
        """Revokes every API key of *user_id*; returns the ids that were live, for the proxies'
        revocation notice (``subjects.APIKEY_REVOKED``)."""
        live = {"user_id": user_id, "revoked": {"$ne": True}}
        ids = [d["_id"] async for d in self.api_keys.find(live, {"_id": 1})]
        await self.api_keys.update_many(live, {"$set": {"revoked": True, "revoked_at": utcnow()}})
        return ids

    async def revoke_user_sessions(self, user_id: str) -> int:
        """Ends every dashboard session of *user_id* (services/dashboard/sessions.py's records),
        and every proxy session token (JWT) issued to it so far: the proxies refuse a token whose
        ``iat`` is before the user's cutoff (services/gateway_proxy/auth.py)."""
        res = await self.db["dashboard_sessions"].delete_many({"user_id": user_id})
        await self.db["token_cutoffs"].update_one(
            {"_id": user_id}, {"$set": {"at": int(time.time())}}, upsert=True
        )
        return res.deleted_count

    async def token_cutoffs(self) -> dict[str, int]:
        """user id -> the time (epoch s) before which its proxy session tokens are refused."""
        return {d["_id"]: int(d["at"]) async for d in self.db["token_cutoffs"].find({})}

    # --- model providers (the LLM broker's upstreams) -------------------------------------------

    async def get_provider(self, name: str) -> dict[str, Any] | None:
        return await self.providers.find_one({"_id": name})

    async def list_providers(self) -> list[dict[str, Any]]:
        return [doc async for doc in self.providers.find({}).sort("_id", ASCENDING)]

    async def add_provider(self, name: str, fields: dict[str, Any]) -> bool:
        """Inserts a provider; False when one of that name exists (add never overwrites a key)."""
        now = utcnow()
        try:
            await self.providers.insert_one(
                {"_id": name, "state": "active", "version": 1, "created_at": now, "updated_at": now, **fields}
            )
        except DuplicateKeyError:
            return False
        return True

    async def update_provider(self, name: str, fields: dict[str, Any]) -> bool:
        res = await self.providers.update_one(
            {"_id": name}, {"$set": {**fields, "updated_at": utcnow()}, "$inc": {"version": 1}}
        )
        return res.matched_count == 1

    async def readd_provider(self, name: str, fields: dict[str, Any]) -> bool:
        """Brings a revoked provider back with new settings and key; False unless it was revoked."""
        res = await self.providers.update_one(
            {"_id": name, "state": "revoked"},
            {"$set": {**fields, "state": "active", "updated_at": utcnow()}, "$inc": {"version": 1}},
        )
        return res.matched_count == 1

    # --- usage and budgets ---------------------------------------------------------------------

    async def add_usage(
        self, user_id: str, day: str, requests: int, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """One atomic $inc on the user's document for the day (upserted)."""
        await self.usage.update_one(
            {"_id": f"{user_id}:{day}"},
            {
                "$inc": {
                    "requests": requests,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "tokens": prompt_tokens + completion_tokens,
                },
                "$set": {"user_id": user_id, "day": day, "month": day[:7], "updated_at": utcnow()},
            },
            upsert=True,
        )

    async def usage_totals(self, user_id: str, day: str) -> tuple[int, int]:
        """Tokens used on *day* and in its month."""
        day_total = month_total = 0
        async for doc in self.usage.find({"user_id": user_id, "month": day[:7]}, {"tokens": 1, "day": 1}):
            month_total += int(doc.get("tokens", 0))
            if doc.get("day") == day:
                day_total = int(doc.get("tokens", 0))
        return day_total, month_total

    async def claim_budget_event(self, key: str) -> bool:
        """True for the first claimant of *key* (one event per user, limit and period)."""
        try:
            await self.budget_events.insert_one({"_id": key, "at": utcnow()})
        except DuplicateKeyError:
            return False
        return True
