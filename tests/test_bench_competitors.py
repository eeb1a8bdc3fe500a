"""Smoke tests for bench/competitors.py: each system of the table runs 100 no-op jobs at
concurrency 10.

Needs a real Redis (db 5 unless SAFEURL_BENCH_REDIS_URL says otherwise) and the ``bench`` extra
(``pip install -e '.[dev,bench]'``); a system whose package is missing is skipped. Not timed
assertions - only that each run completes, its Result is sane, and it leaves no keys.
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from bench.competitors import SYSTEMS, run_system
from bench.harness import Result

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("SAFEURL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
JOBS = 100
CONCURRENCY = 10


def _keys(run_id: str) -> set[bytes]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return set(client.scan_iter(match=f"*{run_id}*", count=1000))
    finally:
        client.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_competitor_smoke(system: str) -> None:
    pytest.importorskip(system)
    run_id = f"bench-{system}-test-{uuid.uuid4().hex[:12]}"

    result = run_system(system, JOBS, CONCURRENCY, REDIS_URL, timeout=45, run_id=run_id)

    assert isinstance(result, Result)
    assert (result.system, result.jobs, result.concurrency) == (system, JOBS, CONCURRENCY)
    assert result.seconds > 0 and result.jobs_per_s > 0
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms
    assert 0 < result.rss_mb < 1000 and result.cpu_ms_per_job > 0
    assert system in result.notes
    # The run deleted every key it created (keys of other runs in the db are not its concern:
    # a concurrent benchmark on the same Redis must not fail this test).
    assert _keys(run_id) == set()
