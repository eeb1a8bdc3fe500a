#!/usr/bin/env bash
# One command from a fresh machine to scan results: set-up, a demo target on an internal docker
# network, the worker, and a few sample scans printed as they finish. Safe to run again.
#   scripts/demo.sh         set up, (re)start the worker, scan the samples
#   scripts/demo.sh stop    stop the demo worker and target
set -euo pipefail
cd "$(dirname "$0")/.."
NET=safeurl-demo
TARGET=safeurl-demo-target
STATE=.demo
mkdir -p "$STATE"

stop() {
  if [ -f "$STATE/worker.pid" ] && kill -0 "$(cat "$STATE/worker.pid")" 2>/dev/null; then
    kill -TERM "$(cat "$STATE/worker.pid")"
    for _ in $(seq 60); do kill -0 "$(cat "$STATE/worker.pid")" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$STATE/worker.pid"
}
if [ "${1:-}" = stop ]; then stop; docker rm -f "$TARGET" >/dev/null 2>&1 || true; exit 0; fi

bash scripts/setup.sh
docker network inspect "$NET" >/dev/null 2>&1 || docker network create --internal "$NET" >/dev/null
docker rm -f "$TARGET" >/dev/null 2>&1 || true
docker run -d --name "$TARGET" --network "$NET" --network-alias site-a.test \
  --network-alias site-b.test --network-alias site-c.test --user 0 --entrypoint python3 \
  -v "$PWD/tests/testhost:/srv:ro" safeurl-fetcher:latest /srv/server.py 80 >/dev/null
SUBNET=$(docker network inspect "$NET" -f '{{(index .IPAM.Config 0).Subnet}}')

stop
# The fetchers join the demo network, and only its subnet is allowed besides public addresses.
FETCHER_NETWORK=$NET FETCH_ALLOW_CIDRS=$SUBNET FETCH_ALLOWED_PORTS=80 WORKER_ID=demo-worker \
  LOG_FORMAT=text nohup .venv/bin/safeurl-worker run >"$STATE/worker.log" 2>&1 &
echo $! >"$STATE/worker.pid"
for _ in $(seq 100); do curl -fs http://127.0.0.1:9400/readyz >/dev/null 2>&1 && break; sleep 0.2; done
echo "worker running (pid $(cat "$STATE/worker.pid")), log: $STATE/worker.log, metrics: http://127.0.0.1:9400/metrics"

for url in http://site-a.test/ http://site-a.test/login http://site-a.test/chain \
           http://site-a.test/download.exe http://site-a.test/obfuscated ftp://example.org/ \
           "http://site-a.test/to/http://169.254.169.254/latest/meta-data/" \
           "http://[::ffff:127.0.0.1]/"; do
  .venv/bin/safeurl-worker submit "$url" --wait --brief --timeout 60 2>/dev/null || true
done
echo
.venv/bin/safeurl-worker status
echo "stop the demo with: scripts/demo.sh stop"
