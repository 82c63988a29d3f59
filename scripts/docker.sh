#!/usr/bin/env bash
# Makes sure a Docker engine answers: installs Debian's docker.io when missing and
# starts dockerd in the background with a log file, then waits for it.
set -euo pipefail
LOG=${ZAKI_DOCKERD_LOG:-/var/log/zaki-dockerd.log}
if docker info >/dev/null 2>&1; then exit 0; fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "[docker] installing docker.io from Debian..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q docker.io >&2
fi
if ! docker info >/dev/null 2>&1; then
  echo "[docker] starting dockerd (log: $LOG)..." >&2
  setsid dockerd >"$LOG" 2>&1 < /dev/null &
fi
for _ in $(seq 1 60); do
  docker info >/dev/null 2>&1 && { echo "[docker] engine is up" >&2; exit 0; }
  sleep 1
done
echo "[docker] dockerd did not come up; last lines of $LOG:" >&2
tail -20 "$LOG" >&2
exit 1
