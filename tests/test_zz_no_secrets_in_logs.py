"""Runs last: after every flow above, no secret appears in any service's log."""

import re

from shared.crypto import KeyRing
from tests.conftest import all_log_text


async def test_no_secret_in_any_log_line(state_dir, fakes, service_env, store, keyring_spec, provisioner):
    text = all_log_text(state_dir)
    assert len(text) > 1000  # the services did log
    tokens = list(fakes.telegram.bots)
    assert tokens, "the suite created bots"
    leaks = [t for t in tokens if t in text]
    assert leaks == []
    assert service_env["ZAKI_LLM_API_KEY"] not in text
    assert keyring_spec.split(":", 1)[1] not in text
    # Shapes of secrets, whoever made them: bot tokens, API keys, sealed values.
    assert not re.search(r"\b[0-9]{5,16}:[A-Za-z0-9_-]{30,64}\b", text)
    assert not re.search(r"\bzk_[0-9a-f]{16}_[A-Za-z0-9-]{32,}", text)
    assert not re.search(r"\bzk1\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{16,}", text)
    # Gateway passwords of the instances still recorded.
    ring = KeyRing.from_spec(keyring_spec)
    for doc in await store.list_instances():
        if doc.get("gateway_password_enc"):
            password = ring.decrypt(doc["gateway_password_enc"], f"instance:{doc['_id']}:gateway_password")
            assert password not in text
