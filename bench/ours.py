"""Our side of the benchmark: the full durable path, with the container replaced by a stub.

Every PostgreSQL write is real (load, claim, FETCHING->ANALYZING, ANALYZING->COMPLETED with the
result row, an audit row per transition) and so is the ack. The worker runs in its own process
(`python -m bench.ours worker`), one process per replica, like the competitors' workers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import redis.asyncio as redis
import uvloop

from safeurl_worker.cli import _install_signals, wired_worker
from safeurl_worker.config import Settings
from safeurl_worker.models import Report
from safeurl_worker.runner import RunResult, RunStatus
from safeurl_worker.store import Store, create_pool

ADMIN_DSN = os.environ.get("SAFEURL_BENCH_ADMIN_DSN", "postgresql://127.0.0.1/postgres")

STUB_REPORT = Report(
    fetcher_version="stub", requested_url="http://bench.test/", final_url="http://bench.test/",
    http_status=200, content_type="text/html", body_size=5, title="bench",
    sha256="0" * 64)


class StubRunner:
    """Answers at once with a fixed valid report (optionally after a delay)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.result = RunResult(RunStatus.OK, report=STUB_REPORT, exit_code=0)

    async def run(self, job_id: uuid.UUID, url: str) -> RunResult:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.result

    async def ping(self) -> bool:
        return True

    async def remove_labelled(self, job_id: uuid.UUID | None = None,
                              older_than_s: float | None = None) -> int:
        return 0


@dataclasses.dataclass(frozen=True)
class OursResult:
    system: str
    jobs: int
    concurrency: int
    seconds: float
    jobs_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    notes: str = ""
    rss_mb: float = 0.0
    cpu_ms_per_job: float = 0.0


async def _worker_main(delay_s: float) -> None:
    settings = Settings()
    async with wired_worker(settings, runner=StubRunner(delay_s)) as worker:
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
        await r.delete(self.stream, f"{self.stream}:dead")
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
                **extra}


def start_worker(env: BenchEnv, worker_id: str, concurrency: int, delay_s: float = 0.0,
                 profile: Path | None = None, **extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "bench.ours", "worker", "--delay", str(delay_s)]
    if profile:
        cmd = [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(profile),
               "-m", "bench.ours", "worker", "--delay", str(delay_s)]
    log = open(f"/tmp/{env.stream}-{worker_id}.log", "wb")  # noqa: SIM115 - lives with proc
    return subprocess.Popen(cmd, env=env.worker_env(worker_id, concurrency, **extra),
                            cwd=Path(__file__).resolve().parent.parent, stdout=log,
                            stderr=subprocess.STDOUT)


async def wait_consumers(r: redis.Redis, env: BenchEnv, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            consumers = await r.xinfo_consumers(env.stream, "scan-workers")
            if len(consumers) >= n:
                return
        except redis.ResponseError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{n} worker(s) did not join the group within {timeout}s")


async def enqueue(pool: asyncpg.Pool, r: redis.Redis, stream: str, n: int,
                  batch: int = 500) -> list[uuid.UUID]:
    """What the API does, in batches: INSERT the rows, then XADD their ids."""
    ids: list[uuid.UUID] = []
    for start in range(0, n, batch):
        chunk = [uuid.uuid4() for _ in range(min(batch, n - start))]
        await pool.executemany("INSERT INTO scan_jobs (id, url) VALUES ($1, $2)",
                               [(j, "http://bench.test/") for j in chunk])
        pipe = r.pipeline(transaction=False)
        for j in chunk:
            pipe.xadd(stream, {"job_id": str(j)})
        await pipe.execute()
        ids += chunk
    return ids


def _proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MB, CPU seconds) of a process, from /proc."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


def _pct(sorted_ms: list[float], p: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p))]


async def run_ours(jobs: int, concurrency: int, redis_url: str, replicas: int = 1,
                   profile: Path | None = None, timeout: float = 600,
                   on_done: Callable[[], None] | None = None) -> OursResult:
    """`on_done` runs when the last job completed, before any process is stopped (so that
    per-connection PostgreSQL backends can still be measured)."""
    env = await BenchEnv.create(redis_url)
    r = redis.Redis.from_url(redis_url)
    pool = await create_pool(env.dsn, 4)
    procs = [start_worker(env, f"bench-{i}", concurrency, profile=profile if i == 0 else None)
             for i in range(replicas)]
    try:
        await wait_consumers(r, env, replicas)
        t0 = time.time()
        await enqueue(pool, r, env.stream, jobs)
        peak_rss = 0.0
        deadline = time.monotonic() + timeout
        while True:
            done = await pool.fetchval("SELECT count(*) FROM scan_jobs WHERE state='COMPLETED'")
            peak_rss = max(peak_rss, max(_proc_stats(p.pid)[0] for p in procs))
            if done >= jobs:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done}/{jobs} completed in {timeout}s")
            await asyncio.sleep(0.05)
        if on_done:
            on_done()
        t1 = float(await pool.fetchval("SELECT extract(epoch FROM max(finished_at)) "
                                       "FROM scan_jobs"))
        cpu = sum(_proc_stats(p.pid)[1] for p in procs)
        lat = sorted(float(x) for x in (r_["ms"] for r_ in await pool.fetch(
            "SELECT extract(epoch FROM finished_at - created_at) * 1000 AS ms FROM scan_jobs")))
        seconds = t1 - t0
        return OursResult("safeurl", jobs, concurrency, seconds, jobs / seconds,
                          _pct(lat, 0.5), _pct(lat, 0.95), _pct(lat, 0.99),
                          notes=f"{replicas} replica(s); durable writes + audit + ack",
                          rss_mb=peak_rss, cpu_ms_per_job=cpu * 1000 / jobs)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        await pool.close()
        await r.aclose()
        await env.drop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ours")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="(internal) a worker process with the stub runner")
    w.add_argument("--delay", type=float, default=0.0)
    b = sub.add_parser("run", help="run the no-container benchmark once")
    b.add_argument("--jobs", type=int, default=10_000)
    b.add_argument("--concurrency", type=int, default=50)
    b.add_argument("--replicas", type=int, default=1)
    b.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    b.add_argument("--profile", type=Path)
    args = ap.parse_args()
    if args.cmd == "worker":
        uvloop.run(_worker_main(args.delay))
        return
    res = uvloop.run(run_ours(args.jobs, args.concurrency, args.redis_url, args.replicas,
                              args.profile))
    print(f"{res.system}: {res.jobs_per_s:,.0f} jobs/s  p50 {res.p50_ms:.0f} ms  "
          f"p95 {res.p95_ms:.0f} ms  p99 {res.p99_ms:.0f} ms  rss {res.rss_mb:.0f} MB  "
          f"cpu {res.cpu_ms_per_job:.2f} ms/job  ({res.notes})")


if __name__ == "__main__":
    main()
