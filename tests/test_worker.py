"""End-to-end: stream -> versioned state machine -> real fetcher container -> ack.

Real Redis, PostgreSQL and Docker; the target is a test host on the test's internal network.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from safeurl_worker.config import Settings
from safeurl_worker.pipeline import url_problem
from safeurl_worker.store import Store

from .conftest import TestNet, running_worker
from .helpers import (
    audit,
    labelled_containers,
    metric,
    pending,
    submit,
    wait_all_terminal,
    wait_terminal,
    wait_until,
)

pytestmark = pytest.mark.integration


async def test_benign_page_completes_with_result_audit_and_ack(
        settings: Settings, store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    async with running_worker(settings) as worker:
        job_id = await submit(store, rds, settings, "http://site-a.test/")
        job = await wait_terminal(store, job_id)
        assert job["state"] == "COMPLETED", job
        assert job["version"] == 3 and job["attempts"] == 1
        assert job["error_code"] is None and job["finished_at"] is not None
        results = await store.pool.fetch("SELECT * FROM scan_results WHERE job_id = $1", job_id)
        assert len(results) == 1
        r = results[0]
        assert r["verdict"] == "safe" and r["http_status"] == 200
        assert r["title"] == "Benign test page"
        assert r["final_url"] == "http://site-a.test/"
        assert r["sha256"] and len(r["sha256"]) == 64
        assert r["report"]["requested_url"] == "http://site-a.test/"
        assert r["analyzer_version"]
        assert await audit(store, job_id) == [
            ("QUEUED", "FETCHING", 1), ("FETCHING", "ANALYZING", 2), ("ANALYZING", "COMPLETED", 3)]
        await asyncio.sleep(0.1)  # the ack follows the commit
        assert await pending(rds, settings) == 0
        assert labelled_containers(job_id) == []
        text = worker.metrics.render()
        assert metric(text, "safeurl_jobs_total", {"outcome": "completed"}) == 1
        assert metric(text, "safeurl_container_runs_total", {"result": "ok"}) == 1


async def test_hanging_target_times_out_within_limit(
        make_settings: type[Settings], store: Store, rds: redis.Redis) -> None:
    # The fetcher's own deadline is set beyond the container's, so the container limit is what
    # stops this scan.
    settings = make_settings(container_timeout_ms=3000, fetch_timeout_ms=60000)
    async with running_worker(settings):
        job_id = await submit(store, rds, settings, "http://site-a.test/hang")
        t0 = time.monotonic()
        job = await wait_terminal(store, job_id, timeout=30)
        took = time.monotonic() - t0
        assert job["state"] == "TIMED_OUT" and job["error_code"] == "TIMEOUT", job
        assert took < 3 + 3, f"took {took:.1f}s for a 3 s timeout"
        assert [a[1] for a in await audit(store, job_id)] == ["FETCHING", "TIMED_OUT"]
        await asyncio.sleep(0.1)
        assert await pending(rds, settings) == 0
        assert labelled_containers(job_id) == []


async def test_page_with_a_nul_byte_in_its_title_is_stored(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    async with running_worker(settings):
        job_id = await submit(store, rds, settings, "http://site-a.test/nul-title")
        job = await wait_terminal(store, job_id)
        assert job["state"] == "COMPLETED" and job["attempts"] == 1, job
        title = await store.pool.fetchval("SELECT title FROM scan_results WHERE job_id=$1",
                                          job_id)
        # The HTML parser turns the NUL into U+FFFD, as a browser's title shows it; a NUL
        # that reaches the report any other way is dropped by models.storable_text.
        assert title == "Nul\ufffdTitle"


async def test_crashing_container_fails_with_container_error_after_retries(
        make_settings: type[Settings], store: Store, rds: redis.Redis, crash_image: str) -> None:
    settings = make_settings(fetcher_image=crash_image, max_attempts=3)
    async with running_worker(settings) as worker:
        job_id = await submit(store, rds, settings, "http://site-a.test/")
        job = await wait_terminal(store, job_id)
        assert job["state"] == "FAILED" and job["error_code"] == "CONTAINER_ERROR", job
        assert "exit code 3" in job["error_message"]
        assert job["attempts"] == 3
        assert [a[1] for a in await audit(store, job_id)] == [
            "FETCHING", "FETCHING", "FETCHING", "FAILED"]
        assert metric(worker.metrics.render(), "safeurl_container_runs_total",
                      {"result": "crashed"}) == 3
        assert labelled_containers(job_id) == []


async def test_garbage_output_fails_output_invalid(
        make_settings: type[Settings], store: Store, rds: redis.Redis, garbage_image: str) -> None:
    settings = make_settings(fetcher_image=garbage_image)
    async with running_worker(settings):
        job_id = await submit(store, rds, settings, "http://site-a.test/")
        job = await wait_terminal(store, job_id)
        assert job["state"] == "FAILED" and job["error_code"] == "OUTPUT_INVALID", job


async def test_invalid_url_fails_without_a_container(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    async with running_worker(settings) as worker:
        job_id = await submit(store, rds, settings, "ftp://x")
        job = await wait_terminal(store, job_id)
        assert job["state"] == "FAILED" and job["error_code"] == "INVALID_URL", job
        assert await audit(store, job_id) == [("QUEUED", "FAILED", 1)]
        assert b"safeurl_container_runs_total{" not in worker.metrics.render()
        await asyncio.sleep(0.1)
        assert await pending(rds, settings) == 0


async def test_malformed_message_is_acked_and_worker_keeps_going(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    async with running_worker(settings) as worker:
        await rds.xadd(settings.scan_stream, {"job_id": "not-a-uuid"})
        await rds.xadd(settings.scan_stream, {"something": "else"})
        job_id = await submit(store, rds, settings, "http://site-a.test/")
        assert (await wait_terminal(store, job_id))["state"] == "COMPLETED"
        await asyncio.sleep(0.2)
        assert await pending(rds, settings) == 0
        assert metric(worker.metrics.render(), "safeurl_malformed_messages_total") == 2
        dead = await rds.xrange(settings.dead_letter_stream)
        assert [d[1][b"reason"] for d in dead] == [b"MALFORMED_MESSAGE"] * 2
        assert dead[0][1][b"job_id"] == b"not-a-uuid"


async def test_same_job_xadded_twice_runs_once(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    async with running_worker(settings) as worker:
        job_id = await submit(store, rds, settings, "http://site-a.test/")
        await rds.xadd(settings.scan_stream, {"job_id": str(job_id)})
        await wait_terminal(store, job_id)
        # The second copy is kept until the job is terminal, then acked (one renewal later).
        await wait_until(lambda: pending(rds, settings), 0, timeout=10)
        assert [a[2] for a in await audit(store, job_id)] == [1, 2, 3]
        n = await store.pool.fetchval("SELECT count(*) FROM scan_results WHERE job_id=$1", job_id)
        assert n == 1
        text = worker.metrics.render()
        assert metric(text, "safeurl_container_runs_total", {"result": "ok"}) == 1
        assert await pending(rds, settings) == 0


async def test_two_workers_never_both_complete_a_job(
        make_settings: type[Settings], store: Store, rds: redis.Redis) -> None:
    a = make_settings(worker_id="w-a", worker_concurrency=4)
    b = make_settings(worker_id="w-b", worker_concurrency=4)
    async with running_worker(a) as wa, running_worker(b) as wb:
        ids = [await submit(store, rds, a, "http://site-a.test/") for _ in range(16)]
        for job_id in ids:  # every job delivered twice: both workers race for each
            await rds.xadd(a.scan_stream, {"job_id": str(job_id)})
        await wait_all_terminal(store, ids, timeout=120)
        # The loser of each race holds its copy until the winner's job is terminal, then acks
        # it (within one renewal interval).
        await wait_until(lambda: pending(rds, a), 0, timeout=10)
    rows = await store.pool.fetch(
        "SELECT job_id, count(*) AS n FROM scan_audit_log WHERE to_state = 'COMPLETED' "
        "GROUP BY job_id")
    assert len(rows) == 16 and all(r["n"] == 1 for r in rows)
    assert await store.pool.fetchval("SELECT count(*) FROM scan_results") == 16
    runs = sum(metric(w.metrics.render(), "safeurl_container_runs_total", {"result": "ok"})
               for w in (wa, wb))
    assert runs == 16
    assert await pending(rds, a) == 0


async def test_result_cache_reuses_a_recent_verdict_without_a_container(
        make_settings: type[Settings], store: Store, rds: redis.Redis) -> None:
    settings = make_settings(result_cache_ttl_s=300)
    async with running_worker(settings) as worker:
        first = await submit(store, rds, settings, "http://site-a.test/")
        assert (await wait_terminal(store, first))["state"] == "COMPLETED"
        # Same URL once normalized (case, default port, fragment): answered from the cache.
        second = await submit(store, rds, settings, "HTTP://Site-A.test:80/#frag")
        assert (await wait_terminal(store, second))["state"] == "COMPLETED"
        text = worker.metrics.render()
        assert metric(text, "safeurl_container_runs_total", {"result": "ok"}) == 1
        assert metric(text, "safeurl_result_cache_hits_total") == 1
    a = await store.pool.fetchrow("SELECT * FROM scan_results WHERE job_id=$1", first)
    b = await store.pool.fetchrow("SELECT * FROM scan_results WHERE job_id=$1", second)
    assert b["cached_from"] == first and a["cached_from"] is None
    assert (b["verdict"], b["score"], b["sha256"]) == (a["verdict"], a["score"], a["sha256"])
    assert [x[2] for x in await audit(store, second)] == [1, 2, 3]
    # With the cache disabled, the same URL is scanned again.
    off = make_settings(result_cache_ttl_s=0)
    async with running_worker(off) as worker:
        third = await submit(store, rds, off, "http://site-a.test/")
        await wait_terminal(store, third)
        assert metric(worker.metrics.render(), "safeurl_container_runs_total",
                      {"result": "ok"}) == 1


@pytest.mark.parametrize("url,ok", [
    ("http://example.org/", True),
    ("https://example.org:8443/a?b=c", True),
    ("ftp://x", False),
    ("javascript:alert(1)", False),
    ("http://", False),
    ("http://exa mple.org/", False),
    ("http://example.org:99999/", False),
    ("http://example.org/" + "a" * 2100, False),
    ("example.org", False),
])
def test_url_problem(url: str, ok: bool) -> None:
    assert (url_problem(url) is None) is ok

