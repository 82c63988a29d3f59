#!/usr/bin/env bash
# Sets up everything the tests need (scripts/setup.sh), then lints and runs the suite
# against real NATS, FerretDB, Docker and OpenClaw gateway containers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:/usr/local/go/bin:$PATH"
echo "[test] ruff" >&2
ruff check .
ruff format --check .
echo "[test] pytest" >&2
exec python -m pytest -q -p no:cacheprovider "$@"
