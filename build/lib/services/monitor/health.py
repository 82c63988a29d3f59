"""The monitor's domain rules, free of I/O: health states with hysteresis, restart backoff,
crash-loop detection, and which replica watches which instance."""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

from shared.events import HealthState

H = HealthState


@dataclass
class HealthTracker:
    """N consecutive failures make an instance unhealthy (or unreachable); M successes heal it.

    A success that took longer than ``slow_s`` counts as *degraded*: answering, but slowly.
    """

    unhealthy_after: int = 2
    healthy_after: int = 2
    slow_s: float = 1.0
    state: HealthState = H.UNKNOWN
    failures: int = 0
    successes: int = 0
    reason: str = ""

    def observe(self, ok: bool, latency_s: float = 0.0, error: str = "") -> HealthState | None:
        """Feeds one probe result; returns the new state when it changed."""
        before = self.state
        if ok:
            self.failures = 0
            self.successes += 1
            recovering = self.state in (H.UNHEALTHY, H.UNREACHABLE, H.CRASHLOOPING)
            if not recovering or self.successes >= self.healthy_after:
                slow = latency_s > self.slow_s
                self.state, self.reason = (H.DEGRADED, "slow") if slow else (H.HEALTHY, "")
        else:
            self.successes = 0
            self.failures += 1
            if self.failures >= self.unhealthy_after and self.state != H.CRASHLOOPING:
                self.state = H.UNREACHABLE if error in ("refused", "timeout") else H.UNHEALTHY
                self.reason = error
        return self.state if self.state != before else None

    def force(self, state: HealthState, reason: str) -> HealthState | None:
        """An out-of-band fact (a Docker event): applies at once, no hysteresis."""
        before = self.state
        if before == H.CRASHLOOPING and state != H.HEALTHY:
            return None
        self.state, self.reason = state, reason
        self.failures = self.unhealthy_after
        self.successes = 0
        return state if state != before else None


@dataclass
class RestartPolicy:
    """Exponential backoff between restarts of one instance; crash-looping after
    ``max_restarts`` within ``window_s``."""

    base_s: float = 2.0
    max_s: float = 300.0
    max_restarts: int = 5
    window_s: float = 600.0
    history: deque[float] = field(default_factory=deque)
    next_allowed: float = 0.0

    def decide(self, now: float) -> str:
        """'restart', 'wait' (backoff not over) or 'crashloop' (give up)."""
        while self.history and self.history[0] < now - self.window_s:
            self.history.popleft()
        if len(self.history) >= self.max_restarts:
            return "crashloop"
        if now < self.next_allowed:
            return "wait"
        return "restart"

    def record(self, now: float) -> None:
        self.history.append(now)
        self.next_allowed = now + min(self.max_s, self.base_s * 2 ** (len(self.history) - 1))

    def reset(self) -> None:
        self.history.clear()
        self.next_allowed = 0.0


def owner(user_id: str, replicas: list[str]) -> str | None:
    """Rendezvous hashing: the live replica that watches *user_id*. When a replica
    leaves, only its own instances move, spread over the others."""
    if not replicas:
        return None
    return max(replicas, key=lambda r: hashlib.blake2b(f"{r}|{user_id}".encode(), digest_size=8).digest())


def jitter_offset(user_id: str, interval_s: float, spread: float = 0.8) -> float:
    """A stable offset inside the probe interval, so probes do not arrive in waves."""
    h = int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=4).digest(), "big")
    return (h / 2**32) * interval_s * spread
