"""The audit trail (issue 17.4): who asked for what, and what came of it.

One record per command the provisioner handles, per outcome it publishes, and per operator
action (CLI, dashboard, fleet), on ``zaki.audit.<kind>`` in the JetStream stream
``ZAKI_AUDIT`` with its own retention (``ZAKI_AUDIT_RETENTION_DAYS``, 400 by default).
Records never hold a secret: secret fields are dropped and the rest passes the log
redactor (bot tokens, keys, bearer credentials, registered literals).

Writers call the process-wide helpers (no-ops until ``install``):
    ``await audit.command(subject, event)``   a command, with its ``actor``
    ``await audit.outcome(subject, event)``   an outcome event
    ``await audit.action(actor, action, target, detail)``   anything else an operator did
A write that fails is logged and counted, never fatal: the command itself goes on.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import BaseModel, SecretStr

from shared import subjects
from shared.events import Actor, ActorKind
from shared.logging import REDACTED, redact

log = logging.getLogger("zaki.audit")

Kind = Literal["command", "outcome", "action"]
MAX_DETAIL = 4000  # characters of a record's detail, after redaction
DAY = 24 * 3600


def stream_config(retention_days: float, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=subjects.AUDIT_STREAM,
        subjects=[f"{subjects.AUDIT}.>", f"{subjects.FLEET}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=retention_days * DAY,
        num_replicas=replicas,
    )


async def ensure_stream(js: Any, retention_days: float, replicas: int = 1) -> None:
    cfg = stream_config(retention_days, replicas)
    try:
        await js.stream_info(cfg.name)
        await js.update_stream(cfg)
    except NotFoundError:
        await js.add_stream(cfg)


_SECRET_KEY = re.compile(r"(?i)(token|password|api_?key|secret|authorization)$")


def _clean(value: Any) -> Any:
    """A JSON-able copy with every secret replaced: secret values and fields named like one
    (sealed ``*_enc`` ones dropped), and every string through the log redactor."""
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, BaseModel):
        value = dict(value)
    if isinstance(value, dict):
        return {
            str(k): REDACTED if _SECRET_KEY.search(str(k)) and v is not None else _clean(v)
            for k, v in value.items()
            if not str(k).endswith("_enc")
        }
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value[-5:]]  # a bounded tail (event logs)
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "value") and isinstance(value.value, str):  # enums
        return value.value
    if isinstance(value, str):
        return redact(value)
    return value if isinstance(value, int | float | bool) or value is None else redact(str(value))


def record(
    kind: Kind,
    subject: str,
    *,
    actor: Actor | dict[str, Any] | None,
    user_id: str | None = None,
    request_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One audit record, redacted and bounded."""
    text = json.dumps(_clean(detail or {}), default=str)
    if len(text) > MAX_DETAIL:
        text = json.dumps({"truncated": text[:MAX_DETAIL]})
    act = actor.model_dump(mode="json") if isinstance(actor, Actor) else actor
    if act is not None:
        act = _clean(act)
    return {
        "id": uuid.uuid4().hex,
        "at": datetime.now(UTC).isoformat(),
        "kind": kind,
        "subject": subject,
        "actor": act,
        "user_id": user_id,
        "request_id": request_id,
        "detail": json.loads(text),
    }


class AuditLog:
    """Writes records to the stream; creates it on first use."""

    def __init__(self, js: Any, retention_days: float, replicas: int = 1) -> None:
        self.js = js
        self.retention_days = retention_days
        self.replicas = replicas
        self._ready = False
        self.failures = 0

    async def write(self, rec: dict[str, Any]) -> None:
        if not self._ready:
            await ensure_stream(self.js, self.retention_days, self.replicas)
            self._ready = True
        await self.js.publish(f"{subjects.AUDIT}.{rec['kind']}", json.dumps(rec).encode(), timeout=5)


_LOG: AuditLog | None = None


def install(nc: Any, retention_days: float, replicas: int = 1) -> AuditLog:
    """Makes this process's helpers write through *nc* (a connected NATS client)."""
    global _LOG
    _LOG = AuditLog(nc.jetstream(), retention_days, replicas)
    return _LOG


