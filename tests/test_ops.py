"""`safeurl-worker check` against real PostgreSQL and Redis: the audit chain, dead letters matching
their FAILED jobs, consumer-group lag, and the janitor count. Each violation is made by hand (SQL
or a raw XADD) on an otherwise clean history, and check must name exactly it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as redis

from safeurl_worker import ops
from safeurl_worker.config import Settings
from safeurl_worker.consumer import Consumer, Queue
from safeurl_worker.models import Analysis, Job, Report, State, Verdict
from safeurl_worker.ops import check_invariants
from safeurl_worker.politeness import target_domain
from safeurl_worker.store import QuotaExceeded, Store, Submission

from .helpers import check, janitor_jobs

pytestmark = pytest.mark.integration

W = "w-test"


async def _job(store: Store) -> Job:
    job = await store.get_job(await store.insert_job("http://a.test/"))
    assert job is not None
    return job


async def _move(store: Store, job: Job, *states: State, **kwargs: object) -> Job:
    for state in states:
        moved = await store.transition(job, state, worker_id=W, **kwargs)  # type: ignore[arg-type]
        assert moved is not None
        job = moved
    return job


async def _completed(store: Store, requeued_by_janitor: bool = False) -> uuid.UUID:
    """A job that went the normal way (optionally with one janitor repair on the way)."""
    job = await _move(store, await _job(store), State.FETCHING)
    if requeued_by_janitor:
        job = await _move(store, job, State.QUEUED, detail={"janitor": "recovered"})
        job = await _move(store, job, State.FETCHING)
    job = await _move(store, job, State.ANALYZING)
    report = Report(fetcher_version="1", requested_url=job.url)
    analysis = Analysis(verdict=Verdict.SAFE, score=0, signals=[], analyzer_version="t")
    assert await store.complete(job, worker_id=W, report=report, analysis=analysis,
                                url_key=None) is not None
    return job.id


async def _failed(store: Store, code: str) -> uuid.UUID:
    job = await _move(store, await _job(store), State.FAILED, error_code=code)
    return job.id


async def _dead_letter(rds: redis.Redis, settings: Settings, reason: str | None,
                       job_id: uuid.UUID | str | None) -> str:
    """An entry as the worker writes it: the message's fields, then the dead-letter ones."""
    fields = {"job_id": str(job_id)} if job_id is not None else {"junk": "x"}
    fields |= {"original_id": "1-0", "deliveries": "6", "consumer": W}
    if reason is not None:
        fields["reason"] = reason
    eid: bytes = await rds.xadd(settings.dead_letter_stream, fields)  # type: ignore[arg-type]
    return eid.decode()


async def _quiet_group(rds: redis.Redis, settings: Settings) -> None:
    """The group has read and acknowledged everything: pending 0, lag 0."""
    await rds.xgroup_create(settings.scan_stream, settings.scan_group, id="0", mkstream=True)
    await rds.xadd(settings.scan_stream, {"job_id": str(uuid.uuid4())})
    read = await rds.xreadgroup(settings.scan_group, W, {settings.scan_stream: ">"})
    await rds.xack(settings.scan_stream, settings.scan_group, read[0][1][0][0])


async def _problems(store: Store, rds: redis.Redis, settings: Settings,
                    allow_active: bool = False) -> list[str]:
    report = await check_invariants(store, rds, settings, [], allow_active=allow_active)
    return report.problems


async def test_clean_history_passes(settings: Settings, store: Store, rds: redis.Redis) -> None:
    await _completed(store)
    poisoned = await _failed(store, "MAX_DELIVERIES")
    await _failed(store, "INVALID_URL")
    await _dead_letter(rds, settings, "MAX_DELIVERIES", poisoned)
    await _dead_letter(rds, settings, "UNKNOWN_JOB", uuid.uuid4())  # a job that never appeared
    await _dead_letter(rds, settings, "MALFORMED_MESSAGE", None)
    await _dead_letter(rds, settings, "MALFORMED_MESSAGE", "not-a-uuid")
    await _quiet_group(rds, settings)
    report = await check_invariants(store, rds, settings, [])
    assert report.problems == []
    assert report.janitor_jobs == 0
    out = await check(settings)  # the CLI prints the same verdict and the janitor count
    assert "all invariants hold" in out
    assert janitor_jobs(out) == 0


