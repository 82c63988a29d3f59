"""A test whose tool is missing is skipped on a developer's machine but fails under CI=true,
where scripts/setup.sh installs every tool: there a skip would hide a missing install step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

NEEDS_A_MISSING_TOOL = """
from tests.conftest import require_tool

pytestmark = require_tool(None, "a tool that is not here")

def test_uses_it():
    raise AssertionError("never runs without its tool")
"""


@pytest.mark.parametrize(("ci", "outcome"), [("true", "1 error"), ("", "1 skipped")])
def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(tmp_path, ci, outcome):
    (tmp_path / "test_needs_tool.py").write_text(NEEDS_A_MISSING_TOOL)
    env = {**os.environ, "CI": ci}
    args = ["-q", "-rA", "-p", "no:cacheprovider", "-p", "tests.conftest", "--rootdir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", *args, str(tmp_path / "test_needs_tool.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in out.stdout, out.stdout + out.stderr
    assert (out.returncode != 0) == bool(ci)  # a CI run with a missing tool is a failed run
    assert "a tool that is not here is missing: scripts/setup.sh installs it" in out.stdout
    assert "never runs" not in out.stdout


def test_every_tool_a_test_needs_is_here_under_ci():
    """Under CI=true the tools the suite needs are installed by scripts/setup.sh."""
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        pytest.skip("checked under CI=true")
    import shutil

    from tests.test_faults import FAKETIME_LIB
    from tests.test_provisioner_more import OPENCLAW

    missing = [t for t in ("docker-compose", "promtool", "prometheus") if not shutil.which(t)]
    missing += [str(p) for p in (Path(FAKETIME_LIB), OPENCLAW) if not p.exists()]
    assert missing == [], missing
