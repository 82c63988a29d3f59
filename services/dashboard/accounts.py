"""Local accounts: username or e-mail + password (Argon2id), roles, disabling, resets.

Names are unique through claim documents whose ``_id`` is the lower-cased name (``u:alice``,
``e:alice@example.com``): an insert either wins or meets a duplicate key, on MongoDB and
FerretDB alike, with no transaction and no unique index over optional fields.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pymongo.errors import DuplicateKeyError

from services.dashboard.errors import ApiError
from shared.store import Store, utcnow
from shared.validation import check_user_id

PASSWORD_MIN = 10
PASSWORD_MAX = 256
ROLES = ("user", "operator")
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{2,31}")
# The most used passwords that pass the length rule; a page should also warn on its own.
COMMON = frozenset(
    {
        "1234567890",
        "12345678910",
        "123456789a",
        "0123456789",
        "1q2w3e4r5t",
        "qwertyuiop",
        "password12",
        "password123",
        "password1234",
        "passw0rd123",
        "iloveyou12",
        "letmein123",
        "welcome123",
        "administrator",
        "qwerty12345",
        "qwerty123456",
        "abc1234567",
        "abcdefghij",
        "1qaz2wsx3edc",
        "zaq12wsxcde3",
        "changeme123",
        "correcthorsebatterystaple",
    }
)

_hasher = PasswordHasher()  # Argon2id, RFC 9106 low-memory parameters (64 MiB, t=3, p=4)
# Verified when the login names no account, so both cases cost the same time.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def accounts(store: Store):
    return store.db["accounts"]


def names(store: Store):
    return store.db["account_names"]


def check_password(password: str, username: str = "", field: str = "password") -> None:
    """Refuses a weak password with ``400 weak_password``."""

    def weak(msg: str) -> ApiError:
        return ApiError(400, "weak_password", msg, field)

    if len(password) < PASSWORD_MIN:
        raise weak(f"the password is too short (at least {PASSWORD_MIN} characters)")
    if len(password) > PASSWORD_MAX:
        raise weak(f"the password is too long (at most {PASSWORD_MAX} characters)")
    lowered = password.lower()
    if lowered in COMMON or lowered.rstrip("!.?0123456789") in {c.rstrip("0123456789") for c in COMMON}:
        raise weak("this password is one of the most common ones")
    if len(set(password)) < 5:
        raise weak("the password repeats too few different characters")
    if username and len(username) >= 3 and username.lower() in lowered:
        raise weak("the password must not contain the username")


async def hash_password(password: str) -> str:
    # Argon2 takes tens of milliseconds of CPU and 64 MiB: off the event loop.
    return await asyncio.to_thread(_hasher.hash, password)


async def verify_password(stored_hash: str | None, password: str) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
        except (VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(verify)


def public(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": doc["_id"],
        "username": doc["username"],
        "email": doc.get("email"),
        "role": doc.get("role", "user"),
        "created_at": doc["created_at"],
    }


async def ensure_indexes(store: Store) -> None:
    await names(store).create_index("user_id", name="by_user")


def new_user_id(prefix: str) -> str:
    return check_user_id(f"{prefix}{secrets.token_hex(6)}")


async def create_account(
    store: Store,
    username: str,
    email: str | None,
    password: str,
    role: str = "user",
    prefix: str = "u",
) -> dict[str, Any]:
    """Creates an account or raises ``409 name_taken`` / ``400 weak_password``; nothing is left
    behind on failure."""
    if not USERNAME_RE.fullmatch(username):
        raise ApiError(400, "invalid_input", "username: 3-32 of A-Z a-z 0-9 _ -", "username")
    if role not in ROLES:
        raise ApiError(400, "invalid_input", f"role must be one of {ROLES}", "role")
    check_password(password, username)
    user_id = new_user_id(prefix)
    claims = [("username", f"u:{username.lower()}")]
    if email:
        claims.append(("email", f"e:{email.lower()}"))
    taken: list[str] = []
    for fld, claim in claims:
        try:
            await names(store).insert_one({"_id": claim, "user_id": user_id, "at": utcnow()})
            taken.append(claim)
        except DuplicateKeyError:
            await names(store).delete_many({"_id": {"$in": taken}, "user_id": user_id})
            raise ApiError(409, "name_taken", f"this {fld} is already taken", fld) from None
    now = utcnow()
    doc = {
        "_id": user_id,
        "username": username.lower(),
        "email": email.lower() if email else None,
        "password_hash": await hash_password(password),
        "role": role,
        "disabled": False,
        "created_at": now,
        "updated_at": now,
        "password_changed_at": now,
    }
    try:
        await accounts(store).insert_one(doc)
    except BaseException:
        await names(store).delete_many({"_id": {"$in": taken}, "user_id": user_id})
        raise
    return doc


async def find_by_login(store: Store, login: str) -> dict[str, Any] | None:
    key = f"e:{login.lower()}" if "@" in login else f"u:{login.lower()}"
    claim = await names(store).find_one({"_id": key})
    if claim is None:
        return None
    return await accounts(store).find_one({"_id": claim["user_id"]})


async def get(store: Store, user_id: str) -> dict[str, Any] | None:
    return await accounts(store).find_one({"_id": user_id})


async def rehash_if_needed(store: Store, doc: dict[str, Any], password: str) -> None:
    if _hasher.check_needs_rehash(doc["password_hash"]):
        await accounts(store).update_one(
            {"_id": doc["_id"]}, {"$set": {"password_hash": await hash_password(password)}}
        )


async def set_password(store: Store, user_id: str, password: str, username: str) -> None:
    check_password(password, username, "new_password")
    now = utcnow()
    await accounts(store).update_one(
        {"_id": user_id},
        {
            "$set": {
                "password_hash": await hash_password(password),
                "password_changed_at": now,
                "updated_at": now,
            }
        },
    )


def temporary_password() -> str:
    """A reset password: 20 url-safe characters (about 120 bits), shown once."""
    return secrets.token_urlsafe(15)


async def set_disabled(store: Store, user_id: str, disabled: bool) -> bool:
    res = await accounts(store).update_one(
        {"_id": user_id}, {"$set": {"disabled": disabled, "updated_at": utcnow()}}
    )
    return res.matched_count == 1


async def delete_account(store: Store, user_id: str) -> None:
    await accounts(store).delete_one({"_id": user_id})
    await names(store).delete_many({"user_id": user_id})


async def list_accounts(store: Store) -> list[dict[str, Any]]:
    return [d async for d in accounts(store).find({}).sort("created_at", 1)]


async def resolve(store: Store, who: str) -> dict[str, Any] | None:
    """An account by user id, username or e-mail (the CLI's and the operator pages' argument)."""
    return await get(store, who) or await find_by_login(store, who)
