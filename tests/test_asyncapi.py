"""The committed AsyncAPI document and JSON Schemas match the code."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from shared import subjects

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_committed_contract_is_up_to_date():
    out = subprocess.run([sys.executable, "-m", "shared.asyncapi", "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_subject_is_documented_with_its_schema():
    doc = yaml.safe_load((DOCS / "asyncapi.yaml").read_text())
    addresses = {c["address"] for c in doc["channels"].values()}
    for subject in (*subjects.COMMANDS, *subjects.OUTCOMES, subjects.HEALTH_SUMMARY):
        assert subject in addresses, subject
    requested = json.loads((DOCS / "schemas" / "requested.json").read_text())
    assert {"request_id", "user_id", "bot_token"} <= set(requested["required"])
    assert requested["additionalProperties"] is False
    ready = json.loads((DOCS / "schemas" / "ready.json").read_text())
    assert "bot_token" not in json.dumps(ready)  # outcomes never carry secrets
