"""Log-in throttling: a token bucket per account and one per client address. Every attempt takes
a token and a successful one gives it back, so only failures count; an empty bucket answers 429
with Retry-After. Kept in this process (one dashboard replica; see the README's known gaps)."""

from __future__ import annotations

import ipaddress
import math

from services.dashboard.errors import ApiError
from shared.ratelimit import TokenBucket

MAX_KEYS = 100_000


class Throttle:
    def __init__(self, burst: int, interval_s: float) -> None:
        self.burst, self.rate = burst, 1.0 / interval_s
        self.buckets: dict[str, TokenBucket] = {}

    def take(self, key: str) -> float:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_KEYS:  # forget idle keys rather than grow without bound
                self.buckets = {k: b for k, b in self.buckets.items() if b.tokens < b.burst - 1e-9}
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take()

    def give_back(self, key: str) -> None:
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(float(bucket.burst), bucket.tokens + 1)


class LoginThrottle:
    def __init__(self, account: Throttle, address: Throttle) -> None:
        self.account, self.address = account, address

    def attempt(self, account_key: str, address: str) -> None:
        """Takes one token from both buckets or raises ``429 too_many_attempts``."""
        wait_addr = self.address.take(address)
        wait_acct = self.account.take(account_key)
        wait = max(wait_addr, wait_acct)
        if wait > 0:
            # A refused attempt is not charged twice: return what this one took.
            if wait_addr == 0:
                self.address.give_back(address)
            if wait_acct == 0:
                self.account.give_back(account_key)
            secs = max(1, math.ceil(wait))
            raise ApiError(
                429,
                "too_many_attempts",
                f"too many failed log-ins; try again in {secs} s",
                extra={"retry_after_s": secs},
                headers={"Retry-After": str(secs)},
            )

    def succeeded(self, account_key: str, address: str) -> None:
        self.address.give_back(address)
        self.account.give_back(account_key)


def client_address(remote: str | None, forwarded_for: str | None, trusted: list[str]) -> str:
    """The caller's address: the proxy's X-Forwarded-For (its last hop) when the peer is a
    trusted proxy, else the peer. IPv6 addresses count per /64 (one host has many)."""
    addr = remote or "unknown"
    if forwarded_for and addr in trusted:
        addr = forwarded_for.split(",")[-1].strip() or addr
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr[:64]
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
