"""The state store: PostgreSQL rows for jobs, results and the audit log.

Every state change is ONE statement: a versioned UPDATE (`WHERE id AND version AND state`) with its
audit INSERT in a data-modifying CTE, so the change and its audit row commit together in one round
trip. Zero rows back means another worker moved the job first: a conflict, reported as `None`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from importlib import resources
from typing import Any

import asyncpg
import orjson

from .models import Analysis, Job, Report, State

_JOB_COLUMNS = ("id, url, state, version, attempts, worker_id, error_code, created_at, "
                "owner_token, faults")
_MIGRATION_LOCK = 0x5AFE0001  # advisory lock id: concurrent `migrate` runs take turns

_TRANSITION = f"""
WITH u AS (
    UPDATE scan_jobs SET
        state = $4, version = version + 1, updated_at = now(), worker_id = $5,
        attempts = attempts + $6, owner_token = $10,
        faults = CASE WHEN $12::boolean THEN 0 ELSE faults + $11 END,
        error_code = $7, error_message = $8,
        started_at = CASE WHEN $4 = 'FETCHING' THEN now() ELSE started_at END,
        finished_at = CASE WHEN $4 IN ('COMPLETED', 'FAILED', 'TIMED_OUT') THEN now() END
    WHERE id = $1 AND version = $2 AND state = $3
    RETURNING {_JOB_COLUMNS}
), a AS (
    INSERT INTO scan_audit_log (job_id, from_state, to_state, version, worker_id, detail)
    SELECT id, $3, state, version, $5, $9::jsonb FROM u
)
SELECT {_JOB_COLUMNS} FROM u
"""

# Read the job and, if it is QUEUED, claim it: one round trip for the hot path. The UPDATE is
# still versioned on the version this statement read; a concurrent claim makes it match no row
# (PostgreSQL re-checks the WHERE clause on the newest row version). URLs that are plainly not
# http(s) or too long are not claimed, so the worker fails them straight from QUEUED
# (pipeline.url_problem stays the authority on validity); nor is a job that has used up its
# faults (it is dead-lettered instead).
_LOAD_AND_CLAIM = f"""
WITH cur AS (
    SELECT {_JOB_COLUMNS} FROM scan_jobs WHERE id = $1
), u AS (
    UPDATE scan_jobs j SET
        state = 'FETCHING', version = j.version + 1, updated_at = now(), worker_id = $2,
        attempts = j.attempts + 1, error_code = NULL, error_message = NULL,
        started_at = now(), finished_at = NULL, owner_token = $4
    FROM cur WHERE j.id = cur.id AND j.version = cur.version AND j.state = 'QUEUED'
        AND length(cur.url) <= 2048 AND cur.url ~* '^https?://[^/?#[:space:]]'
        AND j.faults < $5
    RETURNING j.id, j.version
), a AS (
    INSERT INTO scan_audit_log (job_id, from_state, to_state, version, worker_id, detail)
    SELECT id, 'QUEUED', 'FETCHING', version, $2, $3::jsonb FROM u
)
SELECT cur.*, u.version AS claimed_version FROM cur LEFT JOIN u ON u.id = cur.id
"""

_COMPLETE = """
WITH u AS (
    UPDATE scan_jobs SET
        state = 'COMPLETED', version = version + 1, updated_at = now(), finished_at = now(),
        worker_id = $3, error_code = NULL, error_message = NULL
    WHERE id = $1 AND version = $2 AND state = 'ANALYZING'
    RETURNING id, version
), r AS (
    INSERT INTO scan_results (job_id, verdict, score, http_status, final_url, redirects,
        content_type, sha256, title, signals, report, analyzer_version, url_key, cached_from,
        confidence)
    SELECT id, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12::jsonb, $13::jsonb, $14, $15, $16,
        $18
    FROM u
), a AS (
    INSERT INTO scan_audit_log (job_id, from_state, to_state, version, worker_id, detail)
    SELECT id, 'ANALYZING', 'COMPLETED', version, $3, $17::jsonb FROM u
)
SELECT version FROM u
"""

_INSERT_JOB = """
WITH j AS (INSERT INTO scan_jobs (id, url) VALUES ($1, $2) RETURNING id)
SELECT id FROM j
"""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python objects, encoded with orjson (fast, and strict about types).
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="text",
                              encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release hook. asyncpg's default runs `RESET ALL; UNLISTEN *; CLOSE ALL; ...` -- one
    more server round trip after every statement. We never change session state (no SET, no
    LISTEN, no cursors; the migration lock is transaction-scoped), so there is nothing to reset."""


async def create_pool(dsn: str, size: int, min_size: int = 1) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=min(min_size, size), max_size=size,
                                     init=_init_connection, reset=_keep_session,
                                     command_timeout=30, timeout=10)
    assert pool is not None
    return pool


def _job(row: asyncpg.Record | None) -> Job | None:
    return None if row is None else _job_of(dict(row))


def _job_of(fields: dict[str, Any]) -> Job:
    # Rows come from our own schema (the CHECK constraint guards `state`): no re-validation on
    # the hot path, just the enum conversion.
    fields["state"] = State(fields["state"])
    return Job.model_construct(**fields)


