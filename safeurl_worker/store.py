"""The state store: PostgreSQL rows for jobs, results, the audit log and the callback outbox.

Every state change is ONE statement: a versioned UPDATE (`WHERE id AND version AND state`) with its
audit INSERT in a data-modifying CTE, so the change and its audit row commit together in one round
trip. Zero rows back means another worker moved the job first: a conflict, reported as `None`.
A terminal change also writes its callback outbox row and NOTIFY in that statement.

All the project's SQL is here: the workers', the janitor's, and the operations behind the CLI and
the API (ops.py).
"""

from __future__ import annotations

import base64
import dataclasses
import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg
import orjson

from . import artifacts as artifact_kinds
from .artifacts import Artifact
from .models import Analysis, Job, Report, State

_JOB_COLUMNS = ("id, url, state, version, attempts, worker_id, error_code, created_at, "
                "owner_token, faults, mode, lane, tenant")
_MIGRATION_LOCK = 0x5AFE0001  # advisory lock id: concurrent `migrate` runs take turns
# The two-key advisory lock space of per-tenant submission locks: (_TENANT_LOCK, hashtext(tenant)).
# A hash collision only makes two tenants' submissions take turns.
_TENANT_LOCK = 0x5AFE0002
# LISTEN on this channel to hear of every job that reached a terminal state (payload: its id).
NOTIFY_CHANNEL = "safeurl_scan_finished"
_TERMINAL_SQL = "('COMPLETED', 'FAILED', 'TIMED_OUT')"

# Part of every terminal write (docs/contract.md, *Callbacks and NOTIFY*): the callback outbox
# row, when the job has a callback URL or a default is configured (`$D`), and the NOTIFY, both
# committed with the state itself. Without a callback the INSERT selects zero rows: the only
# cost on the hot path is the NOTIFY.
_OUTBOX = f"""
, cb AS (
    INSERT INTO scan_callbacks (job_id, version, state, error_code, url)
    SELECT id, version, state, error_code, coalesce(callback_url, $D::text) FROM u
    WHERE state IN {_TERMINAL_SQL} AND coalesce(callback_url, $D::text) IS NOT NULL
)"""
# A LATERAL join rather than a plain CTE: a SELECT in WITH runs only if the query reads it.
# Only with NOTIFY_FINISHED: PostgreSQL serialises the commits of notifying transactions on one
# global lock held until the commit is flushed, which costs concurrent workers (measured in
# docs/contract.md).
_NOTIFY = (f"LEFT JOIN LATERAL (SELECT pg_notify('{NOTIFY_CHANNEL}', u.id::text) "
           f"WHERE u.state IN {_TERMINAL_SQL}) n ON true")

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
    RETURNING {_JOB_COLUMNS}, callback_url
), a AS (
    INSERT INTO scan_audit_log (job_id, from_state, to_state, version, worker_id, detail)
    SELECT id, $3, state, version, $5, $9::jsonb FROM u
){_OUTBOX.replace("$D", "$13")}
SELECT {_JOB_COLUMNS} FROM u {{notify}}
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

# ANALYZING -> COMPLETED; or, with the ANALYZING detail ($24), FETCHING -> ANALYZING ->
# COMPLETED in one statement: two audit rows and one commit for an analysis that ran in-process
# (the ANALYZING state stays in the audit trail, it just never waits for a second round trip).
_COMPLETE = f"""
WITH u AS (
    UPDATE scan_jobs SET
        state = 'COMPLETED', version = version + CASE WHEN $24::jsonb IS NULL THEN 1 ELSE 2 END,
        updated_at = now(), finished_at = now(),
        worker_id = $3, error_code = NULL, error_message = NULL
    WHERE id = $1 AND version = $2
        AND state = CASE WHEN $24::jsonb IS NULL THEN 'ANALYZING' ELSE 'FETCHING' END
    RETURNING id, version, state, error_code, callback_url
), r AS (
    INSERT INTO scan_results (job_id, verdict, score, http_status, final_url, redirects,
        content_type, sha256, title, signals, report, analyzer_version, url_key, cached_from,
        confidence)
    SELECT id, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12::jsonb, $13::jsonb, $14, $15, $16,
        $18
    FROM u
), a AS (
    INSERT INTO scan_audit_log (job_id, from_state, to_state, version, worker_id, detail)
    SELECT id, 'FETCHING', 'ANALYZING', version - 1, $3, $24::jsonb FROM u
    WHERE $24::jsonb IS NOT NULL
    UNION ALL
    SELECT id, 'ANALYZING', 'COMPLETED', version, $3, $17::jsonb FROM u
), art AS (
    INSERT INTO scan_artifacts (job_id, kind, content_type, size, sha256, data)
    SELECT u.id, x.kind, x.content_type, octet_length(x.data), x.sha256, x.data
    FROM u, unnest($20::text[], $21::text[], $22::text[], $23::bytea[])
        AS x(kind, content_type, sha256, data)
){_OUTBOX.replace("$D", "$19")}
SELECT version FROM u {{notify}}
"""

