"""The platform's public contract as an AsyncAPI document and JSON Schemas, generated
from the event models by FastStream.

    python -m shared.asyncapi            # rewrites docs/asyncapi.yaml and docs/schemas/*.json
    python -m shared.asyncapi --check    # exits 1 when the committed files are out of date

The provisioner's real consumers take raw messages (so a malformed one can be
dead-lettered with its reason instead of failing inside the framework); this module
registers the same subjects with their typed models on a broker that is never
connected, only described.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel

from shared import subjects
from shared.events import (
    BACKUP_EVENT_MODELS,
    BROKER_EVENT_MODELS,
    COMMAND_MODELS,
    OUTCOME_MODELS,
    DeadLetter,
    HealthSummary,
    InstanceHealthChanged,
)
from shared.generated import write_or_check

DOCS = Path(__file__).resolve().parent.parent / "docs"

DESCRIPTIONS = {
    subjects.INSTANCE_REQUESTED: "Give a user a gateway. Carries the bot token; the stream is a work queue, "
    "so the message is deleted once handled. Answered by instance.ready or instance.failed with the same request_id.",
    subjects.INSTANCE_STOP: "Stop a user's gateway (its data stays). Answered by instance.stopped.",
    subjects.INSTANCE_START: "Start a stopped or failed gateway. Answered by instance.ready.",
    subjects.INSTANCE_RESTART: "Restart a gateway (the monitor sends these, with a reason). Answered by instance.ready.",
    subjects.INSTANCE_DELETE: "Delete a gateway; purge also removes the workspace. Answered by instance.deleted.",
    subjects.INSTANCE_UPDATE: "New model, bot token or provider: config rewritten, gateway restarted.",
    subjects.INSTANCE_UPGRADE: "Recreate the gateway on another allowed image; the data carries over. "
    "When the new image does not get ready, the last good one is restored (instance.upgrade.rolled_back).",
    subjects.INSTANCE_READY: "A gateway answers on /readyz; host and port are internal (reach it through the proxy).",
    subjects.INSTANCE_FAILED: "A command failed; reason is a stable code, message is for humans.",
    subjects.INSTANCE_STOPPED: "A gateway was stopped; reason is set when the platform stopped it on its own "
    "(disk_quota_exceeded: the data folder is over its limit; a start is refused until it is under).",
    subjects.INSTANCE_DELETED: "A gateway and its secrets are gone.",
    subjects.INSTANCE_UPGRADE_ROLLED_BACK: "An upgrade's image did not get ready: the last good image was "
    "restored and is starting (instance.ready follows with the same request_id).",
    subjects.INSTANCE_SUSPEND: "Suspend an idle gateway (the waker sends these): container stopped, port and "
    "network kept. Answered by instance.suspended.",
    subjects.INSTANCE_WAKE: "Wake a suspended gateway (the proxy on traffic, the waker on a Telegram message or a "
    "due scheduled job). Answered by instance.ready; instance.woken says why.",
    subjects.INSTANCE_SUSPENDED: "A gateway was suspended for idleness; next_wake_at says when its next "
    "scheduled job will wake it.",
    subjects.INSTANCE_WOKEN: "A suspended gateway is ready again; reason says what woke it.",
    subjects.INSTANCE_BUDGET_EXCEEDED: "The LLM broker refuses a user's model calls (provider-style 429) "
    "until the period ends: a hard budget limit was reached. Once per user, limit and period.",
    subjects.INSTANCE_BUDGET_WARNING: "A user crossed the soft share of a token budget; calls still pass.",
    subjects.BACKUP_COMPLETED: "A backup of a user's data folder is good: complete on its target, read back "
    "and its manifest written (scheduled, manual, or before an upgrade or a delete).",
    subjects.BACKUP_FAILED: "A backup did not complete (error: a stable code); nothing of it is listed as good.",
}


def build_spec_broker() -> NatsBroker:
    broker = NatsBroker("nats://localhost:4222")

    for subject, model in COMMAND_MODELS.items():

        def described(body, _model=model):  # documentation only: never connected, never called
            return None

        described.__annotations__ = {"body": model, "return": None}
        broker.subscriber(subject, title=f"provisioner:{subject}", description=DESCRIPTIONS.get(subject, ""))(
            described
        )

    published = {
        **OUTCOME_MODELS,
        **BROKER_EVENT_MODELS,
        **BACKUP_EVENT_MODELS,
        f"{subjects.INSTANCE_HEALTH}.{{user_id}}": InstanceHealthChanged,
        subjects.HEALTH_SUMMARY: HealthSummary,
        f"{subjects.DEAD_LETTER}.{{subject}}": DeadLetter,
    }
    for subject, model in published.items():
        broker.publisher(
            subject, title=f"platform:{subject}", description=DESCRIPTIONS.get(subject, ""), schema=model
        )
    return broker


def render() -> dict[str, str]:
    """Every generated file, path relative to docs/ -> content."""
    spec = AsyncAPI(
        build_spec_broker(),
        title="Zaki platform events",
        version="1",
        description="Commands other systems publish to JetStream and the events the platform publishes.",
    )
    # FastStream's channel order varies between runs: sort for a stable, diffable file.
    files = {
        "asyncapi.yaml": yaml.safe_dump(spec.to_specification().to_jsonable(), sort_keys=True, width=110)
    }
    models: dict[str, type[BaseModel]] = {
        **{s.rsplit(".", 1)[-1]: m for s, m in COMMAND_MODELS.items()},
        **{s.rsplit(".", 1)[-1]: m for s, m in OUTCOME_MODELS.items()},
        **{"budget-" + s.rsplit(".", 1)[-1]: m for s, m in BROKER_EVENT_MODELS.items()},
        **{"backup-" + s.rsplit(".", 1)[-1]: m for s, m in BACKUP_EVENT_MODELS.items()},
        "health": InstanceHealthChanged,
        "health-summary": HealthSummary,
        "deadletter": DeadLetter,
    }
    for name, model in sorted(models.items()):
        schema = model.model_json_schema(mode="serialization")
        files[f"schemas/{name}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    return write_or_check(render(), DOCS, ap.parse_args().check, "python -m shared.asyncapi")


if __name__ == "__main__":
    sys.exit(main())
