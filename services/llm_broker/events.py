"""Budget events, published once per user, limit and period across every broker process."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext

from services.llm_broker.budget import Verdict
from services.llm_broker.directory import BrokerClient
from shared import subjects
from shared.events import BudgetExceeded, BudgetWarning
from shared.store import Store

log = logging.getLogger("zaki.broker")


class BudgetEvents:
    def __init__(self, store: Store, js: JetStreamContext | None) -> None:
        self.store = store
        self.js = js
        self.sent: set[str] = set()  # this process already knows these were published

    async def __call__(self, kind: str, verdict: Verdict, client: BrokerClient, hard: bool) -> None:
        key = f"{kind}:{client.user_id}:{verdict.limit.value}:{verdict.period}"
        if key in self.sent:
            return
        self.sent.add(key)
        if len(self.sent) > 100_000:
            self.sent = {key}
        if not await self.store.claim_budget_event(key):
            return  # another process published it
        model = BudgetExceeded if hard else BudgetWarning
        subject = subjects.INSTANCE_BUDGET_EXCEEDED if hard else subjects.INSTANCE_BUDGET_WARNING
        event = model(
            user_id=client.user_id,
            instance_id=client.instance_id,
            limit=verdict.limit,
            used=verdict.used,
            allowed=verdict.allowed,
            period=verdict.period,
        )
        if self.js is not None:
            await self.js.publish(subject, event.model_dump_json().encode())
        log.info(
            "budget event",
            extra={
                "user_id": client.user_id,
                "limit": verdict.limit.value,
                "kind": kind,
                "period": verdict.period,
            },
        )
