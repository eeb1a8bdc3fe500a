"""The janitor against real Redis, PostgreSQL and Docker: lost XADDs, stuck jobs, orphans,
one leader at a time."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import aiodocker
import pytest
import redis.asyncio as redis

from safeurl_worker.cli import wired_worker
from safeurl_worker.config import Settings
from safeurl_worker.janitor import Janitor
from safeurl_worker.models import State
from safeurl_worker.runner import Runner
from safeurl_worker.store import Store

from .conftest import FETCHER_IMAGE, docker, running_worker
from .helpers import audit, wait_terminal

pytestmark = pytest.mark.integration


async def _age(store: Store, job_id: uuid.UUID, seconds: int) -> None:
    await store.pool.execute("UPDATE scan_jobs SET updated_at = now() - make_interval(secs => $2)"
                             " WHERE id = $1", job_id, seconds)


async def _deliver_something(rds: redis.Redis, settings: Settings) -> None:
    """Move the group's last-delivered id to now, as live traffic would."""
    await rds.xgroup_create(settings.scan_stream, settings.scan_group, id="0", mkstream=True)
    await rds.xadd(settings.scan_stream, {"job_id": "filler"})
    await rds.xreadgroup(settings.scan_group, "someone", {settings.scan_stream: ">"}, count=10)


async def test_lost_xadd_is_requeued_and_then_completes(
        make_settings: type[Settings], store: Store, rds: redis.Redis) -> None:
    settings = make_settings(requeue_after_s=30)
    await _deliver_something(rds, settings)
    lost = await store.insert_job("http://site-a.test/")  # the API crashed before its XADD
    fresh = await store.insert_job("http://site-a.test/")  # too young to judge
    await _age(store, lost, 3600)
    async with wired_worker(settings) as worker:
        assert worker.janitor is not None
        done = await worker.janitor.run_once()
    assert done["requeued"] == 1
    assert await audit(store, lost) == [("QUEUED", "QUEUED", 1)]
    assert await audit(store, fresh) == []
    entries = await rds.xrange(settings.scan_stream)
    assert [f[b"job_id"] for _, f in entries].count(str(lost).encode()) == 1
    await rds.xack(settings.scan_stream, settings.scan_group,
                   *[m for m, f in entries if f[b"job_id"] == b"filler"])
    async with running_worker(settings):
        assert (await wait_terminal(store, lost))["state"] == "COMPLETED"


async def test_stuck_job_without_a_lease_is_recovered(
        make_settings: type[Settings], store: Store, rds: redis.Redis) -> None:
    settings = make_settings(container_timeout_ms=1000, max_attempts=1, lease_timeout_ms=1000,
                             lease_renew_ms=200)
    await _deliver_something(rds, settings)
    job_id = await store.insert_job("http://site-a.test/")
    job = await store.get_job(job_id)
    assert job is not None
    await store.transition(job, State.FETCHING, worker_id="dead-worker", add_attempt=True)
    await _age(store, job_id, 3600)  # its worker died and its message is gone
    async with wired_worker(settings) as worker:
        assert worker.janitor is not None
        assert (await worker.janitor.run_once())["recovered"] == 0  # Redis not yet steady
        await asyncio.sleep(settings.lease_timeout_ms / 1000)
        assert (await worker.janitor.run_once())["recovered"] == 1
    trail = await audit(store, job_id)
    assert trail == [("QUEUED", "FETCHING", 1), ("FETCHING", "QUEUED", 2)]
    detail = await store.pool.fetchval(
        "SELECT detail->>'janitor' FROM scan_audit_log WHERE job_id=$1 AND version=2", job_id)
    assert "owner gone" in detail


async def test_orphan_containers_are_removed(
        make_settings: type[Settings], store: Store) -> None:
    settings = make_settings(orphan_after_s=1)
    orphan = uuid.uuid4()
    cid = docker("create", "--label", f"safeurl.job_id={orphan}", "--entrypoint", "true",
                 FETCHER_IMAGE)
    try:
        await asyncio.sleep(1.5)
        async with wired_worker(settings) as worker:
            assert worker.janitor is not None
            assert (await worker.janitor.run_once())["containers_removed"] >= 1
        assert docker("ps", "-aq", "--filter", f"id={cid}") == ""
    finally:
        docker("rm", "-f", cid, check=False)


