"""Operator tools behind the CLI: invariant check, fleet status, retry, dead-letter handling.

Pure data functions here; printing and argument parsing stay in cli.py.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis.asyncio as redis

from .config import Settings
from .models import TERMINAL, Job, State
from .store import Store

_TERMINAL = [s.value for s in TERMINAL]


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# --- invariants ---------------------------------------------------------------------------

# Dead-letter reasons that also end the job FAILED with the reason as its error_code.
_DEAD_LETTER_CODES = ["MAX_DELIVERIES", "MALFORMED_MESSAGE", "UNKNOWN_JOB"]
_LIMIT = 20  # violations reported per check: enough to act on, bounded output


@dataclasses.dataclass(frozen=True)
class CheckReport:
    problems: list[str]  # violations; empty when every invariant holds
    janitor_jobs: int  # jobs the janitor had to repair (not a violation; a health figure)


async def check_invariants(store: Store, rds: redis.Redis, settings: Settings,
                           containers: list[str], allow_active: bool = False) -> CheckReport:
    """Everything that must hold once the system is quiet (`allow_active`: the checks that also
    hold while jobs run). `containers`: labelled containers of jobs in this database."""
    problems = await _job_problems(store, allow_active)
    if not allow_active:  # a live system: in-flight jobs hold entries and run containers
        problems += await _group_problems(rds, settings)
        problems += [f"container {c} labelled safeurl.job_id still exists" for c in containers]
        problems += await _dead_letter_problems(store, rds, settings)
    return CheckReport(problems, await _janitor_jobs(store))


async def _job_problems(store: Store, allow_active: bool) -> list[str]:
    problems: list[str] = []
    q = store.pool.fetch
    if not allow_active:
        for r in await q("SELECT id, state FROM scan_jobs WHERE state <> ALL($1) LIMIT 20",
                         _TERMINAL):
            problems.append(f"job {r['id']} is not terminal ({r['state']})")
    for r in await q("""
            SELECT j.id, j.version, count(a.id) AS n, count(DISTINCT a.version) AS d,
                   min(a.version) AS lo, max(a.version) AS hi
            FROM scan_jobs j LEFT JOIN scan_audit_log a ON a.job_id = j.id
            GROUP BY j.id, j.version
            HAVING count(a.id) <> j.version OR count(DISTINCT a.version) <> j.version
                OR (j.version > 0 AND (min(a.version) <> 1 OR max(a.version) <> j.version))
            LIMIT 20"""):
        problems.append(f"job {r['id']} audit versions broken: version {r['version']}, "
                        f"{r['n']} rows, {r['d']} distinct, {r['lo']}..{r['hi']}")
    problems += await _audit_chain_problems(store)
    for r in await q("""
            SELECT j.id, j.state, count(r.job_id) AS n FROM scan_jobs j
            LEFT JOIN scan_results r ON r.job_id = j.id GROUP BY j.id, j.state
            HAVING (j.state = 'COMPLETED') <> (count(r.job_id) = 1) LIMIT 20"""):
        problems.append(f"job {r['id']} is {r['state']} with {r['n']} result rows")
    for r in await q("SELECT id, state FROM scan_jobs WHERE state IN ('FAILED', 'TIMED_OUT') "
                     "AND error_code IS NULL LIMIT 20"):
        problems.append(f"job {r['id']} is {r['state']} without an error_code")
    return problems


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
LIMIT 20
"""


async def _audit_chain_problems(store: Store) -> list[str]:
    problems = []
    for r in await store.pool.fetch(_AUDIT_CHAIN):
        where = f"job {r['job_id']} audit chain broken at version {r['version']}"
        if r["state"] is None:
            problems.append(f"{where}: row starts from {r['from_state']}, "
                            f"the chain was at {r['expected_from']}")
        else:
            problems.append(f"{where}: the chain ends in {r['to_state']}, "
                            f"the job is {r['state']}")
    return problems


async def _group_problems(rds: redis.Redis, settings: Settings) -> list[str]:
    problems: list[str] = []
    for g in await _groups(rds, settings.scan_stream):
        if _s(g["name"]) != settings.scan_group:
            continue
        if int(g["pending"]):
            problems.append(f"consumer group has {g['pending']} pending entries")
        # lag: entries nobody has read yet. None when Redis cannot tell (entries deleted).
        if g.get("lag") is not None and int(g["lag"]):
            problems.append(f"consumer group has lag {g['lag']} (entries never read)")
    return problems


