#!/usr/bin/env bash
# Sets up a fresh machine for Zaki: system packages, a virtualenv with the project,
# the FerretDB program, a running Docker engine and the container images.
# Idempotent and cached: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

need_apt=()
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || need_apt+=(golang-go)
command -v promtool >/dev/null || need_apt+=(prometheus)  # promtool and the Prometheus stand-in
command -v docker-compose >/dev/null || need_apt+=(docker-compose)  # the compose stack test
command -v faketime >/dev/null || need_apt+=(faketime)  # wall-clock jumps in the fault tests
command -v wrk >/dev/null || need_apt+=(wrk)  # bench/proxy.py's load generator
command -v nginx >/dev/null || need_apt+=(nginx-light)  # bench/proxy.py's baseline
command -v chromium >/dev/null || need_apt+=(chromium)  # the dashboard's real-browser tests (headless)
for pkg in ${ZAKI_EXTRA_APT:-}; do need_apt+=("$pkg"); done
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q "${need_apt[@]}" >&2
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.zaki-installed
# Every wheel the project needs, kept per pyproject.toml: a fresh clone installs offline in
# seconds (pip's own HTTP cache stays empty when the index answers no-store).
wheels="${ZAKI_CACHE:-$HOME/.cache/zaki}/wheels/$(sha256sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if [ -f "$wheels/.complete" ] && .venv/bin/pip install -q --no-index --find-links "$wheels" -e '.[dev]' >&2; then
    say "installed the project and its dev tools into .venv from $wheels"
  else
    say "installing the project and its dev tools into .venv"
    .venv/bin/pip install -q --upgrade pip >&2
    .venv/bin/pip install -q -e '.[dev]' >&2
    tmp_wheels=$(mktemp -d "$(dirname "$wheels")/.new.XXXX" 2>/dev/null || { mkdir -p "$(dirname "$wheels")"; mktemp -d "$(dirname "$wheels")/.new.XXXX"; })
    .venv/bin/pip freeze --exclude-editable > "$tmp_wheels/requirements.txt"
    if .venv/bin/pip wheel -q --no-deps --wheel-dir "$tmp_wheels" -r "$tmp_wheels/requirements.txt" \
        'setuptools>=68' wheel >&2; then
      touch "$tmp_wheels/.complete"
      rm -rf "$wheels" && mv "$tmp_wheels" "$wheels"
    else
      rm -rf "$tmp_wheels"  # next time online again; nothing is wrong with this .venv
    fi
  fi
  touch "$stamp"
fi
# The project's own tools are named by path (never found on PATH): this works from any shell.
export ZAKI_PYTHON="$PWD/.venv/bin/python"
"$ZAKI_PYTHON" -c 'from zaki.stack import build_ferretdb; build_ferretdb()'
bash scripts/docker.sh
bash deploy/images/build.sh all
# The compose stack's images: Zaki's services and stand-ins for MongoDB, NATS, Prometheus.
bash deploy/images/build.sh stack
say "ready"
