"""JetStream plumbing: stream definitions, event decoding, dead letters, publishing."""

from __future__ import annotations

import json
import logging
from typing import TypeVar

import nats
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from pydantic import BaseModel, ValidationError

from shared import subjects
from shared.events import DeadLetter, Event
from shared.logging import redact

log = logging.getLogger("zaki.bus")

E = TypeVar("E", bound=Event)

DAY = 24 * 3600

STREAMS = [
    # Commands carry bot tokens: a work queue deletes each message once it is acked.
    StreamConfig(
        name=subjects.COMMAND_STREAM,
        subjects=[*subjects.COMMANDS, subjects.NODE_COMMANDS],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_age=7 * DAY,
        duplicate_window=120,
    ),
    StreamConfig(
        name=subjects.EVENT_STREAM,
        subjects=[
            *subjects.OUTCOMES,
            f"{subjects.INSTANCE_HEALTH}.*",
            subjects.HEALTH_SUMMARY,
            subjects.INSTANCE_BUDGET_EXCEEDED,
            subjects.INSTANCE_BUDGET_WARNING,
            *subjects.BACKUP_EVENTS,
        ],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * DAY,
        max_bytes=1 << 30,
        discard=DiscardPolicy.OLD,
    ),
    StreamConfig(
        name=subjects.DEAD_LETTER_STREAM,
        subjects=[f"{subjects.DEAD_LETTER}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=30 * DAY,
        max_bytes=256 << 20,
        discard=DiscardPolicy.OLD,
    ),
]


def nats_servers(url: str) -> list[str]:
    """``ZAKI_NATS_URL`` may list several servers of a cluster, comma-separated."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def ensure_streams(nats_url: str, replicas: int = 1) -> None:
    """Creates or updates the platform's streams; safe to run from every replica."""
    nc = await nats.connect(nats_servers(nats_url), connect_timeout=5, max_reconnect_attempts=3)
    try:
        js = nc.jetstream()
        for base in STREAMS:
            cfg = StreamConfig.from_response({**base.as_dict(), "num_replicas": replicas})
            try:
                await js.stream_info(cfg.name)
                try:
                    await js.update_stream(cfg)
                except BadRequestError as e:  # e.g. retention cannot change in place
                    log.warning("stream %s kept as it is: %s", cfg.name, e.description)
            except NotFoundError:
                await js.add_stream(cfg)
    finally:
        await nc.close()


class MalformedEvent(Exception):
    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


def decode_event(model: type[E], data: bytes) -> E:
    """Parses and validates an event, or raises MalformedEvent with a reason code."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedEvent("not_json", str(e)) from None
    if not isinstance(obj, dict):
        raise MalformedEvent("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        # Only locations and messages: pydantic's input echo could hold a secret.
        errs = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors())
        reason = (
            "unsupported_version"
            if any(err["loc"][:1] == ("schema_version",) for err in e.errors())
            else "invalid_schema"
        )
        raise MalformedEvent(reason, redact(errs)) from None


def dead_letter_for(subject: str, data: bytes, err: MalformedEvent) -> DeadLetter:
    return DeadLetter(
        subject=subject,
        reason=err.reason,
        error=err.error[:2000],
        payload_excerpt=redact(data[:2048].decode("utf-8", "replace")),
    )


def to_json(event: BaseModel) -> bytes:
    return event.model_dump_json().encode()
