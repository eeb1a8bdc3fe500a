"""Competitor side of the no-op benchmark: saq, arq and Celery on the same Redis, as a table.

Each system is data plus two small adapters: how its worker process serves a no-op task, and how
a producer enqueues one the way its docs show. One run (`run_system`):

1. starts ONE worker process at the given concurrency and waits until it has run a warm-up job;
2. enqueues ``jobs`` no-op jobs from a single producer, one at a time, passing ``time.time()``
   (taken just before the enqueue call) as the task argument;
3. the task records ``"<enqueued_at> <done_at>"`` with one plain RPUSH into a per-run list - the
   same extra cost for every system;
4. when all records are in, computes latencies and the wall time first enqueue -> last completion;
5. stops the worker (SIGTERM, then SIGKILL) and deletes every key carrying the per-run id.

Library defaults otherwise (see each system's notes); worker logging at WARNING for all three.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from .harness import Proc, Result, read_proc, spawn, stop

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/5"
_ENV = ("BENCH_REDIS_URL", "BENCH_RUN_ID", "BENCH_CONCURRENCY")


class BenchError(RuntimeError):
    """A run that could not complete: worker died, never became ready, or timed out."""


@dataclasses.dataclass(frozen=True)
class Run:
    redis_url: str
    id: str  # in every key the run creates
    concurrency: int

    @property
    def done_key(self) -> str:
        return f"{self.id}:done"

    @classmethod
    def from_env(cls) -> Run:
        url, run_id, concurrency = (os.environ[k] for k in _ENV)
        return cls(url, run_id, int(concurrency))

    async def record(self, sink: aioredis.Redis, enqueued_at: float) -> None:
        await sink.rpush(self.done_key, f"{enqueued_at!r} {time.time()!r}")


Enqueue = Callable[[float], Awaitable[object]]  # None means the job was refused


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    dists: tuple[str, ...]  # for the versions in the notes
    serve: Callable[[Run], None] | None  # worker process body; None: Celery's own CLI
    connect: Callable[[Run], Awaitable[tuple[Enqueue, Callable[[], Awaitable[object]]]]]
    notes: str  # formatted with the concurrency


# --- saq ---------------------------------------------------------------------------------------

def _saq_serve(run: Run) -> None:
    from saq import Queue, Worker

    # saq's stop() warns that idle dequeue tasks outlived the (zero) grace period: expected here.
    logging.getLogger("saq").setLevel(logging.ERROR)
    sink = aioredis.Redis.from_url(run.redis_url)

    async def noop(ctx: Any, *, enqueued_at: float) -> None:
        await run.record(sink, enqueued_at)

    async def main() -> None:
        queue = Queue.from_url(run.redis_url, name=run.id)
        await queue.connect()
        try:  # start() returns after SIGTERM
            await Worker(queue, functions=[("noop", noop)], concurrency=run.concurrency).start()
        finally:
            await queue.disconnect()

    asyncio.run(main())


async def _saq_connect(run: Run) -> tuple[Enqueue, Callable[[], Awaitable[object]]]:
    from saq import Queue

    queue = Queue.from_url(run.redis_url, name=run.id)
    await queue.connect()
    return (lambda t: queue.enqueue("noop", enqueued_at=t)), queue.disconnect


# --- arq ---------------------------------------------------------------------------------------

def _arq_serve(run: Run) -> None:
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    sink = aioredis.Redis.from_url(run.redis_url)

    async def noop(ctx: Any, enqueued_at: float) -> None:
        await run.record(sink, enqueued_at)

    asyncio.set_event_loop(loop := asyncio.new_event_loop())  # arq binds to it in __init__
    try:
        Worker(functions=[func(noop, name="noop")], queue_name=f"arq:queue:{run.id}",
               redis_settings=RedisSettings.from_dsn(run.redis_url),
               max_jobs=run.concurrency).run()
    except asyncio.CancelledError:
        pass  # arq re-raises the cancellation of its SIGTERM handler: the expected end
    finally:
        loop.close()


async def _arq_connect(run: Run) -> tuple[Enqueue, Callable[[], Awaitable[object]]]:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(run.redis_url),
                             default_queue_name=f"arq:queue:{run.id}")
    # _job_id (a documented option) only puts the run id in the keys, for cleanup.
    return (lambda t: pool.enqueue_job("noop", t, _job_id=f"{run.id}:{uuid.uuid4().hex}"),
            pool.aclose)


# --- Celery ------------------------------------------------------------------------------------

_celery_app: Any = None


def build_celery_app(run: Run) -> tuple[Any, Any]:
    """The app and its ``noop`` task (same in producer and worker): Redis broker, no result
    backend, ``task_acks_late``; kombu's ``global_keyprefix`` puts the run id in every key."""
    from celery import Celery

    app = Celery("safeurl_bench", broker=run.redis_url, set_as_current=False)
    app.conf.update(task_acks_late=True,
                    broker_transport_options={"global_keyprefix": f"{run.id}:"},
                    broker_connection_retry_on_startup=True)  # the default; silences a warning
    sink = redis.Redis.from_url(run.redis_url)

    @app.task(name="bench.noop")  # type: ignore[untyped-decorator]  # celery ships no types
    def noop(enqueued_at: float) -> None:
        sink.rpush(run.done_key, f"{enqueued_at!r} {time.time()!r}")

    return app, noop


