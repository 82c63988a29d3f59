#!/usr/bin/env bash
# Builds Zaki's container images locally: no registry is reachable, so every image
# starts from a Debian rootfs made here with debootstrap and `docker import`.
# Each image is tagged with a hash of its inputs; a second run with the same inputs
# finds the image and returns in seconds.
#
#   deploy/images/build.sh [gateway|standin|all|services|ferretdb|nats|prometheus|stack]
#
# `all` builds what the tests and `zaki up` need; `stack` adds the images of the
# compose stack (deploy/compose.yaml): Zaki's services and local stand-ins for MongoDB
# (FerretDB), NATS and Prometheus.
#
# Env: ZAKI_CACHE (default ~/.cache/zaki), OPENCLAW_VERSION, ZAKI_PYTHON (the project's Python,
# default .venv/bin/python), ZAKI_NODE (node >= 24), ZAKI_NATS_SERVER. The project's own tools
# are never looked up on PATH: a fresh shell's `python3` is the system's, without the project.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${ZAKI_PYTHON:-$ROOT/.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "[images] the project's Python ($PY) is missing: run scripts/setup.sh or set ZAKI_PYTHON" >&2
  exit 1
fi
# Runs Python in the repository with the project importable (zaki.stack knows where its tools are).
py() { (cd "$ROOT" && "$PY" "$@"); }
CACHE=${ZAKI_CACHE:-$HOME/.cache/zaki}
OPENCLAW_VERSION=${OPENCLAW_VERSION:-2026.9.6}
SUITE=bookworm
what=${1:-all}
mkdir -p "$CACHE"

say() { printf '\033[1m[images]\033[0m %s\n' "$*" >&2; }

NODE=${ZAKI_NODE:-$(py -c 'from zaki.stack import node_bin; print(node_bin())')}
nats_bin() {
  if [ -n "${ZAKI_NATS_SERVER:-}" ]; then readlink -f "$ZAKI_NATS_SERVER"; return; fi
  py -c 'from zaki.stack import nats_server_bin; print(nats_server_bin())' | xargs readlink -f
}
NODE_VERSION=$("$NODE" --version)

mirror() {
  awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || echo http://deb.debian.org/debian
}

# A minimal Debian rootfs with ca-certificates and git (the gateway runs `git init`
# in a new workspace), cached as a tarball.
base_rootfs_tar() {
  local tar="$CACHE/rootfs-$SUITE-v2.tar"
  if [ -s "$tar" ]; then echo "$tar"; return; fi
  command -v debootstrap >/dev/null || { say "installing debootstrap"; apt-get install -y -q debootstrap >&2; }
  local r; r=$(mktemp -d "$CACHE/rootfs.XXXX")
  say "debootstrap $SUITE into $r (about a minute, once)"
  debootstrap --variant=minbase "$SUITE" "$r" "$(mirror)" >&2
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  chroot "$r" sh -c 'apt-get install -y -q --no-install-recommends ca-certificates git tini >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*' >&2
  : > "$r/etc/resolv.conf"
  chroot "$r" sh -c 'groupadd -g 1000 node && useradd -u 1000 -g 1000 -m -d /home/node -s /bin/sh node'
  tar -C "$r" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
  rm -rf "$r"
  echo "$tar"
}

