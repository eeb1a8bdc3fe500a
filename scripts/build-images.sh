#!/usr/bin/env bash
# Build the fetcher (sandbox) image, and optionally the browser (rendering sandbox) and worker
# images, from the Containerfile.
# The Containerfile takes its base as a build arg (a public image by default). Where no registry is
# reachable, a base image is built locally from Debian packages (debootstrap) and cached: it is only
# rebuilt when missing.
#   scripts/build-images.sh            # fetcher image
#   scripts/build-images.sh worker     # worker image too
#   scripts/build-images.sh browser    # browser image too (Debian's chromium: ~5 minutes once)
#   scripts/build-images.sh all        # all three
set -euo pipefail
cd "$(dirname "$0")/.."

PUBLIC_BASE=${PUBLIC_BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE=${LOCAL_BASE_IMAGE:-safeurl-base:bookworm}
FETCHER_IMAGE=${FETCHER_IMAGE:-safeurl-fetcher:latest}
WORKER_IMAGE=${WORKER_IMAGE:-safeurl-worker:latest}
BROWSER_IMAGE=${BROWSER_IMAGE:-safeurl-browser:latest}
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

build() {  # target tag base
  log "building $2 (target $1, base $3)"
  DOCKER_BUILDKIT=0 docker build -q -f Containerfile --target "$1" --build-arg "BASE_IMAGE=$3" -t "$2" . >/dev/null
}

# What the fetcher imports besides the standard library: wheels for the image's Python (3.11),
# fetched here so that the image build needs no registry. weburl.py: ada-url (+ cffi, its
# run-time), idna; htmlscan.py: selectolax (the Lexbor HTML5 parser); content.py: webencodings.
FETCHER_WHEELS=("ada-url==4.0.0" "cffi==2.1.1" "idna==3.20" "selectolax==1.0.2"
                "webencodings==0.6.1")
fetcher_wheels() {
  local arch
  arch=$(uname -m)
  rm -rf build/fetcher-wheels
  mkdir -p build/fetcher-wheels
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform "manylinux_2_28_$arch" --platform "manylinux2014_$arch" \
    -d build/fetcher-wheels "${FETCHER_WHEELS[@]}" >/dev/null
}

# The browser image: the fetcher's wheels (the renderer reuses netcheck/weburl/htmlscan), plus
# Playwright (its wheel carries its own Node.js driver; no browser is downloaded: the image has
# Debian's chromium) and mmh3 (the favicon hash as Shodan computes it).
BROWSER_WHEELS=("playwright==1.65.2" "greenlet==3.5.6" "mmh3==5.3.1")
browser_wheels() {
  local arch
  arch=$(uname -m)
  rm -rf build/browser-wheels
  mkdir -p build/browser-wheels
  cp build/fetcher-wheels/*.whl build/browser-wheels/
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
    --platform "manylinux_2_28_$arch" --platform "manylinux2014_$arch" \
    --platform "manylinux_2_17_$arch" --platform "manylinux1_$arch" \
    -d build/browser-wheels "${BROWSER_WHEELS[@]}" >/dev/null
}

base=$(pick_base)
fetcher_wheels
build fetcher "$FETCHER_IMAGE" "$base"
if [ "${1:-}" = browser ] || [ "${1:-}" = all ]; then
  browser_wheels
  build browser "$BROWSER_IMAGE" "$base"
fi
if [ "${1:-}" = worker ] || [ "${1:-}" = all ]; then
  rm -rf build/wheels
  # async-timeout: redis needs it on Python < 3.11.3 (Debian bookworm has 3.11.2).
  .venv/bin/pip wheel -q -w build/wheels . "async-timeout>=4.0.3" >/dev/null
  build worker "$WORKER_IMAGE" "$base"
fi
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^(${FETCHER_IMAGE%%:*}|${BROWSER_IMAGE%%:*}|${WORKER_IMAGE%%:*}|${LOCAL_BASE%%:*}):" >&2 || true
