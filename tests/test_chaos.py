"""Chaos: real worker processes, killed and starved of their dependencies; then the invariants.

Each test runs `safeurl-worker run` as separate processes against the real services, does
violence (SIGKILL a replica, restart Redis, restart PostgreSQL, stop dockerd, SIGTERM), waits for
every job to settle and runs `safeurl-worker check`. Figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis

from safeurl_worker.config import Settings
from safeurl_worker.store import Store

from .conftest import ROOT, TestNet
from .helpers import Fleet, check, submit, wait_all_terminal

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
SERVICES = ["bash", str(ROOT / "scripts" / "services.sh")]


async def sh(cmd: list[str], timeout: float = 120) -> None:
    """Run an admin command (stop/start a service) without blocking the event loop."""
    await asyncio.to_thread(subprocess.run, cmd, check=True, capture_output=True,
                            timeout=timeout)


@pytest.fixture
def fleet_settings(make_settings: type[Settings]) -> Settings:
    # Default lease settings (5 s renew, 15 s timeout): the figures printed are the real ones.
    return make_settings(worker_concurrency=4, lease_renew_ms=5000, lease_timeout_ms=15000,
                         container_timeout_ms=20000, shutdown_grace_s=25)


@pytest.fixture
def fleet(fleet_settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(fleet_settings, tmp_path)
    yield f
    f.stop_all()


async def held_by(rds: redis.Redis, settings: Settings, worker_id: str) -> list[str]:
    try:
        rows = await rds.xpending_range(settings.scan_stream, settings.scan_group, min="-",
                                        max="+", count=1000, consumername=worker_id)
    except redis.ResponseError:  # NOGROUP: the workers have not created the group yet
        return []
    return [r["message_id"].decode() for r in rows]


async def wait_until_holding(rds: redis.Redis, settings: Settings, worker_id: str,
                             minimum: int = 2, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = await held_by(rds, settings, worker_id)
        if len(held) >= minimum:
            return held
        await asyncio.sleep(0.05)
    raise AssertionError(f"{worker_id} never held {minimum} messages")


async def job_ids_of(rds: redis.Redis, settings: Settings, message_ids: list[str]) -> list[str]:
    out = []
    for mid in message_ids:
        for _, fields in await rds.xrange(settings.scan_stream, min=mid, max=mid):
            out.append(fields[b"job_id"].decode())
    return out


async def restart_times(store: Store, job_ids: set[str], victim: str,
                        killed_at: float) -> list[float]:
    """Seconds from the kill to the first write by another replica on each of the jobs."""
    rows = await store.pool.fetch(
        "SELECT job_id, min(extract(epoch FROM at)) AS t FROM scan_audit_log "
        "WHERE job_id = ANY($1::uuid[]) AND worker_id <> $2 AND at > to_timestamp($3) "
        "GROUP BY job_id", [uuid.UUID(j) for j in job_ids], victim, killed_at)
    return sorted(float(r["t"]) - killed_at for r in rows)


# A mix of pages; /slow answers after 2 s so that replicas are caught holding jobs.
URLS = ["http://site-a.test/", "http://site-a.test/slow", "http://site-a.test/login",
        "http://site-a.test/chain", "http://site-a.test/meta", "http://site-a.test/download.exe"]


async def submit_many(store: Store, rds: redis.Redis, settings: Settings,
                      n: int) -> list[uuid.UUID]:
    return [await submit(store, rds, settings, URLS[i % len(URLS)]) for i in range(n)]


async def test_sigkill_replicas_jobs_restart_elsewhere(
        fleet: Fleet, fleet_settings: Settings, store: Store, rds: redis.Redis) -> None:
    s = fleet_settings
    for w in ("r1", "r2", "r3"):
        fleet.start(w)
    ids = await submit_many(store, rds, s, 200)
    figures = []
    for victim in ("r1", "r2"):
        held = await wait_until_holding(rds, s, victim)
        killed_at = time.time()
        fleet.procs[victim].send_signal(signal.SIGKILL)
        fleet.procs[victim].wait()
        # Jobs it finished but had not acked come back as terminal skips, not restarts: only
        # the ones it left unfinished must be taken over (claimed ones and not yet claimed).
        active = {str(r["id"]) for r in await store.pool.fetch(
            "SELECT id FROM scan_jobs WHERE id = ANY($1::uuid[]) AND state IN "
            "('QUEUED', 'FETCHING', 'ANALYZING')",
            [uuid.UUID(j) for j in await job_ids_of(rds, s, held)])}
        assert active, f"{victim} held no unfinished job when killed"
        deadline = time.monotonic() + 2 * s.lease_timeout_ms / 1000 + 30
        times: list[float] = []
        while time.monotonic() < deadline and len(times) < len(active):
            await asyncio.sleep(0.2)
            times = await restart_times(store, active, victim, killed_at)
        assert len(times) == len(active), f"{victim}: {len(times)}/{len(active)} restarted"
        figures.append((victim, len(active), times))
        if victim == "r1":
            fleet.start("r4")  # a replacement replica, as an orchestrator would start
    await wait_all_terminal(store, ids, timeout=240)
    await asyncio.sleep(1)
    fleet.stop_all()
    for victim, n, times in figures:
        print(f"\n[chaos] SIGKILL {victim} holding {n} jobs: restart after kill "
              f"p50={times[len(times) // 2]:.1f}s max={max(times):.1f}s "
              f"(lease timeout {s.lease_timeout_ms / 1000:.0f}s)")
        assert max(times) < 2 * s.lease_timeout_ms / 1000
    await asyncio.sleep(0.5)
    await check(s)
    done = await store.pool.fetchval("SELECT count(*) FROM scan_jobs WHERE state='COMPLETED'")
    assert done == 200


async def _outage(fleet: Fleet, s: Settings, store: Store, rds: redis.Redis,
                  stop: list[str], start: list[str], down_s: float) -> None:
    for w in ("o1", "o2"):
        fleet.start(w)
    ids = await submit_many(store, rds, s, 60)
    await wait_until_holding(rds, s, "o1", minimum=1)
    await sh(stop)
    await asyncio.sleep(down_s)
    await sh(start)
    more = await submit_many(store, rds, s, 20)
    await wait_all_terminal(store, ids + more, timeout=240)
    assert fleet.alive() == ["o1", "o2"], "a worker exited during the outage"
    await asyncio.sleep(1)
    fleet.stop_all()
    await check(s)


@pytest.fixture
async def fresh_rds() -> AsyncIterator[None]:
    yield
    # Make sure the shared Redis is up for the tests after this one, whatever happened.
    await sh([*SERVICES, "redis"])


async def test_redis_restart_mid_run(fleet: Fleet, fleet_settings: Settings, store: Store,
                                     rds: redis.Redis, fresh_rds: None) -> None:
    await _outage(fleet, fleet_settings, store, rds,
                  ["redis-cli", "-h", "127.0.0.1", "shutdown"], [*SERVICES, "redis"], 3)


def _pg_ctl(*args: str) -> list[str]:
    ctl = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
    return ["runuser", "-u", "postgres", "--", str(ctl), "-D", "/var/lib/safeurl/pg", *args]


async def test_postgres_restart_mid_run(fleet: Fleet, fleet_settings: Settings, store: Store,
                                        rds: redis.Redis) -> None:
    try:
        await _outage(fleet, fleet_settings, store, rds, _pg_ctl("stop", "-m", "fast", "-w"),
                      [*SERVICES, "postgres"], 3)
    finally:
        await sh([*SERVICES, "postgres"])


async def test_dockerd_stopped_for_ten_seconds(fleet: Fleet, fleet_settings: Settings,
                                               store: Store, rds: redis.Redis,
                                               testnet: TestNet) -> None:
    pid = Path("/run/safeurl/dockerd.pid")
    stop = ["bash", "-c", f"kill -TERM $(cat {pid}); while kill -0 $(cat {pid}) 2>/dev/null; "
                          "do sleep 0.2; done"]
    try:
        await _outage(fleet, fleet_settings, store, rds, stop, [*SERVICES, "docker"], 10)
    finally:
        await sh([*SERVICES, "docker"])


async def test_sigterm_drains_in_flight_and_exits_zero(
        fleet: Fleet, fleet_settings: Settings, store: Store, rds: redis.Redis) -> None:
    s = fleet_settings
    p = fleet.start("t1")
    ids = await submit_many(store, rds, s, 12)
    held = await wait_until_holding(rds, s, "t1", minimum=2)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(p.wait, s.shutdown_grace_s + 10)
    took = time.monotonic() - t0
    assert code == 0, fleet.log("t1")[-2000:]
    assert took < s.shutdown_grace_s + 2
    states = await store.pool.fetch("SELECT id, state FROM scan_jobs WHERE id = ANY($1::uuid[])",
                                    [uuid.UUID(j) for j in await job_ids_of(rds, s, held)])
    assert all(r["state"] == "COMPLETED" for r in states), states  # in-flight ones finished
    fleet.start("t2")  # the rest is served by another replica: nothing lost
    await wait_all_terminal(store, ids, timeout=120)
    await asyncio.sleep(1)
    fleet.stop_all()
    await check(s)
    print(f"\n[chaos] SIGTERM drained {len(held)} in-flight jobs and exited 0 in {took:.1f}s")


async def test_poison_messages_and_crashing_containers(
        make_settings: type[Settings], store: Store, rds: redis.Redis, crash_image: str,
        tmp_path: Path) -> None:
    s = make_settings(worker_concurrency=4, unknown_job_retries=2, unknown_job_delay_ms=100)
    crashing = make_settings(worker_concurrency=4, fetcher_image=crash_image, max_attempts=2,
                             scan_stream=s.scan_stream, dead_letter_stream=s.dead_letter_stream)
    fleet = Fleet(s, tmp_path)
    try:
        fleet.start("p1")
        await rds.xadd(s.scan_stream, {"job_id": "garbage"})
        await rds.xadd(s.scan_stream, {"nothing": "here"})
        ghost = uuid.uuid4()
        await rds.xadd(s.scan_stream, {"job_id": str(ghost)})
        good = await submit_many(store, rds, s, 10)
        await wait_all_terminal(store, good, timeout=120)
        fleet.stop_all()
        # A replica whose fetcher image always crashes: jobs end FAILED CONTAINER_ERROR.
        fleet = Fleet(crashing, tmp_path)
        fleet.start("p2")
        bad = await submit(store, rds, crashing, "http://site-a.test/")
        await wait_all_terminal(store, [bad], timeout=120)
        fleet.stop_all()
    finally:
        fleet.stop_all()
    row = await store.pool.fetchrow("SELECT state, error_code, attempts FROM scan_jobs "
                                    "WHERE id=$1", bad)
    assert (row["state"], row["error_code"], row["attempts"]) == ("FAILED", "CONTAINER_ERROR", 2)
    dead = await rds.xrange(s.dead_letter_stream)
    reasons = sorted(f[b"reason"].decode() for _, f in dead)
    assert reasons == ["MALFORMED_MESSAGE", "MALFORMED_MESSAGE", "UNKNOWN_JOB"]
    assert any(f.get(b"job_id") == str(ghost).encode() for _, f in dead)
    await asyncio.sleep(0.5)
    await check(s)
