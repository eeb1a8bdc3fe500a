#!/usr/bin/env bash
# Build the images: the sandbox (fetcher), and optionally the worker, the browser sandbox and the
# service images compose.yaml needs, for machines without a registry.
#   scripts/build-images.sh                  # fetcher image
#   scripts/build-images.sh worker           # worker image too
#   scripts/build-images.sh browser          # browser image too (Debian's chromium: ~5 minutes once)
#   scripts/build-images.sh services         # redis, postgres, prometheus from Debian's packages
#   scripts/build-images.sh all              # all of the above
#
# The Containerfile needs nothing from this script (`docker build --target worker .` works from a
# clean clone wherever the base image can be pulled); the script adds the two offline paths:
#  * the base: a public image if present or pullable, else a Debian base built here with
#    debootstrap and cached (only rebuilt when missing). BASE_IMAGE forces one.
#  * the wheels: fetched inside the build from the package index when a container can reach it
#    (probed once); else downloaded on the host into build/wheelhouse for the base's Python and
#    CPU, and the build runs pip with --no-index. SAFEURL_WHEELS=online|offline forces one.
# Tags: FETCHER_IMAGE, WORKER_IMAGE, BROWSER_IMAGE, REDIS_IMAGE, POSTGRES_IMAGE, PROMETHEUS_IMAGE.
set -euo pipefail
cd "$(dirname "$0")/.."

PUBLIC_BASE=${PUBLIC_BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE=${LOCAL_BASE_IMAGE:-safeurl-base:bookworm}
FETCHER_IMAGE=${FETCHER_IMAGE:-safeurl-fetcher:latest}
WORKER_IMAGE=${WORKER_IMAGE:-safeurl-worker:latest}
BROWSER_IMAGE=${BROWSER_IMAGE:-safeurl-browser:latest}
REDIS_IMAGE=${REDIS_IMAGE:-safeurl-redis:bookworm}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-safeurl-postgres:bookworm}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-safeurl-prometheus:bookworm}
INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}
log() { printf '[images] %s\n' "$*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

build_local_base() {
  local dir
  dir=$(mktemp -d /tmp/safeurl-base.XXXXXX)
  log "building $LOCAL_BASE with debootstrap (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,tini \
    bookworm "$dir" http://deb.debian.org/debian >"$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; exit 1; }
  # Keep the image lean: no apt caches, docs or locales a fetcher never reads.
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc \
    "$dir"/usr/share/man "$dir"/usr/share/locale
  tar -C "$dir" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$dir" "$dir.log"
}

pick_base() {
  if [ -n "${BASE_IMAGE:-}" ]; then echo "$BASE_IMAGE"; return; fi
  if have "$PUBLIC_BASE"; then echo "$PUBLIC_BASE"; return; fi
  if have "$LOCAL_BASE"; then echo "$LOCAL_BASE"; return; fi
  if timeout 20 docker pull -q "$PUBLIC_BASE" >/dev/null 2>&1; then echo "$PUBLIC_BASE"; return; fi
  log "cannot pull $PUBLIC_BASE; using a local base image"
  build_local_base
  echo "$LOCAL_BASE"
}

# Can a container on the default bridge (where `docker build` runs its steps) reach the index?
index_reachable() {  # base
  timeout 40 docker run --rm --entrypoint python3 "$1" -c \
    'import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip("/") + "/pip/", timeout=15)' \
    "$INDEX_URL" >/dev/null 2>&1
}

quiet() {  # command...: its output only if it fails (pip warns about the host's pip.conf)
  local out
  if ! out=$("$@" 2>&1); then printf '%s\n' "$out" >&2; return 1; fi
}

# The offline path: every wheel the builds need, downloaded on the host for the base's Python
# version and CPU (not the host's), into build/wheelhouse.
fill_wheelhouse() {  # base
  local ver arch pip plats=()
  read -r ver arch < <(docker run --rm --entrypoint python3 "$1" -c \
    'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.machine())')
  for minor in $(seq 17 36); do plats+=(--platform "manylinux_2_${minor}_$arch"); done
  plats+=(--platform "manylinux2014_$arch" --platform "manylinux1_$arch")
  pip=(.venv/bin/python -m pip)
  [ -x .venv/bin/python ] || pip=(python3 -m pip)
  log "downloading wheels for Python $ver on $arch into build/wheelhouse"
  # Kept between runs: pip skips what is there, and an unchanged wheelhouse keeps the build cache.
  mkdir -p build/wheelhouse
  local dl=(quiet "${pip[@]}" download -q --only-binary=:all: --python-version "$ver" "${plats[@]}"
            -d build/wheelhouse)
  "${dl[@]}" --no-deps -r deploy/images/fetcher-requirements.txt \
    -r deploy/images/browser-requirements.txt
  # The project's dependencies, resolved for the base's Python from its (pure Python) wheel; the
  # build makes its own from the source, with setuptools and wheel from here.
  local tmp
  tmp=$(mktemp -d /tmp/safeurl-wheel.XXXXXX)
  quiet "${pip[@]}" wheel -q --no-deps -w "$tmp" .
  "${dl[@]}" "$tmp"/safeurl_worker-*.whl "async-timeout>=4.0.3" "setuptools>=68" wheel
  rm -rf "$tmp" build/wheelhouse/safeurl_worker-*.whl
}

