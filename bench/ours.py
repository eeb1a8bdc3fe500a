"""Our side of the benchmark: the full durable path, with the container replaced by a stub.

Every PostgreSQL write is real (load, claim, FETCHING->ANALYZING, ANALYZING->COMPLETED with the
result row, an audit row per transition) and so is the ack. The worker runs in its own process
(`python -m bench.ours worker`), one process per replica, like the competitors' workers.
`python -m bench.ours run --profile out.txt` runs it once under pyinstrument.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import redis.asyncio as redis
import uvloop

from safeurl_worker.cli import _install_signals, wired_worker
from safeurl_worker.config import Settings
from safeurl_worker.models import Report
from safeurl_worker.runner import Mode, RunResult, RunStatus
from safeurl_worker.store import Store, create_pool

from .harness import Result, read_proc, spawn, stop

ADMIN_DSN = os.environ.get("SAFEURL_BENCH_ADMIN_DSN", "postgresql://127.0.0.1/postgres")
STUB_REPORT = Report(
    fetcher_version="stub", requested_url="http://bench.test/", final_url="http://bench.test/",
    http_status=200, content_type="text/html", body_size=5, title="bench", sha256="0" * 64)


class StubRunner:
    """Answers at once with a fixed valid report (optionally after a delay)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.result = RunResult(RunStatus.OK, report=STUB_REPORT, exit_code=0)

    async def run(self, job_id: uuid.UUID, url: str, mode: Mode = "static") -> RunResult:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.result

    async def ping(self) -> bool:
        return True

    async def remove_labelled(self, job_id: uuid.UUID | None = None,
                              older_than_s: float | None = None) -> int:
        return 0


async def _worker_main(delay_s: float) -> None:
    async with wired_worker(Settings(), runner=StubRunner(delay_s)) as worker:
        _install_signals(worker.stopping)
        await worker.run()


@dataclasses.dataclass
class BenchEnv:
    """A throw-away database and stream for one run."""

    dsn: str
    db: str
    stream: str
    redis_url: str

    @classmethod
    async def create(cls, redis_url: str) -> BenchEnv:
        db = f"safeurl_bench_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'CREATE DATABASE "{db}"')
        finally:
            await admin.close()
        env = cls(ADMIN_DSN.rsplit("/", 1)[0] + f"/{db}", db, f"bench-{db}", redis_url)
        pool = await create_pool(env.dsn, 1)
        await Store(pool).migrate()
        await pool.close()
        return env

    async def drop(self) -> None:
        r = redis.Redis.from_url(self.redis_url)
        # The stream, its dead letters and the workers' heartbeats: all carry the stream name.
        if keys := [k async for k in r.scan_iter(match=f"*{self.stream}*", count=1000)]:
            await r.delete(*keys)
        await r.aclose()
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        finally:
            await admin.close()

    def worker_env(self, worker_id: str, concurrency: int, **extra: str) -> dict[str, str]:
        return {**os.environ, "DATABASE_URL": self.dsn, "REDIS_URL": self.redis_url,
                "SCAN_STREAM": self.stream, "DEAD_LETTER_STREAM": f"{self.stream}:dead",
                "WORKER_ID": worker_id, "WORKER_CONCURRENCY": str(concurrency),
                "METRICS_PORT": "0", "LOG_LEVEL": "INFO", "READ_BATCH": str(concurrency),
                "RESULT_CACHE_TTL_S": "0",  # every job takes the full path
                # The competitors have no politeness gate, and every bench job has one URL.
                "PER_DOMAIN_CONCURRENCY": "0",
                **extra}


def start_worker(env: BenchEnv, worker_id: str, concurrency: int, delay_s: float = 0.0,
                 profile: Path | None = None, **extra: str) -> subprocess.Popen[bytes]:
    cmd = ["-m", "bench.ours", "worker", "--delay", str(delay_s)]
    if profile:
        cmd = ["-m", "pyinstrument", "-r", "text", "-o", str(profile), *cmd]
    return spawn([sys.executable, *cmd], env.worker_env(worker_id, concurrency, **extra),
                 Path(f"/tmp/{env.stream}-{worker_id}.log"))


