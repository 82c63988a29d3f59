#!/usr/bin/env bash
# Sets up everything the tests need (scripts/setup.sh), then lints and runs the suite
# against real NATS, FerretDB, Docker and OpenClaw gateway containers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# .venv/bin is deliberately not put on PATH: the suite runs as a fresh shell would, so a
# program that looks one of the project's own tools up on PATH fails here, not for a newcomer.
echo "[test] ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "[test] pytest" >&2
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
