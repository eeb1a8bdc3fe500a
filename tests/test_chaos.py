"""Chaos: real worker processes, killed and starved of their dependencies; then the invariants.

Each test runs `safeurl-worker run` as separate processes against the real services, does
violence (SIGKILL a replica, restart Redis, restart PostgreSQL, stop dockerd, SIGTERM), waits for
every job to settle and runs `safeurl-worker check`. Figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis

from safeurl_worker.config import Settings
from safeurl_worker.store import Store

from .conftest import ADMIN_DSN, ROOT, TestNet
from .helpers import (
    Fleet,
    check,
    janitor_jobs,
    pending,
    submit,
    wait_all_terminal,
    wait_terminal,
    wait_until,
)

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


async def finished_by(store: Store, job_ids: set[str], victim: str) -> set[str]:
    rows = await store.pool.fetch(
        "SELECT id FROM scan_jobs WHERE id = ANY($1::uuid[]) AND worker_id = $2 "
        "AND state IN ('COMPLETED', 'FAILED', 'TIMED_OUT')", [uuid.UUID(j) for j in job_ids],
        victim)
    return {str(r["id"]) for r in rows}


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
            # A statement the victim sent just before it died still commits: a job it thereby
            # finished is not left for others (its message comes back as a duplicate).
            active -= await finished_by(store, active, victim)
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
    assert janitor_jobs(await check(s)) == 0
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
    assert janitor_jobs(await check(s)) == 0  # the outage destroyed no Redis data


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


_DOCKERD_PID = Path("/run/safeurl/dockerd.pid")
STOP_DOCKERD = ["bash", "-c", f"kill -TERM $(cat {_DOCKERD_PID}); "
                f"while kill -0 $(cat {_DOCKERD_PID}) 2>/dev/null; do sleep 0.2; done"]


async def test_dockerd_stopped_for_ten_seconds(fleet: Fleet, fleet_settings: Settings,
                                               store: Store, rds: redis.Redis,
                                               testnet: TestNet) -> None:
    try:
        await _outage(fleet, fleet_settings, store, rds, STOP_DOCKERD, [*SERVICES, "docker"], 10)
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
    assert janitor_jobs(await check(s)) == 0
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
    assert janitor_jobs(await check(s)) == 0


# --- faults the first suite never tried (issue 11) ------------------------------------------
# Shorter leases (renew 1 s, timeout 4 s) keep these bounded; every test ends with `check`, and
# asserts that no job needed the janitor unless the fault destroyed Redis data.

@pytest.fixture
def fast(make_settings: type[Settings]) -> Settings:
    return make_settings(worker_concurrency=4, lease_renew_ms=1000, lease_timeout_ms=4000,
                         container_timeout_ms=20000, shutdown_grace_s=10)


@pytest.fixture
def fast_fleet(fast: Settings, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(fast, tmp_path)
    yield f
    f.stop_all()


async def settle_and_check(fleet: Fleet, s: Settings, store: Store, ids: list[uuid.UUID],
                           janitor_allowed: bool = False, timeout: float = 180) -> str:
    await wait_all_terminal(store, ids, timeout=timeout)
    # Every entry gets acked too: duplicates and set-aside copies within a renewal, and the
    # entries of a replica that could not hand them back once a survivor takes them over.
    rds = redis.Redis.from_url(s.redis_dsn)
    try:
        await wait_until(lambda: pending(rds, s), 0, timeout=3 * s.lease_timeout_ms / 1000 + 10)
    finally:
        await rds.aclose()
    fleet.stop_all()
    out = await check(s)
    if not janitor_allowed:
        assert janitor_jobs(out) == 0, out
    return out


async def states(store: Store, ids: list[uuid.UUID]) -> dict[str, int]:
    rows = await store.pool.fetch("SELECT state, error_code, count(*) AS n FROM scan_jobs "
                                  "WHERE id = ANY($1::uuid[]) GROUP BY 1, 2", ids)
    return {f"{r['state']}/{r['error_code']}": r["n"] for r in rows}


async def test_worker_waits_for_postgres_at_startup_and_honours_sigterm_meanwhile(
        fast_fleet: Fleet, fast: Settings, store: Store, rds: redis.Redis) -> None:
    await sh(_pg_ctl("stop", "-m", "fast", "-w"))
    port = free_port()
    try:
        early = fast_fleet.start("s0")
        fast_fleet.start("s1", METRICS_PORT=str(port))
        await asyncio.sleep(4)
        assert sorted(fast_fleet.alive()) == ["s0", "s1"], fast_fleet.log("s1")[-2000:]
        assert "waiting for postgres" in fast_fleet.log("s1")
        status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and "postgres" in body["reasons"], body  # not ready, and why
        t0 = time.monotonic()
        early.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(early.wait, 10) == 0
        assert time.monotonic() - t0 < 3
    finally:
        await sh([*SERVICES, "postgres"])
    ids = await submit_many(store, rds, fast, 12)
    await settle_and_check(fast_fleet, fast, store, ids)
    assert await states(store, ids) == {"COMPLETED/None": 12}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def test_stream_deleted_mid_run_is_recreated_and_lost_jobs_recovered(
        fast_fleet: Fleet, fast: Settings, store: Store, rds: redis.Redis) -> None:
    for w in ("d1", "d2"):
        fast_fleet.start(w)
    ids = await submit_many(store, rds, fast, 40)
    await wait_until_holding(rds, fast, "d1", minimum=1)
    await rds.delete(fast.scan_stream)  # a DEL, or a failover that lost the key
    more = await submit_many(store, rds, fast, 10)  # the API goes on: XADD recreates it
    await wait_all_terminal(store, ids + more, timeout=120)  # no new traffic needed after this
    assert sorted(fast_fleet.alive()) == ["d1", "d2"], "a worker exited"
    await settle_and_check(fast_fleet, fast, store, ids + more, janitor_allowed=True)
    assert await states(store, ids + more) == {"COMPLETED/None": 50}


@pytest.fixture
async def empty_redis_restart() -> AsyncIterator[list[str]]:
    """Stop Redis, throw its data away, start it again: an empty restart."""
    cmd = ["bash", "-c", "redis-cli -h 127.0.0.1 shutdown nosave; "
                         "rm -rf /var/lib/safeurl/redis/appendonlydir /var/lib/safeurl/redis/*.aof"]
    yield cmd
    await sh([*SERVICES, "redis"])


async def test_redis_restarts_empty(fast_fleet: Fleet, fast: Settings, store: Store,
                                    rds: redis.Redis, empty_redis_restart: list[str]) -> None:
    for w in ("e1", "e2"):
        fast_fleet.start(w)
    ids = await submit_many(store, rds, fast, 40)
    await wait_until_holding(rds, fast, "e1", minimum=1)
    await sh(empty_redis_restart)
    await asyncio.sleep(2)
    await sh([*SERVICES, "redis"])
    # Nothing new is submitted: every job must be found again from PostgreSQL.
    await wait_all_terminal(store, ids, timeout=120)
    assert sorted(fast_fleet.alive()) == ["e1", "e2"], "a worker exited"
    await settle_and_check(fast_fleet, fast, store, ids, janitor_allowed=True)
    assert await states(store, ids) == {"COMPLETED/None": 40}


async def test_lost_xadd_on_a_quiet_system_is_requeued(
        make_settings: type[Settings], store: Store, rds: redis.Redis, tmp_path: Path) -> None:
    s = make_settings(requeue_after_s=3, lease_renew_ms=1000, lease_timeout_ms=4000)
    fleet = Fleet(s, tmp_path)
    try:
        fleet.start("q1")
        ids = [await store.insert_job("http://site-a.test/") for _ in range(3)]  # no XADD
        out = await settle_and_check(fleet, s, store, ids, janitor_allowed=True, timeout=60)
    finally:
        fleet.stop_all()
    assert janitor_jobs(out) == 3  # the janitor was the only way: it must say so
    assert await states(store, ids) == {"COMPLETED/None": 3}


async def test_job_that_kills_its_worker_is_dead_lettered_across_same_id_restarts(
        make_settings: type[Settings], store: Store, rds: redis.Redis, tmp_path: Path) -> None:
    s = make_settings(max_deliveries=3, lease_renew_ms=1000, lease_timeout_ms=4000)
    fleet = Fleet(s, tmp_path)
    try:
        fleet.start("k1")
        job = await submit(store, rds, s, "http://site-a.test/slow")
        for faults in range(3):  # the job is running on k1: it "takes k1 down"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                row = await store.pool.fetchrow("SELECT state, faults FROM scan_jobs "
                                                "WHERE id=$1", job)
                if row["state"] == "FETCHING" and row["faults"] == faults:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"never running with {faults} faults: {dict(row)}")
            fleet.procs["k1"].send_signal(signal.SIGKILL)
            fleet.procs["k1"].wait()
            fleet.start("k1")  # what compose and Kubernetes do: same WORKER_ID
        final = await wait_terminal(store, job, timeout=60)
        out = await settle_and_check(fleet, s, store, [job])
    finally:
        fleet.stop_all()
    assert (final["state"], final["error_code"], final["faults"]) == ("FAILED",
                                                                      "MAX_DELIVERIES", 2)
    dead = [f for _, f in await rds.xrange(s.dead_letter_stream)]
    assert [(f[b"job_id"], f[b"reason"]) for f in dead] == [(str(job).encode(),
                                                             b"MAX_DELIVERIES")]
    assert "janitor repaired 0" in out


def _db_name(settings: Settings) -> str:
    return settings.database_url.rsplit("/", 1)[1]


async def _set_read_only(settings: Settings, store: Store, on: bool) -> None:
    """Make the test's database refuse writes (as after a failover, or a full disk), and
    drop its sessions so every new one sees it (the test's own pool reconnects too)."""
    db = _db_name(settings)
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        value = "SET default_transaction_read_only = on" if on else \
            "RESET default_transaction_read_only"
        await admin.execute(f'ALTER DATABASE "{db}" {value}')
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = $1 AND pid <> pg_backend_pid()", db)
    finally:
        await admin.close()
    await store.pool.expire_connections()


async def test_postgres_refusing_writes_fails_no_job(
        fast_fleet: Fleet, fast: Settings, store: Store, rds: redis.Redis) -> None:
    for w in ("ro1", "ro2"):
        fast_fleet.start(w)
    ids = await submit_many(store, rds, fast, 40)
    await wait_until_holding(rds, fast, "ro1", minimum=2)
    await _set_read_only(fast, store, True)
    try:
        await asyncio.sleep(10)  # longer than a lease: nothing may be taken over or failed
    finally:
        await _set_read_only(fast, store, False)
    await settle_and_check(fast_fleet, fast, store, ids)
    assert await states(store, ids) == {"COMPLETED/None": 40}
    faulted = await store.pool.fetch(
        "SELECT a.job_id, a.from_state, a.to_state, a.worker_id, a.detail::text"
        " FROM scan_audit_log a JOIN scan_jobs j ON j.id = a.job_id"
        " WHERE j.faults > 0 ORDER BY a.id")
    logs = "\n".join(fast_fleet.log(w) for w in ("ro1", "ro2"))
    # Nothing was counted against any job; if something was, say which path counted it.
    assert not faulted, f"faults counted: {[tuple(r) for r in faulted]}\n{logs}"


def _pid(name: str) -> int:
    return int(Path(f"/run/safeurl/{name}.pid").read_text())


async def test_redis_hung_longer_than_a_lease_keeps_live_owners(
        fast_fleet: Fleet, fast: Settings, store: Store, rds: redis.Redis) -> None:
    for w in ("h1", "h2"):
        fast_fleet.start(w)
    ids = await submit_many(store, rds, fast, 30)
    await wait_until_holding(rds, fast, "h1", minimum=2)
    pid = _pid("redis")
    os.kill(pid, signal.SIGSTOP)  # stopped, not dead: connections hang
    try:
        await asyncio.sleep(fast.lease_timeout_ms / 1000 + 4)
    finally:
        os.kill(pid, signal.SIGCONT)
    await settle_and_check(fast_fleet, fast, store, ids)
    assert await states(store, ids) == {"COMPLETED/None": 30}
    taken = await store.pool.fetchval("SELECT count(*) FROM scan_audit_log "
                                      "WHERE detail ? 'taken_from'")
    assert taken == 0  # both owners were alive all along: nobody lost a job


async def test_a_stalled_worker_loses_its_jobs_and_gives_them_up_when_it_resumes(
        fast_fleet: Fleet, fast: Settings, store: Store, rds: redis.Redis) -> None:
    for w in ("z1", "z2"):
        fast_fleet.start(w)
    ids = await submit_many(store, rds, fast, 30)
    # A 2 s page claimed under a second ago: z1 is certainly in the middle of that scan.
    running_on_z1 = ("SELECT count(*) FROM scan_jobs WHERE worker_id = 'z1' AND state = "
                     "'FETCHING' AND url LIKE '%/slow' AND updated_at > now() - interval '1 s'")
    deadline = time.monotonic() + 60
    while not await store.pool.fetchval(running_on_z1):
        assert time.monotonic() < deadline, "z1 never ran a job"
        await asyncio.sleep(0.02)
    z1 = fast_fleet.procs["z1"]
    z1.send_signal(signal.SIGSTOP)  # a long GC pause, a frozen VM: alive but silent
    try:
        await asyncio.sleep(fast.lease_timeout_ms / 1000 + 4)
    finally:
        z1.send_signal(signal.SIGCONT)
    await settle_and_check(fast_fleet, fast, store, ids)
    assert await states(store, ids) == {"COMPLETED/None": 30}
    taken = await store.pool.fetchval("SELECT count(*) FROM scan_audit_log "
                                      "WHERE detail->>'taken_from' = 'z1'")
    assert taken >= 1


async def _sigterm_while_down(fleet: Fleet, s: Settings, store: Store, rds: redis.Redis,
                              name: str, stop: list[str], start: list[str]) -> None:
    """SIGTERM a replica holding jobs while a dependency is down: it must exit 0 within the
    grace period, and a replica started afterwards finishes every job."""
    p = fleet.start(f"{name}1")
    ids = await submit_many(store, rds, s, 8)
    await wait_until_holding(rds, s, f"{name}1", minimum=1)
    await sh(stop)
    try:
        await asyncio.sleep(1.5)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(p.wait, s.shutdown_grace_s + 10)
        took = time.monotonic() - t0
    finally:
        await sh(start)
    assert code == 0 and took < s.shutdown_grace_s + 2, (code, took, fleet.log(f"{name}1")[-2000:])
    fleet.start(f"{name}2")
    await settle_and_check(fleet, s, store, ids)
    assert await states(store, ids) == {"COMPLETED/None": 8}


async def test_sigterm_is_honoured_while_docker_is_down(
        fast_fleet: Fleet, fast: Settings, store: Store, rds: redis.Redis,
        testnet: TestNet) -> None:
    await _sigterm_while_down(fast_fleet, fast, store, rds, "sd", STOP_DOCKERD,
                              [*SERVICES, "docker"])


async def test_sigterm_is_honoured_while_redis_is_down(
        fast_fleet: Fleet, fast: Settings, store: Store, rds: redis.Redis,
        fresh_rds: None) -> None:
    await _sigterm_while_down(fast_fleet, fast, store, rds, "sr",
                              ["redis-cli", "-h", "127.0.0.1", "shutdown"], [*SERVICES, "redis"])


async def test_hung_docker_daemon_is_never_the_targets_timeout(
        make_settings: type[Settings], store: Store, rds: redis.Redis, tmp_path: Path,
        testnet: TestNet) -> None:
    s = make_settings(worker_concurrency=4, lease_renew_ms=1000, lease_timeout_ms=4000,
                      container_timeout_ms=6000, shutdown_grace_s=10)
    fleet = Fleet(s, tmp_path)
    pid = _pid("dockerd")
    try:
        fleet.start("hd1")
        ids = await submit_many(store, rds, s, 12)
        await wait_until_holding(rds, s, "hd1", minimum=2)
        os.kill(pid, signal.SIGSTOP)  # hung, not dead: every API call just waits
        try:
            await asyncio.sleep(s.container_timeout_ms / 1000 + 6)
        finally:
            os.kill(pid, signal.SIGCONT)
        await settle_and_check(fleet, s, store, ids)
    finally:
        fleet.stop_all()
    assert await states(store, ids) == {"COMPLETED/None": 12}  # no TIMED_OUT among them
