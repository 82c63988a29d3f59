"""Self-healing rules (issue 14.3), free of I/O: which failures the platform retries on its
own, and when.

An instance that was running and then failed on the platform's side (a gateway that misses
readiness after a restart, a Docker error, a container gone) is retried by reconcile after
``base * 2^n`` seconds (at most ``max``). After ``heal_max_attempts`` failed retries it is
``crashlooping``: retrying a broken image or config forever only burns the host. Failures
caused by input (a bad token, an image not allowed, an illegal command) and a user's stop
are never retried.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from shared.events import FailureReason
from shared.settings import ZakiSettings

# Failures on the platform's side: retrying can help.
HEALABLE = frozenset(
    {
        FailureReason.GATEWAY_NOT_READY,
        FailureReason.DOCKER,
        FailureReason.DISK,
        FailureReason.NO_PORT,
        FailureReason.INTERNAL,
    }
)


def next_heal(
    previous: dict[str, Any] | None, reason: FailureReason, now: datetime, s: ZakiSettings
) -> dict[str, Any]:
    """The record's ``heal`` field after a healable failure. ``attempts`` counts the retries
    made so far; it carries over while failures follow each other within heal_reset_s."""
    attempts = 0
    if previous and (now - previous["failed_at"]).total_seconds() < s.heal_reset_s:
        attempts = int(previous.get("attempts", 0))
    delay = min(s.heal_backoff_base_s * 2**attempts, s.heal_backoff_max_s)
    return {
        "attempts": attempts,
        "failed_at": now,
        "next_at": now + timedelta(seconds=delay),
        "reason": reason.value,
    }


def decide(heal: dict[str, Any] | None, now: datetime, s: ZakiSettings) -> str | None:
    """For a failed record: 'retry', 'give_up' or None (not ours to retry, or not yet)."""
    if not heal:
        return None
    if int(heal.get("attempts", 0)) >= s.heal_max_attempts:
        return "give_up"
    return "retry" if heal["next_at"] <= now else None