async def _dead_letter_problems(store: Store, rds: redis.Redis, settings: Settings
                                ) -> list[str]:
    """Dead letters and dead-lettered jobs match one to one (see _DEAD_LETTER_CODES)."""
    entries = await _read_stream(rds, settings.dead_letter_stream)
    problems = [f"dead-letter entry {eid} has no reason"
                for eid, fields in entries if "reason" not in fields][:_LIMIT]
    named = [(eid, fields["reason"], _uuid_or_none(fields.get("job_id")))
             for eid, fields in entries if "reason" in fields]
    problems += await _entries_without_their_job(store, named)
    problems += await _jobs_without_their_entry(
        store, named, missing_ok=await _trimmed(rds, settings))
    return problems


async def _entries_without_their_job(
        store: Store, named: list[tuple[str, str, uuid.UUID | None]]) -> list[str]:
    """A MAX_DELIVERIES entry names a job FAILED MAX_DELIVERIES; an UNKNOWN_JOB entry names no
    job, or one FAILED UNKNOWN_JOB. MALFORMED_MESSAGE entries need no job."""
    ids = list({jid for _, _, jid in named if jid is not None})
    jobs = {r["id"]: (r["state"], r["error_code"]) for r in await store.pool.fetch(
        "SELECT id, state, error_code FROM scan_jobs WHERE id = ANY($1::uuid[])", ids)}
    problems: list[str] = []
    for eid, reason, jid in named:
        job = jobs.get(jid) if jid is not None else None
        if reason == "MAX_DELIVERIES" and job != ("FAILED", reason):
            problems.append(f"dead-letter entry {eid} (MAX_DELIVERIES) names job "
                            f"{jid or '(no valid job_id)'}, which is {_job_state(job)}, "
                            "not FAILED MAX_DELIVERIES")
        elif reason == "UNKNOWN_JOB" and job is not None and job != ("FAILED", reason):
            problems.append(f"dead-letter entry {eid} (UNKNOWN_JOB) names job {jid}, "
                            f"which exists ({_job_state(job)})")
    return problems[:_LIMIT]


async def _jobs_without_their_entry(store: Store, named: list[tuple[str, str, uuid.UUID | None]],
                                    missing_ok: bool) -> list[str]:
    """Each dead-lettered FAILED job has exactly one entry with its error_code as reason. After
    a trim, old jobs may have lost theirs: then only duplicates are violations."""
    with_job = [(jid, reason) for _, reason, jid in named if jid is not None]
    rows = await store.pool.fetch("""
        SELECT j.id, j.error_code, count(e.job_id) AS n
        FROM scan_jobs j
        LEFT JOIN unnest($1::uuid[], $2::text[]) AS e(job_id, reason)
               ON e.job_id = j.id AND e.reason = j.error_code
        WHERE j.state = 'FAILED' AND j.error_code = ANY($3)
        GROUP BY j.id, j.error_code
        HAVING count(e.job_id) > 1 OR (count(e.job_id) = 0 AND NOT $4)
        ORDER BY j.id LIMIT 20""",
        [jid for jid, _ in with_job], [reason for _, reason in with_job],
        _DEAD_LETTER_CODES, missing_ok)
    return [f"job {r['id']} is FAILED {r['error_code']} with {r['n']} dead-letter entries"
            for r in rows]


async def _trimmed(rds: redis.Redis, settings: Settings) -> bool:
    """Whether entries have left the dead-letter stream (MAXLEN trim, or `dlq purge`/`replay`
    by id): entries-added counts every XADD, length only what is left."""
    stream = settings.dead_letter_stream
    if not await rds.exists(stream):
        return False
    info: dict[str, Any] = await rds.xinfo_stream(stream)
    length, added = int(info["length"]), info.get("entries-added")  # Redis >= 7
    maxlen: int = getattr(settings, "dead_letter_maxlen", 10_000)
    return (added is not None and int(added) > length) or length >= maxlen


