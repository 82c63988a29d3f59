"""Alert and recording rules: valid, unit-tested with promtool, and about metrics that exist."""

import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "rules.test.yml"
PROMTOOL = shutil.which("promtool")

pytestmark = require_tool(PROMTOOL, "promtool (Debian's prometheus)")


def test_rules_are_valid():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rule_unit_tests_pass():
    out = subprocess.run(
        [PROMTOOL, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, cwd=RULE_TESTS.parent
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_alert_has_a_test_that_fires_it():
    alerts = set(re.findall(r"^\s+- alert: (\w+)", RULES.read_text(), re.M))
    tests = RULE_TESTS.read_text()
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", tests))
    assert alerts and alerts <= fired, alerts - fired


def test_rules_use_only_metrics_the_services_export():
    source = "\n".join(p.read_text() for p in (ROOT / "services").rglob("*.py"))
    names = set(re.findall(r"\b(zaki_[a-z_]+?)(?:_bucket|_total)?\b", RULES.read_text()))
    names = {n for n in names if not n.startswith("zaki_proxy_requests:")}
    missing = [n for n in names if f'"{n}' not in source]
    assert not missing, missing
