"""Operator tools behind the CLI: invariant check, fleet status, retry, dead-letter handling.

Pure data functions here; printing and argument parsing stay in cli.py.
"""

from __future__ import annotations

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

async def check_invariants(store: Store, rds: redis.Redis, settings: Settings,
                           containers: list[str], allow_active: bool = False) -> list[str]:
    """Everything that must hold once the system is quiet (`allow_active`: the checks that also
    hold while jobs run). `containers`: labelled containers of jobs in this database.
    Returns the violations."""
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
    for r in await q("""
            SELECT j.id, j.state, count(r.job_id) AS n FROM scan_jobs j
            LEFT JOIN scan_results r ON r.job_id = j.id GROUP BY j.id, j.state
            HAVING (j.state = 'COMPLETED') <> (count(r.job_id) = 1) LIMIT 20"""):
        problems.append(f"job {r['id']} is {r['state']} with {r['n']} result rows")
    for r in await q("SELECT id, state FROM scan_jobs WHERE state IN ('FAILED', 'TIMED_OUT') "
                     "AND error_code IS NULL LIMIT 20"):
        problems.append(f"job {r['id']} is {r['state']} without an error_code")
    if allow_active:  # a live system: in-flight jobs hold entries and run containers
        return problems
    with_group = [g for g in await _groups(rds, settings.scan_stream)
                  if _s(g["name"]) == settings.scan_group]
    if with_group and int(with_group[0]["pending"]):
        problems.append(f"consumer group has {with_group[0]['pending']} pending entries")
    problems += [f"container {c} labelled safeurl.job_id still exists" for c in containers]
    dead: Any = await rds.xrange(settings.dead_letter_stream, count=10_000)
    for entry_id, fields in dead:
        if b"reason" not in fields:
            problems.append(f"dead-letter entry {_s(entry_id)} has no reason")
    return problems


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
        moved = await store.transition(job, State.QUEUED, worker_id=actor,
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
            await store.transition(job, State.QUEUED, worker_id=actor,
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
