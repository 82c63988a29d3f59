"""Per-tenant limits kept in this process: a token bucket for requests and a
counter of open WebSockets."""

from __future__ import annotations

from collections import defaultdict

from shared.ratelimit import TokenBucket


class TenantLimits:
    def __init__(self, rate: float, burst: int, max_websockets: int) -> None:
        self.rate, self.burst, self.max_websockets = rate, burst, max_websockets
        self.buckets: dict[str, TokenBucket] = {}
        self.websockets: dict[str, int] = defaultdict(int)

    def take(self, tenant: str) -> float:
        bucket = self.buckets.get(tenant)
        if bucket is None:
            bucket = self.buckets[tenant] = TokenBucket(self.rate, self.burst)
            if len(self.buckets) > 200_000:  # idle tenants are cheap to forget
                self.buckets = {tenant: bucket}
        return bucket.take()

    def open_websocket(self, tenant: str) -> bool:
        if self.websockets[tenant] >= self.max_websockets:
            return False
        self.websockets[tenant] += 1
        return True

    def close_websocket(self, tenant: str) -> None:
        self.websockets[tenant] -= 1
        if self.websockets[tenant] <= 0:
            del self.websockets[tenant]