async def _read_stream(rds: redis.Redis, stream: str, page: int = 1000
                       ) -> list[tuple[str, dict[str, str]]]:
    """Every entry of a (bounded) stream, a page at a time."""
    entries: list[tuple[str, dict[str, str]]] = []
    start = "-"
    while True:
        batch: Any = await rds.xrange(stream, min=start, count=page)
        entries += [(_s(eid), {_s(k): _s(v) for k, v in fields.items()})
                    for eid, fields in batch]
        if len(batch) < page:
            return entries
        start = f"({entries[-1][0]}"  # exclusive: after the last entry read


def _uuid_or_none(v: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(v or "")
    except ValueError:
        return None


def _job_state(job: tuple[str, str | None] | None) -> str:
    return "missing" if job is None else " ".join(x for x in job if x)


async def _janitor_jobs(store: Store) -> int:
    n: int = await store.pool.fetchval(
        "SELECT count(DISTINCT job_id) FROM scan_audit_log WHERE detail ? 'janitor'")
    return n


async def _groups(rds: redis.Redis, stream: str) -> list[dict[str, Any]]:
    if not await rds.exists(stream):
        return []
    groups: list[dict[str, Any]] = await rds.xinfo_groups(stream)
    return groups


# --- status ---------------------------------------------------------------------------------

async def fleet_status(store: Store, rds: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Counts by state, recent throughput, queue age, stream figures, dead letters."""
    by_state = {s.value: 0 for s in State}
    for r in await store.pool.fetch("SELECT state, count(*) AS n FROM scan_jobs GROUP BY state"):
        by_state[r["state"]] = r["n"]
    recent: Any = await store.pool.fetchrow("""
        SELECT count(*) FILTER (WHERE state = 'COMPLETED' AND finished_at > now() - interval '5 minutes') AS c5,
               count(*) FILTER (WHERE state <> 'COMPLETED' AND finished_at > now() - interval '5 minutes') AS f5,
               count(*) FILTER (WHERE state = 'COMPLETED' AND finished_at > now() - interval '60 minutes') AS c60,
               count(*) FILTER (WHERE state <> 'COMPLETED' AND finished_at > now() - interval '60 minutes') AS f60
        FROM scan_jobs WHERE finished_at > now() - interval '60 minutes'""")  # noqa: E501
    oldest = await store.pool.fetchval(
        "SELECT extract(epoch FROM now() - min(created_at)) FROM scan_jobs WHERE state='QUEUED'")
    stream: dict[str, Any] = {"length": 0, "lag": None, "pending": 0, "consumers": {}}
    if await rds.exists(settings.scan_stream):
        stream["length"] = await rds.xlen(settings.scan_stream)
        for g in await _groups(rds, settings.scan_stream):
            if _s(g["name"]) == settings.scan_group:
                stream["lag"], stream["pending"] = g.get("lag"), int(g["pending"])
        try:
            consumers = await rds.xinfo_consumers(settings.scan_stream, settings.scan_group)
        except redis.ResponseError:
            consumers = []
        stream["consumers"] = {_s(c["name"]): {"pending": int(c["pending"]),
                                               "idle_ms": int(c["idle"])} for c in consumers}
    dead = await rds.xlen(settings.dead_letter_stream) if await rds.exists(
        settings.dead_letter_stream) else 0
    return {"jobs": by_state,
            "last_5m": {"completed": recent["c5"], "failed": recent["f5"]},
            "last_60m": {"completed": recent["c60"], "failed": recent["f60"]},
            "oldest_queued_s": None if oldest is None else round(float(oldest), 1),
            "stream": stream, "dead_letters": dead}


def _or_dash(v: object) -> str:
    return "-" if v is None else str(v)


def status_table(st: dict[str, Any]) -> str:
    lines = ["JOBS", *(f"  {k:<10} {v:>8}" for k, v in st["jobs"].items()),
             "RECENT            completed   failed",
             f"  last 5 min  {st['last_5m']['completed']:>13} {st['last_5m']['failed']:>8}",
             f"  last 60 min {st['last_60m']['completed']:>13} {st['last_60m']['failed']:>8}",
             f"OLDEST QUEUED  {_or_dash(st['oldest_queued_s'])} s",
             "STREAM",
             f"  length {st['stream']['length']}  lag {st['stream']['lag']}  "
             f"pending {st['stream']['pending']}"]
    for name, c in sorted(st["stream"]["consumers"].items()):
        lines.append(f"  consumer {name:<30} pending {c['pending']:>5}  idle {c['idle_ms']} ms")
    lines.append(f"DEAD LETTERS   {st['dead_letters']}")
    return "\n".join(lines)


# --- retry ----------------------------------------------------------------------------------

async def retry_jobs(store: Store, rds: redis.Redis, settings: Settings, *,
                     job_ids: list[uuid.UUID], state: str | None, error_code: str | None,
                     since: datetime | None, limit: int, actor: str,
                     progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Re-queue FAILED/TIMED_OUT jobs: versioned move back to QUEUED, audit row, new XADD.
    Returns (re-queued, skipped)."""
    states = [state] if state else ["FAILED", "TIMED_OUT"]
    if any(s not in ("FAILED", "TIMED_OUT") for s in states):
        raise ValueError("only FAILED or TIMED_OUT jobs can be retried")
    rows = await store.pool.fetch(
        "SELECT id, url, state, version, attempts, worker_id, error_code, created_at "
        "FROM scan_jobs WHERE state = ANY($1) "
        "AND (cardinality($2::uuid[]) = 0 OR id = ANY($2)) "
        "AND ($3::text IS NULL OR error_code = $3) "
        "AND ($4::timestamptz IS NULL OR finished_at >= $4) ORDER BY finished_at LIMIT $5",
        states, job_ids, error_code, since, limit)
    done = skipped = 0
    for i, row in enumerate(rows, 1):
        job = Job.model_validate(dict(row))
        # The transition clears error_code and finished_at; failed jobs have no result row.
        moved = await store.transition(job, State.QUEUED, worker_id=actor, reset_faults=True,
                                       detail={"retry": True, "previous_error": job.error_code})
        if moved is None:
            skipped += 1
        else:
            await rds.xadd(settings.scan_stream, {"job_id": str(job.id)})
            done += 1
        if progress:
            progress(i, len(rows))
    return done, skipped + (len(job_ids) - len(rows) if job_ids else 0)


# --- dead letters ---------------------------------------------------------------------------

_ENTRY_ID = re.compile(r"^\d+(-\d+)?$")


def bad_entry_ids(ids: list[str]) -> list[str]:
    """Ids that are not stream entry ids (`<ms>-<seq>`), so Redis would reject them."""
    return [i for i in ids if not _ENTRY_ID.match(i)]


async def dlq_list(rds: redis.Redis, settings: Settings, count: int) -> list[dict[str, str]]:
    entries: Any = await rds.xrange(settings.dead_letter_stream, count=count)
    return [{"id": _s(eid), **{_s(k): _s(v) for k, v in fields.items()}}
            for eid, fields in entries]


async def dlq_replay(store: Store, rds: redis.Redis, settings: Settings, ids: list[str],
                     actor: str, progress: Callable[[int, int], None] | None = None
                     ) -> tuple[int, list[str]]:
    """Send dead-lettered entries back to the stream; a FAILED job is first moved back to
    QUEUED (versioned, audited). Replayed entries leave the dead-letter stream."""
    replayed, problems = 0, []
    for i, eid in enumerate(ids, 1):
        found: Any = await rds.xrange(settings.dead_letter_stream, min=eid, max=eid)
        if not found:
            problems.append(f"{eid}: no such dead-letter entry")
            continue
        fields = {_s(k): _s(v) for k, v in found[0][1].items()}
        try:
            job_id = uuid.UUID(fields.get("job_id", ""))
        except ValueError:
            problems.append(f"{eid}: malformed (job_id {fields.get('job_id')!r}); purge it")
            continue
        job = await store.get_job(job_id)
        if job is None:
            problems.append(f"{eid}: job {job_id} does not exist")
            continue
        if job.state in (State.FAILED, State.TIMED_OUT):
            await store.transition(job, State.QUEUED, worker_id=actor, reset_faults=True,
                                   detail={"dlq_replay": eid})
        await rds.xadd(settings.scan_stream, {"job_id": str(job_id)})
        await rds.xdel(settings.dead_letter_stream, eid)
        replayed += 1
        if progress:
            progress(i, len(ids))
    return replayed, problems


async def dlq_purge(rds: redis.Redis, settings: Settings, ids: list[str]) -> int:
    if ids:
        return int(await rds.xdel(settings.dead_letter_stream, *ids))
    n = await rds.xlen(settings.dead_letter_stream) if await rds.exists(
        settings.dead_letter_stream) else 0
    await rds.delete(settings.dead_letter_stream)
    return int(n)
