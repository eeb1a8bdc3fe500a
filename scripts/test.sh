#!/usr/bin/env bash
# The whole suite from a fresh machine: set-up, lint, types, tests. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
echo "== ruff"; .venv/bin/ruff check safeurl_worker tests
echo "== mypy --strict"; .venv/bin/mypy --strict safeurl_worker
echo "== pytest"; .venv/bin/pytest -q -p no:cacheprovider "$@"
echo "suite finished in $(( $(date +%s) - start )) s"
