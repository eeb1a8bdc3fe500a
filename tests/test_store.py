"""The state store against a real PostgreSQL: versioned transitions, audit rows, migrate."""

from __future__ import annotations

import asyncio
import base64
import uuid

import asyncpg
import pytest

from safeurl_worker.artifacts import Artifact
from safeurl_worker.models import Analysis, Job, Render, RenderImage, Report, State, Verdict
from safeurl_worker.store import Store, Submission

pytestmark = pytest.mark.integration


async def test_migrate_is_idempotent(store: Store) -> None:
    await store.migrate()
    await store.migrate()
    n = await store.pool.fetchval(
        "SELECT count(*) FROM pg_constraint WHERE conname = 'scan_jobs_state_check'")
    assert n == 1


async def test_migrate_on_api_created_tables(store: Store) -> None:
    """The API service may have created the tables first (without our extra columns)."""
    await store.pool.execute("DROP TABLE scan_artifacts, scan_audit_log, scan_results, scan_jobs")
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


async def test_submit_job_is_idempotent_per_key(store: Store) -> None:
    first = await store.submit_job(Submission(uuid.uuid4(), "http://a.test/", None, {"k": 1},
                                              "static", "tok:key-1", "hash-a"))
    assert first.created and first.state is State.QUEUED
    again = await store.submit_job(Submission(uuid.uuid4(), "http://b.test/", None, None, None,
                                              "tok:key-1", "hash-b"))
    assert (again.id, again.created, again.request_hash) == (first.id, False, "hash-a")
    # Without a key every submission is a job of its own.
    plain = [await store.submit_job(Submission(uuid.uuid4(), "http://a.test/"))
             for _ in range(2)]
    assert all(p.created for p in plain) and plain[0].id != plain[1].id
    assert await store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 3


async def test_the_outbox_works_on_api_created_tables_after_migrate(store: Store) -> None:
    """Tables made by another API service gain the new columns and tables compatibly."""
    await store.pool.execute("DROP TABLE scan_artifacts, scan_audit_log, scan_results, "
                             "scan_jobs, scan_callbacks, scan_callback_attempts")
    await store.pool.execute("""
        CREATE TABLE scan_jobs (id uuid PRIMARY KEY, url text NOT NULL,
          state text NOT NULL DEFAULT 'QUEUED', version integer NOT NULL DEFAULT 0,
          attempts integer NOT NULL DEFAULT 0, worker_id text, error_code text,
          error_message text, created_at timestamptz DEFAULT now(),
          updated_at timestamptz DEFAULT now(), started_at timestamptz, finished_at timestamptz);
        INSERT INTO scan_jobs (id, url) VALUES (gen_random_uuid(), 'http://old.test/');""")
    await store.migrate()
    old = await store.pool.fetchrow("SELECT callback_url, metadata, mode FROM scan_jobs")
    assert old is not None and tuple(old) == (None, None, None)
    job_id = await store.insert_job("http://a.test/")
    await store.pool.execute("UPDATE scan_jobs SET callback_url = 'http://127.0.0.1:9/' "
                             "WHERE id = $1", job_id)
    job = await store.get_job(job_id)
    assert job is not None
    assert await store.transition(job, State.FAILED, worker_id="w", error_code="X") is not None
    assert await store.pool.fetchval("SELECT count(*) FROM scan_callbacks") == 1


PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


async def _analyzing(store: Store, mode: str | None = None) -> Job:
    job = await store.get_job(await store.insert_job("http://a.test/", mode=mode))
    assert job is not None and job.mode == mode
    for to in (State.FETCHING, State.ANALYZING):
        job = await store.transition(job, to, worker_id="w")
        assert job is not None
    return job


