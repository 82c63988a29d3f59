"""When an instance is suspended and when it must be woken again: pure rules, no I/O.

An instance is idle once nothing happened for its idle time (see ``shared/activity.py`` for
what counts). Its own ``idle_suspend_s`` overrides ``ZAKI_IDLE_SUSPEND_S``; 0 means never.
A gateway with a scheduled job is woken ``lead_s`` before the job; one whose next job is
too close to be worth a suspend (boot costs more than the sleep saves) is left running.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

# Suspending for less than this is not worth a boot (a real gateway takes ~15 s and its
# first turn is slower). Also the shortest sleep the scheduled-work rule allows.
MIN_SLEEP_S = 120.0


@dataclass(frozen=True)
class Decision:
    suspend: bool
    why: str  # "never", "active", "job_soon" or "idle"
    idle_s: float = 0.0  # how long it has been idle
    wake_at: datetime | None = None  # when to wake it for its next job (suspend only)
    check_at: datetime | None = None  # when the answer may change (not suspended)


def effective_idle_s(override: int | float | None, default: float, flush_s: float = 0.0) -> float:
    """The instance's own idle time when it has one (0 = never), else the platform default;
    never below two activity flushes (*flush_s*, ZAKI_ACTIVITY_FLUSH_S) and a second: a request
    in flight is recorded only at a flush, so a shorter idle time stops a gateway mid-request."""
    chosen = max(0.0, float(default if override is None else override))
    return 0.0 if chosen == 0 else max(chosen, 2 * flush_s + 1)


def wake_time(next_job_at: datetime | None, lead_s: float) -> datetime | None:
    return None if next_job_at is None else next_job_at - timedelta(seconds=lead_s)


def decide(
    now: datetime,
    idle_after_s: float,
    last_active: datetime | None,
    active_floor: datetime | None,
    next_job_at: datetime | None = None,
    lead_s: float = 60.0,
    min_sleep_s: float = MIN_SLEEP_S,
) -> Decision:
    """Whether to suspend now.

    *last_active* is the last recorded traffic; *active_floor* the last moment the platform
    itself touched the instance (started, woken, updated): a gateway that just booted is not
    idle merely because nobody has used it yet.
    """
    if idle_after_s <= 0:
        return Decision(False, "never")
    seen = [t for t in (last_active, active_floor) if t is not None]
    since = max(seen) if seen else None
    idle_s = (now - since).total_seconds() if since is not None else float("inf")
    if since is not None and idle_s < idle_after_s:
        return Decision(False, "active", idle_s, check_at=since + timedelta(seconds=idle_after_s))
    wake_at = wake_time(next_job_at, lead_s)
    if wake_at is not None and (wake_at - now).total_seconds() < min_sleep_s:
        # The next job is too close: stay up for it, look again once it has run.
        return Decision(False, "job_soon", idle_s, check_at=next_job_at)
    return Decision(True, "idle", idle_s if since is not None else idle_after_s, wake_at=wake_at)


def due_wakes(now: datetime, wake_at: dict[str, datetime | None]) -> list[str]:
    """The suspended instances whose scheduled wake time has come."""
    return sorted(u for u, at in wake_at.items() if at is not None and at <= now)
