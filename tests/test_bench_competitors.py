"""Smoke tests for bench/competitors.py: each competitor runs 200 no-op jobs at concurrency 10.

Needs a real Redis (db 5 unless SAFEURL_BENCH_REDIS_URL says otherwise) and the ``bench`` extra
(``pip install -e '.[dev,bench]'``); a system whose package is missing is skipped. Not timed
assertions - only that each run completes and its Result is sane, and that it leaves no keys.
"""

from __future__ import annotations

import os

import pytest
import redis

from bench.competitors import Result, run_system

pytestmark = pytest.mark.integration

REDIS_URL = os.environ.get("SAFEURL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
JOBS = 200
CONCURRENCY = 10


def _run_keys(system: str) -> set[bytes]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return set(client.scan_iter(match=f"*bench-{system}-*", count=1000))
    finally:
        client.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("system", ["saq", "arq", "celery"])
def test_competitor_smoke(system: str) -> None:
    pytest.importorskip(system)
    before = _run_keys(system)

    result = run_system(system, JOBS, CONCURRENCY, REDIS_URL, timeout=45)

    assert isinstance(result, Result)
    assert result.system == system
    assert result.jobs == JOBS
    assert result.concurrency == CONCURRENCY
    assert result.seconds > 0
    assert result.jobs_per_s > 0
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms
    assert result.notes
    # The run deleted every key it created (others' keys in the db are left alone).
    assert _run_keys(system) <= before
