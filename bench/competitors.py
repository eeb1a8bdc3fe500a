"""Competitor side of the no-op benchmark: saq, arq and Celery on the same Redis.

Each ``run_*`` function:

1. starts ONE worker process for the system at the given concurrency and waits until it has
   run a warm-up job (so it is consuming, and the producer's connection is open);
2. enqueues ``jobs`` no-op jobs from a single producer, one at a time, the way the project's docs
   show, passing ``time.time()`` (taken just before the enqueue call) as the task argument;
3. the no-op task takes ``time.time()`` at its end and records ``"<enqueued_at> <done_at>"`` with
   one plain RPUSH into a per-run Redis list - the same extra cost for every system;
4. when all ``jobs`` entries are in the list, computes latencies (done - enqueued per job) and the
   wall time from the first enqueue to the last completion;
5. stops the worker (always, in a ``finally``; SIGTERM, then SIGKILL) and deletes every key the run
   created. Every key carries the per-run id, so only our own keys are deleted.

Library defaults are used except where noted in ``Result.notes``. Worker logging is at WARNING
for all three systems so that no system pays for per-job log output.

CLI: ``python -m bench.competitors --system saq|arq|celery|all --jobs N --concurrency C``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Protocol

import redis
import redis.asyncio as aioredis

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/5"
SYSTEMS = ("saq", "arq", "celery")
CELERY_POOLS = ("threads", "gevent")
# Default Celery pool: the one that gave Celery its best single-process figure on this machine
# (see the module's report; both are single-process pools that honour --concurrency).
DEFAULT_CELERY_POOL = "threads"

READY_TIMEOUT_S = 60.0  # worker start-up + warm-up job
MAX_TIMEOUT_S = 300.0
MIN_TIMEOUT_S = 30.0
EXPECTED_RATE = 500.0  # jobs/s assumed for the "10 x expected" bound
STOP_GRACE_S = 15.0
POLL_S = 0.005
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Result:
    system: str
    jobs: int
    concurrency: int
    seconds: float  # first enqueue -> last completion
    jobs_per_s: float
    p50_ms: float  # per-job latency, enqueue -> completion
    p95_ms: float
    p99_ms: float
    notes: str


class BenchError(RuntimeError):
    """A run that could not complete: worker died, never became ready, or timed out."""


# --------------------------------------------------------------------------- shared helpers


def default_timeout(jobs: int) -> float:
    """10x the expected duration at EXPECTED_RATE, within [MIN_TIMEOUT_S, MAX_TIMEOUT_S]."""
    return min(MAX_TIMEOUT_S, max(MIN_TIMEOUT_S, 10.0 * jobs / EXPECTED_RATE))


def _new_run_id(system: str) -> str:
    return f"bench-{system}-{uuid.uuid4().hex[:12]}"


def _record_value(enqueued_at: float) -> str:
    return f"{enqueued_at!r} {time.time()!r}"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _summarize(
    system: str, jobs: int, concurrency: int, raw: Sequence[bytes | str], notes: str
) -> Result:
    pairs = [tuple(float(x) for x in item.split()) for item in raw]
    if len(pairs) != jobs:
        raise BenchError(f"{system}: expected {jobs} completion records, found {len(pairs)}")
    enqueued = [p[0] for p in pairs]
    done = [p[1] for p in pairs]
    latencies = sorted((d - e) * 1000.0 for e, d in pairs)
    seconds = max(done) - min(enqueued)
    return Result(
        system=system,
        jobs=jobs,
        concurrency=concurrency,
        seconds=seconds,
        jobs_per_s=jobs / seconds if seconds > 0 else 0.0,
        p50_ms=_percentile(latencies, 0.50),
        p95_ms=_percentile(latencies, 0.95),
        p99_ms=_percentile(latencies, 0.99),
        notes=notes,
    )


def delete_run_keys(redis_url: str, run_id: str) -> int:
    """Delete every key whose name contains ``run_id`` (all keys a run creates do)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{run_id}*", count=1000))
        deleted = 0
        for i in range(0, len(keys), 500):
            deleted += int(client.delete(*keys[i : i + 500]))
        return deleted
    finally:
        client.close()


