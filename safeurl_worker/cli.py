"""The `safeurl-worker` command.

  safeurl-worker run                 run the worker (SIGTERM/SIGINT: graceful; a second: at once)
  safeurl-worker migrate             create or update the schema (idempotent)
  safeurl-worker submit URL [--wait] insert a QUEUED job and XADD its id, as the API service does
  safeurl-worker status [JOB_ID]     fleet status table (or --json); one job as JSON
  safeurl-worker check               verify the delivery invariants
  safeurl-worker retry ...           re-queue FAILED/TIMED_OUT jobs
  safeurl-worker dlq list|replay|purge   the dead-letter stream
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

import aiodocker
import asyncpg
import orjson
import redis.exceptions
import uvloop

from . import __version__, brands, ops, urls
from .blocklist import Blocklist
from .config import ConfigError, Settings, load_settings
from .consumer import Consumer, connect
from .errors import backoff, is_transient, pause
from .intake import DuplicateWorkerId
from .janitor import Janitor
from .metrics import HealthServer, Metrics
from .runner import LABEL_JOB, ContainerRunner, Runner
from .store import Store, create_pool
from .worker import Worker

log = logging.getLogger("safeurl")
_STD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(f"{k}={v}" for k, v in record.__dict__.items() if k not in _STD_ATTRS)
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        text = f"{base}  {extra}" if extra else base
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


# --- wiring -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _store(settings: Settings, size: int = 2, warm: bool = False) -> AsyncIterator[Store]:
    # warm: open every connection now rather than on the first busy second.
    pool = await create_pool(settings.database_url, size, min_size=size if warm else 1)
    try:
        yield Store(pool)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[Any]:
    client = connect(settings.redis_dsn)
    try:
        yield client
    finally:
        await client.aclose()


def _consumer(settings: Settings) -> Consumer:
    return Consumer(connect(settings.redis_dsn, settings.read_block_ms), settings.scan_stream,
                    settings.scan_group, settings.worker_id, settings.dead_letter_stream,
                    settings.dead_letter_maxlen)


class StoppedDuringStartup(Exception):
    """SIGTERM arrived while we were still waiting for a dependency."""


async def _connect_store(settings: Settings, stopping: asyncio.Event,
                         status: dict[str, str]) -> Store:
    """Open the PostgreSQL pool, waiting with backoff while the server is down or restarting:
    a dependency that blinks at start-up must not end the process. /readyz says why."""
    attempt = 0
    while True:
        try:
            # One connection per concurrent job plus the loops: no job waits for a connection.
            size = settings.worker_concurrency + 3
            return Store(await create_pool(settings.database_url, size, min_size=size))
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            status["postgres"] = f"connecting: {type(exc).__name__}: {exc}"[:200]
            log.warning("waiting for postgres", extra={"error": status["postgres"]})
            await pause(stopping, backoff(attempt, base=0.5, cap=5))
            if stopping.is_set():
                raise StoppedDuringStartup from exc


@contextlib.asynccontextmanager
async def wired_worker(settings: Settings, runner: ContainerRunner | None = None,
                       stopping: asyncio.Event | None = None) -> AsyncIterator[Worker]:
    """A Worker connected to PostgreSQL, Redis and Docker, with its health server up first (so
    /readyz explains a slow start). `runner` replaces the Docker runner (the benchmark's stub)."""
    stopping = stopping or asyncio.Event()
    metrics = Metrics()
    consumer = _consumer(settings)
    docker = aiodocker.Docker(url=f"unix://{settings.docker_socket_path}")
    runner = runner or Runner(settings, docker)
    wiring: dict[str, Any] = {"status": {}}
    health = HealthServer(metrics, _probes(wiring, consumer, runner), settings.metrics_port,
                          on_scrape=lambda: _scrape(consumer, metrics))
    store: Store | None = None
    try:
        if settings.metrics_port:
            await health.start()
        store = await _connect_store(settings, stopping, wiring["status"])
        wiring["store"] = store
        blocklist = Blocklist(settings.blocklist_path or None)
        catalogue = brands.load_catalogue(settings.brands_path or None)  # checked in main()
        urls.registrable_domain("example.com")  # load the public suffix list now, once
        janitor = Janitor(settings, store, consumer, runner, metrics)
        worker = Worker(settings, store, consumer, runner, metrics, blocklist, janitor,
                        stopping=stopping, catalogue=catalogue)
        wiring["worker"] = worker
        yield worker
    finally:
        await health.stop()
        if store is not None:  # a hung server must not hold up the exit
            try:
                await asyncio.wait_for(store.pool.close(), 1)
            except Exception:
                store.pool.terminate()
        await docker.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.redis.aclose(), 1)


