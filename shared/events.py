"""Versioned event models: the platform's public contract on NATS.

Commands (``instance.requested`` and the lifecycle commands) come in from other systems;
outcomes and health events go out. Outcome events never carry a secret.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, SecretStr, field_validator

from shared import subjects
from shared.provider_url import check_provider_url
from shared.validation import ModelRef, NodeRef, RequestId, UserId, check_bot_token

# A secret on the wire: hidden in repr/str and logs, revealed only in the JSON sent to NATS.
WireSecret = Annotated[SecretStr, PlainSerializer(lambda s: s.get_secret_value(), when_used="json")]


ImageRef = Annotated[
    str, Field(max_length=256, pattern=r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?(@sha256:[a-f0-9]{64})?$")
]


def _now() -> datetime:
    return datetime.now(UTC)


def _new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    event_id: str = Field(default_factory=_new_id)
    occurred_at: datetime = Field(default_factory=_now)


class ProviderSettings(BaseModel):
    """A user's own model provider (bring-your-own-key); the platform default when absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,31}$")]
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=512)]
    api: Literal["openai-completions", "openai-responses", "anthropic-messages"] = "openai-completions"
    api_key: WireSecret | None = None
    models: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,127}$")]] = Field(
        default_factory=list, max_length=32
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        # The broker's URL rule, under the settings of the process that validates the event
        # (the provisioner's, for commands); the broker checks again at call time.
        check_provider_url(v)
        return v


class Budget(BaseModel):
    """Per-user limits the LLM broker enforces; None means the platform default (ZAKI_BUDGET_*).
    A hard limit refuses calls with a provider-style 429; a soft one only warns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: Annotated[int, Field(ge=1, le=100_000)] | None = None
    tokens_per_day: Annotated[int, Field(ge=1)] | None = None
    tokens_per_month: Annotated[int, Field(ge=1)] | None = None
    # Share of a token limit at which instance.budget.warning is published.
    soft_ratio: Annotated[float, Field(gt=0, le=1)] | None = None


# Idle time before suspend (issue 16): at most 30 days; 0 means never suspend.
IdleSeconds = Annotated[int, Field(ge=0, le=30 * 24 * 3600)]


class ActorKind(StrEnum):
    CLI = "cli"  # an operator at the zaki CLI (id: their login name on the host)
    DASHBOARD = "dashboard"  # a dashboard account (id: the account id)
    API_KEY = "api_key"  # an API key (id: the key id, never the key)
    PLATFORM = "platform"  # the platform itself (id: monitor, reconcile, fleet, ...)


class Actor(BaseModel):
    """Who asked for a command (issue 17.4): recorded in the audit trail with every outcome."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ActorKind
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,63}$")]
    reason: Annotated[str, Field(max_length=200)] | None = None


# Between scheduled backups (issue 17.1): 0 means none; at most 30 days.
BackupSeconds = Annotated[int, Field(ge=0, le=30 * 24 * 3600)]


def _check_token(v: SecretStr) -> SecretStr:
    check_bot_token(v.get_secret_value())
    return v


class InstanceRequested(Event):
    request_id: RequestId
    user_id: UserId
    bot_token: WireSecret
    model: ModelRef | None = None
    provider: ProviderSettings | None = None
    # Telegram user ids allowed to DM the bot; empty means OpenClaw's pairing flow.
    telegram_allow_from: list[Annotated[str, Field(pattern=r"^[0-9]{1,20}$")]] = Field(
        default_factory=list, max_length=64
    )
    # Optional gateway image; must be one the operator allows (ZAKI_ALLOWED_IMAGES).
    image: ImageRef | None = None
    budget: Budget | None = None
    # Seconds without traffic before the platform suspends the gateway; 0 = never; None = ZAKI_IDLE_SUSPEND_S.
    idle_suspend_s: IdleSeconds | None = None
    # Seconds between scheduled backups; 0 = none; None = ZAKI_BACKUP_INTERVAL_S (services/backup).
    backup_interval_s: BackupSeconds | None = None
    actor: Actor | None = None  # who asked (audit trail)

    _token = field_validator("bot_token")(_check_token)