WHEEL_ARGS=()
pick_wheels() {  # base: sets WHEEL_ARGS, the build args for where pip finds the wheels
  local mode=${SAFEURL_WHEELS:-auto}
  if [ "$mode" = auto ]; then
    if index_reachable "$1"; then mode=online; else mode=offline; fi
    log "package index from a container: $([ "$mode" = online ] && echo reachable || echo unreachable)"
  fi
  case "$mode" in
    online) WHEEL_ARGS=(--build-arg "PIP_INDEX_URL=$INDEX_URL") ;;
    offline) fill_wheelhouse "$1" >&2
             WHEEL_ARGS=(--build-arg WHEELHOUSE=build/wheelhouse --build-arg PIP_OFFLINE=1) ;;
    *) log "SAFEURL_WHEELS must be auto, online or offline"; exit 2 ;;
  esac
}

build() {  # file context target tag
  local out
  out=$(mktemp /tmp/safeurl-build.XXXXXX)
  log "building $4 (target $3)"
  # The classic builder: docker-compose v1 builds with it too, and BuildKit's frontend would be
  # pulled from a registry here.
  if ! DOCKER_BUILDKIT=0 docker build -f "$1" --target "$3" "${ARGS[@]}" -t "$4" "$2" >"$out" 2>&1; then
    tail -40 "$out" >&2; rm -f "$out"; exit 1
  fi
  rm -f "$out"
}

want() {  # name: asked for on the command line (or `all`)
  local a
  for a in "${TARGETS[@]}"; do [ "$a" = "$1" ] || [ "$a" = all ] && return 0; done
  return 1
}

TARGETS=("$@")
base=$(pick_base)
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' safeurl_worker/__init__.py)
# The commit and its time: labels that do not change between builds of one commit (cache hits).
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
created=$(git log -1 --format=%cI 2>/dev/null || echo unknown)
pick_wheels "$base"
ARGS=(--build-arg "BASE_IMAGE=$base" --build-arg "VERSION=$version"
      --build-arg "REVISION=$revision" --build-arg "CREATED=$created" "${WHEEL_ARGS[@]}")
build Containerfile . fetcher "$FETCHER_IMAGE"
if want worker; then build Containerfile . worker "$WORKER_IMAGE"; fi
if want browser; then build Containerfile . browser "$BROWSER_IMAGE"; fi
if want services; then
  ARGS=(--build-arg "BASE_IMAGE=$base")
  build deploy/images/Containerfile deploy/images redis "$REDIS_IMAGE"
  build deploy/images/Containerfile deploy/images prometheus "$PROMETHEUS_IMAGE"
  build deploy/images/Containerfile deploy/images postgres "$POSTGRES_IMAGE"
fi
# What was built, as a Compose env file: `docker compose --env-file build/compose.env up` runs
# compose.yaml on these images (and rebuilds the worker the same way, offline or not).
compose_env=${SAFEURL_COMPOSE_ENV:-build/compose.env}
mkdir -p "$(dirname "$compose_env")"
{
  echo "BASE_IMAGE=$base"
  echo "FETCHER_IMAGE=$FETCHER_IMAGE"
  echo "WORKER_IMAGE=$WORKER_IMAGE"
  echo "SAFEURL_VERSION=$version"
  echo "SAFEURL_REVISION=$revision"
  echo "SAFEURL_CREATED=$created"
  case "${WHEEL_ARGS[*]}" in
    *PIP_OFFLINE=1*) echo "WHEELHOUSE=build/wheelhouse"; echo "PIP_OFFLINE=1" ;;
  esac
  if want services; then
    echo "REDIS_IMAGE=$REDIS_IMAGE"
    echo "POSTGRES_IMAGE=$POSTGRES_IMAGE"
    echo "PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE"
  fi
} >"$compose_env"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' |
  grep -E "^(${FETCHER_IMAGE%%:*}|${BROWSER_IMAGE%%:*}|${WORKER_IMAGE%%:*}|${LOCAL_BASE%%:*}|${REDIS_IMAGE%%:*}|${POSTGRES_IMAGE%%:*}|${PROMETHEUS_IMAGE%%:*}):" >&2 || true
