"""Secrets at rest: AES-256-GCM under a key ring with key ids, so keys can rotate.

A sealed value looks like ``zk1.<kid>.<base64url(nonce || ciphertext+tag)>``. The
caller's *context* (for example ``"instance:alice:bot_token"``) is bound in as
associated data, so a ciphertext copied into another record or field fails to open.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "zk1"
_KID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


class DecryptionError(Exception):
    """The value was tampered with, bound to another context, or its key is unknown."""


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class KeyRing:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        for kid, key in keys:
            if not _KID_RE.fullmatch(kid):
                raise ValueError(f"bad key id {kid!r}")
            if len(key) != 32:
                raise ValueError(f"key {kid!r} must be 32 bytes")
        self.primary_kid = keys[0][0]
        self._keys = {kid: AESGCM(key) for kid, key in keys}

    @classmethod
    def from_spec(cls, spec: str) -> KeyRing:
        """Parses ``kid:base64key[,kid:base64key...]``; the first key encrypts."""
        pairs = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            kid, _, b64 = part.partition(":")
            pairs.append((kid, _b64d(b64)))
        return cls(pairs)

    @staticmethod
    def new_key_spec(kid: str) -> str:
        return f"{kid}:{_b64e(os.urandom(32))}"

    def encrypt(self, plaintext: str, context: str) -> str:
        nonce = os.urandom(12)
        ct = self._keys[self.primary_kid].encrypt(nonce, plaintext.encode(), context.encode())
        return f"{PREFIX}.{self.primary_kid}.{_b64e(nonce + ct)}"

    def decrypt(self, sealed: str, context: str) -> str:
        try:
            prefix, kid, body = sealed.split(".", 2)
            raw = _b64d(body)
        except (ValueError, AttributeError) as e:
            raise DecryptionError("not a sealed value") from e
        aead = self._keys.get(kid)
        if prefix != PREFIX or aead is None:
            raise DecryptionError(f"unknown key id {kid!r}")
        try:
            return aead.decrypt(raw[:12], raw[12:], context.encode()).decode()
        except InvalidTag as e:
            raise DecryptionError("ciphertext does not authenticate") from e

    def cipher(self, kid: str | None = None) -> tuple[str, AESGCM]:
        """The AEAD of key *kid* (default: the primary) for streaming use (services/backup);
        KeyError for an unknown id."""
        kid = kid or self.primary_kid
        return kid, self._keys[kid]

    def key_id(self, sealed: str) -> str:
        return sealed.split(".", 2)[1]

    def reseal(self, sealed: str, context: str) -> str | None:
        """The value under the primary key, or None when it already is."""
        if self.key_id(sealed) == self.primary_kid:
            return None
        return self.encrypt(self.decrypt(sealed, context), context)


def instance_secret_context(user_id: str, field: str) -> str:
    """The AES-GCM context of one instance secret: a sealed value only opens for its own field of its own user."""
    return f"instance:{user_id}:{field}"


def provider_key_context(provider: str) -> str:
    return f"provider:{provider}:api_key"


BROKER_CREDENTIAL_PREFIX = "zkb_"


def new_broker_credential() -> str:
    """A per-instance credential for the LLM broker: what a gateway's config holds instead of a provider key."""
    return BROKER_CREDENTIAL_PREFIX + secrets.token_urlsafe(32)


def credential_hash(credential: str) -> str:
    """Lookup key for a credential (high-entropy secrets: a plain SHA-256 is enough, no stretching)."""
    return hashlib.sha256(credential.encode()).hexdigest()
