"""Scheduling with real worker processes and real containers: lanes, tenants, politeness.

  * a bulk flood of one tenant does not hold back another tenant's interactive scan, nor a
    small tenant's bulk scans (they take turns with the flood inside the bulk lane)
  * 50 scans of one domain over three replicas never have more than PER_DOMAIN_CONCURRENCY in
    flight (from the audit trail and from the containers seen), the deferred ones keep their
    messages and complete, and `check` holds after SIGKILL of a replica holding deferred jobs
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from safeurl_worker.config import Settings
from safeurl_worker.consumer import Consumer
from safeurl_worker.politeness import target_domain
from safeurl_worker.store import Store
from safeurl_worker.wiring import consumer_for

from .helpers import Fleet, check, wait_all_terminal, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
TERMINAL = ("COMPLETED", "FAILED", "TIMED_OUT")


@pytest.fixture
async def consumer(settings: Settings) -> AsyncIterator[Consumer]:
    c = consumer_for(settings, name="test-api")
    yield c
    await c.redis.aclose()


async def submit(store: Store, consumer: Consumer, url: str, lane: str | None = None,
                 tenant: str | None = None) -> uuid.UUID:
    """What `safeurl-worker api` does: the row with its lane and tenant, then the XADD."""
    job_id = await store.insert_job(url, lane=lane, tenant=tenant)
    await consumer.enqueue(job_id, lane=lane, tenant=tenant, domain=target_domain(url))
    return job_id


async def started_at(store: Store, job_id: uuid.UUID) -> float:
    """Seconds from submission to the job's first claim (its first FETCHING)."""
    t = await store.pool.fetchval(
        "SELECT extract(epoch FROM min(a.at) - j.created_at) FROM scan_audit_log a "
        "JOIN scan_jobs j ON j.id = a.job_id WHERE a.job_id = $1 AND a.to_state = 'FETCHING' "
        "GROUP BY j.created_at", job_id)
    return float(t)


async def _fewer(store: Store, ids: list[uuid.UUID], n: int) -> bool:
    return await queued(store, ids) < n


async def queued(store: Store, ids: list[uuid.UUID]) -> int:
    return int(await store.pool.fetchval(
        "SELECT count(*) FROM scan_jobs WHERE id = ANY($1) AND state = 'QUEUED'", ids))