_INSERT_JOB = """
WITH j AS (INSERT INTO scan_jobs (id, url, mode, lane, tenant) VALUES ($1, $2, $3, $4, $5)
           RETURNING id)
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


def _with_notify(sql: str, notify: bool) -> str:
    return sql.replace("{notify}", _NOTIFY if notify else "")


class Store:
    def __init__(self, pool: asyncpg.Pool, default_callback_url: str | None = None,
                 notify: bool = False) -> None:
        self.pool = pool
        # CALLBACK_DEFAULT_URL: the outbox gets a row for every finished job without its own.
        self.default_callback_url = default_callback_url or None
        # NOTIFY_FINISHED: terminal writes also NOTIFY (off by default: it serialises commits).
        self.notify = notify
        self._transition_sql = _with_notify(_TRANSITION, notify)
        self._complete_sql = _with_notify(_COMPLETE, notify)

    async def migrate(self) -> None:
        sql = resources.files("safeurl_worker").joinpath("schema.sql").read_text()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(sql)

    async def insert_job(self, url: str, job_id: uuid.UUID | None = None,
                         mode: str | None = None, *, lane: str | None = None,
                         tenant: str | None = None) -> uuid.UUID:
        """Insert a QUEUED job, as the API service does (`mode`: static / render / None).
        No quota: see `submit_job`."""
        jid = job_id or uuid.uuid4()
        await self.pool.execute(_INSERT_JOB, jid, url, mode, lane, tenant)
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
            self._transition_sql, job.id, job.version, job.state.value, to.value, worker_id,
            1 if add_attempt else 0, error_code, error_message, dict(detail or {}),
            owner_token, 1 if add_fault else 0, reset_faults, self.default_callback_url,
        )
        return _job(row)

    async def complete(self, job: Job, *, worker_id: str, report: Report, analysis: Analysis,
                       url_key: str | None, cached_from: uuid.UUID | None = None,
                       detail: Mapping[str, Any] | None = None,
                       artifacts: Sequence[Artifact] = (),
                       analyzing: Mapping[str, Any] | None = None) -> int | None:
        """ANALYZING -> COMPLETED with its result row, audit row and artifacts (a render scan's
        screenshot, DOM, request log: artifacts.split), in one statement, so an artifact never
        exists without its result. With `analyzing` (the ANALYZING audit detail), the job is
        FETCHING and both transitions are written (see `_COMPLETE`). Returns the new version,
        or None on conflict."""
        version: int | None = await self.pool.fetchval(
            self._complete_sql, job.id, job.version, worker_id,
            analysis.verdict.value, analysis.score, report.http_status, report.final_url,
            [h.model_dump() for h in report.redirects], report.content_type, report.sha256,
            report.title, analysis.signals_json(), report.model_dump(mode="json"),
            analysis.analyzer_version, url_key, cached_from,
            {"verdict": analysis.verdict.value, "score": analysis.score, **(detail or {})},
            analysis.confidence, self.default_callback_url,
            [a.kind for a in artifacts], [a.content_type for a in artifacts],
            [a.sha256 for a in artifacts], [a.data for a in artifacts],
            None if analyzing is None else dict(analyzing),
        )
        return version

    async def cached_result(self, url_key: str, ttl_s: int,
                            rendered: bool = False) -> asyncpg.Record | None:
        """The newest original (not itself cached) result for this normalized URL within the
        TTL. `unknown` verdicts are not reused: the target may be back. `rendered`: only a
        render scan's result (a render job asked for what a static scan cannot show)."""
        row: asyncpg.Record | None = await self.pool.fetchrow(
            "SELECT job_id, verdict, score, signals, report, analyzer_version, confidence "
            "FROM scan_results "
            "WHERE url_key = $1 AND created_at > now() - make_interval(secs => $2) "
            "AND cached_from IS NULL AND verdict <> 'unknown' "
            "AND (NOT $3::boolean OR jsonb_typeof(report->'render') = 'object') "
            "ORDER BY created_at DESC LIMIT 1", url_key, float(ttl_s), rendered)
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
        artifacts = await self.pool.fetch(
            "SELECT kind, content_type, size, sha256 FROM scan_artifacts WHERE job_id = $1 "
            "ORDER BY array_position($2::text[], kind), kind", job_id, list(ALL_ARTIFACT_KINDS))
        return {"job": dict(job), "result": dict(result) if result else None,
                "audit": [dict(a) for a in audit], "artifacts": [dict(a) for a in artifacts]}

    # --- operator queries (ops.py: check, status, retry) -----------------------------------

    async def nonterminal_jobs(self, limit: int) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(
            f"SELECT id, state FROM scan_jobs WHERE state NOT IN {_TERMINAL_SQL} LIMIT $1",
            limit))

    async def audit_version_problems(self, limit: int) -> list[asyncpg.Record]:
        """Jobs whose audit versions do not run 1..version without gaps or repeats."""
        return list(await self.pool.fetch("""
            SELECT j.id, j.version, count(a.id) AS n, count(DISTINCT a.version) AS d,
                   min(a.version) AS lo, max(a.version) AS hi
            FROM scan_jobs j LEFT JOIN scan_audit_log a ON a.job_id = j.id
            GROUP BY j.id, j.version
            HAVING count(a.id) <> j.version OR count(DISTINCT a.version) <> j.version
                OR (j.version > 0 AND (min(a.version) <> 1 OR max(a.version) <> j.version))
            LIMIT $1""", limit))

    async def audit_chain_problems(self, limit: int) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(_AUDIT_CHAIN, limit))

    async def result_row_problems(self, limit: int) -> list[asyncpg.Record]:
        """Jobs with a result row count other than 1 if COMPLETED, 0 otherwise."""
        return list(await self.pool.fetch("""
            SELECT j.id, j.state, count(r.job_id) AS n FROM scan_jobs j
            LEFT JOIN scan_results r ON r.job_id = j.id GROUP BY j.id, j.state
            HAVING (j.state = 'COMPLETED') <> (count(r.job_id) = 1) LIMIT $1""", limit))

    async def failed_without_error_code(self, limit: int) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(
            "SELECT id, state FROM scan_jobs WHERE state IN ('FAILED', 'TIMED_OUT') "
            "AND error_code IS NULL LIMIT $1", limit))

    async def job_states(self, ids: list[uuid.UUID]) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(
            "SELECT id, state, error_code FROM scan_jobs WHERE id = ANY($1::uuid[])", ids))

    async def dead_lettered_entry_counts(self, job_ids: list[uuid.UUID], reasons: list[str],
                                         codes: list[str], missing_ok: bool, limit: int
                                         ) -> list[asyncpg.Record]:
        """FAILED jobs with an error_code in `codes` whose number of dead-letter entries (given
        as parallel lists) with that reason is not exactly one (zero is fine if `missing_ok`)."""
        return list(await self.pool.fetch("""
            SELECT j.id, j.error_code, count(e.job_id) AS n
            FROM scan_jobs j
            LEFT JOIN unnest($1::uuid[], $2::text[]) AS e(job_id, reason)
                   ON e.job_id = j.id AND e.reason = j.error_code
            WHERE j.state = 'FAILED' AND j.error_code = ANY($3)
            GROUP BY j.id, j.error_code
            HAVING count(e.job_id) > 1 OR (count(e.job_id) = 0 AND NOT $4)
            ORDER BY j.id LIMIT $5""", job_ids, reasons, codes, missing_ok, limit))

    async def janitor_repaired_jobs(self) -> int:
        n: int = await self.pool.fetchval(
            "SELECT count(DISTINCT job_id) FROM scan_audit_log WHERE detail ? 'janitor'")
        return n

    async def all_job_ids(self) -> set[str]:
        return {str(r["id"]) for r in await self.pool.fetch("SELECT id FROM scan_jobs")}

    async def counts_by_state(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT state, count(*) AS n FROM scan_jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    async def recent_counts(self) -> asyncpg.Record:
        """Jobs finished in the last 5 and 60 minutes, completed and not."""
        row = await self.pool.fetchrow("""
            SELECT count(*) FILTER (WHERE state = 'COMPLETED' AND finished_at > now() - interval '5 minutes') AS c5,
                   count(*) FILTER (WHERE state <> 'COMPLETED' AND finished_at > now() - interval '5 minutes') AS f5,
                   count(*) FILTER (WHERE state = 'COMPLETED' AND finished_at > now() - interval '60 minutes') AS c60,
                   count(*) FILTER (WHERE state <> 'COMPLETED' AND finished_at > now() - interval '60 minutes') AS f60
            FROM scan_jobs WHERE finished_at > now() - interval '60 minutes'""")  # noqa: E501
        assert row is not None
        return row

    async def oldest_queued_s(self) -> float | None:
        age = await self.pool.fetchval(
            "SELECT extract(epoch FROM now() - min(created_at)) FROM scan_jobs "
            "WHERE state = 'QUEUED'")
        return None if age is None else float(age)

    async def retry_candidates(self, states: list[str], job_ids: list[uuid.UUID],
                               error_code: str | None, since: datetime | None, limit: int
                               ) -> list[Job]:
        rows = await self.pool.fetch(
            f"SELECT {_JOB_COLUMNS} FROM scan_jobs WHERE state = ANY($1) "
            "AND (cardinality($2::uuid[]) = 0 OR id = ANY($2)) "
            "AND ($3::text IS NULL OR error_code = $3) "
            "AND ($4::timestamptz IS NULL OR finished_at >= $4) ORDER BY finished_at LIMIT $5",
            states, job_ids, error_code, since, limit)
        return [_job_of(dict(r)) for r in rows]

    # --- submissions through the API ---------------------------------------------------------

    async def submit_job(self, sub: Submission, *, max_queued: int = 0) -> Submitted:
        """Insert a QUEUED job, or find the one an earlier request with the same idempotency
        key created (then `created` is False and `request_hash` is that request's).

        `max_queued` (the tenant's quota; 0: no limit) applies to a job with a tenant: when the
        tenant already has that many QUEUED jobs, QuotaExceeded is raised and nothing is
        written. A repeat of an existing idempotency key still returns its job."""
        for _ in range(3):
            if sub.tenant is not None and max_queued > 0:
                row = await self._submit_within_quota(sub, max_queued)
            else:
                row = await self.pool.fetchrow(_SUBMIT, *_submit_args(sub))
            if row is not None:
                return Submitted(row["id"], State(row["state"]), row["created"],
                                 row["request_hash"])
            # The key's row was committed by a concurrent request after this statement's
            # snapshot was taken: DO NOTHING saw it, the SELECT did not. Look again.
        raise RuntimeError(f"idempotency key {sub.idempotency_key!r}: no row after 3 tries")

    async def _submit_within_quota(self, sub: Submission, max_queued: int
                                   ) -> asyncpg.Record | None:
        """Count and insert under a transaction-scoped lock on the tenant, so concurrent
        submissions of one tenant (from any API replica) take turns and cannot overshoot the
        quota; other tenants are not held up. In READ COMMITTED each statement sees what the
        previous lock holder committed."""
        assert sub.tenant is not None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                               _TENANT_LOCK, sub.tenant)
            if sub.idempotency_key is not None:
                found: asyncpg.Record | None = await conn.fetchrow(
                    "SELECT id, state, request_hash, false AS created FROM scan_jobs "
                    "WHERE idempotency_key = $1", sub.idempotency_key)
                if found is not None:
                    return found
            queued: int = await conn.fetchval(
                "SELECT count(*) FROM scan_jobs WHERE tenant = $1 AND state = 'QUEUED'",
                sub.tenant)
            if queued >= max_queued:
                finished: int = await conn.fetchval(
                    "SELECT count(*) FROM scan_jobs WHERE tenant = $1 "
                    "AND finished_at > now() - make_interval(secs => $2)",
                    sub.tenant, float(RETRY_WINDOW_S))
                raise QuotaExceeded(sub.tenant, queued, max_queued,
                                    retry_after_s(queued - max_queued + 1, finished))
            row: asyncpg.Record | None = await conn.fetchrow(_SUBMIT, *_submit_args(sub))
            return row

    async def queue_counts(self) -> list[asyncpg.Record]:
        """Per (lane, tenant): `queued` (QUEUED), `running` (FETCHING or ANALYZING), how long
        the oldest queued job has waited (`oldest_queued_s`, None without one) and the jobs
        finished in the last 5 minutes (`done_5m`: the throughput). Lane NULL is `default`,
        tenant NULL stays NULL. Two index scans: the active jobs (scan_jobs_active_idx) and
        the recently finished (scan_jobs_finished_idx), however many finished before."""
        return list(await self.pool.fetch("""
            SELECT lane, tenant, sum(queued)::int AS queued, sum(running)::int AS running,
                   max(oldest)::float AS oldest_queued_s, sum(done)::int AS done_5m FROM (
                SELECT coalesce(lane, 'default') AS lane, tenant,
                       count(*) FILTER (WHERE state = 'QUEUED') AS queued,
                       count(*) FILTER (WHERE state <> 'QUEUED') AS running,
                       extract(epoch FROM now() - min(created_at)
                               FILTER (WHERE state = 'QUEUED')) AS oldest,
                       0 AS done
                FROM scan_jobs WHERE state IN ('QUEUED', 'FETCHING', 'ANALYZING')
                GROUP BY 1, 2
                UNION ALL
                SELECT coalesce(lane, 'default'), tenant, 0, 0, NULL, count(*)
                FROM scan_jobs WHERE finished_at > now() - interval '5 minutes'
                GROUP BY 1, 2
            ) x GROUP BY 1, 2 ORDER BY 1, 2"""))

    async def scan_view(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        """Everything the API shows about one scan: the job, its result, audit trail, and
        callback deliveries with their attempts."""
        view = await self.job_view(job_id)
        if view is None:
            return None
        callbacks = [dict(r) for r in await self.pool.fetch(
            "SELECT id, version, state, url, status, attempts, next_attempt_at, last_error, "
            "created_at, delivered_at FROM scan_callbacks WHERE job_id = $1 ORDER BY id", job_id)]
        attempts = await self.pool.fetch(
            "SELECT callback_id, attempt, at, http_status, error, duration_ms "
            "FROM scan_callback_attempts WHERE job_id = $1 ORDER BY id", job_id)
        for c in callbacks:
            c["deliveries"] = [{k: v for k, v in dict(a).items() if k != "callback_id"}
                               for a in attempts if a["callback_id"] == c["id"]]
        view["callbacks"] = callbacks
        view["artifacts"] = [dict(r) for r in await self.pool.fetch(
            _ARTIFACT_INDEX, job_id, list(ARTIFACT_KINDS))]
        return view

    async def artifact(self, job_id: uuid.UUID, kind: str) -> Any:
        """One artifact of a render scan in the API's shape: an image object with `type` and
        `base64`, or the DOM as a string; None if the scan has none."""
        found = await self.artifact_bytes(job_id, kind)
        if found is None:
            # A report stored with its artifacts inline (before scan_artifacts).
            return await self.pool.fetchval(
                "SELECT report->'render'->$2 FROM scan_results WHERE job_id = $1", job_id, kind)
        content_type, data = found
        if kind == "dom":
            return data.decode("utf-8", "replace")
        return {"type": content_type, "base64": base64.b64encode(data).decode("ascii")}

    async def artifact_bytes(self, job_id: uuid.UUID, kind: str) -> tuple[str, bytes] | None:
        """(content type, bytes) of one stored artifact, or None."""
        row = await self.pool.fetchrow(
            "SELECT content_type, data FROM scan_artifacts WHERE job_id = $1 AND kind = $2",
            job_id, kind)
        return None if row is None else (row["content_type"], bytes(row["data"]))

    async def list_scans(self, *, state: str | None, verdict: str | None,
                         since: datetime | None, url: str | None,
                         after: tuple[datetime, uuid.UUID] | None, limit: int,
                         lane: str | None = None, tenant: str | None = None
                         ) -> list[dict[str, Any]]:
        """Jobs newest first, filtered; `after`: the (created_at, id) the previous page ended
        at (keyset pagination: stable while new jobs arrive). `lane`: `default` matches the
        jobs without a lane too."""
        rows = await self.pool.fetch(
            _LIST_SCANS, state, verdict, since, url, after[0] if after else None,
            after[1] if after else None, limit, lane, tenant)
        return [dict(r) for r in rows]

    # --- the callback outbox -----------------------------------------------------------------

    async def claim_callbacks(self, limit: int, lease_s: float) -> list[dict[str, Any]]:
        """Due PENDING callbacks, each counted as one more attempt and hidden from other
        deliverers for `lease_s` (FOR UPDATE SKIP LOCKED: replicas never claim the same row;
        a deliverer that dies mid-attempt leaves it due again when the lease ends)."""
        rows = await self.pool.fetch(_CLAIM_CALLBACKS, limit, float(lease_s))
        return [dict(r) for r in rows]

    async def finish_callback(self, callback_id: int, attempt: int, *, status: str,
                              retry_in_s: float, http_status: int | None, error: str | None,
                              duration_ms: int) -> None:
        """Record one attempt, and the row's new status (PENDING: due again in `retry_in_s`).
        The status changes only if the row is still at this attempt (not re-claimed)."""
        await self.pool.execute(_FINISH_CALLBACK, callback_id, attempt, status, float(retry_in_s),
                                http_status, error, duration_ms)

    # --- retention ---------------------------------------------------------------------------

    async def prune_batch(self, older_than_s: float, batch: int) -> dict[str, Any]:
        """Delete up to `batch` jobs that finished more than `older_than_s` ago, with their
        results, audit rows and callbacks, in one short statement. Rows another transaction
        holds (a retry of that very job) are skipped, not waited for. Returns the counts, and
        in `dead_lettered` the ids of deleted jobs that were FAILED MAX_DELIVERIES (their
        dead-letter entries must go too)."""
        row = await self.pool.fetchrow(_PRUNE, float(older_than_s), batch)
        assert row is not None
        return dict(row)


@dataclasses.dataclass(frozen=True)
class Submission:
    job_id: uuid.UUID
    url: str
    callback_url: str | None = None
    metadata: dict[str, Any] | None = None
    mode: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    lane: str | None = None  # None: the default lane
    tenant: str | None = None  # None: no tenant, no quota


def _submit_args(sub: Submission) -> tuple[Any, ...]:
    return (sub.job_id, sub.url, sub.callback_url, sub.metadata, sub.mode, sub.idempotency_key,
            sub.request_hash, sub.lane, sub.tenant)


# The retry hint of a quota refusal: how long until enough of the tenant's queued jobs are
# gone for one more to fit, at the rate its jobs finished over the last RETRY_WINDOW_S
# (`missing` jobs / (finished / window)). Bounded: never "now" (the rate is a guess), never
# more than RETRY_MAX_S (a client told to wait an hour gives up). Nothing finished in the
# window (a stalled or fresh backlog): no rate to go by, RETRY_UNKNOWN_S.
RETRY_WINDOW_S = 300
RETRY_MIN_S = 1
RETRY_MAX_S = 600
RETRY_UNKNOWN_S = 60


def retry_after_s(missing: int, finished_in_window: int) -> int:
    """Seconds until `missing` more of a tenant's queued jobs should have finished, given how
    many finished in the last RETRY_WINDOW_S; see above."""
    if finished_in_window <= 0:
        return RETRY_UNKNOWN_S
    seconds = math.ceil(max(missing, 1) * RETRY_WINDOW_S / finished_in_window)
    return max(RETRY_MIN_S, min(RETRY_MAX_S, seconds))


class QuotaExceeded(Exception):
    """A submission refused: `tenant` has `queued` QUEUED jobs, its max_queued is `limit`.
    `retry_after_s`: when trying again is likely to succeed (see retry_after_s)."""

    def __init__(self, tenant: str, queued: int, limit: int, retry_after_s: int) -> None:
        super().__init__(f"tenant {tenant!r} has {queued} queued scans, its limit is {limit}: "
                         f"retry in {retry_after_s} s")
        self.tenant, self.queued, self.limit = tenant, queued, limit
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class Submitted:
    id: uuid.UUID
    state: State
    created: bool
    request_hash: str | None


_SUBMIT = """
WITH ins AS (
    INSERT INTO scan_jobs (id, url, callback_url, metadata, mode, idempotency_key, request_hash,
                           lane, tenant)
    VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, state, request_hash
)
SELECT id, state, request_hash, true AS created FROM ins
UNION ALL
SELECT id, state, request_hash, false FROM scan_jobs
WHERE $6::text IS NOT NULL AND idempotency_key = $6 AND NOT EXISTS (SELECT 1 FROM ins)
"""

# The artifacts the API serves (api/artifacts.py), and every kind the worker stores.
ARTIFACT_KINDS = ("screenshot", "full_page", "dom")
ALL_ARTIFACT_KINDS = artifact_kinds.KINDS
# Which of them a scan has, with type and size, without sending their bytes: the rows of
# scan_artifacts, else (a report stored before that table) what the report carries inline.
_ARTIFACT_INDEX = """
SELECT * FROM (
SELECT kind, content_type AS type, size FROM scan_artifacts
WHERE job_id = $1 AND kind = ANY($2::text[])
UNION ALL
SELECT k, CASE WHEN jsonb_typeof(a) = 'object' THEN a->>'type' ELSE 'text/html' END,
       CASE WHEN jsonb_typeof(a) = 'object' THEN (a->>'size')::bigint
            ELSE octet_length(a #>> '{}') END
FROM scan_results r, unnest($2::text[]) AS k, LATERAL (SELECT r.report->'render'->k AS a) x
WHERE r.job_id = $1 AND (jsonb_typeof(x.a) = 'string'
                         OR (jsonb_typeof(x.a) = 'object' AND x.a ? 'base64'
                             AND jsonb_typeof(x.a->'base64') = 'string'))
  AND NOT EXISTS (SELECT 1 FROM scan_artifacts s WHERE s.job_id = $1 AND s.kind = k)
) found ORDER BY array_position($2::text[], kind)
"""

_LIST_SCANS = """
SELECT j.id, j.url, j.state, j.error_code, j.mode, j.lane, j.tenant, j.created_at,
       j.finished_at, r.verdict, r.score
FROM scan_jobs j LEFT JOIN scan_results r ON r.job_id = j.id
WHERE ($1::text IS NULL OR j.state = $1) AND ($2::text IS NULL OR r.verdict = $2)
  AND ($8::text IS NULL OR coalesce(j.lane, 'default') = $8)
  AND ($9::text IS NULL OR j.tenant = $9)
  AND ($3::timestamptz IS NULL OR j.created_at >= $3)
  AND ($4::text IS NULL OR (md5(j.url) = md5($4) AND j.url = $4))
  AND ($5::timestamptz IS NULL OR (j.created_at, j.id) < ($5, $6::uuid))
ORDER BY j.created_at DESC, j.id DESC
LIMIT $7
"""

_CLAIM_CALLBACKS = """
WITH due AS (
    SELECT id FROM scan_callbacks WHERE status = 'PENDING' AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED
)
UPDATE scan_callbacks c SET attempts = c.attempts + 1,
    next_attempt_at = now() + make_interval(secs => $2)
FROM due, scan_jobs j LEFT JOIN scan_results r ON r.job_id = j.id
WHERE c.id = due.id AND j.id = c.job_id
RETURNING c.id, c.job_id, c.version, c.state, c.error_code, c.url, c.attempts, c.created_at,
          j.url AS scan_url, j.metadata, j.mode, r.verdict, r.score, r.final_url
"""

_FINISH_CALLBACK = """
WITH c AS (
    UPDATE scan_callbacks SET status = $3, last_error = $6,
        next_attempt_at = CASE WHEN $3 = 'PENDING' THEN now() + make_interval(secs => $4)
                               ELSE next_attempt_at END,
        delivered_at = CASE WHEN $3 = 'DELIVERED' THEN now() END
    WHERE id = $1 AND attempts = $2 AND status = 'PENDING'
)
INSERT INTO scan_callback_attempts (callback_id, job_id, attempt, http_status, error,
                                    duration_ms)
SELECT id, job_id, $2, $5, $6, $7 FROM scan_callbacks WHERE id = $1
"""

# Child rows first in the same statement; the foreign key (NO ACTION) is checked at its end.
_PRUNE = f"""
WITH v AS (
    SELECT id, error_code FROM scan_jobs
    WHERE state IN {_TERMINAL_SQL} AND finished_at < now() - make_interval(secs => $1)
    ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED
), ar AS (DELETE FROM scan_artifacts WHERE job_id IN (SELECT id FROM v)
), r AS (DELETE FROM scan_results WHERE job_id IN (SELECT id FROM v) RETURNING 1
), a AS (DELETE FROM scan_audit_log WHERE job_id IN (SELECT id FROM v) RETURNING 1
), c AS (DELETE FROM scan_callbacks WHERE job_id IN (SELECT id FROM v) RETURNING 1
), ca AS (DELETE FROM scan_callback_attempts WHERE job_id IN (SELECT id FROM v) RETURNING 1
), j AS (DELETE FROM scan_jobs WHERE id IN (SELECT id FROM v) RETURNING 1)
SELECT (SELECT count(*) FROM j) AS jobs, (SELECT count(*) FROM r) AS results,
       (SELECT count(*) FROM a) AS audit_rows, (SELECT count(*) FROM c) AS callbacks,
       (SELECT count(*) FROM ca) AS callback_attempts,
       ARRAY(SELECT id FROM v WHERE error_code = 'MAX_DELIVERIES') AS dead_lettered
"""

# Each audit row must start where the previous one ended (the first where every job starts,
# QUEUED), and the last must end in the job's current state: otherwise a state change happened
# without its audit row, or a row was written for a change that never happened. A job without
# rows must still be QUEUED. Rows are ordered by version (id breaks ties, which the version
# check reports on its own).
_AUDIT_CHAIN = """
WITH a AS (
    SELECT job_id, version, from_state, to_state,
           coalesce(lag(to_state) OVER w, 'QUEUED') AS expected_from,
           lead(id) OVER w IS NULL AS is_last
    FROM scan_audit_log
    WINDOW w AS (PARTITION BY job_id ORDER BY version, id)
)
SELECT job_id, version, from_state, expected_from, NULL AS to_state, NULL AS state
FROM a WHERE from_state IS DISTINCT FROM expected_from
UNION ALL
SELECT a.job_id, a.version, NULL, NULL, a.to_state, j.state
FROM a JOIN scan_jobs j ON j.id = a.job_id WHERE a.is_last AND a.to_state <> j.state
UNION ALL
SELECT j.id, 0, NULL, NULL, 'QUEUED', j.state FROM scan_jobs j
WHERE j.state <> 'QUEUED' AND NOT EXISTS (SELECT 1 FROM scan_audit_log l WHERE l.job_id = j.id)
ORDER BY 1, 2
LIMIT $1
"""
