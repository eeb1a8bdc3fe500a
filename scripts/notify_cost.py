"""Measure what the NOTIFY and the outbox cost the workers' terminal write (docs/contract.md,
*Callbacks and NOTIFY*): `CONCURRENCY` sessions each run `Store.complete` on their own jobs, in
rounds that rotate between NOTIFY on, NOTIFY off (the default), and neither NOTIFY nor the outbox
CTE (the statement as it was before callbacks); prints per-round medians and throughput, then the
medians of the rounds with their spread.

    .venv/bin/python scripts/notify_cost.py [--concurrency 32] [--per-session 40] [--rounds 5]

It creates and drops its own database (`safeurl_notify_cost`) on the server of ADMIN_DSN.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid

import asyncpg

from safeurl_worker import store as store_module
from safeurl_worker.models import Analysis, Job, Report, State, Verdict
from safeurl_worker.store import Store, create_pool

ADMIN_DSN = os.environ.get("SAFEURL_TEST_ADMIN_DSN", "postgresql://127.0.0.1/postgres")
DB = "safeurl_notify_cost"


def _without_outbox(pool: asyncpg.Pool) -> Store:
    """A Store whose terminal write is the pre-callback statement: the outbox CTE replaced by
    one that only names its parameter (PostgreSQL refuses a parameter it cannot type)."""
    store = Store(pool)
    outbox = store_module._OUTBOX.replace("$D", "$19")
    store._complete_sql = store._complete_sql.replace(outbox, ", cb AS (SELECT $19::text)")
    assert store._complete_sql != Store(pool)._complete_sql
    return store


async def _jobs(store: Store, n: int) -> list[Job]:
    """n jobs in ANALYZING, as a worker would have them just before the terminal write."""
    ids = [uuid.uuid4() for _ in range(n)]
    await store.pool.execute(
        "INSERT INTO scan_jobs (id, url, state, version) "
        "SELECT unnest($1::uuid[]), 'http://a.test/', 'ANALYZING', 2", ids)
    rows = await store.pool.fetch("SELECT id, url, created_at FROM scan_jobs "
                                  "WHERE id = ANY($1::uuid[])", ids)
    return [Job.model_construct(id=r["id"], url=r["url"], state=State.ANALYZING, version=2,
                                attempts=1, worker_id="w", error_code=None,
                                created_at=r["created_at"], owner_token="t", faults=0)
            for r in rows]


async def _session(store: Store, jobs: list[Job], lat: list[float]) -> None:
    report = Report(fetcher_version="1", requested_url="http://a.test/", http_status=200)
    analysis = Analysis(verdict=Verdict.SAFE, score=0, signals=[], analyzer_version="t")
    for job in jobs:
        t0 = time.perf_counter()
        assert await store.complete(job, worker_id="w", report=report, analysis=analysis,
                                    url_key=None) is not None
        lat.append(time.perf_counter() - t0)


async def _round(store: Store, conc: int, per: int) -> tuple[float, float]:
    jobs = await _jobs(store, conc * per)
    lat: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_session(store, jobs[i::conc], lat) for i in range(conc)))
    wall = time.perf_counter() - t0
    return statistics.median(lat) * 1e6, len(lat) / wall


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--per-session", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f"DROP DATABASE IF EXISTS {DB}")
    await admin.execute(f"CREATE DATABASE {DB}")
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + "/" + DB
    try:
        pool = await create_pool(dsn, a.concurrency, min_size=a.concurrency)
        stores = {"notify on": Store(pool, notify=True), "notify off": Store(pool, notify=False),
                  "no outbox": _without_outbox(pool)}
        await stores["notify on"].migrate()
        for s in stores.values():
            await _round(s, a.concurrency, 5)  # warm the pool and the plans
        out: dict[str, list[tuple[float, float]]] = {k: [] for k in stores}
        names = list(stores)
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # each goes first in turn
            for name in order:
                med, rate = await _round(stores[name], a.concurrency, a.per_session)
                out[name].append((med, rate))
                print(f"round {r + 1} {name:<10} median {med:7.0f} us  {rate:7.0f} writes/s",
                      flush=True)
        for name, got in out.items():
            meds, rates = sorted(m for m, _ in got), sorted(x for _, x in got)
            print(f"{name:<10} median latency {statistics.median(meds):.0f} us "
                  f"[{meds[0]:.0f}-{meds[-1]:.0f}], throughput {statistics.median(rates):.0f}/s "
                  f"[{rates[0]:.0f}-{rates[-1]:.0f}]")
        await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
