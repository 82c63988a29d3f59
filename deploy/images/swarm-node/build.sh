#!/usr/bin/env bash
# Builds the Swarm lab's node image: Debian's docker.io (the same 20.10 engine as the host's)
# and iptables in the debootstrap base of ../build.sh, imported with `docker import`. A node is
# a container running its own dockerd (zaki/swarm_lab.py starts it; entrypoint below).
#
#   deploy/images/swarm-node/build.sh      -> prints the image reference (zaki/swarm-node:<hash>)
#
# The base rootfs, the apt mirror and the import step are ../build.sh's own functions, read from
# it (not copied) so a change there changes this image's tag too. Env: ZAKI_CACHE.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${ZAKI_CACHE:-$HOME/.cache/zaki}
SUITE=bookworm
mkdir -p "$CACHE"
say() { printf '\033[1m[swarm-node]\033[0m %s\n' "$*" >&2; }
# ../build.sh runs its build at the end; only its function definitions are taken.
FUNCS=$(sed -n -e '/^mirror() {/,/^}/p' -e '/^base_rootfs_tar() {/,/^}/p' \
  -e '/^image_exists() /p' -e '/^import_image() {/,/^}/p' "$HERE/../build.sh")
for f in mirror base_rootfs_tar image_exists import_image; do
  grep -q "^$f() " <<<"$FUNCS" || { say "../build.sh no longer defines $f()"; exit 1; }
done
eval "$FUNCS"

setup_node() {
  local r=$1
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  chroot "$r" sh -c 'apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends \
      docker.io iptables iproute2 procps >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*' >&2
  : > "$r/etc/resolv.conf"
  install -m 0755 "$HERE/entrypoint.sh" "$r/usr/local/bin/swarm-node"
}

h=$( (declare -f base_rootfs_tar import_image setup_node; cat "$HERE/entrypoint.sh") | sha256sum | cut -c1-12)
ref="zaki/swarm-node:$h"
import_image "$ref" setup_node \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'VOLUME /var/lib/docker' \
  --change 'ENTRYPOINT ["/usr/bin/tini","--","/usr/local/bin/swarm-node"]'
echo "$ref"
