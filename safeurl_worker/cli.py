"""The `safeurl-worker` command.

  safeurl-worker run                 run the worker (SIGTERM/SIGINT: graceful; a second: at once)
  safeurl-worker api                 the HTTP API and the callback deliverer (docs/api.md)
  safeurl-worker migrate             create or update the schema (idempotent)
  safeurl-worker submit URL [--wait] insert a QUEUED job and XADD its id, as the API service does
                                     (--lane L --tenant T; exit 75 when T's quota is full)
  safeurl-worker status [JOB_ID]     fleet status table (or --json); one job as JSON, with its
                                     artifacts (--screenshot FILE writes a render's screenshot)
  safeurl-worker check               verify the delivery invariants
  safeurl-worker retry ...           re-queue FAILED/TIMED_OUT jobs
  safeurl-worker dlq list|replay|purge   the dead-letter stream
  safeurl-worker prune --older-than 30d  delete finished jobs (results, audit, callbacks)
  safeurl-worker token NAME --scopes ... a new API token and its API_TOKENS entry
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import sys
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import aiodocker
import asyncpg
import orjson
import redis.exceptions
import uvloop

from . import __version__, brands, ops
from .api.config import SCOPES, hash_token, load_api_settings
from .config import TENANT_PATTERN, ConfigError, Settings, load_settings
from .intake import DuplicateWorkerId
from .logs import setup_logging
from .runner import LABEL_JOB, job_of_container
from .store import QuotaExceeded, Store, Submission
from .wiring import (
    consumer_for,
    install_signals,
    ops_consumer,
    redis_for,
    run_worker,
    store_for,
    wired_worker,
)

# Kept importable from here (tests and the benchmark build workers through these).
__all__ = ["_install_signals", "build_parser", "main", "wired_worker"]
_install_signals = install_signals


# --- commands -----------------------------------------------------------------------------


async def cmd_migrate(settings: Settings, _: argparse.Namespace) -> int:
    async with store_for(settings) as store:
        await store.migrate()
    print("schema is up to date")
    return 0


# `submit` refused by the tenant's queued-scans quota: sysexits' EX_TEMPFAIL, "try again later",
# distinct from a failed scan (1) and a usage error or --wait timeout (2).
EXIT_QUOTA = 75


async def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    if args.lane is not None and args.lane not in settings.lane_weights:
        print(f"safeurl-worker submit: lane {args.lane!r} is not configured; the lanes are: "
              f"{', '.join(settings.lane_weights)}", file=sys.stderr)
        return 2
    lane = None if args.lane == "default" else args.lane
    async with store_for(settings) as store:
        consumer = consumer_for(settings)
        try:
            sub = Submission(uuid.uuid4(), args.url, mode=args.mode, lane=lane,
                             tenant=args.tenant)
            try:
                got = await ops.submit_scan(store, consumer, sub,
                                            ops.max_queued(settings, args.tenant))
            except QuotaExceeded as exc:
                print(f"safeurl-worker submit: refused: {exc}", file=sys.stderr)
                return EXIT_QUOTA
            job_id = got.id
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
    if args.job_id is None and args.screenshot:
        print("--screenshot needs a JOB_ID", file=sys.stderr)
        return 2
    if args.job_id is None:
        async with store_for(settings) as store, redis_for(settings) as rds:
            st = await ops.fleet_status(store, rds, settings)
        print(_json(st) if args.json else ops.status_table(st))
        return 0
    async with store_for(settings) as store:
        view = await store.job_view(args.job_id)
        if view is None:
            print(f"no job {args.job_id}", file=sys.stderr)
            return 1
        saved = (await ops.save_artifact(store, args.job_id, "screenshot", args.screenshot)
                 if args.screenshot else None)
    print(_json(view))
    if args.screenshot and saved is None:
        print(f"job {args.job_id} has no screenshot (not a completed render scan)",
              file=sys.stderr)
        return 1
    if saved is not None:
        print(f"wrote {saved[1]} bytes ({saved[0]}) to {args.screenshot}", file=sys.stderr)
    return 0


async def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    async with store_for(settings) as store, redis_for(settings) as rds:
        docker = aiodocker.Docker(url=f"unix://{settings.docker_socket_path}")
        try:
            found = await docker.containers.list(
                all=True, filters=orjson.dumps({"label": [LABEL_JOB]}).decode())
            # Only this deployment's jobs: the daemon may run other fleets' scans too.
            ours = await store.all_job_ids()
            # A warm container's job label is empty: its name carries the job (runner.py).
            containers = [c.id[:12] for c in found
                          if job_of_container(c["Labels"], c["Names"]) in ours]
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
    async with store_for(settings) as store, ops_consumer(settings) as consumer:
        done, skipped = await ops.retry_jobs(
            store, consumer, job_ids=args.job_ids, state=args.state,
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
    if args.action == "purge" and not args.ids and not args.all and not _confirm(
            "purge EVERY dead letter? [y/N] "):
        print("safeurl-worker dlq purge: name the entry ids, or pass --all to purge every "
              "entry", file=sys.stderr)
        return 2
    async with store_for(settings) as store, ops_consumer(settings) as consumer:
        if args.action == "list":
            entries = await ops.dlq_list(consumer, args.count)
            print(_json(entries) if args.json else "\n".join(
                f"{e['id']}  {e.get('reason', '?'):<18} job_id={e.get('job_id', '-')}  "
                f"original={e.get('original_id', '-')}" for e in entries) or "(empty)")
            return 0
        if args.action == "replay":
            if not args.ids:
                print("safeurl-worker dlq replay: name the entry ids (see dlq list)",
                      file=sys.stderr)
                return 2
            n, problems = await ops.dlq_replay(store, consumer, args.ids,
                                               f"cli:{settings.worker_id}", _progress("replay"))
            for p in problems:
                print(p, file=sys.stderr)
            print(f"replayed {n}")
            return 1 if problems else 0
        n = await ops.dlq_purge(consumer, args.ids, everything=not args.ids)
        print(f"purged {n}")
        return 0


def _confirm(question: str) -> bool:
    """Ask on a terminal; anywhere else (scripts, CI) the answer is no."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    print(question, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