async def test_never_started_warm_containers_of_a_dead_worker_are_removed(
        make_settings: type[Settings], store: Store) -> None:
    settings = make_settings(orphan_after_s=1)
    client = aiodocker.Docker(url="unix:///var/run/docker.sock")
    dead = Runner(make_settings(worker_id=f"dead-{uuid.uuid4().hex[:6]}"), client)
    try:
        await dead._make_warm()  # then its worker dies: nobody removes them
        await dead._make_warm()
        warm = [w.container.id for w in dead._warm]
        await asyncio.sleep(1.5)
        async with wired_worker(settings) as worker:
            assert worker.janitor is not None
            assert (await worker.janitor.run_once())["containers_removed"] >= 2
        for cid in warm:
            assert docker("ps", "-aq", "--filter", f"id={cid}") == ""
    finally:
        for w in dead._warm:
            docker("rm", "-f", w.container.id, check=False)
        await client.close()


async def test_one_janitor_leads_at_a_time(
        make_settings: type[Settings], store: Store) -> None:
    a, b = make_settings(worker_id="jan-a"), make_settings(worker_id="jan-b")
    async with wired_worker(a) as wa, wired_worker(b) as wb:
        assert wa.janitor is not None and wb.janitor is not None
        assert await wa.janitor._leader(ttl_ms=5000)
        assert not await wb.janitor._leader(ttl_ms=5000)
        assert await wa.janitor._leader(ttl_ms=5000)  # the leader renews its lock
        await wa.consumer.redis.delete(wa.janitor.lock_key)  # the leader died: lock expired
        assert await wb.janitor._leader(ttl_ms=5000)
        await wb.consumer.redis.delete(wb.janitor.lock_key)


async def test_retention_days_prunes_old_finished_jobs(
        make_settings: type[Settings], store: Store, rds: redis.Redis) -> None:
    """RETENTION_DAYS: the janitor prunes finished jobs past it, never unfinished ones; 0 keeps
    everything."""
    ids = [await store.insert_job("http://site-a.test/") for _ in range(3)]
    for job_id in ids[::2]:  # two finished jobs; the middle one stays QUEUED
        job = await store.get_job(job_id)
        assert job is not None
        assert await store.transition(job, State.FAILED, worker_id="t", detail={},
                                      error_code="INVALID_URL") is not None
    old_done, old_queued, recent_done = ids
    await store.pool.execute("UPDATE scan_jobs SET finished_at = now() - interval '10 days', "
                             "updated_at = now() - interval '10 days', "
                             "created_at = now() - interval '10 days' WHERE id = ANY($1::uuid[])",
                             [old_done, old_queued])
    for days, pruned in ((0, 0), (7, 1)):
        async with wired_worker(make_settings(retention_days=days)) as worker:
            assert worker.janitor is not None
            done = await worker.janitor.run_once()
        assert done["pruned"] == pruned
    assert await store.get_job(old_done) is None
    assert await store.get_job(old_queued) is not None
    assert await store.get_job(recent_done) is not None


async def test_a_cancel_that_a_client_library_turns_into_an_error_still_ends_the_loop() -> None:
    """redis-py and asyncpg may surface a cancel that lands mid-command as a connection error;
    the janitor's "a bad round must not stop me" must not swallow the worker's stop with it
    (a worker once waited forever for its janitor at shutdown)."""
    janitor = Janitor.__new__(Janitor)  # only what loop() uses
    janitor.settings = Settings(janitor_interval_s=0.01)
    janitor.consumer = SimpleNamespace(data_lost=asyncio.Event())  # type: ignore[assignment]

    async def leader(ttl_ms: int) -> bool:
        return True

    async def a_round(after_data_loss: bool = False) -> dict[str, int]:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ConnectionError("Connection closed by server.") from None
        return {}

    janitor._leader = leader  # type: ignore[method-assign]
    janitor.run_once = a_round  # type: ignore[method-assign]
    task = asyncio.create_task(janitor.loop())
    await asyncio.sleep(0.05)  # inside a round
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done and task.cancelled()