def _proc_cpu_rss(pid: int | None) -> tuple[float, float]:
    """(CPU seconds user+sys, RSS MB) of a live process from /proc; (nan, nan) if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, IndexError):
        return math.nan, math.nan
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    rss_kb = next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")), 0)
    return cpu, rss_kb / 1024


@dataclass(frozen=True)
class _Measured:
    raw: list[bytes | str]
    enqueue_s: float
    worker_cpu_s: float  # worker CPU between warm-up done and last completion
    producer_cpu_s: float  # this process's CPU over the same window (enqueue + polling)
    worker_rss_mb: float

    def describe(self, jobs: int) -> str:
        return (
            f"enqueue phase {self.enqueue_s:.2f} s; worker CPU "
            f"{self.worker_cpu_s * 1000 / jobs:.2f} ms/job, producer CPU "
            f"{self.producer_cpu_s * 1000 / jobs:.2f} ms/job, worker RSS "
            f"{self.worker_rss_mb:.0f} MB"
        )


def _cleanup(redis_url: str, run_id: str) -> None:
    """delete_run_keys for a ``finally``: a Redis failure here must not mask the run's error."""
    try:
        delete_run_keys(redis_url, run_id)
    except redis.RedisError as exc:
        print(
            f"warning: could not delete keys of {run_id} ({exc}); "
            f"delete keys matching '*{run_id}*' by hand",
            file=sys.stderr,
        )


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:  # pragma: no cover - only if installed oddly
        return "?"


def _run_loop(coro: Coroutine[Any, Any, Any], use_uvloop: bool) -> Any:
    if use_uvloop:
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# --------------------------------------------------------------------------- worker processes


class _WorkerHandle(Protocol):
    @property
    def pid(self) -> int | None: ...
    def alive(self) -> bool: ...
    def stop(self) -> None: ...
    def describe(self) -> str: ...


class _SpawnedWorker:
    """A worker in a multiprocessing 'spawn' child (saq, arq)."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._proc = ctx.Process(target=target, args=args, daemon=True)
        self._proc.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()  # SIGTERM: both saq and arq shut down cleanly on it
            self._proc.join(STOP_GRACE_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def describe(self) -> str:
        return f"worker pid={self._proc.pid} exitcode={self._proc.exitcode}"


class _SubprocessWorker:
    """A worker started as a command (Celery's own CLI); its output goes to a temp file."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        # Lives as long as the worker; closed in stop(), so no context manager.
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        try:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)  # Celery: warm shutdown
                try:
                    self._proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
        finally:
            self._log.close()

    def describe(self) -> str:
        tail = ""
        if not self._log.closed:
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace")[-2000:]
        return f"worker pid={self._proc.pid} returncode={self._proc.poll()}; output tail:\n{tail}"


# --------------------------------------------------------------------------- producer harness


class _Producer(Protocol):
    async def start(self) -> None: ...
    async def enqueue(self, enqueued_at: float) -> None: ...
    async def close(self) -> None: ...


async def _wait_for_records(
    client: aioredis.Redis,
    key: str,
    count: int,
    deadline: float,
    worker: _WorkerHandle,
    what: str,
) -> None:
    while True:
        have = int(await client.llen(key))
        if have >= count:
            return
        if not worker.alive():
            raise BenchError(f"{what}: worker exited ({have}/{count} done); {worker.describe()}")
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what}: timed out with {have}/{count} jobs completed; {worker.describe()}"
            )
        await asyncio.sleep(POLL_S)


