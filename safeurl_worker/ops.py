"""Operator tools behind the CLI: invariant check, fleet status, retry, dead-letter handling.

Pure data functions here; printing and argument parsing stay in cli.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import redis.asyncio as redis

from .config import Settings
from .consumer import Consumer, Queue
from .models import Job, State
from .politeness import target_domain
from .store import Store, Submission, Submitted


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# --- artifacts ----------------------------------------------------------------------------

async def save_artifact(store: Store, job_id: uuid.UUID, kind: str, path: str
                        ) -> tuple[str, int] | None:
    """Write one stored artifact of a render scan (e.g. its screenshot) to `path`; returns
    (content type, bytes written), or None when the job has no such artifact."""
    found = await store.artifact_bytes(job_id, kind)
    if found is None:
        return None
    content_type, data = found
    await asyncio.to_thread(_write_file, path, data)
    return content_type, len(data)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


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
    if not allow_active:
        for r in await store.nonterminal_jobs(_LIMIT):
            problems.append(f"job {r['id']} is not terminal ({r['state']})")
    for r in await store.audit_version_problems(_LIMIT):
        problems.append(f"job {r['id']} audit versions broken: version {r['version']}, "
                        f"{r['n']} rows, {r['d']} distinct, {r['lo']}..{r['hi']}")
    problems += await _audit_chain_problems(store)
    for r in await store.result_row_problems(_LIMIT):
        problems.append(f"job {r['id']} is {r['state']} with {r['n']} result rows")
    for r in await store.failed_without_error_code(_LIMIT):
        problems.append(f"job {r['id']} is {r['state']} without an error_code")
    return problems


async def _audit_chain_problems(store: Store) -> list[str]:
    problems = []
    for r in await store.audit_chain_problems(_LIMIT):
        where = f"job {r['job_id']} audit chain broken at version {r['version']}"
        if r["state"] is None:
            problems.append(f"{where}: row starts from {r['from_state']}, "
                            f"the chain was at {r['expected_from']}")
        else:
            problems.append(f"{where}: the chain ends in {r['to_state']}, "
                            f"the job is {r['state']}")
    return problems


async def _queues(rds: redis.Redis, settings: Settings) -> list[Queue]:
    """Every queue the group reads: each lane's stream and each tenant queue (the consumer
    knows their names; this one only lists them)."""
    lister = Consumer(rds, settings.scan_stream, settings.scan_group, "ops",
                      settings.dead_letter_stream, lanes=settings.lane_weights)
    return await lister.queues(fresh=True)


async def _group_problems(rds: redis.Redis, settings: Settings) -> list[str]:
    """Nothing pending and nothing unread, in every queue: each lane's stream and each tenant
    queue (the consumer knows their names)."""
    problems: list[str] = []
    for q in await _queues(rds, settings):
        where = "consumer group" if q.stream == settings.scan_stream else (
            f"consumer group of {q.stream}")
        groups = [g for g in await _groups(rds, q.stream) if _s(g["name"]) == settings.scan_group]
        if not groups and await rds.exists(q.stream) and await rds.xlen(q.stream):
            # A tenant queue gets its group when first read: entries in one without are unread.
            problems.append(f"{q.stream} has {await rds.xlen(q.stream)} entries never read")
        for g in groups:
            if int(g["pending"]):
                problems.append(f"{where} has {g['pending']} pending entries")
            # lag: entries nobody has read yet. None when Redis cannot tell (entries deleted).
            if g.get("lag") is not None and int(g["lag"]):
                problems.append(f"{where} has lag {g['lag']} (entries never read)")
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
    jobs = {r["id"]: (r["state"], r["error_code"]) for r in await store.job_states(ids)}
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
    rows = await store.dead_lettered_entry_counts(
        [jid for jid, _ in with_job], [reason for _, reason in with_job],
        _DEAD_LETTER_CODES, missing_ok, _LIMIT)
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
    return await store.janitor_repaired_jobs()


async def _groups(rds: redis.Redis, stream: str) -> list[dict[str, Any]]:
    if not await rds.exists(stream):
        return []
    groups: list[dict[str, Any]] = await rds.xinfo_groups(stream)
    return groups


# --- status ---------------------------------------------------------------------------------

async def fleet_status(store: Store, rds: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Counts by state, recent throughput, queue age, stream figures, dead letters."""
    by_state = {s.value: 0 for s in State}
    by_state.update(await store.counts_by_state())
    recent = await store.recent_counts()
    oldest = await store.oldest_queued_s()
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
    lanes, tenants = await queue_counts(store, settings)
    return {"jobs": by_state,
            "last_5m": {"completed": recent["c5"], "failed": recent["f5"]},
            "last_60m": {"completed": recent["c60"], "failed": recent["f60"]},
            "oldest_queued_s": None if oldest is None else round(float(oldest), 1),
            "stream": stream, "dead_letters": dead, "lanes": lanes, "tenants": tenants,
            "queues": await _queue_figures(rds, settings)}


