"""Part 6: what a user waits for. Submit -> terminal for a local test-host page on an idle
worker, one scan at a time, against `docker run --rm` of the same fetch. Our worker runs in three
modes: `worker` (the defaults: warm containers created and started ahead, the fetcher waiting
for its URL on stdin), `worker_created` (WARM_START=false: created ahead, started for their
job) and `worker_cold` (WARM_CONTAINERS=false: each container created for its job).

Our figure is the job row's own clock: `finished_at - created_at` (the INSERT is the submit; the
XADD follows it). The docker side is the wall time of one `docker run --rm` process. Each scan
starts after the previous one ended and a short pause, so every scan meets an idle worker (its
pool refilled, the last container removed) and an idle daemon.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg

from .harness import percentile, spawn
from .ours import enqueue, running

PAUSE_S = 0.3  # between scans: "idle" means nothing of the previous scan still in flight
CONCURRENCY = 5  # the default WORKER_CONCURRENCY
URL = "http://site-a.test/"


def _figures(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(ms, 0.5), "p99_ms": percentile(ms, 0.99), "min_ms": min(ms),
            "max_ms": max(ms), "scans": len(ms)}


def docker_run_latency(network: str, subnet: str, image: str, scans: int) -> dict[str, float]:
    """`docker run --rm` of the same fetch, one after the other; each its own wall time."""
    ms: list[float] = []
    for _ in range(scans):
        t0 = time.monotonic()
        subprocess.run(["docker", "run", "--rm", "--network", network,
                        "-e", f"FETCH_ALLOW_CIDRS={subnet}", "-e", "FETCH_ALLOWED_PORTS=80",
                        image, URL], stdout=subprocess.DEVNULL, check=True, timeout=120)
        ms.append((time.monotonic() - t0) * 1000)
        time.sleep(PAUSE_S)
    return _figures(ms)


async def _warm_ready(worker_id: str, n: int, status: str, timeout: float = 60) -> None:
    """Until the worker has its `n` warm containers (`status`: created, or running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = await asyncio.create_subprocess_exec(
            "docker", "ps", "-aq", "--filter", f"label=safeurl.worker_id={worker_id}",
            "--filter", f"status={status}", stdout=subprocess.PIPE)
        out, _ = await proc.communicate()
        if len(out.split()) >= n:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"worker {worker_id} made no {n} warm containers in {timeout:.0f}s")


async def worker_latency(network: str, subnet: str, image: str, scans: int, redis_url: str,
                         mode: str = "worker") -> dict[str, float]:
    """Our worker (the real Docker runner), one job at a time, submit -> terminal."""
    warm = mode != "worker_cold"
    worker_id = f"bench-lat-{uuid.uuid4().hex[:6]}"
    async with running(redis_url, lambda env: [spawn(
            [str(Path(sys.executable).parent / "safeurl-worker"), "run"],
            env.worker_env(worker_id, CONCURRENCY, FETCHER_NETWORK=network,
                           FETCH_ALLOW_CIDRS=subnet, FETCH_ALLOWED_PORTS="80",
                           FETCHER_IMAGE=image, WARM_CONTAINERS=str(warm).lower(),
                           WARM_START=str(mode == "worker").lower()),
            Path(f"/tmp/{env.stream}.log"))]) as (env, r, pool, _):
        if warm:
            await _warm_ready(worker_id, CONCURRENCY, "running" if mode == "worker"
                              else "created")
        ms: list[float] = []
        for _ in range(scans):
            [job] = await enqueue(pool, r, env.stream, 1, url=URL)
            ms.append(await _terminal_ms(pool, job))
            await asyncio.sleep(PAUSE_S)
        return _figures(ms)


async def _terminal_ms(pool: asyncpg.Pool, job: uuid.UUID, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await pool.fetchrow(
            "SELECT state, extract(epoch FROM finished_at - created_at) * 1000 AS ms "
            "FROM scan_jobs WHERE id = $1", job)
        assert row is not None  # inserted by enqueue
        if row["ms"] is not None:
            if row["state"] != "COMPLETED":
                raise RuntimeError(f"scan {job} ended {row['state']}")
            return float(row["ms"])
        await asyncio.sleep(0.005)
    raise RuntimeError(f"scan {job} not terminal after {timeout:.0f}s")
