#!/bin/sh
# A Swarm lab node: its own dockerd, in a container started by zaki/swarm_lab.py with every
# capability but CAP_SYS_RESOURCE (root here lacks it, so --privileged fails) and the host's
# cgroup v1 tree mounted read-write. Arguments are passed on to dockerd (swarm_lab gives
# --cgroup-parent=/<node>, so the node's containers sit in a subtree of their own).
set -eu
exec dockerd --host=unix:///var/run/docker.sock "$@"