class InstanceCommand(Event):
    """stop / start / restart / delete."""

    request_id: RequestId = Field(default_factory=_new_id)
    user_id: UserId
    reason: Annotated[str, Field(max_length=200)] | None = None
    actor: Actor | None = None  # who asked (audit trail)


class InstanceUpdate(InstanceCommand):
    model: ModelRef | None = None
    bot_token: WireSecret | None = None
    provider: ProviderSettings | None = None
    budget: Budget | None = None
    idle_suspend_s: IdleSeconds | None = None  # see InstanceRequested; no gateway restart
    backup_interval_s: BackupSeconds | None = None  # see InstanceRequested; no gateway restart

    @field_validator("bot_token")
    @classmethod
    def _token(cls, v: SecretStr | None) -> SecretStr | None:
        return None if v is None else _check_token(v)


class InstanceDelete(InstanceCommand):
    # Also remove the user's workspace and gateway state; by default they are kept.
    purge: bool = False


class InstanceUpgrade(InstanceCommand):
    image: ImageRef


class InstanceMove(InstanceCommand):
    """Onto another node (``ZAKI_RUNTIME=swarm``): backed up, stopped, unpinned from its node
    and started wherever the swarm has room but *away_from* (default: the node it is on)."""

    away_from: NodeRef | None = None


class SuspendReason(StrEnum):
    IDLE = "idle"  # no traffic, WebSocket, model call or Telegram update for the idle time
    COMMAND = "command"  # an operator or another system asked


class WakeReason(StrEnum):
    REQUEST = "request"  # HTTP, SSE or WebSocket traffic through the proxy
    TELEGRAM = "telegram"  # a message to the user's bot
    SCHEDULE = "schedule"  # a scheduled (cron) job of the gateway is due
    COMMAND = "command"


class InstanceSuspend(InstanceCommand):
    """Stop an idle gateway, keeping its port and network; traffic and its bot wake it."""

    cause: SuspendReason = SuspendReason.COMMAND
    idle_s: Annotated[float, Field(ge=0)] | None = None  # how long it had been idle


class InstanceWake(InstanceCommand):
    """Start a suspended gateway. Several wakes of one instance boot it once."""

    cause: WakeReason = WakeReason.COMMAND


class FailureReason(StrEnum):
    INVALID_REQUEST = "invalid_request"
    INVALID_USER_ID = "invalid_user_id"
    INVALID_BOT_TOKEN = "invalid_bot_token"  # noqa: S105 - a reason code
    INVALID_PROVIDER_URL = "invalid_provider_url"
    TELEGRAM_UNREACHABLE = "telegram_unreachable"
    NO_PORT = "no_port_available"
    DISK = "disk_error"
    DOCKER = "docker_error"
    GATEWAY_NOT_READY = "gateway_not_ready"
    NOT_FOUND = "not_found"
    ILLEGAL_TRANSITION = "illegal_transition"
    INTERNAL = "internal_error"
    # The platform's own retries of a failed instance were used up (ZAKI_HEAL_*): no more retries.
    CRASHLOOPING = "crashlooping"
    # The tenant's data folder is over ZAKI_TENANT_DISK_BYTES / ZAKI_TENANT_MAX_FILES.
    DISK_QUOTA = "disk_quota_exceeded"
    # The backup taken before an upgrade or a delete failed (ZAKI_BACKUP_BEFORE_CHANGE=required).
    BACKUP_FAILED = "backup_failed"
    # A restore of the user's data is in progress (services/backup): only a stop is carried out.
    RESTORING = "restore_in_progress"


class InstanceReady(Event):
    request_id: str
    user_id: str
    instance_id: str
    docker_host: str
    host: str
    port: int
    bot_username: str | None = None
    image: str
    timings: dict[str, float] = Field(default_factory=dict)


class InstanceFailed(Event):
    request_id: str
    user_id: str
    reason: FailureReason
    message: str
    logs: list[str] = Field(default_factory=list)


class StopReason(StrEnum):
    DISK_QUOTA = "disk_quota_exceeded"  # stopped by the platform: the data folder is over its limit


class InstanceStopped(Event):
    request_id: str
    user_id: str
    instance_id: str
    # Set when the platform stopped it on its own (None: a stop command).
    reason: StopReason | None = None
    message: str = ""


