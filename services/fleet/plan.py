"""Fleet upgrades in canary waves (issue 17.2): the rules, free of I/O.

``plan`` cuts the fleet into a canary set and waves (cumulative shares of the fleet, in a
stable pseudo-random order so the canary is a sample, not the oldest users); ``gate`` says
whether a wave may be followed by the next one, from what the platform records about each
upgraded instance: the upgrade's outcome (``instance.ready`` on the new image, or
``instance.upgrade.rolled_back`` / ``instance.failed``), the instance record after the soak
(still ``running`` on the new image, not ``failed`` or ``crashlooping``) and the monitor's
health (not ``unhealthy``, ``unreachable`` or ``crashlooping``), and the answers counted for
the upgraded instances since their upgrade (shared/activity.py): the share of proxy answers that
are 5xx and of broker model calls that failed, each judged once it has ``min_samples`` answers
(summed over the upgraded instances: one user's noise is not a verdict on an image) and compared
with its limit.

A stopped or suspended instance is not started by a rollout: the new image goes on its record
(``recorded``) and it starts with it next time; a rollback puts its previous image back there.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum

from shared.activity import Counts


class PlanError(ValueError):
    """Bad rollout input (a share, a wave list, an empty fleet)."""


class Status(StrEnum):
    PENDING = "pending"
    UPGRADING = "upgrading"  # the upgrade command is out; its outcome not yet seen
    UPGRADED = "upgraded"  # ready on the new image
    FAILED = "failed"  # the new image did not get ready (the provisioner put the old one back)
    REVERTING = "reverting"  # the runner asked for the previous image
    REVERTED = "reverted"  # back on its previous image
    RECORDED = "recorded"  # stopped or suspended: the new image is on its record for its next start
    SKIPPED = "skipped"  # neither running nor parked when its wave came (failed, being deleted, gone)


class RolloutState(StrEnum):
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    HALTED = "halted"  # the gate failed; every upgraded instance is back on its previous image
    COMPLETED = "completed"
    ABORTED = "aborted"  # an operator stopped it (and it was rolled back)


DONE = frozenset({RolloutState.HALTED, RolloutState.COMPLETED, RolloutState.ABORTED})
BAD_HEALTH = frozenset({"unhealthy", "unreachable", "crashlooping"})
BAD_STATES = frozenset({"failed", "crashlooping"})
NONE = Counts()
PARKED = frozenset({"stopped", "suspended"})  # upgraded on the record only (Status.RECORDED)


def parse_share(text: str) -> float:
    """``5%`` or ``0.05`` -> 0.05; in (0, 1]."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text or "")
    if not m:
        raise PlanError(f"{text!r} is not a share (5% or 0.05)")
    v = float(m[1]) / (100 if m[2] else 1)
    if not 0 < v <= 1:
        raise PlanError(f"{text!r} must be above 0 and at most 100%")
    return v


def parse_waves(text: str) -> list[float]:
    """``25%,50%,100%``: cumulative shares, increasing, ending at 100%."""
    shares = [parse_share(p) for p in text.split(",") if p.strip()]
    if not shares:
        raise PlanError("no waves given")
    if any(b <= a for a, b in itertools.pairwise(shares)):
        raise PlanError(f"waves must increase: {text}")
    if shares[-1] != 1.0:
        shares.append(1.0)  # every instance is upgraded in the end
    return shares


def _order(user_id: str, seed: str) -> bytes:
    return hashlib.blake2b(f"{seed}|{user_id}".encode(), digest_size=8).digest()


def plan(user_ids: list[str], canary: float, waves: list[float], seed: str = "") -> list[list[str]]:
    """The canary set, then each wave's new instances (cumulative shares of the fleet). Every
    user is in exactly one group; no group is empty; the canary has at least one instance."""
    if not user_ids:
        raise PlanError("no instance to upgrade")
    if not 0 < canary <= 1:
        raise PlanError("canary share must be in (0, 1]")
    users = sorted(set(user_ids), key=lambda u: _order(u, seed))
    n = len(users)
    groups: list[list[str]] = []
    done = 0
    for share in [canary, *waves]:
        upto = min(n, max(done + (1 if not groups else 0), math.ceil(share * n - 1e-9)))
        if upto > done:
            groups.append(users[done:upto])
            done = upto
    if done < n:
        groups.append(users[done:])
    return groups