async def _queue_figures(rds: redis.Redis, settings: Settings) -> dict[str, dict[str, Any]]:
    """Length, lag and pending of every other queue than SCAN_STREAM itself (which `stream`
    shows): the other lanes' streams and the tenant queues, those that exist."""
    figures: dict[str, dict[str, Any]] = {}
    for q in await _queues(rds, settings):
        if q.stream == settings.scan_stream or not await rds.exists(q.stream):
            continue
        length = await rds.xlen(q.stream)
        # A tenant queue has no group until first read: then all of it is unread.
        f: dict[str, Any] = {"lane": q.lane, "tenant": q.tenant, "length": length,
                             "lag": length, "pending": 0}
        for g in await _groups(rds, q.stream):
            if _s(g["name"]) == settings.scan_group:
                f["lag"], f["pending"] = g.get("lag"), int(g["pending"])
        figures[q.stream] = f
    return figures


def _add(counts: dict[str, Any], row: Any) -> None:
    counts["queued"] += row["queued"]
    counts["running"] += row["running"]
    counts["done_5m"] += row["done_5m"]
    if row["oldest_queued_s"] is not None:
        counts["oldest_queued_s"] = round(max(counts["oldest_queued_s"] or 0.0,
                                              row["oldest_queued_s"]), 1)


def _counts() -> dict[str, Any]:
    return {"queued": 0, "running": 0, "oldest_queued_s": None, "done_5m": 0}


_TENANTS_SHOWN = 50  # the status shows the tenants with the most unfinished jobs, not all


