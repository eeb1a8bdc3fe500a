#!/bin/sh
# The worker image's entrypoint, started by tini (PID 1: reaps the children, forwards SIGTERM so
# the worker drains). Arguments are safeurl-worker's: `run`, `migrate`, `api`, ...
#
# As a non-root user (the image's default; Kubernetes with runAsUser 10001): runs the worker as is.
# As root (compose.yaml: `user: "0:0"` with only the SETUID and SETGID capabilities): finds the
# group that owns the Docker API socket (root:docker 0660 on most hosts, and the docker group's
# id differs from host to host), then drops to the safeurl user (10001) with that group added.
# So nobody has to export DOCKER_GID, and the worker itself never runs as root: setpriv changes
# the uid from 0, which clears every capability, and no-new-privileges keeps them cleared.
set -eu
if [ "$(id -u)" != 0 ]; then
  exec safeurl-worker "$@"
fi
socket=${DOCKER_SOCKET_PATH:-/var/run/docker.sock}
groups=10001
if [ -S "$socket" ]; then
  groups="$groups,$(stat -c %g "$socket")"
fi
# HOME as Docker sets it for the safeurl user: libraries look there (asyncpg for client
# certificates in ~/.postgresql), and root's /root is not readable by 10001.
export HOME=/nonexistent
exec setpriv --reuid=10001 --regid=10001 --groups="$groups" --inh-caps=-all -- safeurl-worker "$@"
