"""Restart before memory runs out (issue 17.3).

Each watched gateway's memory is read from its cgroup (v1: ``memory.usage_in_bytes`` minus
``total_inactive_file`` under ``ZAKI_MEMORY_CGROUP_ROOT/<container id>``, the figure ``docker
stats`` shows; v2: ``memory.current`` minus ``inactive_file``), a few file reads per
instance; Docker's stats API (about a second per container) only when neither is readable
(a monitor in a container without the host's cgroup tree).

The rules (``MemoryTrend``, ``decide``) are pure: samples -> least-squares slope over the
window -> projected seconds to the limit. An instance above ``memory_high_ratio`` of its limit
for ``memory_high_for_s``, or projected to reach it within ``memory_horizon_s``, is due for a
restart with reason ``memory_growth``; the restart waits for a quiet moment: no proxy or
broker activity for ``memory_quiet_s`` (the proxy counts an open WebSocket, a stream and
every request in flight as activity at each flush, shared/activity.py). Within
``memory_force_s`` of the limit it goes even if busy: the kernel would kill it mid-answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram
from pymongo.errors import DuplicateKeyError

from shared import audit, subjects
from shared.activity import last_active
from shared.events import InstanceCommand
from shared.gateway import container_name
from shared.settings import ZakiSettings

log = logging.getLogger("zaki.monitor.memory")

REASON = "memory_growth"
READ_SECONDS = Histogram(
    "zaki_monitor_memory_read_seconds", "Reading every watched gateway's memory once", ["source"]
)
DEFERRED = Counter("zaki_monitor_memory_restarts_deferred_total", "memory_growth restarts put off: not quiet")
for _s in ("cgroup", "docker"):
    READ_SECONDS.labels(_s)


# --- the rules, without I/O --------------------------------------------------------------------


def slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares bytes per second over (time, bytes) samples; 0 with fewer than two."""
    n = len(samples)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in samples) / n
    mb = sum(b for _, b in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    return sum((t - mt) * (b - mb) for t, b in samples) / var


def time_to_limit(samples: list[tuple[float, float]], limit: float) -> float | None:
    """Seconds until the limit at the current trend, from the last sample; None when not growing."""
    if not samples or limit <= 0:
        return None
    s = slope(samples)
    if s <= 0:
        return None
    return max(0.0, (limit - samples[-1][1]) / s)


@dataclass
class MemoryTrend:
    """One incarnation's samples within the window, and since when it is above the high mark."""

    window_s: float
    warmup_s: float = 0.0
    min_samples: int = 3
    samples: deque[tuple[float, float]] = field(default_factory=deque)
    limit: float = 0.0
    high_since: float | None = None
    first_seen: float | None = None

    def add(self, t: float, used: float, limit: float, high_ratio: float) -> None:
        # A gateway allocates most of its memory while it boots (0 to ~1 GiB in seconds): that is
        # not a leak, so an incarnation's first warmup_s are not sampled at all.
        self.first_seen = t if self.first_seen is None else self.first_seen
        if t - self.first_seen < self.warmup_s:
            return
        self.samples.append((t, used))
        self.limit = limit
        while self.samples and self.samples[0][0] < t - self.window_s:
            self.samples.popleft()
        high = limit > 0 and high_ratio > 0 and used >= high_ratio * limit
        self.high_since = (self.high_since or t) if high else None


@dataclass(frozen=True)
class Verdict:
    action: str  # "ok", "restart" (when quiet), "force" (now, quiet or not)
    detail: str = ""
    eta_s: float | None = None


def decide(trend: MemoryTrend, now: float, s: ZakiSettings) -> Verdict:
    if s.memory_high_ratio <= 0 or trend.limit <= 0 or not trend.samples:
        return Verdict("ok")
    used = trend.samples[-1][1]
    eta = time_to_limit(list(trend.samples), trend.limit) if len(trend.samples) >= trend.min_samples else None
    share = f"{used / 2**20:.0f} of {trend.limit / 2**20:.0f} MiB"
    if eta is not None and eta <= s.memory_force_s:
        return Verdict("force", f"{share}, limit in {eta:.0f} s", eta)
    if eta is not None and eta <= s.memory_horizon_s:
        return Verdict("restart", f"{share}, limit projected in {eta:.0f} s", eta)
    if trend.high_since is not None and now - trend.high_since >= s.memory_high_for_s:
        return Verdict("restart", f"{share} for {now - trend.high_since:.0f} s", eta)
    return Verdict("ok", share, eta)


# --- reading -----------------------------------------------------------------------------------


def _stat(path: Path, key: str) -> int:
    for line in path.read_text().splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


def read_cgroup(container_id: str, root: str) -> tuple[int, int] | None:
    """(working set, limit) in bytes from the cgroup files, or None when not readable here."""
    v1 = Path(root) / container_id
    try:
        usage = int((v1 / "memory.usage_in_bytes").read_text())
        limit = int((v1 / "memory.limit_in_bytes").read_text())
        return max(0, usage - _stat(v1 / "memory.stat", "total_inactive_file")), limit
    except (OSError, ValueError):
        pass
    v2 = Path("/sys/fs/cgroup/system.slice") / f"docker-{container_id}.scope"
    try:
        usage = int((v2 / "memory.current").read_text())
        raw = (v2 / "memory.max").read_text().strip()
        limit = 0 if raw == "max" else int(raw)
        return max(0, usage - _stat(v2 / "memory.stat", "inactive_file")), limit
    except (OSError, ValueError):
        return None


def docker_stats(client: Any, name: str) -> tuple[int, int] | None:
    try:
        st = client.containers.get(name).stats(stream=False)
    except Exception:
        return None
    mem = st.get("memory_stats") or {}
    if "usage" not in mem:
        return None
    inactive = (mem.get("stats") or {}).get(
        "total_inactive_file", (mem.get("stats") or {}).get("inactive_file", 0)
    )
    return max(0, int(mem["usage"]) - int(inactive)), int(mem.get("limit") or 0)


# --- the guard ---------------------------------------------------------------------------------


class MemoryGuard:
    """Samples every gateway the monitor watches and asks for ``memory_growth`` restarts."""

    def __init__(self, monitor: Any) -> None:
        self.m = monitor
        self.s: ZakiSettings = monitor.s
        self.trends: dict[str, MemoryTrend] = {}  # by instance id
        self.ids: dict[str, str] = {}  # instance id -> container id

    def _container_id(self, user_id: str, instance_id: str) -> str | None:
        cid = self.ids.get(instance_id)
        if cid is None:
            try:
                cid = self.m.docker.containers.get(container_name(user_id)).id
            except Exception:
                return None
            self.ids[instance_id] = cid
        return cid

    def _read(self, user_id: str, instance_id: str) -> tuple[int, int] | None:
        cid = self._container_id(user_id, instance_id)
        if cid is None:
            return None
        got = read_cgroup(cid, self.s.memory_cgroup_root)
        if got is None:
            self.ids.pop(instance_id, None)  # a new container for this incarnation: look it up again
            cid = self._container_id(user_id, instance_id)
            got = read_cgroup(cid, self.s.memory_cgroup_root) if cid else None
        if got is None:
            with READ_SECONDS.labels("docker").time():
                got = docker_stats(self.m.docker, container_name(user_id))
        return got

    def _read_all(self, watches: list[Any]) -> dict[str, tuple[int, int]]:
        t0 = time.perf_counter()
        out = {}
        for w in watches:
            got = self._read(w.user_id, w.instance_id)
            if got is not None:
                out[w.instance_id] = got
        READ_SECONDS.labels("cgroup").observe(time.perf_counter() - t0)
        return out

    async def sweep(self) -> None:
        if self.s.memory_high_ratio <= 0 or getattr(self.m, "docker", None) is None:
            return
        watches = [w for w in self.m.watches.values() if w.tracker.state.value in ("healthy", "degraded")]
        live = {w.instance_id for w in watches}
        for iid in list(self.trends):
            if iid not in live:
                self.trends.pop(iid, None)
                self.ids.pop(iid, None)
        readings = await asyncio.to_thread(self._read_all, watches)
        now = time.monotonic()
        due = []
        for w in watches:
            if w.instance_id not in readings:
                continue
            used, limit = readings[w.instance_id]
            trend = self.trends.setdefault(
                w.instance_id, MemoryTrend(self.s.memory_window_s, self.s.memory_warmup_s)
            )
            trend.add(now, used, limit, self.s.memory_high_ratio)
            verdict = decide(trend, now, self.s)
            if verdict.action != "ok" and not w.pending_restart:
                due.append((w, verdict))
        if not due:
            return
        active = await last_active(self.m.store.db, [w.user_id for w, _ in due])
        wall = datetime.now(UTC)
        for w, verdict in due:
            at = active.get(w.user_id)
            quiet = at is None or (wall - at).total_seconds() >= self.s.memory_quiet_s
            if verdict.action == "force" or quiet:
                await self._restart(w, verdict, quiet)
            else:
                DEFERRED.inc()
                log.info(
                    "memory_growth restart waits for a quiet moment",
                    extra={"user_id": w.user_id, "detail": verdict.detail},
                )

    async def _restart(self, w: Any, verdict: Verdict, quiet: bool) -> None:
        doc = await self.m._still_running(w)
        if doc is None:
            return
        # One restart per incarnation version, shared with the health restarts (monitor.py).
        try:
            await self.m.store.db["restart_claims"].insert_one(
                {
                    "_id": f"{w.user_id}:{w.instance_id}:{int(doc.get('version', 0))}",
                    "by": self.m.replica_id,
                    "reason": REASON,
                    "at": datetime.now(UTC),
                }
            )
        except DuplicateKeyError:
            return
        w.pending_restart = True
        self.trends.pop(w.instance_id, None)
        self.ids.pop(w.instance_id, None)
        why = f"{REASON}: {verdict.detail}" + ("" if quiet else " (not quiet: forced)")
        log.warning(
            "requesting a restart before memory runs out", extra={"user_id": w.user_id, "detail": why}
        )
        from services.monitor.monitor import RESTARTS

        RESTARTS.labels(REASON).inc()
        await self.m.publish(
            subjects.INSTANCE_RESTART,
            InstanceCommand(
                user_id=w.user_id, reason=f"monitor: {why}"[:200], actor=audit.platform("monitor", REASON)
            ),
        )
