#!/usr/bin/env bash
# Everything a fresh Debian/Ubuntu machine (root) needs: services, .venv with the project, the
# fetcher image, the schema. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh all
if [ ! -x .venv/bin/safeurl-worker ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "[setup] creating .venv and installing the project" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[dev,bench]' >/dev/null
  touch .venv/.installed
fi
bash scripts/build-images.sh "$@"
.venv/bin/safeurl-worker migrate >/dev/null
echo "[setup] ready: redis 127.0.0.1:6379, postgres 127.0.0.1:5432 (db safeurl), docker, $(.venv/bin/safeurl-worker --version)" >&2