async def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    def show(t: dict[str, int]) -> None:
        if sys.stderr.isatty():
            print(f"prune: {t['jobs']} jobs so far", end="\r", file=sys.stderr, flush=True)

    async with store_for(settings) as store, ops_consumer(settings) as consumer:
        totals = await ops.prune(store, args.older_than, consumer=consumer, batch=args.batch,
                                 progress=show)
    print("pruned " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in totals.items()))
    return 0


async def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from .api.server import run_api  # FastAPI and uvicorn load only for this command

    await run_api(settings, args.api_settings)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """A new random token (or the given one) and its API_TOKENS entry. No services needed."""
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        print(f"safeurl-worker token: --scopes takes {', '.join(SCOPES)} "
              f"(got {args.scopes!r})", file=sys.stderr)
        return 2
    token = sys.stdin.readline().strip() if args.stdin else secrets.token_urlsafe(32)
    if len(token) < 16:
        print("safeurl-worker token: a token needs at least 16 characters", file=sys.stderr)
        return 2
    if not args.stdin:
        print(f"token (give it to the client; it is not stored anywhere): {token}",
              file=sys.stderr)
    bound = f":{args.tenant}" if args.tenant else ""
    print(f"{args.name}:{hash_token(token)}:{'+'.join(scopes)}{bound}")
    return 0


def _progress(what: str) -> Callable[[int, int], None]:
    def show(i: int, n: int) -> None:
        if sys.stderr.isatty() or i == n:
            end = "\n" if i == n else "\r"
            print(f"{what}: {i}/{n}", end=end, file=sys.stderr, flush=True)
    return show


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    api = args.api_settings
    await run_worker(settings, api.callback_default_url or None, notify=api.notify_finished)
    return 0


def _json(obj: Any) -> str:
    return orjson.dumps(obj, default=str, option=orjson.OPT_INDENT_2).decode()