class InstanceUpgradeRolledBack(Event):
    """An upgrade's image did not get ready: the instance runs its last good image again."""

    request_id: str
    user_id: str
    instance_id: str
    failed_image: str
    image: str  # the last good image, restored
    reason: FailureReason
    message: str
    logs: list[str] = Field(default_factory=list)


class InstanceDeleted(Event):
    request_id: str
    user_id: str
    instance_id: str
    purged: bool = False


class InstanceSuspended(Event):
    request_id: str
    user_id: str
    instance_id: str
    reason: SuspendReason
    idle_s: float | None = None
    # When the platform will wake it by itself for its next scheduled job (None: only on traffic).
    next_wake_at: datetime | None = None


class InstanceWoken(Event):
    request_id: str
    user_id: str
    instance_id: str
    reason: WakeReason
    suspended_s: float | None = None  # how long it slept
    timings: dict[str, float] = Field(default_factory=dict)


class BackupCompleted(Event):
    """A good backup: complete on its target, read back, its manifest written (services/backup)."""

    user_id: str
    instance_id: str | None = None
    backup_id: str
    reason: str  # scheduled, manual, pre_upgrade, pre_delete, pre_move
    target: str  # local or s3
    stored_bytes: int
    seconds: float
    key_id: str


class BackupFailed(Event):
    """A backup that did not complete: nothing of it is listed as good. *error* is a stable code
    (disk_full, target_error, read_error, timeout, not_found, ...)."""

    user_id: str
    instance_id: str | None = None
    reason: str
    error: str
    message: str


class BudgetLimit(StrEnum):
    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_DAY = "tokens_per_day"
    TOKENS_PER_MONTH = "tokens_per_month"


class BudgetExceeded(Event):
    """A hard limit was hit: the broker refuses the user's model calls until *period* ends."""

    user_id: str
    instance_id: str
    limit: BudgetLimit
    used: int
    allowed: int
    period: str  # "2026-11-26", "2026-11" or the minute


class BudgetWarning(BudgetExceeded):
    """A soft limit was crossed; calls still go through."""


class HealthState(StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNREACHABLE = "unreachable"
    CRASHLOOPING = "crashlooping"


class InstanceHealthChanged(Event):
    user_id: str
    instance_id: str
    previous: HealthState
    state: HealthState
    reason: str
    detail: str = ""


class HealthSummary(Event):
    replica_id: str
    counts: dict[HealthState, int]


class DeadLetter(Event):
    subject: str
    reason: str
    error: str
    payload_excerpt: str


COMMAND_MODELS: dict[str, type[Event]] = {
    subjects.INSTANCE_REQUESTED: InstanceRequested,
    subjects.INSTANCE_STOP: InstanceCommand,
    subjects.INSTANCE_START: InstanceCommand,
    subjects.INSTANCE_RESTART: InstanceCommand,
    subjects.INSTANCE_DELETE: InstanceDelete,
    subjects.INSTANCE_UPDATE: InstanceUpdate,
    subjects.INSTANCE_UPGRADE: InstanceUpgrade,
    subjects.INSTANCE_SUSPEND: InstanceSuspend,
    subjects.INSTANCE_WAKE: InstanceWake,
    subjects.INSTANCE_MOVE: InstanceMove,
}

OUTCOME_MODELS: dict[str, type[Event]] = {
    subjects.INSTANCE_READY: InstanceReady,
    subjects.INSTANCE_FAILED: InstanceFailed,
    subjects.INSTANCE_STOPPED: InstanceStopped,
    subjects.INSTANCE_DELETED: InstanceDeleted,
    subjects.INSTANCE_UPGRADE_ROLLED_BACK: InstanceUpgradeRolledBack,
    subjects.INSTANCE_SUSPENDED: InstanceSuspended,
    subjects.INSTANCE_WOKEN: InstanceWoken,
}

BACKUP_EVENT_MODELS: dict[str, type[Event]] = {
    subjects.BACKUP_COMPLETED: BackupCompleted,
    subjects.BACKUP_FAILED: BackupFailed,
}

BROKER_EVENT_MODELS: dict[str, type[Event]] = {
    subjects.INSTANCE_BUDGET_EXCEEDED: BudgetExceeded,
    subjects.INSTANCE_BUDGET_WARNING: BudgetWarning,
}
