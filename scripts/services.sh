#!/usr/bin/env bash
# Install (if missing) and start Redis, PostgreSQL and the Docker Engine for local runs and tests.
# Idempotent: a service that is already up is left alone. Redis and PostgreSQL listen on 127.0.0.1
# only, because Docker's bridge/internal networks do not stop a fetcher container from reaching a
# listener on the host's docker0 address.
set -euo pipefail

STATE_DIR=${SAFEURL_STATE_DIR:-/var/lib/safeurl}
RUN_DIR=${SAFEURL_RUN_DIR:-/run/safeurl}
REDIS_PORT=${SAFEURL_REDIS_PORT:-6379}
PG_PORT=${SAFEURL_PG_PORT:-5432}
PG_BIN=${PG_BIN:-}
log() { printf '[services] %s\n' "$*" >&2; }

install_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v curl >/dev/null || missing+=(curl)
  command -v runsc >/dev/null || missing+=(runsc)                    # gVisor, FETCHER_RUNTIME=runsc
  python3 -m venv --help >/dev/null 2>&1 || missing+=(python3-venv)
  command -v promtool >/dev/null || missing+=(prometheus)            # promtool checks the alert rules
  command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 ||
    missing+=(docker-compose)                                         # validates compose.yaml
  if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d stops the packages' own service starts: we start each service ourselves.
    # (An existing policy-rc.d is kept and put back.)
    local saved=""
    [ -e /usr/sbin/policy-rc.d ] && saved=$(mktemp) && cp -p /usr/sbin/policy-rc.d "$saved"
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$saved" ]; then mv "$saved" /usr/sbin/policy-rc.d; else rm -f /usr/sbin/policy-rc.d; fi
  fi
}

start_redis() {
  mkdir -p "$STATE_DIR/redis" "$RUN_DIR"
  if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then return; fi
  log "starting redis on 127.0.0.1:$REDIS_PORT"
  # appendonly: the stream and its pending-entries list survive a Redis restart.
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
    --pidfile "$RUN_DIR/redis.pid" --logfile "$STATE_DIR/redis.log" --dir "$STATE_DIR/redis" \
    --appendonly yes --appendfsync everysec --save ''
  for _ in $(seq 50); do redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && return; sleep 0.1; done
  log "redis did not start"; exit 1
}

start_postgres() {
  local bin=${PG_BIN:-$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -1)")}
  local data="$STATE_DIR/pg"
  mkdir -p "$STATE_DIR" /var/run/postgresql
  chown postgres:postgres /var/run/postgresql
  if [ ! -s "$data/PG_VERSION" ]; then
    log "initdb $data"
    mkdir -p "$data" && chown postgres:postgres "$data"
    # trust on loopback only: this is the local development/test cluster (see docs/operations.md).
    runuser -u postgres -- "$bin/initdb" -D "$data" --auth-local=trust --auth-host=trust -E UTF8 >/dev/null
  fi
  if runuser -u postgres -- "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then :; else
    log "starting postgres on 127.0.0.1:$PG_PORT"
    runuser -u postgres -- "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k /var/run/postgresql -c max_connections=300 -c fsync=on" start >/dev/null
  fi
  runuser -u postgres -- psql -h /var/run/postgresql -p "$PG_PORT" -qtAc \
    "SELECT 1 FROM pg_roles WHERE rolname='root'" | grep -q 1 ||
    runuser -u postgres -- psql -h /var/run/postgresql -p "$PG_PORT" -qc "CREATE ROLE root LOGIN SUPERUSER"
  runuser -u postgres -- psql -h /var/run/postgresql -p "$PG_PORT" -qtAc \
    "SELECT 1 FROM pg_database WHERE datname='safeurl'" | grep -q 1 ||
    runuser -u postgres -- psql -h /var/run/postgresql -p "$PG_PORT" -qc "CREATE DATABASE safeurl OWNER root"
}

start_docker() {
  if docker info >/dev/null 2>&1; then return; fi
  mkdir -p "$RUN_DIR"
  log "starting dockerd"
  # live-restore: containers survive a dockerd restart, so a daemon outage does not kill scans.
  nohup dockerd --pidfile "$RUN_DIR/dockerd.pid" --live-restore >"$STATE_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 120); do docker info >/dev/null 2>&1 && return; sleep 0.25; done
  log "dockerd did not start; see $STATE_DIR/dockerd.log"; tail -20 "$STATE_DIR/dockerd.log" >&2; exit 1
}

# gVisor for FETCHER_RUNTIME=runsc (docs/deploy.md). This runsc build refuses networked containers
# with its own netstack ("root network namespace"), and --platform=kvm hangs here; ptrace with
# --network=host runs a fetch over the container's own network namespace (not the host's).
# Registered through daemon.json (merged, never overwritten) and picked up with a SIGHUP, which
# leaves running containers alone.
register_runsc() {
  command -v runsc >/dev/null || return 0
  docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' && return 0
  mkdir -p /etc/docker
  python3 - <<'PY'
import json, pathlib
p = pathlib.Path("/etc/docker/daemon.json")
conf = json.loads(p.read_text()) if p.exists() and p.read_text().strip() else {}
conf.setdefault("runtimes", {})["runsc"] = {
    "path": "/usr/bin/runsc", "runtimeArgs": ["--platform=ptrace", "--network=host"]}
p.write_text(json.dumps(conf, indent=2) + "\n")
PY
  log "registering the runsc runtime with dockerd"
  local pid
  pid=$(cat "$RUN_DIR/dockerd.pid" 2>/dev/null || pgrep -xo dockerd)
  kill -HUP "$pid"
  for _ in $(seq 40); do
    docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' && return 0
    sleep 0.25
  done
  log "dockerd did not pick up the runsc runtime; see $STATE_DIR/dockerd.log"; exit 1
}

# The fetchers' network (FETCHER_NETWORK's default, safeurl-fetch), instead of Docker's default
# `bridge`: a bridge of its own (br-safeurl) with no traffic between containers, and
# deploy/firewall/docker-user.sh denying it the host and private ranges. Same name and options as
# compose.yaml's fetch network, which Compose then finds and uses. SAFEURL_FETCH_NETWORK=0 skips it
# (a worker then stops at start-up unless FETCHER_NETWORK names a network that exists).
fetch_network() {
  [ "${SAFEURL_FETCH_NETWORK:-1}" = 0 ] && return 0
  if ! docker network inspect safeurl-fetch >/dev/null 2>&1; then
    log "creating the safeurl-fetch network (bridge br-safeurl, no inter-container traffic)"
    docker network create --driver bridge --opt com.docker.network.bridge.name=br-safeurl \
      --opt com.docker.network.bridge.enable_icc=false safeurl-fetch >/dev/null
  fi
  bash "$(dirname "$0")/../deploy/firewall/docker-user.sh" apply
}

main() {
  mkdir -p "$STATE_DIR"
  install_packages
  case "${1:-all}" in
    redis) start_redis ;;
    postgres) start_postgres ;;
    docker) start_docker; register_runsc; fetch_network ;;
    all) start_redis; start_postgres; start_docker; register_runsc; fetch_network ;;
    *) echo "usage: $0 [all|redis|postgres|docker]" >&2; exit 2 ;;
  esac
}
main "$@"
