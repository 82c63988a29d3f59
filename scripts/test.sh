#!/usr/bin/env bash
# Sets up everything the tests need (scripts/setup.sh), then lints and runs the suite
# against real NATS, FerretDB, Docker and OpenClaw gateway containers.
#
# With no arguments the suite runs in two phases (tests/lanes.py says which test goes where):
#   1. everything but the exclusive modules, on two pytest-xdist workers (two lanes);
#   2. the exclusive modules alone (they restart the Docker daemon, make a Swarm, ...).
# With arguments, one plain pytest run of what they name: `bash scripts/test.sh tests/test_x.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# .venv/bin is deliberately not put on PATH: the suite runs as a fresh shell would, so a
# program that looks one of the project's own tools up on PATH fails here, not for a newcomer.
echo "[test] ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
pytest=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [ "$#" -gt 0 ]; then
  echo "[test] pytest $*" >&2
  exec "${pytest[@]}" "$@"
fi
runs="$(mktemp -d /tmp/zaki-test-runs.XXXXXX)"
echo "[test] pytest, phase 1 of 2: two lanes (pytest-xdist)" >&2
first=0
"${pytest[@]}" -n 2 --dist loadgroup -m "not exclusive" --basetemp "$runs/lanes" || first=$?
echo "[test] pytest, phase 2 of 2: the exclusive modules, alone" >&2
second=0
ZAKI_TEST_EARLIER_RUNS="$runs/lanes" "${pytest[@]}" -m exclusive --basetemp "$runs/alone" || second=$?
rm -rf "$runs"
echo "[test] phase 1: exit $first, phase 2: exit $second" >&2
[ "$first" -eq 0 ] && [ "$second" -eq 0 ]
