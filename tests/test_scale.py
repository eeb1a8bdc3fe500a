"""Scale-out: N worker processes (1, 2, 4) in one consumer group share a 300-job load.

Each N is its own test (own database and stream). The replicas are real `safeurl-worker run`
processes; all N join the group before the load arrives. Afterwards: every job COMPLETED exactly
once (one COMPLETED audit row each), the invariants hold, and for N > 1 every replica completed
a fair share. Throughput by N is printed and written to a JSON file in the pytest tmp dir.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from safeurl_worker.config import Settings
from safeurl_worker.store import Store

from .conftest import TestNet
from .helpers import Fleet, check, submit, wait_all_terminal

pytestmark = pytest.mark.integration

JOBS = 300
CONCURRENCY = 4
URL = "http://site-a.test/"


@pytest.fixture
def scale_settings(make_settings: type[Settings]) -> Settings:
    # Production lease settings: a busy 2-core host must not look like a dead replica.
    return make_settings(worker_concurrency=CONCURRENCY, lease_renew_ms=5000,
                         lease_timeout_ms=15000, container_timeout_ms=20000,
                         shutdown_grace_s=25)


@pytest.fixture
def fleet(scale_settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(scale_settings, tmp_path)
    yield f
    f.stop_all()


async def wait_consumers(rds: redis.Redis, settings: Settings, names: list[str],
                         fleet: Fleet, timeout: float = 60) -> None:
    """Until every replica has read from the group once (it is up and taking jobs)."""
    deadline = time.monotonic() + timeout
    while True:
        assert fleet.alive() == names, {w: fleet.log(w)[-1500:] for w in names}
        try:
            found = {c["name"].decode() for c in
                     await rds.xinfo_consumers(settings.scan_stream, settings.scan_group)}
        except redis.ResponseError:  # no stream or group yet
            found = set()
        if set(names) <= found:
            return
        assert time.monotonic() < deadline, f"replicas not reading after {timeout}s: {found}"
        await asyncio.sleep(0.1)


def record(base: Path, n: int, figures: dict[str, Any]) -> Path:
    """Merge this N's figures into one JSON file for the session."""
    path = base / "scale-figures.json"
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    data[str(n)] = figures
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


@pytest.mark.parametrize("n", [1, 2, 4])
async def test_replicas_share_a_300_job_load_fairly_and_complete_each_once(
        n: int, fleet: Fleet, scale_settings: Settings, store: Store, rds: redis.Redis,
        testnet: TestNet, tmp_path_factory: pytest.TempPathFactory) -> None:
    s = scale_settings
    names = [f"scale{n}-r{i}" for i in range(1, n + 1)]
    for w in names:
        fleet.start(w)
    await wait_consumers(rds, s, names, fleet)

    t0 = time.monotonic()
    ids: list[uuid.UUID] = [await submit(store, rds, s, URL) for _ in range(JOBS)]
    await wait_all_terminal(store, ids, timeout=200)
    took = time.monotonic() - t0
    assert fleet.alive() == names, "a replica exited under load"
    await asyncio.sleep(1)  # batched acks
    fleet.stop_all()
    for w in names:
        assert fleet.procs[w].returncode == 0, fleet.log(w)[-2000:]

    states = {r["state"]: r["n"] for r in await store.pool.fetch(
        "SELECT state, count(*) AS n FROM scan_jobs GROUP BY state")}
    assert states == {"COMPLETED": JOBS}, states
    per_job = await store.pool.fetch(
        "SELECT j.id, count(a.id) AS n FROM scan_jobs j LEFT JOIN scan_audit_log a "
        "ON a.job_id = j.id AND a.to_state = 'COMPLETED' GROUP BY j.id")
    assert len(per_job) == JOBS
    twice = [(r["id"], r["n"]) for r in per_job if r["n"] != 1]
    assert not twice, f"jobs not completed exactly once: {twice[:10]}"
    assert await store.pool.fetchval("SELECT count(*) FROM scan_results") == JOBS
    per_replica: dict[str, int] = {r["worker_id"]: r["n"] for r in await store.pool.fetch(
        "SELECT worker_id, count(*) AS n FROM scan_audit_log WHERE to_state = 'COMPLETED' "
        "GROUP BY worker_id ORDER BY worker_id")}
    assert set(per_replica) == set(names), per_replica
    assert sum(per_replica.values()) == JOBS
    if n > 1:
        fair = JOBS / n * 0.5
        assert all(c >= fair for c in per_replica.values()), \
            f"unfair share (each must complete >= {fair:.0f}): {per_replica}"
    conflicts = await store.pool.fetchval(
        "SELECT count(*) FROM scan_audit_log a JOIN scan_audit_log b ON a.job_id = b.job_id "
        "AND a.version + 1 = b.version AND a.worker_id <> b.worker_id")
    await settled_check(s)

    rate = JOBS / took
    figures = {"replicas": n, "concurrency_per_replica": CONCURRENCY, "jobs": JOBS,
               "seconds": round(took, 2), "jobs_per_s": round(rate, 2),
               "per_replica": per_replica, "handovers": conflicts}
    path = record(tmp_path_factory.getbasetemp(), n, figures)
    print(f"\n[scale] N={n}: {rate:.2f} jobs/s, per replica: {per_replica} "
          f"({JOBS} jobs in {took:.1f}s, concurrency {CONCURRENCY} each)")
    print(f"[scale] figures: {path}")


async def settled_check(settings: Settings, attempts: int = 20) -> None:
    """`helpers.check`; a run of other tests' containers on the shared Docker daemon (check
    lists every container labelled safeurl.job_id) is waited out, nothing else is."""
    for i in range(attempts):
        try:
            await check(settings)
            return
        except AssertionError as exc:
            lines = [line for line in str(exc).splitlines() if line.startswith("VIOLATION")]
            only_containers = all("labelled safeurl.job_id still exists" in line
                                  for line in lines)
            if not only_containers or i == attempts - 1:
                raise
            await asyncio.sleep(1)