def __getattr__(name: str) -> Any:
    """``celery -A bench.competitors:celery_app`` builds the worker's app from the environment."""
    global _celery_app
    if name != "celery_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _celery_app is None:
        _celery_app = build_celery_app(Run.from_env())[0]
    return _celery_app


async def _celery_connect(run: Run) -> tuple[Enqueue, Callable[[], Awaitable[object]]]:
    app, noop = build_celery_app(run)

    async def enqueue(t: float) -> object:
        return noop.delay(t)  # a blocking publish; nothing else runs on this loop

    async def close() -> None:
        app.close()

    return enqueue, close


SYSTEMS = {s.name: s for s in (
    System("saq", ("saq",), _saq_serve, _saq_connect,
           "1 process, Worker(concurrency={c}), asyncio loop; sequential "
           "`await queue.enqueue('noop', enqueued_at=t)`; defaults otherwise"),
    System("arq", ("arq",), _arq_serve, _arq_connect,
           "1 process, Worker(max_jobs={c}), asyncio loop; sequential "
           "`await pool.enqueue_job('noop', t)`; defaults otherwise (poll_delay 0.5 s, results "
           "kept 3600 s)"),
    System("celery", ("celery", "kombu"), None, _celery_connect,
           "1 process, --pool=threads --concurrency={c}; task_acks_late=True, defaults otherwise "
           "(prefetch multiplier 4, gossip/mingle/heartbeat on), no result backend; sequential "
           "`noop.delay(t)`"),
)}


# --- one run -----------------------------------------------------------------------------------

def _worker_argv(system: System, run: Run) -> list[str]:
    if system.serve is None:
        return [sys.executable, "-m", "celery", "-A", "bench.competitors:celery_app", "worker",
                "--pool=threads", f"--concurrency={run.concurrency}", "--loglevel=WARNING",
                "--hostname", f"{run.id}@%h"]
    return [sys.executable, "-m", "bench.competitors", system.name]


async def _wait_records(client: aioredis.Redis, run: Run, n: int, deadline: float,
                        worker: subprocess.Popen[bytes], what: str) -> None:
    while (have := int(await client.llen(run.done_key))) < n:
        if worker.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what}: {have}/{n} done, worker "
                             f"{'exited' if worker.poll() is not None else 'timed out'}; "
                             f"see /tmp/{run.id}.log")
        await asyncio.sleep(0.005)


async def _measure(system: System, run: Run, jobs: int, worker: subprocess.Popen[bytes],
                   timeout: float) -> Result:
    client = aioredis.Redis.from_url(run.redis_url)
    enqueue, close = await system.connect(run)
    try:
        await enqueue(time.time())  # ready = one job ran end to end, the producer is connected
        await _wait_records(client, run, 1, time.monotonic() + 60, worker, f"{system.name} warm-up")
        await client.delete(run.done_key)
        deadline = time.monotonic() + timeout
        cpu0 = (read_proc(worker.pid) or _GONE).cpu_s
        for _ in range(jobs):
            if await enqueue(time.time()) is None:
                raise BenchError(f"{system.name}: enqueue refused a job (duplicate id)")
        await _wait_records(client, run, jobs, deadline, worker, system.name)
        proc = read_proc(worker.pid) or _GONE
        records = await client.lrange(run.done_key, 0, -1)
        pairs = [[float(x) for x in rec.split()] for rec in records]
    finally:
        await close()
        await client.aclose()
    versions = ", ".join(f"{d} {metadata.version(d)}" for d in system.dists)
    return Result.of(system.name, run.concurrency, [(d - e) * 1000 for e, d in pairs],
                     max(d for _, d in pairs) - min(e for e, _ in pairs), proc.rss_mb,
                     proc.cpu_s - cpu0,
                     f"{versions}; {system.notes.format(c=run.concurrency)}; completion recorded "
                     "in-task (RPUSH), no result polling")


_GONE = Proc("gone", "", float("nan"), float("nan"))  # the worker died: figures are NaN


def run_system(name: str, jobs: int, concurrency: int, redis_url: str = DEFAULT_REDIS_URL,
               timeout: float | None = None, run_id: str | None = None) -> Result:
    """One run of a system; every key it creates has `run_id` (default: a new one) in its name
    and is deleted at the end."""
    if jobs < 1 or concurrency < 1:
        raise ValueError("jobs and concurrency must be >= 1")
    system = SYSTEMS[name]
    run = Run(redis_url, run_id or f"bench-{name}-{uuid.uuid4().hex[:12]}", concurrency)
    # spawn() starts it in the repository root: `bench.competitors` imports from there.
    env = {**os.environ, **dict(zip(_ENV, (redis_url, run.id, str(concurrency)), strict=True))}
    worker = spawn(_worker_argv(system, run), env, Path(f"/tmp/{run.id}.log"))
    try:
        return asyncio.run(_measure(system, run, jobs, worker,
                                    timeout or min(300.0, max(30.0, jobs / 50))))
    finally:
        stop([worker])
        _delete_keys(run)


def _delete_keys(run: Run) -> None:
    """Every key with the run id in its name (only this run's keys); a Redis failure here must
    not mask the run's own error."""
    client = redis.Redis.from_url(run.redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{run.id}*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    except redis.RedisError as exc:
        print(f"warning: delete keys matching '*{run.id}*' by hand ({exc})", file=sys.stderr)
    finally:
        client.close()


if __name__ == "__main__":  # `python -m bench.competitors saq|arq`: a worker process
    if (serve := SYSTEMS[sys.argv[1]].serve) is not None:
        serve(Run.from_env())