async def test_complete_stores_artifacts_with_the_result_in_one_statement(store: Store) -> None:
    job = await _analyzing(store, "render")
    stored = Report(fetcher_version="render", requested_url="http://a.test/", http_status=200,
                    render=Render(screenshot=RenderImage(type="image/png", size=len(PNG)),
                                  stored_apart=["screenshot", "dom", "requests"]))
    arts = [Artifact("screenshot", "image/png", PNG), Artifact("dom", "text/html", b"<p>x</p>"),
            Artifact("requests", "application/json", b"[]")]
    analysis = Analysis(verdict=Verdict.SAFE, score=0, signals=[], analyzer_version="t")
    # A stale completion writes nothing: no result, and no artifact without its result.
    stale = job.model_copy(update={"version": job.version - 1})
    assert await store.complete(stale, worker_id="w", report=stored, analysis=analysis,
                                url_key=None, artifacts=arts) is None
    assert await store.pool.fetchval("SELECT count(*) FROM scan_artifacts") == 0
    assert await store.complete(job, worker_id="w", report=stored, analysis=analysis,
                                url_key=None, artifacts=arts) == job.version + 1
    view = await store.job_view(job.id)
    assert view is not None and view["job"]["mode"] == "render"
    assert [(a["kind"], a["content_type"], a["size"]) for a in view["artifacts"]] == [
        ("screenshot", "image/png", len(PNG)), ("dom", "text/html", 8),
        ("requests", "application/json", 2)]
    assert view["artifacts"][0]["sha256"] == arts[0].sha256
    assert await store.artifact_bytes(job.id, "screenshot") == ("image/png", PNG)
    # The API's view: its three kinds only, and the shape api/artifacts.py serves.
    api = await store.scan_view(job.id)
    assert api is not None and [a["kind"] for a in api["artifacts"]] == ["screenshot", "dom"]
    assert await store.artifact(job.id, "dom") == "<p>x</p>"
    shot = await store.artifact(job.id, "screenshot")
    assert shot["type"] == "image/png" and base64.b64decode(shot["base64"]) == PNG
    assert await store.artifact(job.id, "full_page") is None
    # An artifact cannot exist without its result (the foreign key).
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await store.pool.execute(
            "INSERT INTO scan_artifacts (job_id, kind, content_type, size, sha256, data) "
            "VALUES ($1, 'dom', 'text/html', 0, '', '')", uuid.uuid4())
    # Retention removes them with their job.
    await store.pool.execute("UPDATE scan_jobs SET finished_at = now() - interval '2 days'")
    assert (await store.prune_batch(86400, 10))["jobs"] == 1
    assert await store.pool.fetchval("SELECT count(*) FROM scan_artifacts") == 0


async def test_a_render_job_takes_only_a_render_result_from_the_cache(store: Store) -> None:
    analysis = Analysis(verdict=Verdict.SAFE, score=0, signals=[], analyzer_version="t")
    static = await _analyzing(store)
    await store.complete(static, worker_id="w", analysis=analysis, url_key="k",
                         report=Report(fetcher_version="1", requested_url="http://a.test/"))
    assert await store.cached_result("k", 60) is not None
    assert await store.cached_result("k", 60, rendered=True) is None
    rendered = await _analyzing(store, "render")
    await store.complete(rendered, worker_id="w", analysis=analysis, url_key="k",
                         report=Report(fetcher_version="r", requested_url="http://a.test/",
                                       render=Render()))
    hit = await store.cached_result("k", 60, rendered=True)
    assert hit is not None and hit["job_id"] == rendered.id


async def test_artifacts_inline_in_an_older_report_are_still_listed_and_served(
        store: Store) -> None:
    """A result stored with its artifacts inside the report (before scan_artifacts): the API's
    index and `artifact` still find them; a stripped report's metadata alone is no artifact."""
    job = await _analyzing(store, "render")
    inline = {"screenshot": {"type": "image/png", "width": 1, "height": 1, "size": len(PNG),
                             "sha256": "0" * 64, "base64": base64.b64encode(PNG).decode()},
              "full_page": {"type": "image/png", "size": 5, "base64": None},
              "dom": "<html>old</html>"}
    analysis = Analysis(verdict=Verdict.SAFE, score=0, signals=[], analyzer_version="t")
    await store.complete(job, worker_id="w", analysis=analysis, url_key=None,
                         report=Report(fetcher_version="r", requested_url="http://a.test/"))
    await store.pool.execute("UPDATE scan_results SET report = jsonb_set(report, '{render}', "
                             "$2::jsonb) WHERE job_id = $1", job.id, inline)
    view = await store.scan_view(job.id)
    assert view is not None
    assert [(a["kind"], a["type"], a["size"]) for a in view["artifacts"]] == [
        ("screenshot", "image/png", len(PNG)), ("dom", "text/html", 16)]
    shot = await store.artifact(job.id, "screenshot")
    assert base64.b64decode(shot["base64"]) == PNG
    assert await store.artifact(job.id, "dom") == "<html>old</html>"
