"""Runs last: after every flow above, no secret appears in any service's log. In the suite's
second phase (scripts/test.sh) it also reads the logs of the first phase's lanes, each with
the secrets its session made (tests/conftest.py SECRETS_RECORD)."""

import json
import os
import re
from pathlib import Path

import pytest

from shared.crypto import KeyRing
from tests.conftest import SECRETS_RECORD, all_log_text

# Shapes of secrets, whoever made them: bot tokens, API keys, sealed values.
SHAPES = (
    r"\b[0-9]{5,16}:[A-Za-z0-9_-]{30,64}\b",
    r"\bzk_[0-9a-f]{16}_[A-Za-z0-9-]{32,}",
    r"\bzk1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{16,}",
)


def leaks(text: str, secrets: list[str]) -> list[str]:
    found = [s[:6] + "…" for s in secrets if s in text]
    return found + [shape for shape in SHAPES if re.search(shape, text)]


async def test_no_secret_in_any_log_line(state_dir, fakes, service_env, store, keyring_spec, provisioner):
    text = all_log_text(state_dir)
    assert len(text) > 1000  # the services did log
    tokens = list(fakes.telegram.bots)
    assert tokens, "the suite created bots"
    assert leaks(text, [*tokens, service_env["ZAKI_LLM_API_KEY"], keyring_spec.split(":", 1)[1]]) == []
    # Gateway passwords of the instances still recorded.
    ring = KeyRing.from_spec(keyring_spec)
    for doc in await store.list_instances():
        if doc.get("gateway_password_enc"):
            password = ring.decrypt(doc["gateway_password_enc"], f"instance:{doc['_id']}:gateway_password")
            assert password not in text


def test_no_secret_in_the_logs_of_the_first_phases_lanes():
    """scripts/test.sh names the first phase's base folder; each lane left its logs and the
    secrets its session made there. Run alone (no first phase), there is nothing to read."""
    earlier = os.environ.get("ZAKI_TEST_EARLIER_RUNS")
    if not earlier:
        pytest.skip("no first phase ran before this one: scripts/test.sh runs both")
    records = sorted(Path(earlier).rglob(SECRETS_RECORD))
    assert records, f"the first phase left no {SECRETS_RECORD} under {earlier}"
    for record in records:
        text = all_log_text(record.parent)
        assert len(text) > 1000, record  # that lane's services did log
        secrets = json.loads(record.read_text())
        assert len(secrets) > 2, record  # it made bots
        assert leaks(text, secrets) == [], record
