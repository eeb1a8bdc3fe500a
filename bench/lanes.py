"""Part 8: interactive scans under a bulk flood, with and without lanes (issue 17).

One worker with the stub runner (every job takes `job_s`, nothing is fetched) at concurrency 4.
A round queues a flood of bulk jobs (tenant `bulkco`) at once, then submits interactive jobs at
fixed intervals over the first half of the flood, and measures each interactive job's submit ->
terminal time on the job row's own clock (`finished_at - created_at`, as part 6).

Systems, run in alternating rounds:
  lanes         the flood in lane `bulk` (its tenant queue), the interactive jobs in lane
                `interactive`, at the default weights (LANES=interactive:6,default:3,bulk:1)
  one_lane      everything in the default lane's own stream, no tenants: one FIFO queue, what
                happened before lanes
  tenant_queue  everything in the default lane, the flood in its tenant's queue: the tenant
                round-robin alone, without lanes (optional: `--lane-systems`)
  no_flood      the same interactive jobs with no flood at all: the floor (optional)

The interactive jobs arrive at fixed times rather than each after the previous one ended: in a
single FIFO queue the first would wait out the whole flood and the rest would meet an idle
worker, which measures nothing. A round ends when the last interactive job is terminal; the
rest of the flood is dropped with the round's database and streams.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import time
import uuid
from typing import Any

import asyncpg
import redis.asyncio as redis
import uvloop

from safeurl_worker.config import Settings, parse_lanes
from safeurl_worker.consumer import DEFAULT_LANE, Consumer

from .harness import alternate, percentile, ratios, show, summarize
from .ours import BenchEnv, running, start_worker

CONCURRENCY = 4
TENANT = "bulkco"
URL = "http://bench.test/"
LANES = str(Settings.model_fields["lanes"].default)  # the shipped weights, passed explicitly
# system -> (flood lane (None: no flood), flood tenant, interactive lane)
SYSTEMS: dict[str, tuple[str | None, str | None, str]] = {
    "lanes": ("bulk", TENANT, "interactive"),
    "one_lane": (DEFAULT_LANE, None, DEFAULT_LANE),
    "tenant_queue": (DEFAULT_LANE, TENANT, DEFAULT_LANE),
    "no_flood": (None, None, "interactive"),
}


async def _submit(pool: asyncpg.Pool, consumer: Consumer, n: int, lane: str,
                  tenant: str | None, with_columns: bool) -> list[uuid.UUID]:
    """What the API does: INSERT the rows (with their lane and tenant where the schema has the
    columns), then XADD each id to its queue."""
    ids = [uuid.uuid4() for _ in range(n)]
    if with_columns:
        await pool.executemany(
            "INSERT INTO scan_jobs (id, url, lane, tenant) VALUES ($1, $2, $3, $4)",
            [(j, URL, lane, tenant) for j in ids])
    else:
        await pool.executemany("INSERT INTO scan_jobs (id, url) VALUES ($1, $2)",
                               [(j, URL) for j in ids])
    for j in ids:
        await consumer.enqueue(j, lane=lane, tenant=tenant)
    return ids


async def _has_lane_columns(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval(
        "SELECT count(*) = 2 FROM information_schema.columns "
        "WHERE table_name = 'scan_jobs' AND column_name IN ('lane', 'tenant')"))


async def _wait_terminal(pool: asyncpg.Pool, ids: list[uuid.UUID], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (done := await pool.fetchval(
            "SELECT count(*) FROM scan_jobs WHERE id = ANY($1::uuid[]) "
            "AND finished_at IS NOT NULL", ids)) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done}/{len(ids)} interactive jobs ended in "
                               f"{timeout:.0f}s")
        await asyncio.sleep(0.05)


async def flood_latency(system: str, flood: int, interactive: int, job_s: float,
                        redis_url: str) -> dict[str, float]:
    """One round of one system: the interactive jobs' latency figures (ms) and the bulk jobs
    completed per second meanwhile (the flood is slowed, not stopped)."""
    flood_lane, flood_tenant, lane = SYSTEMS[system]
    # The flood's length on an otherwise idle worker; the interactive jobs span half of it.
    interval = flood * job_s / CONCURRENCY / 2 / interactive
    async with running(redis_url, lambda env: [start_worker(
            env, f"bench-lanes-{system}", CONCURRENCY, delay_s=job_s, LANES=LANES,
            PER_DOMAIN_CONCURRENCY="0")]) as (env, r, pool, _):
        consumer = _producer(env, r)
        columns = await _has_lane_columns(pool)
        t0 = time.monotonic()
        bulk = await _submit(pool, consumer, flood, flood_lane, flood_tenant, columns) \
            if flood_lane else []
        ids: list[uuid.UUID] = []
        for i in range(interactive):
            await asyncio.sleep(max(0.0, t0 + (i + 1) * interval - time.monotonic()))
            ids += await _submit(pool, consumer, 1, lane, None, columns)
        await _wait_terminal(pool, ids, timeout=60 + 2 * flood * job_s / CONCURRENCY)
        wall = time.monotonic() - t0
        rows = await pool.fetch(
            "SELECT state, extract(epoch FROM finished_at - created_at) * 1000 AS ms "
            "FROM scan_jobs WHERE id = ANY($1::uuid[])", ids)
        if bad := [x["state"] for x in rows if x["state"] != "COMPLETED"]:
            raise RuntimeError(f"{system}: interactive jobs ended {bad}")
        bulk_done = await pool.fetchval(
            "SELECT count(*) FROM scan_jobs WHERE id = ANY($1::uuid[]) AND state = 'COMPLETED'",
            bulk)
    ms = [float(x["ms"]) for x in rows]
    return {"p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99), "max_ms": max(ms),
            "min_ms": min(ms), "interactive": len(ms), "bulk_per_s": bulk_done / wall}


def _producer(env: BenchEnv, r: redis.Redis) -> Consumer:
    """The API's side of the stream (Consumer.enqueue), under the worker's stream names."""
    return Consumer(r, env.stream, "scan-workers", "bench-producer", f"{env.stream}:dead",
                    lanes=parse_lanes(LANES))


def _round(a: argparse.Namespace, system: str) -> dict[str, float]:
    """On a fresh loop, like every round of every part."""
    return uvloop.run(flood_latency(system, a.flood_jobs, a.interactive_jobs, a.job_seconds,
                                    a.redis_url))


def part8(a: argparse.Namespace) -> dict[str, Any]:
    systems = [s for s in a.lane_systems.split(",") if s]
    if unknown := set(systems) - set(SYSTEMS):
        raise SystemExit(f"--lane-systems: unknown {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(SYSTEMS)}")
    if a.interactive_jobs < 1 or a.flood_jobs < 0 or a.job_seconds <= 0:
        raise SystemExit("part 8 needs --interactive-jobs >= 1, --flood-jobs >= 0 and "
                         "--job-seconds > 0")
    rounds = alternate(a.rounds, {s: functools.partial(_round, a, s) for s in systems})
    return {"flood": a.flood_jobs, "interactive": a.interactive_jobs, "job_s": a.job_seconds,
            "concurrency": CONCURRENCY, "lanes": LANES, "rounds": rounds,
            "summary": summarize(rounds),
            **({"ratio": {f: ratios(rounds, "lanes", f) for f in ("p50_ms", "p99_ms")}}
               if "lanes" in systems else {})}


def table(p: dict[str, Any], w: int) -> list[str]:
    lines = [f"8. interactive submit -> terminal under a bulk flood ({p['flood']} jobs of "
             f"{p['job_s']} s, {p['interactive']} interactive, concurrency {p['concurrency']}, "
             f"{len(p['rounds'])} rounds): median (min-max)",
             "   " + "".join(f"{h:<{w}} " for h in ("system", "p50 ms", "p99 ms", "max ms",
                                                  "bulk/s", "p50 lanes/x"))]
    for name, s in p["summary"].items():
        ratio = p.get("ratio", {}).get("p50_ms", {}).get(name)
        lines.append("   " + "".join(f"{c:<{w}} " for c in (
            name, show(s["p50_ms"]), show(s["p99_ms"]), show(s["max_ms"]),
            show(s["bulk_per_s"], ".1f"), show(ratio, ".3f") if ratio else "-")))
    return lines