def _tenant(value: str) -> str:
    if not re.match(TENANT_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"not a tenant name: {value!r} (1-64 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit)")
    return value


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
    sub.add_parser("run", help="run the worker", description="Run one worker replica. All "
                   "configuration comes from the environment (README.md, Configuration).",
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog=_environment_help() + "\n\nexample: WORKER_CONCURRENCY=8 "
                   "safeurl-worker run").set_defaults(fn=cmd_run)
    sub.add_parser("api", help="serve the HTTP API and deliver completion callbacks",
                   description="The HTTP API (OpenAPI at /openapi.json, docs at /docs) and the "
                   "callback deliverer; see docs/api.md. Run any number of replicas.",
                   epilog="example: API_PORT=8080 API_TOKENS=\"$(safeurl-worker token ci "
                   "--scopes submit,read)\" CALLBACK_SECRET=... safeurl-worker api"
                   ).set_defaults(fn=cmd_api)
    sub.add_parser("migrate", help="create or update the schema (idempotent)",
                   epilog="example: DATABASE_URL=postgresql://db/safeurl safeurl-worker migrate"
                   ).set_defaults(fn=cmd_migrate)
    s = sub.add_parser("submit", help="queue a scan as the API service would",
                       epilog="example: safeurl-worker submit https://example.org --wait; "
                       "safeurl-worker submit https://example.org --lane bulk --tenant acme. "
                       "Exit status: 0 queued (with --wait: completed), 1 failed, 2 usage "
                       f"error or --wait timed out, {EXIT_QUOTA} refused by the tenant's "
                       "queued-scans quota (one line on stderr: try again later).")
    s.add_argument("url")
    s.add_argument("--wait", action="store_true", help="wait and print the result as JSON")
    s.add_argument("--timeout", type=float, default=120, help="seconds to wait (default 120)")
    s.add_argument("--brief", action="store_true", help="with --wait: a short summary, not JSON")
    s.add_argument("--mode", choices=["static", "render"],
                   help="scan mode (default: the worker's SCAN_MODE): render runs a browser")
    s.add_argument("--lane", help="priority lane, one of LANES (default: default)")
    s.add_argument("--tenant", type=_tenant,
                   help="the tenant the scan counts against (its quota and fair share)")
    s.set_defaults(fn=cmd_submit)
    st = sub.add_parser("status", help="fleet status (with queued/running per lane and tenant), "
                        "or one job's row, result and audit trail",
                        epilog="examples: safeurl-worker status; safeurl-worker status --json; "
                        "safeurl-worker status 3f2c8a4e-...; "
                        "safeurl-worker status 3f2c8a4e-... --screenshot shot.png")
    st.add_argument("job_id", type=_uuid, nargs="?")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--screenshot", metavar="FILE",
                    help="with JOB_ID: write a render scan's screenshot (PNG/JPEG) to FILE")
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
    dl.add_argument("ids", nargs="*", help="entry ids (replay: required; purge: these, or "
                    "--all)")
    dl.add_argument("--all", action="store_true", help="purge: every entry (without ids, "
                    "purge asks on a terminal and refuses elsewhere)")
    dl.add_argument("--count", type=int, default=100)
    dl.add_argument("--json", action="store_true")
    dl.set_defaults(fn=cmd_dlq)
    pr = sub.add_parser("prune", help="delete finished jobs older than a duration",
                        description="Delete jobs that finished (COMPLETED, FAILED, TIMED_OUT) "
                        "longer ago than --older-than, with their results, audit rows and "
                        "callbacks, in small batches (short transactions; safe while workers "
                        "run). Unfinished jobs are never touched.",
                        epilog="example: safeurl-worker prune --older-than 30d")
    pr.add_argument("--older-than", type=_duration, required=True, metavar="DURATION",
                    help="e.g. 30d, 12h, 90m, 2w")
    pr.add_argument("--batch", type=int, default=500, help="jobs per statement (default 500)")
    pr.set_defaults(fn=cmd_prune)
    tk = sub.add_parser("token", help="make an API token and its API_TOKENS entry",
                        description="Prints a new random token on stderr and its hashed "
                        "API_TOKENS entry (name:sha256:scopes) on stdout. Only the hash is "
                        "configured; the token goes to the client.",
                        epilog="example: safeurl-worker token ci --scopes submit,read")
    tk.add_argument("name")
    tk.add_argument("--scopes", default="read", help="comma-separated: submit, read, operate")
    tk.add_argument("--stdin", action="store_true", help="hash the token read from stdin "
                    "instead of making one")
    tk.add_argument("--tenant", type=_tenant, help="bind the token to a tenant: its scans "
                    "are that tenant's")
    tk.set_defaults(fn=None, sync=cmd_token)
    return p


def _duration(value: str) -> float:
    try:
        return ops.parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _environment_help() -> str:
    """Every variable `run` reads, with its default (the Settings fields, by name)."""
    lines = ["environment (default):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=False)
        shown = "<hostname>-<pid>" if name == "worker_id" else (
            "''" if default == "" else str(default))
        lines.append(f"  {name.upper():<28} {shown}")
    lines.append(f"  {'CALLBACK_DEFAULT_URL':<28} '' (see docs/api.md)")
    lines.append(f"  {'NOTIFY_FINISHED':<28} False (see docs/contract.md)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "sync", None) is not None:
        code: int = args.sync(args)
        return code
    try:
        settings = load_settings()
        if args.command == "run":  # a bad operator catalogue stops start-up, like bad config
            brands.load_catalogue(settings.brands_path or None)
        # CALLBACK_DEFAULT_URL and NOTIFY_FINISHED are the workers' too
        if args.command in ("run", "api"):
            args.api_settings = load_api_settings()
    except ConfigError as exc:
        print(f"safeurl-worker: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings)
    fn: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = args.fn
    try:
        return uvloop.run(fn(settings, args))
    except KeyboardInterrupt:
        return 130
    except (DuplicateWorkerId, ConfigError) as exc:  # ConfigError: FETCHER_NETWORK missing
        print(f"safeurl-worker: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
            redis.exceptions.RedisError, aiodocker.DockerError) as exc:
        print(f"safeurl-worker: {args.command} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
