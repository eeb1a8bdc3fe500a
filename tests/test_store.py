"""The state store against a real PostgreSQL: versioned transitions, audit rows, migrate."""

from __future__ import annotations

import asyncio
import base64
import uuid

import asyncpg
import pytest

from safeurl_worker.artifacts import Artifact
from safeurl_worker.models import Analysis, Job, Render, RenderImage, Report, State, Verdict
from safeurl_worker.store import (
    RETRY_MAX_S,
    RETRY_MIN_S,
    RETRY_UNKNOWN_S,
    QuotaExceeded,
    Store,
    Submission,
    create_pool,
    retry_after_s,
)

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


async def test_complete_from_fetching_writes_analyzing_and_completed_in_one_statement(
        store: Store) -> None:
    job = await store.get_job(await store.insert_job("http://a.test/"))
    assert job is not None
    fetching = await store.transition(job, State.FETCHING, worker_id="w")
    assert fetching is not None
    report = Report(fetcher_version="1", requested_url="http://a.test/", http_status=200)
    analysis = Analysis(verdict=Verdict.SAFE, score=0, signals=[], analyzer_version="t")
    # Without the ANALYZING detail the job must be ANALYZING already: nothing is written.
    assert await store.complete(fetching, worker_id="w", report=report, analysis=analysis,
                                url_key=None) is None
    assert await store.complete(fetching, worker_id="w", report=report, analysis=analysis,
                                url_key=None, detail={"op": "b"},
                                analyzing={"mode": "render", "op": "a"}) == 3
    rows = await store.pool.fetch(
        "SELECT from_state, to_state, version, detail->>'op' AS op FROM scan_audit_log "
        "ORDER BY version")
    assert [tuple(r) for r in rows] == [("QUEUED", "FETCHING", 1, None),
                                        ("FETCHING", "ANALYZING", 2, "a"),
                                        ("ANALYZING", "COMPLETED", 3, "b")]
    done = await store.get_job(job.id)
    assert done is not None and (done.state, done.version) == (State.COMPLETED, 3)
    # A second try from the same seen version matches no row (the job moved on).
    assert await store.complete(fetching, worker_id="w", report=report, analysis=analysis,
                                url_key=None, analyzing={}) is None
    assert await store.pool.fetchval("SELECT count(*) FROM scan_results") == 1


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


# --- lanes, tenants and the queued quota ----------------------------------------------------


def _sub(url: str = "http://a.test/", **kw: object) -> Submission:
    return Submission(uuid.uuid4(), url, **kw)  # type: ignore[arg-type]


async def test_lane_and_tenant_are_stored_and_null_on_rows_of_another_service(
        store: Store) -> None:
    got = await store.submit_job(_sub(lane="bulk", tenant="acme"))
    job = await store.get_job(got.id)
    assert job is not None and (job.lane, job.tenant) == ("bulk", "acme")
    inserted = await store.get_job(await store.insert_job("http://b.test/", lane="interactive",
                                                          tenant="t1"))
    assert inserted is not None and (inserted.lane, inserted.tenant) == ("interactive", "t1")
    # An API service that knows nothing of lanes INSERTs without them: default lane, no tenant.
    plain_id = uuid.uuid4()
    await store.pool.execute("INSERT INTO scan_jobs (id, url) VALUES ($1, 'http://c.test/')",
                             plain_id)
    plain = await store.get_job(plain_id)
    assert plain is not None and (plain.lane, plain.tenant) == (None, None)
    # Both columns also come back from the claim and from the janitor's queries.
    claimed, ok = await store.load_and_claim(got.id, worker_id="w", owner_token="o",
                                             max_faults=5, detail={})
    assert ok and claimed is not None and (claimed.lane, claimed.tenant) == ("bulk", "acme")
    assert {(j.lane, j.tenant) for j in await store.queued_since(-1)} == {
        ("interactive", "t1"), (None, None)}


async def test_the_queued_quota_refuses_clearly_and_counts_only_that_tenants_queued_jobs(
        store: Store) -> None:
    for _ in range(3):
        assert (await store.submit_job(_sub(tenant="acme"), max_queued=3)).created
    with pytest.raises(QuotaExceeded) as refused:
        await store.submit_job(_sub(tenant="acme"), max_queued=3)
    exc = refused.value
    assert (exc.tenant, exc.queued, exc.limit) == ("acme", 3, 3)
    assert exc.retry_after_s == RETRY_UNKNOWN_S  # none of its jobs finished lately
    assert "tenant 'acme' has 3 queued scans, its limit is 3" in str(exc)
    assert await store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 3  # nothing written
    # Other tenants, jobs without a tenant, and no limit (0) are not held up.
    assert (await store.submit_job(_sub(tenant="other"), max_queued=3)).created
    assert (await store.submit_job(_sub(), max_queued=3)).created
    assert (await store.submit_job(_sub(tenant="acme"), max_queued=0)).created
    # A job that leaves QUEUED frees its place.
    job = await store.get_job(await store.pool.fetchval(
        "SELECT id FROM scan_jobs WHERE tenant = 'acme' LIMIT 1"))
    assert job is not None
    assert await store.transition(job, State.FETCHING, worker_id="w") is not None
    with pytest.raises(QuotaExceeded):  # 3 of the 4 are still QUEUED
        await store.submit_job(_sub(tenant="acme"), max_queued=3)
    assert (await store.submit_job(_sub(tenant="acme"), max_queued=4)).created