@pytest.fixture
def fleet(settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(settings, tmp_path)
    yield f
    f.stop_all()


@pytest.fixture
def settings(make_settings: type[Settings]) -> Settings:
    return make_settings(worker_concurrency=2, lease_renew_ms=500, lease_timeout_ms=2000,
                         container_timeout_ms=15000, shutdown_grace_s=10)


# Bound on an interactive scan's wait behind a bulk flood: every slot may be busy with a bulk
# scan, so it waits for the first of them to finish (a scan here takes 0.3-2 s on a loaded
# 2-core machine), plus a read. Without lanes it would wait for the whole flood ahead of it.
INTERACTIVE_WAIT_BOUND_S = 4.0


async def test_a_bulk_flood_holds_back_neither_interactive_scans_nor_small_tenants(
        fleet: Fleet, settings: Settings, store: Store, consumer: Consumer) -> None:
    fleet.start("w1")
    fleet.start("w2")
    flood = [await submit(store, consumer, "http://site-a.test/", "bulk", "bulkco")
             for _ in range(60)]
    # The flood is running: some of it claimed.
    await wait_until(lambda: _fewer(store, flood, 57), True, timeout=60)
    small = [await submit(store, consumer, "http://site-c.test/", "bulk", "smallco")
             for _ in range(3)]
    waits = []
    for _ in range(3):
        job = await submit(store, consumer, "http://site-b.test/", "interactive", "acme")
        await wait_all_terminal(store, [job], timeout=60)
        waits.append(await started_at(store, job))
    await wait_all_terminal(store, small, timeout=60)
    behind = await queued(store, flood)
    print(f"\ninteractive waits {[round(w, 2) for w in waits]} s; flood still queued when the "
          f"small tenant was done: {behind} of {len(flood)}")
    assert max(waits) <= INTERACTIVE_WAIT_BOUND_S, waits
    # The small tenant's 3 scans took turns with the flood instead of waiting behind it.
    assert behind >= 20, f"only {behind} flood jobs were left: the small tenant waited"
    await wait_all_terminal(store, flood, timeout=240)
    await check(settings)


class ContainerWatch:
    """The scan containers of the given jobs, from Docker's own event stream: a container
    counts from the moment it runs under a job's name (`start` of one created for the job, or
    the `rename` of a warm container started ahead) to its process's `die` (the daemon lists
    it as running a little longer, while it releases its network). `peak()`: the most at once.
    """

    def __init__(self, jobs: set[str]) -> None:
        self.jobs = jobs  # filled in as they are submitted
        self._proc = subprocess.Popen(
            ["docker", "events", "--format", "{{json .}}", "--filter", "type=container",
             "--filter", "event=start", "--filter", "event=rename", "--filter", "event=die"],
            stdout=subprocess.PIPE, text=True)
        self._events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> ContainerWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(1)  # the last die events are on their way
        self._proc.terminate()
        self._proc.wait(10)
        self._thread.join(10)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._events.append(json.loads(line))

    def peak(self) -> tuple[int, int]:
        """(the most containers running a job's scan at once, how many such runs were seen)."""
        running: set[str] = set()  # container ids started and not dead
        named: set[str] = set()  # ... of those, running under one of our jobs' names
        steps: list[tuple[int, int]] = []
        for e in sorted(self._events, key=lambda e: int(e["timeNano"])):
            cid, t, action = e["Actor"]["ID"], int(e["timeNano"]), e["Action"]
            ours = e["Actor"]["Attributes"].get("name", "")[8:44] in self.jobs
            if action == "start":
                running.add(cid)
            if action in ("start", "rename") and ours and cid in running and cid not in named:
                named.add(cid)
                steps.append((t, 1))
            if action == "die":
                running.discard(cid)
                if cid in named:
                    named.discard(cid)
                    steps.append((t, -1))
        peak = now = 0
        for _, step in sorted(steps):  # at equal instants the -1 comes first
            now += step
            peak = max(peak, now)
        return peak, sum(1 for _, step in steps if step > 0)


async def in_flight_peak(store: Store, ids: list[uuid.UUID], killed: str,
                         killed_at: datetime) -> int:
    """The most jobs between a claim (FETCHING) and their next step out of the running states,
    at any instant of the audit trail. A killed replica's run ends at the kill."""
    rows = await store.pool.fetch(
        "SELECT job_id, to_state, worker_id, at FROM scan_audit_log WHERE job_id = ANY($1) "
        "ORDER BY job_id, version", ids)
    events: list[tuple[datetime, int]] = []
    start: dict[uuid.UUID, tuple[datetime, str]] = {}
    for r in rows:
        running = start.get(r["job_id"])
        if running and r["to_state"] != "ANALYZING":
            began, by = running
            end = min(r["at"], killed_at) if by == killed else r["at"]
            events += [(began, 1), (max(began, end), -1)]
            del start[r["job_id"]]
        if r["to_state"] == "FETCHING":
            start[r["job_id"]] = (r["at"], r["worker_id"])
    peak = now = 0
    for _, step in sorted(events):  # at equal instants the -1 comes first
        now += step
        peak = max(peak, now)
    return peak


async def test_one_domain_within_its_limit_through_a_kill(
        make_settings: type[Settings], store: Store, tmp_path: Path) -> None:
    polite = make_settings(worker_concurrency=3, per_domain_concurrency=2,
                           lease_renew_ms=500, lease_timeout_ms=2000, shutdown_grace_s=10)
    api = consumer_for(polite, name="test-api")
    fleet = Fleet(polite, tmp_path)
    try:
        for w in ("w1", "w2", "w3"):
            fleet.start(w)
        urls = ["http://site-a.test/", "http://site-a.test/login", "http://site-a.test/meta"]
        watched: set[str] = set()
        with ContainerWatch(watched) as watch:
            ids = []
            for i in range(50):
                ids.append(await submit(store, api, urls[i % 3], "bulk"))
                watched.add(str(ids[-1]))
            # Kill the replica that holds the most messages while it holds deferred ones.
            victim, held = await _busiest(api, polite, fleet.alive())
            fleet.procs[victim].send_signal(signal.SIGKILL)
            fleet.procs[victim].wait(10)
            killed_at = await store.pool.fetchval("SELECT now()")
            # The invariants hold throughout: with the victim's messages not yet taken over,
            # and again once everything settled (below).
            await check(polite, "--allow-active")
            await wait_all_terminal(store, ids, timeout=240)
        peak = await in_flight_peak(store, ids, victim, killed_at)
        states = await store.pool.fetch(
            "SELECT state, count(*) AS n FROM scan_jobs WHERE id = ANY($1) GROUP BY state", ids)
        completions = await store.pool.fetchval(
            "SELECT count(*) FROM scan_audit_log WHERE job_id = ANY($1) "
            "AND to_state = 'COMPLETED'", ids)
        containers, runs = watch.peak()
        print(f"\nkilled {victim} holding {held} messages; peak in flight: audit {peak}, "
              f"containers {containers} (of {runs} container runs seen)")
        assert {r["state"]: r["n"] for r in states} == {"COMPLETED": 50}
        assert completions == 50  # each exactly once
        assert peak <= 2 and containers <= 2
        assert runs >= 50  # the watch saw every scan's container
        # Jobs that were only deferred were never claimed by the victim: no fault for them.
        faulted = await store.pool.fetchval(
            "SELECT count(*) FROM scan_jobs WHERE id = ANY($1) AND faults > 0", ids)
        assert faulted <= 2, f"{faulted} jobs counted a fault; only the victim's running may"
        await check(polite)
    finally:
        fleet.stop_all()
        await api.redis.aclose()


async def _busiest(api: Consumer, settings: Settings, workers: list[str],
                   timeout: float = 60) -> tuple[str, int]:
    """The replica holding the most messages, once one holds more than it can run (so some
    of them are deferred, waiting for the domain)."""
    deadline = time.monotonic() + timeout
    stream = f"{settings.scan_stream}:bulk"
    while time.monotonic() < deadline:
        with_pending = {}
        try:
            for c in await api.redis.xinfo_consumers(stream, settings.scan_group):
                with_pending[c["name"].decode()] = int(c["pending"])
        except Exception:  # the group does not exist yet
            pass
        name, n = max(with_pending.items(), key=lambda kv: kv[1], default=("", 0))
        if name in workers and n > 2:
            return name, n
        await asyncio.sleep(0.05)
    raise AssertionError("no replica ever held deferred jobs")
