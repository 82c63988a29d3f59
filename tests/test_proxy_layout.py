"""Issue 14.6: the proxy's modules stay small and import each other in one direction only
(type-only imports included), and other services use only its credential rules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROXY = ROOT / "services" / "gateway_proxy"
PREFIX = "services.gateway_proxy."


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(PREFIX):
                found.add(node.module[len(PREFIX) :])
            elif node.module == PREFIX[:-1]:
                found.update(a.name for a in node.names)
    return found


def test_no_import_cycle_and_no_module_over_400_lines():
    graph = {p.stem: imports(p) for p in PROXY.glob("*.py")}
    for path in PROXY.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path.name

    def visit(module: str, trail: tuple[str, ...]) -> None:
        for dep in graph.get(module, ()):
            assert dep not in trail, " -> ".join((*trail, dep))
            visit(dep, (*trail, dep))

    for module in graph:
        visit(module, (module,))


def test_other_services_use_only_the_proxys_credential_rules():
    """Keys and the credential rules (the dashboard shares the cookie and Origin rules); the
    broker's token bucket lives in shared/ratelimit.py."""
    for path in (ROOT / "services").rglob("*.py"):
        if PROXY in path.parents:
            continue
        used = imports(path)
        assert used <= {"keys", "auth"}, (path, used)
