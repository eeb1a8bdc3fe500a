"""The state store against a real PostgreSQL: versioned transitions, audit rows, migrate."""

from __future__ import annotations

import asyncio

import pytest

from safeurl_worker.models import Analysis, Report, State, Verdict
from safeurl_worker.store import Store

pytestmark = pytest.mark.integration


async def test_migrate_is_idempotent(store: Store) -> None:
    await store.migrate()
    await store.migrate()
    n = await store.pool.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE conname = 'scan_jobs_state_check'")
    assert n == 1


async def test_migrate_on_api_created_tables(store: Store) -> None:
    """The API service may have created the tables first (without our extra columns)."""
    await store.pool.execute("DROP TABLE scan_audit_log, scan_results, scan_jobs")
    await store.pool.execute("""
        CREATE TABLE scan_jobs (id uuid PRIMARY KEY, url text NOT NULL,
          state text NOT NULL DEFAULT 'QUEUED', version integer NOT NULL DEFAULT 0,
          attempts integer NOT NULL DEFAULT 0, worker_id text, error_code text,
          error_message text, created_at timestamptz DEFAULT now(),
          updated_at timestamptz DEFAULT now(), started_at timestamptz, finished_at timestamptz);
        CREATE TABLE scan_results (job_id uuid PRIMARY KEY REFERENCES scan_jobs(id),
          verdict text, score integer, http_status integer, final_url text, redirects jsonb,
          content_type text, sha256 text, title text, signals jsonb, report jsonb,
          analyzer_version text, created_at timestamptz DEFAULT now());""")
    await store.migrate()
    job_id = await store.insert_job("http://a.test/")
    assert (await store.get_job(job_id)) is not None
    with pytest.raises(Exception, match="check"):
        await store.pool.execute("UPDATE scan_jobs SET state = 'BOGUS'")


async def test_transition_is_versioned_and_audited(store: Store) -> None:
    job = await store.get_job(await store.insert_job("http://a.test/"))
    assert job is not None and job.state is State.QUEUED and job.version == 0
    moved = await store.transition(job, State.FETCHING, worker_id="w1", add_attempt=True)
    assert moved is not None and moved.version == 1 and moved.attempts == 1
    # A second writer holding the old version loses: zero rows, no audit row.
    assert await store.transition(job, State.FETCHING, worker_id="w2") is None
    rows = await store.pool.fetch("SELECT * FROM scan_audit_log WHERE job_id = $1", job.id)
    assert [(r["from_state"], r["to_state"], r["version"], r["worker_id"]) for r in rows] == [
        ("QUEUED", "FETCHING", 1, "w1")]


async def test_racing_writers_exactly_one_wins(store: Store) -> None:
    job = await store.get_job(await store.insert_job("http://a.test/"))
    assert job is not None
    results = await asyncio.gather(*(store.transition(job, State.FETCHING, worker_id=f"w{i}")
                                     for i in range(8)))
    assert sum(r is not None for r in results) == 1
    assert await store.pool.fetchval("SELECT count(*) FROM scan_audit_log") == 1


async def test_complete_writes_result_and_audit_in_one_statement(store: Store) -> None:
    job = await store.get_job(await store.insert_job("http://a.test/"))
    assert job is not None
    job = await store.transition(job, State.FETCHING, worker_id="w")
    assert job is not None
    job = await store.transition(job, State.ANALYZING, worker_id="w")
    assert job is not None
    report = Report(fetcher_version="1", requested_url="http://a.test/", http_status=200)
    analysis = Analysis(verdict=Verdict.SAFE, score=0, signals=[], analyzer_version="t")
    assert await store.complete(job, worker_id="w", report=report, analysis=analysis,
                                url_key="http://a.test/") == 3
    # Stale completion (same seen version) changes nothing and adds no second result.
    assert await store.complete(job, worker_id="x", report=report, analysis=analysis,
                                url_key=None) is None
    assert await store.pool.fetchval("SELECT count(*) FROM scan_results") == 1
    assert await store.pool.fetchval(
        "SELECT array_agg(version ORDER BY version) FROM scan_audit_log") == [1, 2, 3]