async def test_an_idempotent_repeat_returns_its_job_even_at_the_quota(store: Store) -> None:
    first = await store.submit_job(_sub(tenant="acme", idempotency_key="k:1",
                                        request_hash="h"), max_queued=1)
    assert first.created
    again = await store.submit_job(_sub(tenant="acme", idempotency_key="k:1",
                                        request_hash="h"), max_queued=1)
    assert (again.id, again.created, again.request_hash) == (first.id, False, "h")
    with pytest.raises(QuotaExceeded):  # a new key is a new job: refused
        await store.submit_job(_sub(tenant="acme", idempotency_key="k:2"), max_queued=1)


async def test_the_retry_hint_follows_the_tenants_recent_throughput(store: Store) -> None:
    for _ in range(2):
        await store.submit_job(_sub(tenant="acme"), max_queued=2)
    # 10 of acme's jobs finished in the last 5 minutes (one every 30 s): one more place in ~30 s.
    # Another tenant's finishes do not count.
    for tenant, n in (("acme", 10), ("other", 50)):
        await store.pool.execute(
            "INSERT INTO scan_jobs (id, url, state, tenant, finished_at) "
            "SELECT gen_random_uuid(), 'http://a.test/', 'COMPLETED', $1, "
            "now() - interval '1 minute' FROM generate_series(1, $2)", tenant, n)
    with pytest.raises(QuotaExceeded) as refused:
        await store.submit_job(_sub(tenant="acme"), max_queued=2)
    assert refused.value.retry_after_s == 30
    assert retry_after_s(1, 0) == RETRY_UNKNOWN_S
    assert retry_after_s(1, 10**6) == RETRY_MIN_S  # never "now"
    assert retry_after_s(10**6, 1) == RETRY_MAX_S  # never "in a week"
    assert retry_after_s(5, 10) == 150


async def test_concurrent_submissions_never_overshoot_the_quota(database: str) -> None:
    """40 submissions of one tenant at once, on 16 connections, against a quota of 10: exactly
    10 jobs, 30 refusals. Without the per-tenant lock each transaction would count the others'
    uncommitted rows as absent and most would get in."""
    pool = await create_pool(database, 16, min_size=16)
    try:
        store = Store(pool)

        async def one() -> bool:
            try:
                return (await store.submit_job(_sub(tenant="acme"), max_queued=10)).created
            except QuotaExceeded:
                return False

        async with asyncio.timeout(30):
            results = await asyncio.gather(*(one() for _ in range(40)))
        assert results.count(True) == 10
        assert await pool.fetchval(
            "SELECT count(*) FROM scan_jobs WHERE tenant = 'acme' AND state = 'QUEUED'") == 10
    finally:
        await pool.close()


async def test_a_submission_waits_for_the_tenants_lock_and_only_that_tenants(
        store: Store) -> None:
    """The quota's lock is the one taken: while another transaction holds acme's, an acme
    submission waits and another tenant's does not."""
    async with store.pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT pg_advisory_xact_lock($1, hashtext('acme'))",
                             0x5AFE0002)
        waiting = asyncio.create_task(store.submit_job(_sub(tenant="acme"), max_queued=5))
        async with asyncio.timeout(10):
            assert (await store.submit_job(_sub(tenant="other"), max_queued=5)).created
        await asyncio.sleep(0.3)
        assert not waiting.done()
    async with asyncio.timeout(10):
        assert (await waiting).created


async def test_queue_counts_and_lane_and_tenant_filters(store: Store) -> None:
    ids = {}
    for lane, tenant in (("bulk", "acme"), ("bulk", "acme"), (None, "acme"), (None, None),
                         ("interactive", "zed")):
        ids[(lane, tenant)] = (await store.submit_job(_sub(lane=lane, tenant=tenant))).id
    job = await store.get_job(ids[("interactive", "zed")])
    assert job is not None and await store.transition(job, State.FETCHING, worker_id="w")
    rows = {(r["lane"], r["tenant"]): (r["queued"], r["running"])
            for r in await store.queue_counts()}
    assert rows == {("bulk", "acme"): (2, 0), ("default", "acme"): (1, 0),
                    ("default", None): (1, 0), ("interactive", "zed"): (0, 1)}

    async def listed(**kw: str) -> set[tuple[str | None, str | None]]:
        found = await store.list_scans(state=None, verdict=None, since=None, url=None,
                                       after=None, limit=50, **kw)  # type: ignore[arg-type]
        return {(r["lane"], r["tenant"]) for r in found}

    assert await listed(lane="bulk") == {("bulk", "acme")}
    assert await listed(lane="default") == {(None, "acme"), (None, None)}
    assert await listed(tenant="acme") == {("bulk", "acme"), (None, "acme")}
    assert await listed(lane="bulk", tenant="zed") == set()


async def test_the_queued_count_uses_the_partial_index(store: Store) -> None:
    await store.pool.execute(
        "INSERT INTO scan_jobs (id, url, state, tenant) SELECT gen_random_uuid(), 'http://a/', "
        "CASE WHEN i % 10 = 0 THEN 'QUEUED' ELSE 'COMPLETED' END, 't' || (i % 50) "
        "FROM generate_series(1, 20000) i")
    await store.pool.execute("ANALYZE scan_jobs")
    plan = "\n".join(r[0] for r in await store.pool.fetch(
        "EXPLAIN SELECT count(*) FROM scan_jobs WHERE tenant = $1 AND state = 'QUEUED'", "t10"))
    assert "scan_jobs_tenant_queued_idx" in plan, plan
