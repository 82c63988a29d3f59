"""Files generated from code and committed (the AsyncAPI document, the dashboards):
write them, or check that the committed copies are current."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(files: dict[str, str], out: Path, check: bool, regenerate: str) -> int:
    """Writes *files* (path relative to *out* -> content), or with *check* reports stale ones; exit code."""
    stale = []
    for rel, content in files.items():
        path = out / rel
        if check:
            if not path.exists() or path.read_text() != content:
                stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    if stale:
        print(f"out of date: {', '.join(stale)} (run: {regenerate})", file=sys.stderr)
        return 1
    return 0