async def wait_consumers(r: redis.Redis, env: BenchEnv, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(await r.xinfo_consumers(env.stream, "scan-workers")) >= n:
                return
        except redis.ResponseError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{n} worker(s) did not join the group within {timeout}s")


async def enqueue(pool: asyncpg.Pool, r: redis.Redis, stream: str, n: int,
                  url: str = "http://bench.test/", batch: int = 500) -> list[uuid.UUID]:
    """What the API does, in batches: INSERT the rows, then XADD their ids."""
    ids: list[uuid.UUID] = []
    for start in range(0, n, batch):
        chunk = [uuid.uuid4() for _ in range(min(batch, n - start))]
        await pool.executemany("INSERT INTO scan_jobs (id, url) VALUES ($1, $2)",
                               [(j, url) for j in chunk])
        pipe = r.pipeline(transaction=False)
        for j in chunk:
            pipe.xadd(stream, {"job_id": str(j)})
        await pipe.execute()
        ids += chunk
    return ids


async def wait_completed(pool: asyncpg.Pool, n: int, timeout: float,
                         each: Callable[[], None] = lambda: None) -> float:
    """Poll until `n` jobs are COMPLETED; the epoch of the last completion."""
    deadline = time.monotonic() + timeout
    while (done := await pool.fetchval(
            "SELECT count(*) FROM scan_jobs WHERE state = 'COMPLETED'")) < n:
        each()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done}/{n} completed in {timeout:.0f}s")
        await asyncio.sleep(0.05)
    return float(await pool.fetchval("SELECT extract(epoch FROM max(finished_at)) FROM scan_jobs"))


@contextlib.asynccontextmanager
async def running(redis_url: str, start: Callable[[BenchEnv], list[subprocess.Popen[bytes]]],
                  ) -> AsyncIterator[tuple[BenchEnv, redis.Redis, asyncpg.Pool,
                                           list[subprocess.Popen[bytes]]]]:
    """A fresh database and stream, the worker processes `start` spawns (joined to the group),
    and afterwards everything stopped and dropped."""
    env = await BenchEnv.create(redis_url)
    r = redis.Redis.from_url(redis_url)
    pool = await create_pool(env.dsn, 4)
    procs = start(env)
    try:
        await wait_consumers(r, env, len(procs))
        yield env, r, pool, procs
    finally:
        stop(procs, 60)
        await pool.close()
        await r.aclose()
        await env.drop()


async def run_ours(jobs: int, concurrency: int, redis_url: str, replicas: int = 1,
                   profile: Path | None = None, timeout: float = 600,
                   on_done: Callable[[], None] | None = None) -> Result:
    """`on_done` runs when the last job completed, before any process is stopped (so that
    per-connection PostgreSQL backends can still be measured)."""
    async with running(redis_url, lambda env: [
            start_worker(env, f"bench-{i}", concurrency, profile=profile if i == 0 else None)
            for i in range(replicas)]) as (env, r, pool, procs):
        peak = [0.0]

        def sample_rss() -> None:
            peak[0] = max([peak[0]] + [p.rss_mb for p in map(read_proc, (q.pid for q in procs))
                                       if p])

        t0 = time.time()
        await enqueue(pool, r, env.stream, jobs)
        t1 = await wait_completed(pool, jobs, timeout, sample_rss)
        if on_done:
            on_done()
        cpu = sum(p.cpu_s for p in map(read_proc, (q.pid for q in procs)) if p)
        lat = [float(x["ms"]) for x in await pool.fetch(
            "SELECT extract(epoch FROM finished_at - created_at) * 1000 AS ms FROM scan_jobs")]
        return Result.of("safeurl", concurrency, lat, t1 - t0, peak[0], cpu,
                         f"{replicas} replica(s); durable writes + audit + ack")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ours")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("worker", help="(internal) a worker process with the stub runner").add_argument(
        "--delay", type=float, default=0.0)
    b = sub.add_parser("run", help="run the no-container benchmark once")
    b.add_argument("--jobs", type=int, default=10_000)
    b.add_argument("--concurrency", type=int, default=50)
    b.add_argument("--replicas", type=int, default=1)
    b.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    b.add_argument("--profile", type=Path)
    args = ap.parse_args()
    if args.cmd == "worker":
        uvloop.run(_worker_main(args.delay))
    else:
        print(uvloop.run(run_ours(args.jobs, args.concurrency, args.redis_url, args.replicas,
                                  args.profile)))


if __name__ == "__main__":
    main()
