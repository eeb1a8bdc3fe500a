#!/usr/bin/env bash
# Everything a fresh Debian/Ubuntu machine (root) needs: services, .venv with the project, the
# sandbox images, the schema. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh all
# The console tests drive Debian's chromium with Playwright (never Playwright's own download).
if ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing chromium (console tests)" >&2
  apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; }
fi
if [ ! -x .venv/bin/safeurl-worker ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[setup] creating .venv and installing the project" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev,bench]' >/dev/null
  touch .venv/.installed
fi
bash scripts/build-images.sh "${@:-browser}"  # the fetcher image, and the browser image for its tests
.venv/bin/safeurl-worker migrate >/dev/null
echo "[setup] ready: redis 127.0.0.1:6379, postgres 127.0.0.1:5432 (db safeurl), docker, $(.venv/bin/safeurl-worker --version)" >&2