async def run_worker(settings: Settings) -> None:
    stopping = asyncio.Event()
    _install_signals(stopping)  # first: SIGTERM is honoured while we wait for dependencies
    try:
        async with wired_worker(settings, stopping=stopping) as worker:
            await worker.run()
    except StoppedDuringStartup:
        log.info("stopped before start-up completed")


def _install_signals(stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    seen = {"count": 0}

    def on_signal(signum: int) -> None:
        seen["count"] += 1
        if seen["count"] > 1:
            log.error("second signal: exiting at once", extra={"signal": signum})
            os._exit(1)
        log.info("signal received: draining", extra={"signal": signum})
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def _probes(wiring: dict[str, Any], consumer: Consumer, runner: ContainerRunner
            ) -> dict[str, Callable[[], Awaitable[str | None]]]:
    async def pg() -> str | None:
        store: Store | None = wiring.get("store")
        if store is None:
            return str(wiring["status"].get("postgres", "connecting"))
        await store.pool.fetchval("SELECT 1")
        return None

    async def rd() -> str | None:
        await consumer.redis.ping()
        return None

    async def dk() -> str | None:
        return None if await runner.ping() else "docker daemon unreachable"

    async def taking() -> str | None:
        worker: Worker | None = wiring.get("worker")
        if worker is None or not worker.taking_jobs:
            return "not taking jobs (starting or draining)"
        return None if worker.docker_ready else "paused: waiting for docker"

    return {"postgres": pg, "redis": rd, "docker": dk, "worker": taking}


async def _scrape(consumer: Consumer, metrics: Metrics) -> None:
    for g in await consumer.redis.xinfo_groups(consumer.stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
        if name != consumer.group:
            continue
        labels = (consumer.stream, consumer.group)
        metrics.stream_pending.labels(*labels).set(int(g["pending"]))
        if g.get("lag") is not None:
            metrics.stream_lag.labels(*labels).set(int(g["lag"]))


# --- commands -----------------------------------------------------------------------------


async def cmd_migrate(settings: Settings, _: argparse.Namespace) -> int:
    async with _store(settings) as store:
        await store.migrate()
    print("schema is up to date")
    return 0


async def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    async with _store(settings) as store:
        consumer = _consumer(settings)
        try:
            job_id = await store.insert_job(args.url)
            await consumer.redis.xadd(settings.scan_stream, {"job_id": str(job_id)})
            if not args.wait:
                print(job_id)
                return 0
            return await _wait(store, job_id, args.timeout, args.brief)
        finally:
            await consumer.redis.aclose()


def brief(view: dict[str, Any]) -> str:
    """One job in a few lines: state, verdict, score, URL, error, signals."""
    job, res = view["job"], view["result"] or {}
    lines = [f"{job['state']:<10} {res.get('verdict', '-'):<11} "
             f"score={res.get('score', '-')!s:<4} {job['url']}"]
    if job["error_code"]:
        lines.append(f"{'':<10} error {job['error_code']}: {job['error_message']}")
    if res.get("signals"):
        lines.append(f"{'':<10} signals: " + ", ".join(s["name"] for s in res["signals"]))
    if res.get("cached_from"):
        lines.append(f"{'':<10} (reused the result of job {res['cached_from']})")
    return "\n".join(lines)


async def _wait(store: Store, job_id: uuid.UUID, timeout: float, short: bool = False) -> int:
    deadline = asyncio.get_running_loop().time() + timeout
    last = None
    while True:
        view = await store.job_view(job_id)
        assert view is not None
        state = view["job"]["state"]
        if state != last:
            print(f"{job_id} {state}", file=sys.stderr)
            last = state
        if state in ("COMPLETED", "FAILED", "TIMED_OUT"):
            print(brief(view) if short else _json(view))
            return 0 if state == "COMPLETED" else 1
        if asyncio.get_running_loop().time() > deadline:
            print(f"timed out waiting; last state {state}", file=sys.stderr)
            return 2
        await asyncio.sleep(0.2)


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    if args.job_id is None:
        async with _store(settings) as store, _redis(settings) as rds:
            st = await ops.fleet_status(store, rds, settings)
        print(_json(st) if args.json else ops.status_table(st))
        return 0
    async with _store(settings) as store:
        view = await store.job_view(args.job_id)
    if view is None:
        print(f"no job {args.job_id}", file=sys.stderr)
        return 1
    print(_json(view))
    return 0


async def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    async with _store(settings) as store, _redis(settings) as rds:
        docker = aiodocker.Docker(url=f"unix://{settings.docker_socket_path}")
        try:
            found = await docker.containers.list(
                all=True, filters=orjson.dumps({"label": [LABEL_JOB]}).decode())
            # Only this deployment's jobs: the daemon may run other fleets' scans too.
            ours = {str(r["id"]) for r in await store.pool.fetch("SELECT id FROM scan_jobs")}
            containers = [c.id[:12] for c in found
                          if (c["Labels"] or {}).get(LABEL_JOB) in ours]
        finally:
            await docker.close()
        report = await ops.check_invariants(store, rds, settings, containers,
                                            allow_active=args.allow_active)
    for p in report.problems:
        print(f"VIOLATION {p}")
    # Not a violation: repairs are the janitor's job, but many of them point at a sick fleet.
    print(f"janitor repaired {report.janitor_jobs} job(s)")
    print("all invariants hold" if not report.problems
          else f"{len(report.problems)} violation(s)")
    return 1 if report.problems else 0


async def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    if not (args.job_ids or args.state or args.error_code or args.since):
        print("safeurl-worker retry: name job ids or a filter (--state/--error-code/--since)",
              file=sys.stderr)
        return 2
    async with _store(settings) as store, _redis(settings) as rds:
        done, skipped = await ops.retry_jobs(
            store, rds, settings, job_ids=args.job_ids, state=args.state,
            error_code=args.error_code, since=args.since, limit=args.limit,
            actor=f"cli:{settings.worker_id}", progress=_progress("retry"))
    print(f"re-queued {done}, skipped {skipped}")
    return 0


async def cmd_dlq(settings: Settings, args: argparse.Namespace) -> int:
    bad = ops.bad_entry_ids(args.ids)
    if bad:
        print(f"safeurl-worker dlq: not a stream entry id: {', '.join(bad)} "
              "(see `safeurl-worker dlq list`)", file=sys.stderr)
        return 1
    async with _store(settings) as store, _redis(settings) as rds:
        if args.action == "list":
            entries = await ops.dlq_list(rds, settings, args.count)
            print(_json(entries) if args.json else "\n".join(
                f"{e['id']}  {e.get('reason', '?'):<18} job_id={e.get('job_id', '-')}  "
                f"original={e.get('original_id', '-')}" for e in entries) or "(empty)")
            return 0
        if args.action == "replay":
            if not args.ids:
                print("safeurl-worker dlq replay: name the entry ids (see dlq list)",
                      file=sys.stderr)
                return 2
            n, problems = await ops.dlq_replay(store, rds, settings, args.ids,
                                               f"cli:{settings.worker_id}", _progress("replay"))
            for p in problems:
                print(p, file=sys.stderr)
            print(f"replayed {n}")
            return 1 if problems else 0
        print(f"purged {await ops.dlq_purge(rds, settings, args.ids)}")
        return 0


def _progress(what: str) -> Callable[[int, int], None]:
    def show(i: int, n: int) -> None:
        if sys.stderr.isatty() or i == n:
            end = "\n" if i == n else "\r"
            print(f"{what}: {i}/{n}", end=end, file=sys.stderr, flush=True)
    return show


async def cmd_run(settings: Settings, _: argparse.Namespace) -> int:
    await run_worker(settings)
    return 0


def _json(obj: Any) -> str:
    return orjson.dumps(obj, default=str, option=orjson.OPT_INDENT_2).decode()


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a job id (UUID): {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safeurl-worker", description="Durable, sandboxed URL-scanning worker.",
        epilog="Configuration comes from the environment; see README.md.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the worker", epilog="example: WORKER_CONCURRENCY=8 "
                   "safeurl-worker run").set_defaults(fn=cmd_run)
    sub.add_parser("migrate", help="create or update the schema (idempotent)",
                   epilog="example: DATABASE_URL=postgresql://db/safeurl safeurl-worker migrate"
                   ).set_defaults(fn=cmd_migrate)
    s = sub.add_parser("submit", help="queue a scan as the API service would",
                       epilog="example: safeurl-worker submit https://example.org --wait")
    s.add_argument("url")
    s.add_argument("--wait", action="store_true", help="wait and print the result as JSON")
    s.add_argument("--timeout", type=float, default=120, help="seconds to wait (default 120)")
    s.add_argument("--brief", action="store_true", help="with --wait: a short summary, not JSON")
    s.set_defaults(fn=cmd_submit)
    st = sub.add_parser("status", help="fleet status, or one job's row, result and audit trail",
                        epilog="examples: safeurl-worker status; safeurl-worker status --json; "
                        "safeurl-worker status 3f2c8a4e-...")
    st.add_argument("job_id", type=_uuid, nargs="?")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(fn=cmd_status)
    c = sub.add_parser("check", help="verify the delivery invariants (exit 1 on a violation)",
                       epilog="example: safeurl-worker check --allow-active")
    c.add_argument("--allow-active", action="store_true",
                   help="do not report jobs that are still QUEUED/FETCHING/ANALYZING")
    c.set_defaults(fn=cmd_check)
    r = sub.add_parser("retry", help="re-queue FAILED or TIMED_OUT jobs",
                       epilog="examples: safeurl-worker retry 3f2c8a4e-...; "
                       "safeurl-worker retry --state TIMED_OUT --since 2026-11-23T10:00Z")
    r.add_argument("job_ids", type=_uuid, nargs="*")
    r.add_argument("--state", choices=["FAILED", "TIMED_OUT"])
    r.add_argument("--error-code")
    r.add_argument("--since", type=datetime.fromisoformat,
                   help="only jobs finished at or after this ISO time")
    r.add_argument("--limit", type=int, default=1000)
    r.set_defaults(fn=cmd_retry)
    dl = sub.add_parser("dlq", help="dead-letter stream: list, replay, purge",
                        epilog="examples: safeurl-worker dlq list; safeurl-worker dlq replay "
                        "1700000000000-0; safeurl-worker dlq purge")
    dl.add_argument("action", choices=["list", "replay", "purge"])
    dl.add_argument("ids", nargs="*", help="entry ids (replay: required; purge: default all)")
    dl.add_argument("--count", type=int, default=100)
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(fn=cmd_dlq)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "run":  # a bad operator catalogue stops start-up, like bad config
            brands.load_catalogue(settings.brands_path or None)
    except ConfigError as exc:
        print(f"safeurl-worker: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    fn: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = args.fn
    try:
        return uvloop.run(fn(settings, args))
    except KeyboardInterrupt:
        return 130
    except DuplicateWorkerId as exc:
        print(f"safeurl-worker: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
            redis.exceptions.RedisError, aiodocker.DockerError) as exc:
        print(f"safeurl-worker: {args.command} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