@dataclass(frozen=True)
class Observation:
    """What the platform records about one instance of a finished wave."""

    status: Status
    state: str | None = None  # the instance record's state now (None: deleted)
    image: str | None = None
    health: str | None = None  # the monitor's state for this incarnation, when it has one
    proxy: Counts = NONE  # proxy answers since the upgrade
    broker: Counts = NONE  # broker model calls since the upgrade


@dataclass(frozen=True)
class Limits:
    """ZAKI_FLEET_MAX_PROXY_5XX_RATE, ZAKI_FLEET_MAX_BROKER_ERROR_RATE, ZAKI_FLEET_MIN_SAMPLES."""

    max_proxy_5xx_rate: float = 0.05
    max_broker_error_rate: float = 0.05
    min_samples: int = 50

    def __post_init__(self) -> None:
        for rate in (self.max_proxy_5xx_rate, self.max_broker_error_rate):
            if not 0 <= rate <= 1:
                raise PlanError(f"an error rate limit must be within 0 and 1, not {rate}")
        if self.min_samples < 1:
            raise PlanError("the minimum sample count must be at least 1")


@dataclass
class Gate:
    ok: bool
    reasons: list[str] = field(default_factory=list)


def rate_reasons(observed: dict[str, Observation], limits: Limits) -> list[str]:
    """The instances running the new image (status ``upgraded``) whose own proxy 5xx or broker
    error share is above its limit, from ``min_samples`` of their own answers on. Judged per
    instance and counted like any other bad instance (``max_failures``): summed over the wave,
    one busy or hostile tenant (its own provider failing, its agent stopped under load) would
    decide the rollout for everyone."""
    reasons = []
    for user, o in sorted(observed.items()):
        if o.status != Status.UPGRADED or o.state is None:
            continue
        for what, c, limit in (
            ("proxy 5xx", o.proxy, limits.max_proxy_5xx_rate),
            ("broker error", o.broker, limits.max_broker_error_rate),
        ):
            if c.calls >= limits.min_samples and c.errors / c.calls > limit:
                reasons.append(
                    f"{user}: {what} rate {c.errors}/{c.calls} ({c.errors / c.calls:.1%}) above {limit:.1%}"
                )
    return reasons


def gate(
    observed: dict[str, Observation], target: str, max_failures: int = 0, limits: Limits | None = None
) -> Gate:
    """Whether the rollout may go on after a wave and its soak. *observed*: every instance
    upgraded so far (all waves). More than *max_failures* bad instances halt it; an instance
    whose own error rate is above its limit is a bad instance."""
    reasons = []
    for user, o in sorted(observed.items()):
        if o.status in (Status.SKIPPED, Status.PENDING, Status.RECORDED):
            continue
        if o.status == Status.FAILED:
            reasons.append(f"{user}: the new image did not get ready")
        elif o.status != Status.UPGRADED:
            reasons.append(f"{user}: upgrade not finished ({o.status.value})")
        elif o.state is None:
            continue  # deleted meanwhile: not the image's fault
        elif o.state in BAD_STATES:
            reasons.append(f"{user}: {o.state} after the upgrade")
        elif o.image != target:
            reasons.append(f"{user}: runs {o.image}, not {target}")
        elif o.health in BAD_HEALTH:
            reasons.append(f"{user}: health {o.health}")
    reasons += rate_reasons(observed, limits or Limits())
    bad = {r.split(": ", 1)[0] for r in reasons}  # an instance with two reasons is one failure
    return Gate(ok=len(bad) <= max_failures, reasons=reasons)


READY = "ready"
RECORDED = "recorded"


def settled(record: dict | None, image: str) -> str | None:
    """What an instance's record says of an upgrade to *image*, outcome event or not: ``ready``
    (running it, and it got ready on it: the provisioner's ``last_good_image``), ``recorded``
    (stopped or suspended with it on the record, for the next start), else None (not yet, gone)."""
    if record is None or record.get("image") != image:
        return None
    if record.get("state") == "running" and record.get("last_good_image") == image:
        return READY
    if record.get("state") in PARKED:
        return RECORDED
    return None


REVERT = frozenset({Status.UPGRADED, Status.UPGRADING, Status.REVERTING, Status.RECORDED})


def to_revert(statuses: dict[str, Status]) -> list[str]:
    """Instances the runner puts back on their previous image after a failed gate or an
    abort: every one that may run the new image or has it on its record (a failed one was put
    back by the provisioner)."""
    return sorted(u for u, s in statuses.items() if s in REVERT)


def progress_line(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"