async def _measure(
    system: str,
    jobs: int,
    redis_url: str,
    done_key: str,
    producer: _Producer,
    worker: _WorkerHandle,
    timeout: float,
) -> _Measured:
    """Warm up, enqueue ``jobs`` jobs, wait for all records."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await producer.start()
        # Ready = the worker has run one job end to end (and the producer is connected).
        await producer.enqueue(time.time())
        await _wait_for_records(
            client, done_key, 1, time.monotonic() + READY_TIMEOUT_S, worker, f"{system} warm-up"
        )
        await client.delete(done_key)

        deadline = time.monotonic() + timeout
        worker_cpu0 = _proc_cpu_rss(worker.pid)[0]
        producer_cpu0 = time.process_time()
        t0 = time.time()
        for i in range(jobs):
            await producer.enqueue(time.time())
            if i % 256 == 255 and time.monotonic() > deadline:
                raise BenchError(f"{system}: timed out after {timeout:.0f} s while enqueueing")
        enqueue_s = time.time() - t0
        await _wait_for_records(client, done_key, jobs, deadline, worker, system)
        producer_cpu = time.process_time() - producer_cpu0
        worker_cpu1, worker_rss = _proc_cpu_rss(worker.pid)
        return _Measured(
            raw=list(await client.lrange(done_key, 0, -1)),
            enqueue_s=enqueue_s,
            worker_cpu_s=worker_cpu1 - worker_cpu0,
            producer_cpu_s=producer_cpu,
            worker_rss_mb=worker_rss,
        )
    finally:
        try:
            await producer.close()
        finally:
            await client.aclose()


def _validate(jobs: int, concurrency: int) -> None:
    if jobs < 1 or concurrency < 1:
        raise ValueError("jobs and concurrency must be >= 1")


# --------------------------------------------------------------------------- saq


def _saq_worker_main(
    redis_url: str, queue_name: str, done_key: str, concurrency: int, use_uvloop: bool
) -> None:
    """Child process: one saq Worker with ``concurrency`` slots; stops on SIGTERM."""
    from saq import Queue, Worker
    from saq.types import Context

    # saq's stop() always warns that idle dequeue tasks "did not finish within the shutdown grace
    # period" (default grace 0) before cancelling them; that is expected here, not a problem.
    logging.getLogger("saq").setLevel(logging.ERROR)
    sink: dict[str, aioredis.Redis] = {}

    async def startup(ctx: Context) -> None:
        sink["r"] = aioredis.Redis.from_url(redis_url)

    async def shutdown(ctx: Context) -> None:
        await sink["r"].aclose()

    async def noop(ctx: Context, *, enqueued_at: float) -> None:
        await sink["r"].rpush(done_key, _record_value(enqueued_at))

    async def main() -> None:
        queue = Queue.from_url(redis_url, name=queue_name)
        worker = Worker(
            queue,
            functions=[("noop", noop)],
            concurrency=concurrency,
            startup=startup,
            shutdown=shutdown,
        )
        try:
            await queue.connect()
            await worker.start()  # returns after SIGTERM/SIGINT
        finally:
            await queue.disconnect()

    _run_loop(main(), use_uvloop)


class _SaqProducer:
    def __init__(self, redis_url: str, queue_name: str) -> None:
        from saq import Queue

        self._queue = Queue.from_url(redis_url, name=queue_name)

    async def start(self) -> None:
        await self._queue.connect()

    async def enqueue(self, enqueued_at: float) -> None:
        if await self._queue.enqueue("noop", enqueued_at=enqueued_at) is None:
            raise BenchError("saq: enqueue returned None (duplicate job key)")

    async def close(self) -> None:
        await self._queue.disconnect()


def run_saq(
    jobs: int,
    concurrency: int,
    redis_url: str = DEFAULT_REDIS_URL,
    *,
    timeout: float | None = None,
    use_uvloop: bool = False,
) -> Result:
    _validate(jobs, concurrency)
    run_id = _new_run_id("saq")
    done_key = f"{run_id}:done"
    timeout = default_timeout(jobs) if timeout is None else timeout
    worker: _WorkerHandle | None = None
    try:
        worker = _SpawnedWorker(
            _saq_worker_main, (redis_url, run_id, done_key, concurrency, use_uvloop)
        )
        producer = _SaqProducer(redis_url, run_id)
        measured: _Measured = _run_loop(
            _measure("saq", jobs, redis_url, done_key, producer, worker, timeout), use_uvloop
        )
    finally:
        if worker is not None:
            worker.stop()
        _cleanup(redis_url, run_id)
    notes = (
        f"saq {_version('saq')}; 1 spawned process, Worker(concurrency={concurrency}), "
        f"{'uvloop' if use_uvloop else 'asyncio'} loop; producer: sequential "
        "`await queue.enqueue('noop', enqueued_at=...)`; saq defaults otherwise; completion "
        f"recorded in-task (RPUSH), no result polling; {measured.describe(jobs)}"
    )
    return _summarize("saq", jobs, concurrency, measured.raw, notes)


# --------------------------------------------------------------------------- arq


def _arq_worker_main(
    redis_url: str, queue_name: str, done_key: str, concurrency: int, use_uvloop: bool
) -> None:
    """Child process: one arq Worker with ``max_jobs=concurrency``; stops on SIGTERM."""
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    sink: dict[str, aioredis.Redis] = {}

    async def startup(ctx: dict[Any, Any]) -> None:
        sink["r"] = aioredis.Redis.from_url(redis_url)

    async def shutdown(ctx: dict[Any, Any]) -> None:
        await sink["r"].aclose()

    async def noop(ctx: dict[Any, Any], enqueued_at: float) -> None:
        await sink["r"].rpush(done_key, _record_value(enqueued_at))

    if use_uvloop:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # arq's Worker binds to the current loop in __init__
    worker = Worker(
        functions=[func(noop, name="noop")],
        queue_name=queue_name,
        redis_settings=RedisSettings.from_dsn(redis_url),
        max_jobs=concurrency,
        on_startup=startup,
        on_shutdown=shutdown,
    )
    try:
        worker.run()  # SIGTERM -> handle_sig cancels the main task -> close()
    except asyncio.CancelledError:
        # handle_sig also cancels jobs still in their post-processing (result write) and close()
        # then re-raises that cancellation; it is the expected end of a SIGTERM'd arq worker.
        pass
    finally:
        loop.close()


class _ArqProducer:
    def __init__(self, redis_url: str, queue_name: str, run_id: str) -> None:
        self._redis_url = redis_url
        self._queue_name = queue_name
        self._run_id = run_id
        self._n = 0
        self._pool: Any = None

    async def start(self) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self._pool = await create_pool(
            RedisSettings.from_dsn(self._redis_url), default_queue_name=self._queue_name
        )

    async def enqueue(self, enqueued_at: float) -> None:
        self._n += 1
        # _job_id (documented enqueue_job option) only namespaces keys for cleanup; arq's
        # default is uuid4().hex, and the uniqueness check it does is the same either way.
        job = await self._pool.enqueue_job("noop", enqueued_at, _job_id=f"{self._run_id}:{self._n}")
        if job is None:
            raise BenchError("arq: enqueue_job returned None (duplicate job id)")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


def run_arq(
    jobs: int,
    concurrency: int,
    redis_url: str = DEFAULT_REDIS_URL,
    *,
    timeout: float | None = None,
    use_uvloop: bool = False,
) -> Result:
    _validate(jobs, concurrency)
    run_id = _new_run_id("arq")
    queue_name = f"arq:queue:{run_id}"
    done_key = f"{run_id}:done"
    timeout = default_timeout(jobs) if timeout is None else timeout
    worker: _WorkerHandle | None = None
    try:
        worker = _SpawnedWorker(
            _arq_worker_main, (redis_url, queue_name, done_key, concurrency, use_uvloop)
        )
        producer = _ArqProducer(redis_url, queue_name, run_id)
        measured: _Measured = _run_loop(
            _measure("arq", jobs, redis_url, done_key, producer, worker, timeout), use_uvloop
        )
    finally:
        if worker is not None:
            worker.stop()
        _cleanup(redis_url, run_id)
    notes = (
        f"arq {_version('arq')}; 1 spawned process, Worker(max_jobs={concurrency}), "
        f"{'uvloop' if use_uvloop else 'asyncio'} loop; producer: sequential "
        "`await pool.enqueue_job('noop', t, _job_id=...)`; arq defaults otherwise "
        "(poll_delay=0.5 s, queue_read_limit=max(5*max_jobs,100), keep_result=3600 s so results "
        f"are stored); completion recorded in-task (RPUSH); {measured.describe(jobs)}"
    )
    return _summarize("arq", jobs, concurrency, measured.raw, notes)


# --------------------------------------------------------------------------- celery

_CELERY_ENV = ("BENCH_CELERY_REDIS_URL", "BENCH_CELERY_PREFIX", "BENCH_CELERY_DONE_KEY")
_celery_app_cache: Any = None


def build_celery_app(redis_url: str, key_prefix: str, done_key: str) -> tuple[Any, Any]:
    """The Celery app and its ``noop`` task (same definition in producer and worker).

    Redis broker, no result backend, ``task_acks_late=True``; every broker key is prefixed with
    ``key_prefix`` (kombu's documented ``global_keyprefix`` transport option) for cleanup.
    """
    from celery import Celery

    app = Celery("safeurl_bench", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        broker_transport_options={"global_keyprefix": key_prefix},
        # Same behaviour as the 5.x default; set only to silence its deprecation warning.
        broker_connection_retry_on_startup=True,
    )
    sink = redis.Redis.from_url(redis_url)

    @app.task(name="bench.noop")  # type: ignore[untyped-decorator]  # celery ships no types
    def noop(enqueued_at: float) -> None:
        sink.rpush(done_key, _record_value(enqueued_at))

    return app, noop


def __getattr__(name: str) -> Any:
    """``celery -A bench.competitors:celery_app`` builds the worker's app from the environment."""
    global _celery_app_cache
    if name == "celery_app":
        if _celery_app_cache is None:
            url, prefix, done_key = (os.environ[k] for k in _CELERY_ENV)
            _celery_app_cache = build_celery_app(url, prefix, done_key)[0]
        return _celery_app_cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CeleryProducer:
    def __init__(self, redis_url: str, key_prefix: str, done_key: str) -> None:
        self._app, self._noop = build_celery_app(redis_url, key_prefix, done_key)

    async def start(self) -> None:
        return None

    async def enqueue(self, enqueued_at: float) -> None:
        self._noop.delay(enqueued_at)  # blocking publish; nothing else runs on this loop

    async def close(self) -> None:
        self._app.close()


def run_celery(
    jobs: int,
    concurrency: int,
    redis_url: str = DEFAULT_REDIS_URL,
    *,
    timeout: float | None = None,
    pool: str = DEFAULT_CELERY_POOL,
) -> Result:
    _validate(jobs, concurrency)
    if pool not in CELERY_POOLS:
        raise ValueError(f"pool must be one of {CELERY_POOLS}")
    run_id = _new_run_id("celery")
    key_prefix = f"{run_id}:"
    done_key = f"{run_id}:done"
    timeout = default_timeout(jobs) if timeout is None else timeout
    env = dict(os.environ)
    env.update(zip(_CELERY_ENV, (redis_url, key_prefix, done_key), strict=True))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH")) if p)
    argv = [
        sys.executable, "-m", "celery", "-A", "bench.competitors:celery_app", "worker",
        f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=WARNING",
        "--hostname", f"{run_id}@%h",
    ]  # fmt: skip
    worker: _WorkerHandle | None = None
    try:
        worker = _SubprocessWorker(argv, env)
        producer = _CeleryProducer(redis_url, key_prefix, done_key)
        measured: _Measured = _run_loop(
            _measure("celery", jobs, redis_url, done_key, producer, worker, timeout), False
        )
    finally:
        if worker is not None:
            worker.stop()
        _cleanup(redis_url, run_id)
    notes = (
        f"celery {_version('celery')} / kombu {_version('kombu')}; 1 worker process, "
        f"--pool={pool} --concurrency={concurrency}; task_acks_late=True, other settings default "
        "(prefetch multiplier 4, gossip/mingle/heartbeat on); no result backend - completion "
        "recorded in-task (RPUSH); producer: sequential `noop.delay(t)`; "
        f"{measured.describe(jobs)}"
    )
    return _summarize("celery", jobs, concurrency, measured.raw, notes)


# --------------------------------------------------------------------------- CLI


def run_system(
    system: str,
    jobs: int,
    concurrency: int,
    redis_url: str = DEFAULT_REDIS_URL,
    *,
    timeout: float | None = None,
    celery_pool: str = DEFAULT_CELERY_POOL,
    use_uvloop: bool = False,
) -> Result:
    if system == "saq":
        return run_saq(jobs, concurrency, redis_url, timeout=timeout, use_uvloop=use_uvloop)
    if system == "arq":
        return run_arq(jobs, concurrency, redis_url, timeout=timeout, use_uvloop=use_uvloop)
    if system == "celery":
        return run_celery(jobs, concurrency, redis_url, timeout=timeout, pool=celery_pool)
    raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")


def format_result(r: Result) -> str:
    return (
        f"{r.system:<7} jobs={r.jobs} concurrency={r.concurrency} "
        f"{r.jobs_per_s:9.1f} jobs/s  p50={r.p50_ms:.1f} ms  p95={r.p95_ms:.1f} ms  "
        f"p99={r.p99_ms:.1f} ms  ({r.seconds:.2f} s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.competitors",
        description="No-op throughput/latency of saq, arq and Celery (one worker process each).",
    )
    parser.add_argument("--system", choices=[*SYSTEMS, "all"], default="all")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL))
    parser.add_argument("--celery-pool", choices=CELERY_POOLS, default=DEFAULT_CELERY_POOL)
    parser.add_argument(
        "--uvloop", action="store_true", help="run saq/arq worker and producer on uvloop"
    )
    parser.add_argument("--notes", action="store_true", help="also print each result's notes")
    args = parser.parse_args(argv)

    systems = SYSTEMS if args.system == "all" else (args.system,)
    for system in systems:
        result = run_system(
            system,
            args.jobs,
            args.concurrency,
            args.redis_url,
            celery_pool=args.celery_pool,
            use_uvloop=args.uvloop,
        )
        print(format_result(result), flush=True)
        if args.notes:
            print(f"        notes: {result.notes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
