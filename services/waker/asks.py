"""What the waker asked the provisioner and has not seen answered yet: pure rules, no I/O.

The waker asks (``instance.suspend`` / ``instance.wake``) from a view of the store a sweep
old; one ask per pending transition is enough (the provisioner answers every command, one
at a time per user). An ask is pending from the moment it is published until its outcome
arrives; then the next transition of that user is asked for at once, however soon it comes.
If the outcome is lost (the provisioner crashed mid-command, the waker's NATS connection
dropped), the ask lapses after ``reask_s`` and is asked again: a duplicate ask is harmless
(the provisioner answers with the current state), a lost one would leave a gateway up or
asleep for good.

A release (the provisioner is about to start a sleeper, or changes one) is not an ask: the
provisioner releases again after its ``suspended -> starting`` transition, and a poll that
starts after that finds the gateway no longer asleep and ends before it reaches Telegram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared import subjects

Kind = Literal["suspend", "wake"]
SUSPEND: Kind = "suspend"
WAKE: Kind = "wake"
# The provisioner's answers to a suspend or a wake (and whatever else ends one: a stop, a delete).
OUTCOMES = (
    subjects.INSTANCE_SUSPENDED,
    subjects.INSTANCE_WOKEN,
    subjects.INSTANCE_READY,
    subjects.INSTANCE_FAILED,
    subjects.INSTANCE_STOPPED,
    subjects.INSTANCE_DELETED,
)
# The outcomes of *another* command that do not settle an ask: a sleeper's suspend published
# just after the waker saw it asleep and asked for its wake (the wake is still to come); a
# running gateway's "ready" (a start or a request that found it running) says nothing of a
# suspend asked for meanwhile. Anything else shows the ask moot: someone else's wake came
# first, or the instance was stopped, deleted or failed.
NOT_SETTLED_BY_OTHERS: dict[Kind, frozenset[str]] = {
    WAKE: frozenset({subjects.INSTANCE_SUSPENDED}),
    SUSPEND: frozenset({subjects.INSTANCE_READY, subjects.INSTANCE_WOKEN}),
}
# After this long without an outcome the ask is taken as lost and may be made again.
REASK_S = 60.0


@dataclass(frozen=True)
class Ask:
    request_id: str
    at: float  # monotonic seconds


class PendingAsks:
    """The asks in flight, per user and kind; *now* is monotonic seconds."""

    def __init__(self, reask_s: float = REASK_S) -> None:
        self.reask_s = reask_s
        self._asks: dict[tuple[str, Kind], Ask] = {}

    def __len__(self) -> int:
        return len(self._asks)

    def asked(self, user_id: str, kind: Kind, request_id: str, now: float) -> None:
        self._asks[(user_id, kind)] = Ask(request_id, now)

    def forget(self, user_id: str, kind: Kind) -> None:
        """The ask never left (publishing failed): the next sweep may ask again."""
        self._asks.pop((user_id, kind), None)

    def pending(self, user_id: str, kind: Kind, now: float) -> bool:
        """Whether an ask of this kind is in flight (asked, unanswered, not lapsed)."""
        ask = self._asks.get((user_id, kind))
        if ask is None:
            return False
        if now - ask.at >= self.reask_s:
            del self._asks[(user_id, kind)]  # its outcome was lost
            return False
        return True

    def outcome(self, subject: str, user_id: str, request_id: str | None) -> list[Kind]:
        """An outcome for *user_id* arrived; returns the kinds of ask it settled.

        The answer to the ask itself (same request id) settles it whatever it says (done,
        declined, failed); another command's outcome settles it when it shows the instance
        left the state the ask started from (someone else's wake got there first, a stop)."""
        settled: list[Kind] = []
        if subject not in OUTCOMES:
            return settled
        for kind in (SUSPEND, WAKE):
            ask = self._asks.get((user_id, kind))
            if ask is None:
                continue
            if ask.request_id == request_id or subject not in NOT_SETTLED_BY_OTHERS[kind]:
                del self._asks[(user_id, kind)]
                settled.append(kind)
        return settled

    def prune(self, now: float) -> None:
        """Drops lapsed asks (users gone without an outcome would otherwise stay forever)."""
        for key in [k for k, a in self._asks.items() if now - a.at >= self.reask_s]:
            del self._asks[key]
