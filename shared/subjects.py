"""Every NATS subject and JetStream name the platform uses, in one place."""

from __future__ import annotations

PREFIX = "zaki"

# Commands other systems publish; consumed by the provisioner.
INSTANCE_REQUESTED = f"{PREFIX}.instance.requested"
INSTANCE_STOP = f"{PREFIX}.instance.stop"
INSTANCE_START = f"{PREFIX}.instance.start"
INSTANCE_RESTART = f"{PREFIX}.instance.restart"
INSTANCE_DELETE = f"{PREFIX}.instance.delete"
INSTANCE_UPDATE = f"{PREFIX}.instance.update"
INSTANCE_UPGRADE = f"{PREFIX}.instance.upgrade"
# Idle suspend and wake (issue 16): sent by the waker (idle, Telegram, schedule) and the proxy (traffic).
INSTANCE_SUSPEND = f"{PREFIX}.instance.suspend"
INSTANCE_WAKE = f"{PREFIX}.instance.wake"
# Onto another node of a Swarm (issue 18): a drain, or a node that is gone.
INSTANCE_MOVE = f"{PREFIX}.instance.move"
COMMANDS = (
    INSTANCE_REQUESTED,
    INSTANCE_STOP,
    INSTANCE_START,
    INSTANCE_RESTART,
    INSTANCE_DELETE,
    INSTANCE_UPDATE,
    INSTANCE_UPGRADE,
    INSTANCE_SUSPEND,
    INSTANCE_WAKE,
    INSTANCE_MOVE,
)
# One provisioner per swarm node (ZAKI_SWARM_NODE): a command for a user on another node is
# forwarded to that node's zaki.node.<node>.<verb>, in the same stream (provisioner/routing.py).
NODE_COMMANDS = f"{PREFIX}.node.*.*"

# Outcomes the platform publishes.
INSTANCE_READY = f"{PREFIX}.instance.ready"
INSTANCE_FAILED = f"{PREFIX}.instance.failed"
INSTANCE_STOPPED = f"{PREFIX}.instance.stopped"
INSTANCE_DELETED = f"{PREFIX}.instance.deleted"
INSTANCE_HEALTH = f"{PREFIX}.instance.health"  # + ".<user>"
HEALTH_SUMMARY = f"{PREFIX}.health.summary"
INSTANCE_SUSPENDED = f"{PREFIX}.instance.suspended"
INSTANCE_WOKEN = f"{PREFIX}.instance.woken"
# An upgrade's new image missed readiness; the last good image runs again.
INSTANCE_UPGRADE_ROLLED_BACK = f"{PREFIX}.instance.upgrade.rolled_back"
OUTCOMES = (
    INSTANCE_READY,
    INSTANCE_FAILED,
    INSTANCE_STOPPED,
    INSTANCE_DELETED,
    INSTANCE_SUSPENDED,
    INSTANCE_WOKEN,
    INSTANCE_UPGRADE_ROLLED_BACK,
)
# Published by the backup service and the provisioner (before an upgrade or a delete).
BACKUP_COMPLETED = f"{PREFIX}.backup.completed"
BACKUP_FAILED = f"{PREFIX}.backup.failed"
BACKUP_EVENTS = (BACKUP_COMPLETED, BACKUP_FAILED)
# Published by the LLM broker: a user went over a hard budget (calls refused) or a soft one.
INSTANCE_BUDGET_EXCEEDED = f"{PREFIX}.instance.budget.exceeded"
INSTANCE_BUDGET_WARNING = f"{PREFIX}.instance.budget.warning"

DEAD_LETTER = f"{PREFIX}.deadletter"  # + ".<original subject>"

# Streams. Commands carry bot tokens, so their stream is a work queue: a message is
# gone from the server once the provisioner acks it.
COMMAND_STREAM = "ZAKI_COMMANDS"
EVENT_STREAM = "ZAKI_EVENTS"
DEAD_LETTER_STREAM = "ZAKI_DEADLETTER"
PROVISIONER_DURABLE = "provisioner"


def health_subject(user_id: str) -> str:
    return f"{INSTANCE_HEALTH}.{user_id}"


def dead_letter_subject(original: str) -> str:
    return f"{DEAD_LETTER}.{original}"


# Core NATS (not persisted): tells every proxy replica to drop a revoked API key now.
APIKEY_REVOKED = f"{PREFIX}.apikey.revoked"
# Core NATS request/reply: the provisioner asks the waker to stop long-polling a bot's getUpdates
# before it starts that bot's gateway (two long polls on one bot get 409 Conflict).
WAKER_RELEASE = f"{PREFIX}.waker.release"
# Core NATS: a provider key was added, rotated or revoked; every broker drops its cached copy.
PROVIDER_CHANGED = f"{PREFIX}.provider.changed"

# Audit trail (issue 17.4): its own stream and subjects (ZAKI_COMMANDS and ZAKI_EVENTS own
# zaki.instance.*, and NATS refuses two streams over one subject). One record per command
# handled, outcome published and operator action: zaki.audit.<command|outcome|action>.
AUDIT = f"{PREFIX}.audit"
AUDIT_STREAM = "ZAKI_AUDIT"
# Fleet rollouts (issue 17.2): one event per step, kept in the audit stream.
FLEET = f"{PREFIX}.fleet"  # + ".<step>"
