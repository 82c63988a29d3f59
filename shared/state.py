"""The instance state machine and the records kept in MongoDB."""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    REQUESTED = "requested"
    PROVISIONING = "provisioning"
    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    # Failed again and again on the platform's own retries (issue 14.3): left alone until a user acts.
    CRASHLOOPING = "crashlooping"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DELETING = "deleting"
    DELETED = "deleted"
    # Stopped by the platform for idleness (issue 16): woken by traffic, a Telegram message or a
    # scheduled job. Distinct from a user's own `stopped`, which traffic never wakes.
    SUSPENDED = "suspended"


S = InstanceState

# Every legal move. Anything else is refused by the store's conditional update.
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.REQUESTED: frozenset({S.PROVISIONING, S.FAILED, S.DELETING}),
    S.PROVISIONING: frozenset({S.STARTING, S.FAILED, S.DELETING}),
    S.STARTING: frozenset({S.RUNNING, S.FAILED, S.STOPPING, S.DELETING, S.STARTING}),
    S.RUNNING: frozenset({S.STARTING, S.STOPPING, S.DELETING, S.FAILED, S.SUSPENDED}),
    S.FAILED: frozenset({S.PROVISIONING, S.STARTING, S.STOPPING, S.DELETING, S.CRASHLOOPING}),
    S.CRASHLOOPING: frozenset({S.PROVISIONING, S.STARTING, S.STOPPING, S.DELETING}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED, S.DELETING}),
    S.STOPPED: frozenset({S.STARTING, S.PROVISIONING, S.DELETING}),
    S.DELETING: frozenset({S.DELETED}),
    S.DELETED: frozenset({S.REQUESTED}),
    S.SUSPENDED: frozenset({S.STARTING, S.RUNNING, S.PROVISIONING, S.STOPPING, S.STOPPED, S.DELETING}),
}


def sources_of(target: InstanceState) -> list[str]:
    """The states from which *target* may be entered, as stored strings."""
    return [s.value for s, targets in TRANSITIONS.items() if target in targets]


class IllegalTransition(Exception):
    def __init__(self, user_id: str, current: str | None, target: InstanceState) -> None:
        super().__init__(f"instance {user_id}: {current} -> {target.value} is not allowed")
        self.current = current
        self.target = target