class Store:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def migrate(self) -> None:
        sql = resources.files("safeurl_worker").joinpath("schema.sql").read_text()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(sql)

    async def insert_job(self, url: str, job_id: uuid.UUID | None = None) -> uuid.UUID:
        """Insert a QUEUED job, as the API service does."""
        jid = job_id or uuid.uuid4()
        await self.pool.execute(_INSERT_JOB, jid, url)
        return jid

    async def get_job(self, job_id: uuid.UUID) -> Job | None:
        row = await self.pool.fetchrow(f"SELECT {_JOB_COLUMNS} FROM scan_jobs WHERE id = $1",
                                       job_id)
        return _job(row)

    async def load_and_claim(self, job_id: uuid.UUID, *, worker_id: str, owner_token: str,
                             max_faults: int, detail: Mapping[str, Any]
                             ) -> tuple[Job | None, bool]:
        """(job, claimed): the job as it now is (None if no such row), and whether this call
        moved it QUEUED -> FETCHING."""
        row = await self.pool.fetchrow(_LOAD_AND_CLAIM, job_id, worker_id, dict(detail),
                                       owner_token, max_faults)
        if row is None:
            return None, False
        fields = dict(row)
        claimed = fields.pop("claimed_version")
        if claimed is None:
            return _job_of(fields), False
        fields.update(state=State.FETCHING, version=claimed, worker_id=worker_id,
                      attempts=fields["attempts"] + 1, error_code=None, owner_token=owner_token)
        return _job_of(fields), True

    async def transition(
        self,
        job: Job,
        to: State,
        *,
        worker_id: str,
        owner_token: str | None = None,
        detail: Mapping[str, Any] | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        add_attempt: bool = False,
        add_fault: bool = False,
        reset_faults: bool = False,
    ) -> Job | None:
        """Move `job` (as last seen) to state `to`, owned by `owner_token`. Returns the new
        row, or None on conflict. `reset_faults`: an operator's retry gives the job a fresh
        budget of MAX_ATTEMPTS / MAX_DELIVERIES."""
        row = await self.pool.fetchrow(
            _TRANSITION, job.id, job.version, job.state.value, to.value, worker_id,
            1 if add_attempt else 0, error_code, error_message, dict(detail or {}),
            owner_token, 1 if add_fault else 0, reset_faults,
        )
        return _job(row)

    async def complete(self, job: Job, *, worker_id: str, report: Report, analysis: Analysis,
                       url_key: str | None, cached_from: uuid.UUID | None = None,
                       detail: Mapping[str, Any] | None = None) -> int | None:
        """ANALYZING -> COMPLETED with its result row and audit row, in one statement.
        Returns the new version, or None on conflict."""
        version: int | None = await self.pool.fetchval(
            _COMPLETE, job.id, job.version, worker_id,
            analysis.verdict.value, analysis.score, report.http_status, report.final_url,
            [h.model_dump() for h in report.redirects], report.content_type, report.sha256,
            report.title, analysis.signals_json(), report.model_dump(mode="json"),
            analysis.analyzer_version, url_key, cached_from,
            {"verdict": analysis.verdict.value, "score": analysis.score, **(detail or {})},
            analysis.confidence,
        )
        return version

    async def cached_result(self, url_key: str, ttl_s: int) -> asyncpg.Record | None:
        """The newest original (not itself cached) result for this normalized URL within the
        TTL. `unknown` verdicts are not reused: the target may be back."""
        row: asyncpg.Record | None = await self.pool.fetchrow(
            "SELECT job_id, verdict, score, signals, report, analyzer_version, confidence "
            "FROM scan_results "
            "WHERE url_key = $1 AND created_at > now() - make_interval(secs => $2) "
            "AND cached_from IS NULL AND verdict <> 'unknown' "
            "ORDER BY created_at DESC LIMIT 1", url_key, float(ttl_s))
        return row

    async def last_audit_detail(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        """The detail of the job's newest audit row."""
        detail: dict[str, Any] | None = await self.pool.fetchval(
            "SELECT detail FROM scan_audit_log WHERE job_id = $1 ORDER BY version DESC LIMIT 1",
            job_id)
        return detail

    async def audit_op(self, job_id: uuid.UUID, version: int) -> str | None:
        """The write token recorded in the audit row that made `version`."""
        op: str | None = await self.pool.fetchval(
            "SELECT detail->>'op' FROM scan_audit_log WHERE job_id = $1 AND version = $2",
            job_id, version)
        return op

    # --- the janitor's queries ---------------------------------------------------------------

    async def queued_since(self, seconds: float, limit: int = 500) -> list[Job]:
        """QUEUED jobs untouched for `seconds` (candidates for a lost XADD)."""
        rows = await self.pool.fetch(
            f"SELECT {_JOB_COLUMNS} FROM scan_jobs WHERE state = 'QUEUED' "
            "AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2",
            float(seconds), limit)
        return [_job_of(dict(r)) for r in rows]

    async def active_since(self, seconds: float, limit: int = 500) -> list[Job]:
        """FETCHING/ANALYZING jobs untouched for `seconds` (candidates for a dead owner)."""
        rows = await self.pool.fetch(
            f"SELECT {_JOB_COLUMNS} FROM scan_jobs WHERE state IN ('FETCHING', 'ANALYZING') "
            "AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2",
            float(seconds), limit)
        return [_job_of(dict(r)) for r in rows]

    async def job_view(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        """A job with its result and audit trail, for `status JOB_ID` and `submit --wait`."""
        job = await self.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1", job_id)
        if job is None:
            return None
        result = await self.pool.fetchrow(
            "SELECT verdict, score, http_status, final_url, redirects, content_type, sha256, "
            "title, signals, analyzer_version, confidence, cached_from, created_at "
            "FROM scan_results WHERE job_id = $1", job_id)
        audit = await self.pool.fetch(
            "SELECT from_state, to_state, version, worker_id, at, detail FROM scan_audit_log "
            "WHERE job_id = $1 ORDER BY version, id", job_id)
        return {"job": dict(job), "result": dict(result) if result else None,
                "audit": [dict(a) for a in audit]}