async def write(rec: dict[str, Any]) -> bool:
    if _LOG is None:
        return False
    try:
        await _LOG.write(rec)
    except Exception as e:  # NATS down: the command goes on; the gap is logged
        _LOG.failures += 1
        log.warning("audit record not written", extra={"subject": rec["subject"], "error": type(e).__name__})
        return False
    return True


def _event_detail(event: BaseModel) -> dict[str, Any]:
    return {
        k: v for k, v in dict(event).items() if k not in ("actor", "user_id", "request_id", "schema_version")
    }


async def command(subject: str, event: BaseModel) -> bool:
    return await write(
        record(
            "command",
            subject,
            actor=getattr(event, "actor", None),
            user_id=getattr(event, "user_id", None),
            request_id=getattr(event, "request_id", None),
            detail=_event_detail(event),
        )
    )


async def outcome(subject: str, event: BaseModel) -> bool:
    return await write(
        record(
            "outcome",
            subject,
            actor=None,
            user_id=getattr(event, "user_id", None),
            request_id=getattr(event, "request_id", None),
            detail=_event_detail(event),
        )
    )


async def action(
    actor: Actor, name: str, target: str | None = None, detail: dict[str, Any] | None = None
) -> bool:
    return await write(record("action", name, actor=actor, user_id=target, detail=detail))


def platform(component: str, reason: str | None = None) -> Actor:
    """The platform's own actor: *component* is monitor, reconcile, fleet, ..."""
    return Actor(kind=ActorKind.PLATFORM, id=component, reason=(reason or None) and reason[:200])


# --- reading -----------------------------------------------------------------------------------


def matches(rec: dict[str, Any], user: str | None, actor: str | None) -> bool:
    """*actor* is a kind (``cli``) or ``kind:id`` (``dashboard:u123``)."""
    if user is not None and rec.get("user_id") != user:
        return False
    if actor is not None:
        a = rec.get("actor") or {}
        kind, _, ident = actor.partition(":")
        if a.get("kind") != kind or (ident and a.get("id") != ident):
            return False
    return True


async def read(
    js: Any,
    since: datetime | None = None,
    user: str | None = None,
    actor: str | None = None,
    limit: int = 1000,
    timeout: float = 5.0,
    tail: bool = False,
) -> list[dict[str, Any]]:
    """Records from *since* (default: the start of the stream), oldest first, filtered; outcomes
    are joined to their command's actor by request id so ``--actor`` shows both. *tail*: without
    *since*, only the last ~2 x *limit* messages are read (the admin page's recent records)."""
    try:
        info = await js.stream_info(subjects.AUDIT_STREAM)
    except NotFoundError:
        return []
    policy, start_seq = DeliverPolicy.ALL, None
    if since:
        policy = DeliverPolicy.BY_START_TIME
    elif tail and info.state.last_seq > 2 * limit:
        policy, start_seq = DeliverPolicy.BY_START_SEQUENCE, info.state.last_seq - 2 * limit
    cfg = ConsumerConfig(
        deliver_policy=policy,
        opt_start_time=since.astimezone(UTC).isoformat().replace("+00:00", "Z") if since else None,
        opt_start_seq=start_seq,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
    )
    sub = await js.pull_subscribe(f"{subjects.AUDIT}.>", stream=subjects.AUDIT_STREAM, config=cfg)
    out: list[dict[str, Any]] = []
    actors: dict[str, Any] = {}
    try:
        while True:
            try:
                msgs = await sub.fetch(256, timeout=min(timeout, 1.0))
            except TimeoutError:
                break
            for m in msgs:
                try:
                    rec = json.loads(m.data)
                except ValueError:
                    continue
                if rec.get("kind") == "command" and rec.get("request_id") and rec.get("actor"):
                    actors[rec["request_id"]] = rec["actor"]
                if rec.get("kind") == "outcome" and rec.get("actor") is None:
                    rec["actor"] = actors.get(rec.get("request_id") or "")
                if matches(rec, user, actor):
                    out.append(rec)
            if not msgs or msgs[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out[-limit:]