openclaw_modules() {
  local dir="$CACHE/openclaw-$OPENCLAW_VERSION"
  if [ -f "$dir/node_modules/openclaw/package.json" ]; then echo "$dir"; return; fi
  say "npm install openclaw@$OPENCLAW_VERSION (about 30 s, once)"
  mkdir -p "$dir.tmp"
  local npm_cli; npm_cli=$(dirname "$NODE")/../lib/node_modules/npm/bin/npm-cli.js
  (cd "$dir.tmp" && PATH="$(dirname "$NODE"):$PATH" "$NODE" "$npm_cli" install --no-audit --no-fund \
      "openclaw@$OPENCLAW_VERSION" >&2)
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  echo "$dir"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# build_image NAME TAG_HASH EXTRA_SETUP_FN DOCKER_CHANGES...
import_image() {
  local ref=$1 setup=$2; shift 2
  if image_exists "$ref"; then say "$ref is up to date"; return; fi
  local tar; tar=$(base_rootfs_tar)
  local r; r=$(mktemp -d "$CACHE/img.XXXX")
  tar -C "$r" -xf "$tar"
  "$setup" "$r"
  say "docker import $ref"
  tar -C "$r" -c . | docker import "$@" - "$ref" >/dev/null
  rm -rf "$r"
  docker tag "$ref" "${ref%%:*}:latest"
}

setup_gateway() {
  local r=$1 mods; mods=$(openclaw_modules)
  install -m 0755 "$NODE" "$r/usr/local/bin/node"
  mkdir -p "$r/app" && cp -a "$mods/node_modules" "$r/app/"
  printf '#!/bin/sh\nexec /usr/local/bin/node /app/node_modules/openclaw/openclaw.mjs "$@"\n' > "$r/usr/local/bin/openclaw"
  chmod 755 "$r/usr/local/bin/openclaw"
  mkdir -p "$r/home/node/.openclaw" && chown -R 1000:1000 "$r/home/node"
}

setup_standin() {
  local r=$1
  install -m 0755 "$NODE" "$r/usr/local/bin/node"
  mkdir -p "$r/app" && cp "$HERE/standin/server.js" "$r/app/server.js"
}

# Docker's own check: a fallback for a gateway hung inside its container (the monitor's own probes
# come first). It must not call a gateway unhealthy while the platform still waits for it
# (ZAKI_READINESS_TIMEOUT_S, 120 s) nor for one slow answer on a busy host: the monitor restarts a
# gateway Docker calls unhealthy. bash's /dev/tcp, not `node -e fetch(...)`: a Node start per check
# cost ~0.15 CPU-s, ~0.07 with bash (bench/healthcheck_cost.py), and every 30 s, not 10.
# http_probe PORT_EXPR PATH: a HEALTHCHECK command line; PORT_EXPR is expanded by the check's shell.
http_probe() {
  printf 'CMD ["bash","-c","exec 3<>/dev/tcp/127.0.0.1/%s && printf \\"GET %s HTTP/1.0\\\\r\\\\n\\\\r\\\\n\\" >&3 && read -r l <&3 && [[ $l == *\\" 200 \\"* ]]"]' "$1" "$2"
}
HEALTH="HEALTHCHECK --interval=30s --timeout=10s --start-period=120s $(http_probe 18789 /healthz)"
COMMON=(--change 'USER node' --change 'ENV HOME=/home/node NODE_ENV=production PATH=/usr/local/bin:/usr/bin:/bin'
        --change 'EXPOSE 18789' --change "$HEALTH" --change 'ENTRYPOINT ["/usr/bin/tini","--"]')

# The functions that make an image, as text: its tag changes when they do, not when an
# unrelated part of this script is edited.
recipe() { declare -f base_rootfs_tar import_image http_probe "$@"; printf '%s\n' "${COMMON[@]}"; }

build_gateway() {
  local h; h=$(printf '%s\n' "$OPENCLAW_VERSION" "$NODE_VERSION" "$(recipe setup_gateway openclaw_modules build_gateway)" | sha256sum | cut -c1-12)
  import_image "zaki/openclaw-gateway:$OPENCLAW_VERSION-$h" setup_gateway "${COMMON[@]}" \
    --change 'WORKDIR /app' \
    --change 'CMD ["node","/app/node_modules/openclaw/openclaw.mjs","gateway","--port","18789"]'
  docker tag "zaki/openclaw-gateway:$OPENCLAW_VERSION-$h" "zaki/openclaw-gateway:$OPENCLAW_VERSION"
}

build_standin() {
  local h; h=$(cat "$HERE/standin/server.js" <(recipe setup_standin build_standin) <(echo "$NODE_VERSION") | sha256sum | cut -c1-12)
  import_image "zaki/standin-gateway:$h" setup_standin "${COMMON[@]}" \
    --change 'WORKDIR /app' --change 'CMD ["node","/app/server.js"]'
}

# Zaki's services in one image (python -m services.<name>), run as uid 1000 by compose except
# the provisioner (root with CAP_NET_ADMIN: it manages the tenants' egress rules with iptables,
# nf_tables backend like the host's) and the backup service (it chroots into tenant folders).
setup_services() {
  local r=$1
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  chroot "$r" sh -c 'apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends python3 python3-venv iptables iproute2 >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/*' >&2
  # Wheels are built on the build host (its pip has the registry access and certificates)
  # and installed offline into the image.
  local wheels; wheels=$(mktemp -d "$CACHE/wheels.XXXX")
  (cd "$ROOT" && "$PY" -m pip wheel -q --wheel-dir "$wheels" . >&2)
  mkdir -p "$r/wheels" && cp "$wheels"/*.whl "$r/wheels/" && rm -rf "$wheels"
  chroot "$r" env -u PIP_FIND_LINKS -u PIP_CERT sh -c \
    'python3 -m venv /opt/zaki && /opt/zaki/bin/pip install -q --no-index --find-links /wheels zaki && rm -rf /wheels' >&2
  : > "$r/etc/resolv.conf"
}

services_hash() {
  (cd "$ROOT" && git ls-files -z pyproject.toml shared services zaki | xargs -0 cat; recipe setup_services build_services) | sha256sum | cut -c1-12
}

build_services() {
  local h; h=$(services_hash)
  import_image "zaki/services:$h" setup_services \
    --change 'USER 1000:1000' --change 'ENV PATH=/opt/zaki/bin:/usr/sbin:/usr/bin:/sbin:/bin PYTHONUNBUFFERED=1 ZAKI_METRICS_PORT=9100' \
    --change 'WORKDIR /opt/zaki' \
    --change "HEALTHCHECK --interval=30s --timeout=3s --start-period=30s $(http_probe '$ZAKI_METRICS_PORT' /metrics)" \
    --change 'ENTRYPOINT ["/usr/bin/tini","--","python3","-m"]' --change 'CMD ["services.provisioner"]'
}

# Stand-ins for the official images, started with the same arguments.
setup_ferretdb() {
  local r=$1
  install -m 0755 "$ROOT/.zaki/bin/zaki-ferretdb" "$r/usr/local/bin/zaki-ferretdb"
  # Takes mongod's arguments (uses --bind_ip and --port, ignores the rest), so compose
  # starts it exactly like the official `mongo` image.
  cat > "$r/usr/local/bin/mongod" <<'SH'
#!/bin/sh
ip=127.0.0.1; port=27017
while [ $# -gt 0 ]; do
  case "$1" in
    --bind_ip) ip=${2%%,*}; shift ;;
    --port) port=$2; shift ;;
  esac
  shift
done
exec /usr/local/bin/zaki-ferretdb -listen "$ip:$port" -dir /data/db
SH
  chmod 755 "$r/usr/local/bin/mongod"
  mkdir -p "$r/data/db" && chown 1000:1000 "$r/data/db"
}

setup_nats() {
  local r=$1
  install -m 0755 "$(nats_bin)" "$r/nats-server"
  mkdir -p "$r/data" && chown 1000:1000 "$r/data"
}

setup_prometheus() {
  local r=$1
  install -m 0755 "$(command -v prometheus)" "$r/bin/prometheus"
  mkdir -p "$r/prometheus" "$r/etc/prometheus" && chown 1000:1000 "$r/prometheus"
}

build_stand_ins() {
  py -c 'from zaki.stack import build_ferretdb; build_ferretdb()' >&2
  local fh nh ph
  fh=$(cat "$ROOT/.zaki/bin/zaki-ferretdb" <(recipe setup_ferretdb) | sha256sum | cut -c1-12)
  import_image "zaki/ferretdb:$fh" setup_ferretdb --change 'USER 1000:1000' --change 'EXPOSE 27017' \
    --change 'ENTRYPOINT ["/usr/bin/tini","--","/usr/local/bin/mongod"]'
  nh=$(cat "$(nats_bin)" <(recipe setup_nats) | sha256sum | cut -c1-12)
  import_image "zaki/nats:$nh" setup_nats --change 'USER 1000:1000' --change 'EXPOSE 4222 8222' \
    --change 'ENTRYPOINT ["/usr/bin/tini","--","/nats-server"]'
  command -v prometheus >/dev/null || { say "installing Debian's prometheus"; apt-get install -y -q prometheus >&2; }
  ph=$(cat "$(command -v prometheus)" <(recipe setup_prometheus) | sha256sum | cut -c1-12)
  import_image "zaki/prometheus:$ph" setup_prometheus --change 'USER 1000:1000' --change 'EXPOSE 9090' \
    --change 'ENTRYPOINT ["/bin/prometheus"]' \
    --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml","--storage.tsdb.path=/prometheus"]'
}

case "$what" in
  gateway) build_gateway ;;
  standin) build_standin ;;
  all) build_standin; build_gateway; openclaw_modules >/dev/null ;;  # the modules: `openclaw config validate` in tests
  services) build_services ;;
  stack) build_services; build_stand_ins ;;
  *) echo "usage: $0 [gateway|standin|all|services|stack]" >&2; exit 2 ;;
esac