async def queue_counts(store: Store, settings: Settings
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """From the database: per lane (every configured lane, in priority order, then any other
    lane found in rows) and per tenant (the _TENANTS_SHOWN busiest; jobs without a tenant are
    not listed): `queued`, `running`, `oldest_queued_s` (the wait so far of the oldest queued
    job) and `done_5m` (finished in the last 5 minutes)."""
    lanes = {lane: _counts() for lane in settings.lane_weights}
    tenants: dict[str, dict[str, Any]] = {}
    for r in await store.queue_counts():
        _add(lanes.setdefault(r["lane"], _counts()), r)
        if r["tenant"] is not None:
            _add(tenants.setdefault(r["tenant"], _counts()), r)
    busiest = sorted(tenants.items(), key=lambda kv: (-kv[1]["queued"] - kv[1]["running"],
                                                      kv[0]))[:_TENANTS_SHOWN]
    return lanes, dict(sorted(busiest))


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
    for name, q in st.get("queues", {}).items():
        lines.append(f"  queue {name}  length {q['length']}  lag {q['lag']}  "
                     f"pending {q['pending']}")
    lines.append(f"DEAD LETTERS   {st['dead_letters']}")
    for title, rows in (("LANES", st.get("lanes", {})), ("TENANTS", st.get("tenants", {}))):
        if rows:
            lines.append(f"{title:<34} queued  running  oldest s  done 5m")
            lines += [f"  {name:<30} {c['queued']:>8} {c['running']:>8} "
                      f"{_or_dash(c['oldest_queued_s']):>9} {c['done_5m']:>8}"
                      for name, c in rows.items()]
    return "\n".join(lines)


# --- submit -------------------------------------------------------------------------------

def max_queued(settings: Settings, tenant: str | None) -> int:
    """The queued-jobs quota a submission of `tenant` is held to; 0: none (no tenant)."""
    return 0 if tenant is None else settings.quota(tenant).max_queued


async def submit_scan(store: Store, consumer: Consumer, sub: Submission,
                      max_queued: int = 0) -> Submitted:
    """What the contract says the API service does: INSERT the QUEUED row, then XADD its id
    (to its lane's stream). A repeated request (same idempotency key) finds the first one's
    job and adds nothing: if that request's XADD was lost, the janitor re-enqueues the job.
    `max_queued`: the tenant's quota (see `max_queued`); over it, store.QuotaExceeded."""
    got = await store.submit_job(sub, max_queued=max_queued)
    if got.created:
        await consumer.enqueue(got.id, lane=sub.lane, tenant=sub.tenant,
                               domain=target_domain(sub.url))
    return got


async def enqueue_job(consumer: Consumer, job: Job) -> None:
    """XADD an existing job again, to its lane, with its tenant and target domain. A lane no
    longer configured: the default lane rather than a stream no one reads (as the janitor)."""
    lane = job.lane if job.lane in consumer.lanes else None
    await consumer.enqueue(job.id, lane=lane, tenant=job.tenant, domain=target_domain(job.url))


# --- retry ----------------------------------------------------------------------------------

async def retry_jobs(store: Store, consumer: Consumer, *,
                     job_ids: list[uuid.UUID], state: str | None, error_code: str | None,
                     since: datetime | None, limit: int, actor: str,
                     progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Re-queue FAILED/TIMED_OUT jobs: versioned move back to QUEUED, audit row, new XADD.
    Returns (re-queued, skipped)."""
    states = [state] if state else ["FAILED", "TIMED_OUT"]
    if any(s not in ("FAILED", "TIMED_OUT") for s in states):
        raise ValueError("only FAILED or TIMED_OUT jobs can be retried")
    jobs = await store.retry_candidates(states, job_ids, error_code, since, limit)
    done = skipped = 0
    for i, job in enumerate(jobs, 1):
        # The transition clears error_code and finished_at; failed jobs have no result row.
        # An operator's retry is not held to the tenant's queued quota: it re-queues work the
        # tenant was already allowed to submit.
        moved = await store.transition(job, State.QUEUED, worker_id=actor, reset_faults=True,
                                       detail={"retry": True, "previous_error": job.error_code})
        if moved is None:
            skipped += 1
        else:
            await enqueue_job(consumer, job)
            done += 1
        if progress:
            progress(i, len(jobs))
    return done, skipped + (len(job_ids) - len(jobs) if job_ids else 0)


# --- dead letters ---------------------------------------------------------------------------

_ENTRY_ID = re.compile(r"^\d+(-\d+)?$")


def bad_entry_ids(ids: list[str]) -> list[str]:
    """Ids that are not stream entry ids (`<ms>-<seq>`), so Redis would reject them."""
    return [i for i in ids if not _ENTRY_ID.match(i)]


async def dlq_list(consumer: Consumer, count: int, after: str | None = None
                   ) -> list[dict[str, str]]:
    """Up to `count` dead letters, oldest first; `after`: the id the previous page ended at."""
    return [{"id": eid, **fields} for eid, fields in await consumer.dead_letters(after, count)]


async def dlq_entry(consumer: Consumer, entry_id: str) -> dict[str, str] | None:
    fields = await consumer.dead_letter_entry(entry_id)
    return None if fields is None else {"id": entry_id, **fields}


async def dlq_replay(store: Store, consumer: Consumer, ids: list[str],
                     actor: str, progress: Callable[[int, int], None] | None = None
                     ) -> tuple[int, list[str]]:
    """Send dead-lettered entries back to the stream; a FAILED job is first moved back to
    QUEUED (versioned, audited). Replayed entries leave the dead-letter stream."""
    replayed, problems = 0, []
    for i, eid in enumerate(ids, 1):
        fields = await consumer.dead_letter_entry(eid)
        if fields is None:
            problems.append(f"{eid}: no such dead-letter entry")
            continue
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
        await enqueue_job(consumer, job)
        await consumer.delete_dead_letters([eid])
        replayed += 1
        if progress:
            progress(i, len(ids))
    return replayed, problems


async def dlq_purge(consumer: Consumer, ids: list[str], everything: bool = False) -> int:
    """Delete the named entries, or (only when asked explicitly) the whole stream."""
    if ids:
        return await consumer.delete_dead_letters(ids)
    if not everything:
        raise ValueError("name the entries to purge, or purge all of them explicitly")
    return await consumer.purge_dead_letters()


# --- retention ------------------------------------------------------------------------------

_PRUNED = ("jobs", "results", "audit_rows", "callbacks", "callback_attempts")


async def prune(store: Store, older_than_s: float, *, consumer: Consumer | None = None,
                batch: int = 500, pause_s: float = 0.05, max_jobs: int | None = None,
                progress: Callable[[dict[str, int]], None] | None = None) -> dict[str, int]:
    """Delete finished jobs older than `older_than_s` with their results, audit rows and
    callbacks, `batch` jobs per statement (each its own short transaction, so no lock is held
    for long and the workers' writes interleave), until none is left or `max_jobs` are gone.
    With `consumer`, the dead-letter entries of pruned MAX_DELIVERIES jobs go too: `check`
    holds such jobs and their entries one to one. Returns the totals."""
    totals = dict.fromkeys((*_PRUNED, "dead_letters"), 0)
    dead_lettered: set[str] = set()
    while True:
        size = batch if max_jobs is None else min(batch, max_jobs - totals["jobs"])
        done = await store.prune_batch(older_than_s, size)
        for k in _PRUNED:
            totals[k] += int(done[k])
        dead_lettered.update(str(j) for j in done["dead_lettered"])
        if progress:
            progress(totals)
        if done["jobs"] < size or (max_jobs is not None and totals["jobs"] >= max_jobs):
            break
        await asyncio.sleep(pause_s)  # room for everybody else between batches
    if consumer is not None and dead_lettered:
        totals["dead_letters"] = await _drop_dead_letters_of(consumer, dead_lettered)
    return totals


async def _drop_dead_letters_of(consumer: Consumer, job_ids: set[str]) -> int:
    """XDEL the MAX_DELIVERIES entries naming these (deleted) jobs; one pass over the bounded
    dead-letter stream."""
    doomed = [eid for eid, f in await consumer.dead_letters()
              if f.get("reason") == "MAX_DELIVERIES" and f.get("job_id") in job_ids]
    return await consumer.delete_dead_letters(doomed)


async def prune_retained(store: Store, retention_days: float, consumer: Consumer | None = None,
                         max_jobs: int = 5000) -> int:
    """The janitor's retention policy (RETENTION_DAYS; 0: off): a bounded prune per round, so
    a first run over a large backlog is spread over many rounds. Returns the jobs deleted."""
    if retention_days <= 0:
        return 0
    done = await prune(store, retention_days * 86400, consumer=consumer, max_jobs=max_jobs)
    return done["jobs"]


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` -> seconds; raises ValueError."""
    m = _DURATION.match(text.strip().lower())
    if m is None:
        raise ValueError(f"not a duration: {text!r} (examples: 30d, 12h, 90m)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]