async def test_audit_row_that_does_not_start_where_the_last_ended(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    job_id = await _completed(store)  # versions 1..3, ending COMPLETED
    # A 4th row, with the job's version to match, claiming to start from FETCHING: the version
    # check is satisfied, the chain is not.
    await store.pool.execute(
        "INSERT INTO scan_audit_log (job_id, from_state, to_state, version, worker_id) "
        "VALUES ($1, 'FETCHING', 'COMPLETED', 4, 'intruder')", job_id)
    await store.pool.execute("UPDATE scan_jobs SET version = 4 WHERE id = $1", job_id)
    assert await _problems(store, rds, settings) == [
        f"job {job_id} audit chain broken at version 4: row starts from FETCHING, "
        "the chain was at COMPLETED"]
    # The first row must start from QUEUED.
    await store.pool.execute("UPDATE scan_audit_log SET from_state = 'FETCHING' "
                             "WHERE job_id = $1 AND version = 1", job_id)
    assert (f"job {job_id} audit chain broken at version 1: row starts from FETCHING, "
            "the chain was at QUEUED") in await _problems(store, rds, settings)


async def test_state_changed_without_an_audit_row(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    failed = await _failed(store, "INVALID_URL")
    await store.pool.execute("UPDATE scan_jobs SET state = 'TIMED_OUT' WHERE id = $1", failed)
    never_moved = (await _job(store)).id
    await store.pool.execute("UPDATE scan_jobs SET state = 'FAILED', error_code = 'TIMEOUT' "
                             "WHERE id = $1", never_moved)
    problems = await _problems(store, rds, settings, allow_active=True)
    assert sorted(problems) == sorted([
        f"job {failed} audit chain broken at version 1: the chain ends in FAILED, "
        "the job is TIMED_OUT",
        f"job {never_moved} audit chain broken at version 0: the chain ends in QUEUED, "
        "the job is FAILED"])


async def test_dead_lettered_job_without_its_entry(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    job_id = await _failed(store, "MAX_DELIVERIES")
    assert await _problems(store, rds, settings) == [
        f"job {job_id} is FAILED MAX_DELIVERIES with 0 dead-letter entries"]
    assert await _problems(store, rds, settings, allow_active=True) == []
    # An entry with another reason does not count for it.
    await _dead_letter(rds, settings, "MALFORMED_MESSAGE", job_id)
    assert len(await _problems(store, rds, settings)) == 1
    # Once entries have left the stream (trimmed or deleted), a missing one may be old history.
    gone = await _dead_letter(rds, settings, "MALFORMED_MESSAGE", None)
    await rds.xdel(settings.dead_letter_stream, gone)
    assert await _problems(store, rds, settings) == []


async def test_dead_lettered_job_with_two_entries(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    job_id = await _failed(store, "MAX_DELIVERIES")
    for _ in range(2):
        await _dead_letter(rds, settings, "MAX_DELIVERIES", job_id)
    gone = await _dead_letter(rds, settings, "MALFORMED_MESSAGE", None)
    await rds.xdel(settings.dead_letter_stream, gone)  # trimmed: duplicates still count
    assert await _problems(store, rds, settings) == [
        f"job {job_id} is FAILED MAX_DELIVERIES with 2 dead-letter entries"]


async def test_dead_letter_entries_without_their_job(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    ghost = uuid.uuid4()
    no_job = await _dead_letter(rds, settings, "MAX_DELIVERIES", ghost)
    completed = await _completed(store)
    wrong_job = await _dead_letter(rds, settings, "MAX_DELIVERIES", completed)
    known = await _dead_letter(rds, settings, "UNKNOWN_JOB", completed)
    reasonless = await _dead_letter(rds, settings, None, uuid.uuid4())
    assert sorted(await _problems(store, rds, settings)) == sorted([
        f"dead-letter entry {no_job} (MAX_DELIVERIES) names job {ghost}, which is missing, "
        "not FAILED MAX_DELIVERIES",
        f"dead-letter entry {wrong_job} (MAX_DELIVERIES) names job {completed}, which is "
        "COMPLETED, not FAILED MAX_DELIVERIES",
        f"dead-letter entry {known} (UNKNOWN_JOB) names job {completed}, which exists "
        "(COMPLETED)",
        f"dead-letter entry {reasonless} has no reason"])


async def test_consumer_group_lag(settings: Settings, store: Store, rds: redis.Redis) -> None:
    # A group that has never read its one entry: nothing pending, but the entry waits.
    await rds.xgroup_create(settings.scan_stream, settings.scan_group, id="0", mkstream=True)
    await rds.xadd(settings.scan_stream, {"job_id": str(uuid.uuid4())})
    assert await _problems(store, rds, settings) == [
        "consumer group has lag 1 (entries never read)"]
    assert await _problems(store, rds, settings, allow_active=True) == []


async def test_janitor_repairs_are_counted_not_violations(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    await _completed(store)
    await _completed(store, requeued_by_janitor=True)
    report = await check_invariants(store, rds, settings, [])
    assert report.problems == []
    assert report.janitor_jobs == 1
    assert janitor_jobs(await check(settings)) == 1


# --- prune ------------------------------------------------------------------------------------


async def _with_callback(store: Store, job_id: uuid.UUID) -> None:
    """An outbox row and one recorded attempt for a finished job, as the deliverer leaves."""
    cb = await store.pool.fetchval(
        "INSERT INTO scan_callbacks (job_id, version, state, url, status, attempts) "
        "VALUES ($1, 1, 'COMPLETED', 'http://127.0.0.1:9/', 'DELIVERED', 1) RETURNING id",
        job_id)
    await store.pool.execute("INSERT INTO scan_callback_attempts (callback_id, job_id, attempt, "
                             "http_status) VALUES ($1, $2, 1, 200)", cb, job_id)


async def _age(store: Store, job_id: uuid.UUID, days: float) -> None:
    await store.pool.execute(
        "UPDATE scan_jobs SET finished_at = now() - make_interval(days => $2), "
        "created_at = now() - make_interval(days => $2 + 1) WHERE id = $1", job_id, days)


async def _rows(store: Store, job_id: uuid.UUID) -> tuple[int, ...]:
    row = await store.pool.fetchrow("""
        SELECT (SELECT count(*) FROM scan_jobs WHERE id = $1),
               (SELECT count(*) FROM scan_results WHERE job_id = $1),
               (SELECT count(*) FROM scan_audit_log WHERE job_id = $1),
               (SELECT count(*) FROM scan_callbacks WHERE job_id = $1),
               (SELECT count(*) FROM scan_callback_attempts WHERE job_id = $1)""", job_id)
    assert row is not None
    return tuple(row)


async def test_prune_removes_old_finished_jobs_and_nothing_else(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    old_done = [await _completed(store) for _ in range(5)]
    old_failed = await _failed(store, "INVALID_URL")
    recent_done = await _completed(store)
    for j in [*old_done, old_failed, recent_done]:
        await _with_callback(store, j)
    for j in [*old_done, old_failed]:
        await _age(store, j, 31)
    await _age(store, recent_done, 29)
    # Old but unfinished: never pruned, however old (a stuck job is the janitor's business).
    old_queued = (await _job(store)).id
    running = (await _move(store, await _job(store), State.FETCHING)).id
    await store.pool.execute("UPDATE scan_jobs SET created_at = now() - interval '90 days', "
                             "updated_at = now() - interval '90 days' "
                             "WHERE id = ANY($1::uuid[])", [old_queued, running])
    kept = {j: await _rows(store, j) for j in (recent_done, old_queued, running)}
    assert kept[recent_done] == (1, 1, 3, 1, 1)

    batches: list[int] = []
    totals = await ops.prune(store, 30 * 86400, batch=2, pause_s=0,
                             progress=lambda t: batches.append(t["jobs"]))
    assert totals == {"jobs": 6, "results": 5, "audit_rows": 16, "callbacks": 6,
                      "callback_attempts": 6, "dead_letters": 0}
    assert batches == [2, 4, 6, 6]  # in batches of 2; the last one finds nothing more
    for j in [*old_done, old_failed]:
        assert await _rows(store, j) == (0, 0, 0, 0, 0)
    for j, counts in kept.items():
        assert await _rows(store, j) == counts
    # What is left is a consistent history.
    assert await _problems(store, rds, settings, allow_active=True) == []
    assert await ops.prune(store, 30 * 86400) == dict.fromkeys(totals, 0)


async def test_prune_skips_a_job_another_transaction_holds(store: Store) -> None:
    job_id = await _completed(store)
    await _age(store, job_id, 40)
    async with store.pool.acquire() as conn, conn.transaction():
        # e.g. an operator's retry of this very job, in flight: prune does not wait for it.
        await conn.execute("SELECT 1 FROM scan_jobs WHERE id = $1 FOR UPDATE", job_id)
        done = await asyncio.wait_for(store.prune_batch(30 * 86400, 100), 5)
        assert done["jobs"] == 0
    assert (await store.prune_batch(30 * 86400, 100))["jobs"] == 1


def _consumer(settings: Settings, rds: redis.Redis) -> Consumer:
    return Consumer(rds, settings.scan_stream, settings.scan_group, "cli:test",
                    settings.dead_letter_stream, settings.dead_letter_maxlen,
                    lanes=settings.lane_weights)


def test_durations() -> None:
    assert ops.parse_duration("30d") == 30 * 86400
    assert ops.parse_duration("1.5h") == 5400
    assert ops.parse_duration(" 2W ") == 14 * 86400
    for bad in ("30", "d", "-1d", "1y", ""):
        with pytest.raises(ValueError, match="duration"):
            ops.parse_duration(bad)


async def test_retention_policy_is_bounded_per_round_and_off_at_zero(store: Store) -> None:
    jobs = [await _failed(store, "INVALID_URL") for _ in range(5)]
    for j in jobs:
        await _age(store, j, 10)
    assert await ops.prune_retained(store, 0) == 0  # RETENTION_DAYS unset: nothing
    assert await ops.prune_retained(store, 30) == 0  # nothing that old
    assert await ops.prune_retained(store, 7, max_jobs=2) == 2  # at most ~max_jobs a round
    left = await store.pool.fetchval("SELECT count(*) FROM scan_jobs")
    assert left == 3


async def test_prune_takes_the_dead_letters_of_pruned_jobs_and_check_passes(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    """A job dead-lettered long ago: its entry goes with it (check requires one to one), the
    entries of kept jobs and the entries that name no job stay."""
    await _quiet_group(rds, settings)
    old_poison = await _failed(store, "MAX_DELIVERIES")
    new_poison = await _failed(store, "MAX_DELIVERIES")
    await _age(store, old_poison, 31)
    old_entry = await _dead_letter(rds, settings, "MAX_DELIVERIES", old_poison)
    new_entry = await _dead_letter(rds, settings, "MAX_DELIVERIES", new_poison)
    junk = await _dead_letter(rds, settings, "MALFORMED_MESSAGE", None)
    assert await _problems(store, rds, settings) == []
    totals = await ops.prune(store, 30 * 86400, consumer=_consumer(settings, rds))
    assert (totals["jobs"], totals["dead_letters"]) == (1, 1)
    left = [e["id"] for e in await ops.dlq_list(_consumer(settings, rds), 10)]
    assert old_entry not in left and left == [new_entry, junk]
    assert await _problems(store, rds, settings) == []  # the full check, not --allow-active


# --- lanes and tenants ----------------------------------------------------------------------


async def _entries(rds: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in await rds.xrange(stream)]


async def test_submit_retry_and_replay_enqueue_to_the_jobs_lane_and_tenant(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    consumer = _consumer(settings, rds)
    url = "http://www.site-a.test/page"
    got = await ops.submit_scan(store, consumer, Submission(uuid.uuid4(), url, lane="bulk",
                                                            tenant="acme"), max_queued=1)
    queue = Queue.of(settings.scan_stream, "bulk", "acme").stream
    want = {"job_id": str(got.id), "lane": "bulk", "tenant": "acme",
            "domain": target_domain(url)}
    assert target_domain(url) is not None
    assert await _entries(rds, queue) == [want]
    # Over the quota: refused, and nothing reaches any stream.
    with pytest.raises(QuotaExceeded):
        await ops.submit_scan(store, consumer, Submission(uuid.uuid4(), url, lane="bulk",
                                                          tenant="acme"), max_queued=1)
    assert len(await _entries(rds, queue)) == 1
    assert await rds.exists(settings.scan_stream) == 0  # the default lane got nothing

    job = await store.get_job(got.id)
    assert job is not None
    await _move(store, job, State.FAILED, error_code="TIMEOUT")
    assert await ops.retry_jobs(store, consumer, job_ids=[got.id], state=None, error_code=None,
                                since=None, limit=10, actor="t") == (1, 0)
    assert await _entries(rds, queue) == [want, want]  # back to its own queue

    job = await store.get_job(got.id)
    assert job is not None
    await _move(store, job, State.FAILED, error_code="MAX_DELIVERIES")
    eid = await _dead_letter(rds, settings, "MAX_DELIVERIES", got.id)
    assert await ops.dlq_replay(store, consumer, [eid], "t") == (1, [])
    assert await _entries(rds, queue) == [want, want, want]

    # A job of a lane since removed from LANES is retried in the default lane.
    gone = await store.get_job(await store.insert_job(url, lane="nightly"))
    assert gone is not None
    await _move(store, gone, State.FAILED, error_code="TIMEOUT")
    assert await ops.retry_jobs(store, consumer, job_ids=[gone.id], state=None,
                                error_code=None, since=None, limit=10, actor="t") == (1, 0)
    assert await _entries(rds, settings.scan_stream) == [
        {"job_id": str(gone.id), "domain": target_domain(url)}]
    await rds.delete(settings.scan_stream)

    # A job of the default lane without a tenant: the plain stream, as before lanes.
    plain = await ops.submit_scan(store, consumer, Submission(uuid.uuid4(), url))
    assert await _entries(rds, settings.scan_stream) == [
        {"job_id": str(plain.id), "domain": target_domain(url)}]
    assert ops.max_queued(settings, None) == 0
    assert ops.max_queued(settings, "acme") == settings.tenant_max_queued


async def test_status_counts_queued_and_running_per_lane_and_tenant(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    for lane, tenant in (("bulk", "acme"), ("bulk", "acme"), (None, "zed"), (None, None)):
        await store.insert_job("http://a.test/", lane=lane, tenant=tenant)
    await _move(store, await _job(store), State.FETCHING)  # running, default lane, no tenant
    await _failed(store, "TIMEOUT")  # finished: counted nowhere
    st = await ops.fleet_status(store, rds, settings)

    def counts(rows: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
        return {k: (c["queued"], c["running"], c["done_5m"]) for k, c in rows.items()}

    assert counts(st["lanes"]) == {"interactive": (0, 0, 0), "default": (2, 1, 1),
                                   "bulk": (2, 0, 0)}
    assert list(st["lanes"]) == list(settings.lane_weights)  # priority order
    assert counts(st["tenants"]) == {"acme": (2, 0, 0), "zed": (1, 0, 0)}
    # The wait so far of each one's oldest queued job; none queued, none waiting.
    assert st["lanes"]["interactive"]["oldest_queued_s"] is None
    assert 0 <= st["lanes"]["bulk"]["oldest_queued_s"] < 60
    table = ops.status_table(st).splitlines()
    assert table[0] == "JOBS"  # the existing shape first, the new sections after it
    i = table.index("LANES                              queued  running  oldest s  done 5m")
    assert [line.split() for line in table[i + 1:i + 4]] == [
        ["interactive", "0", "0", "-", "0"],
        ["default", "2", "1", str(st["lanes"]["default"]["oldest_queued_s"]), "1"],
        ["bulk", "2", "0", str(st["lanes"]["bulk"]["oldest_queued_s"]), "0"]]
    j = table.index("TENANTS                            queued  running  oldest s  done 5m")
    assert [line.split()[:3] for line in table[j + 1:]] == [["acme", "2", "0"],
                                                           ["zed", "1", "0"]]
    assert st["queues"] == {}  # nothing was XADDed (rows inserted directly)


async def test_status_shows_every_queue_with_its_length_lag_and_pending(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    consumer = _consumer(settings, rds)
    for lane, tenant in (("bulk", "acme"), ("bulk", "acme"), ("interactive", None), (None, None)):
        await consumer.enqueue(uuid.uuid4(), lane=lane, tenant=tenant)
    interactive = Queue.of(settings.scan_stream, "interactive", None).stream
    await rds.xgroup_create(interactive, settings.scan_group, id="0")
    await rds.xreadgroup(settings.scan_group, W, {interactive: ">"}, count=1)
    st = await ops.fleet_status(store, rds, settings)
    acme = Queue.of(settings.scan_stream, "bulk", "acme").stream
    assert st["queues"] == {
        interactive: {"lane": "interactive", "tenant": None, "length": 1, "lag": 0,
                      "pending": 1},
        acme: {"lane": "bulk", "tenant": "acme", "length": 2, "lag": 2, "pending": 0}}
    assert st["stream"]["length"] == 1  # the default lane's own stream, as before
    table = ops.status_table(st)
    assert f"  queue {interactive}  length 1  lag 0  pending 1" in table
    assert f"  queue {acme}  length 2  lag 2  pending 0" in table


async def test_check_finds_unread_entries_in_lane_streams_and_tenant_queues(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    consumer = _consumer(settings, rds)
    await _quiet_group(rds, settings)
    assert await _problems(store, rds, settings, allow_active=False) == []
    await consumer.enqueue(uuid.uuid4(), lane="bulk", tenant="acme")
    tenant_queue = Queue.of(settings.scan_stream, "bulk", "acme").stream
    assert await _problems(store, rds, settings) == [
        f"{tenant_queue} has 1 entries never read"]
    await rds.delete(tenant_queue)
    lane = Queue.of(settings.scan_stream, "interactive", None).stream
    await rds.xgroup_create(lane, settings.scan_group, id="$", mkstream=True)
    await consumer.enqueue(uuid.uuid4(), lane="interactive")
    assert await _problems(store, rds, settings) == [
        f"consumer group of {lane} has lag 1 (entries never read)"]
