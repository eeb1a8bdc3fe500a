"""The worker: reads the stream, drives each job through the state machine, acks at the end.

Where things happen (the one-minute tour):
  * a message is read ............ `Worker._read_loop` -> `Consumer.read`
  * a job is claimed ............. `Worker._load` -> `Store.load_and_claim` (versioned)
  * a container runs ............. `Worker._scan` -> `Runner.run`
  * a state transition is written  `Worker._move` -> `Store.transition` / `Store.complete`
  * the message is acked ......... `Worker._finish` (only after a terminal write committed)
  * leases / takeover ............ `Worker._lease_loop`, `Worker._reclaim_loop`
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import redis.exceptions
from pydantic import ValidationError

from . import analysis
from .config import Settings
from .consumer import Consumer, Delivery
from .janitor import Janitor
from .metrics import Metrics
from .models import Analysis, Job, Report, State, StreamMessage
from .runner import ContainerRunner, DockerUnavailable, RunResult, RunStatus
from .store import Store

log = logging.getLogger("safeurl.worker")
T = TypeVar("T")

MAX_URL_LENGTH = 2048
# Errors of a dependency that is down or restarting: retried, never the job's fault.
TRANSIENT = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def url_problem(url: str) -> str | None:
    """Why a URL is refused before any container runs (INVALID_URL), or None."""
    if len(url) > MAX_URL_LENGTH:
        return f"URL is {len(url)} characters; the limit is {MAX_URL_LENGTH}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"unparsable URL: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r} is not http or https"
    if not parts.hostname:
        return "URL has no host"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "URL contains whitespace or control characters"
    return None


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


class Conflict(Exception):
    """A versioned write matched no row: another worker moved the job."""


@dataclasses.dataclass
class InFlight:
    delivery: Delivery
    task: asyncio.Task[None] | None = None
    acked: bool = False
    job_id: uuid.UUID | None = None


class Worker:
    def __init__(self, settings: Settings, store: Store, consumer: Consumer,
                 runner: ContainerRunner, metrics: Metrics,
                 blocklist: analysis.Blocklist | None = None,
                 janitor: Janitor | None = None) -> None:
        self.settings = settings
        self.store = store
        self.consumer = consumer
        self.runner = runner
        self.metrics = metrics
        self.blocklist = blocklist
        self.janitor = janitor
        self.worker_id = settings.worker_id
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._inflight: dict[str, InFlight] = {}
        self._running: set[uuid.UUID] = set()  # job ids being processed here
        self._stopping = asyncio.Event()
        self._docker_ready = asyncio.Event()
        self._docker_ready.set()
        self.taking_jobs = False

    # --- lifecycle --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading new messages; `run` then drains in-flight jobs."""
        self._stopping.set()

    @property
    def docker_ready(self) -> bool:
        return self._docker_ready.is_set()

    async def run(self) -> None:
        await self._retry("redis", self.consumer.ensure_group)
        own = await self._retry("redis", self.consumer.read_own_pending)
        for d in own:  # our previous life's messages come first
            self._start(d)
        loops = [asyncio.create_task(self._lease_loop()),
                 asyncio.create_task(self._reclaim_loop())]
        if self.janitor:
            loops.append(asyncio.create_task(self.janitor.loop()))
        self.taking_jobs = True
        log.info("worker started", extra={"worker_id": self.worker_id,
                                          "concurrency": self.settings.worker_concurrency})
        try:
            await self._read_loop()
        finally:
            self.taking_jobs = False
            await self._drain()
            for t in loops:
                t.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            log.info("worker stopped", extra={"worker_id": self.worker_id})

    async def _drain(self) -> None:
        """Let in-flight jobs finish within the grace period; then cancel the rest and hand
        their messages back for another replica to reclaim at once."""
        tasks = [f.task for f in self._inflight.values() if f.task]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        left = [m for m, f in self._inflight.items() if not f.acked]
        if left:
            with contextlib.suppress(*TRANSIENT):
                await self.consumer.release(left, self.settings.lease_timeout_ms)
            log.warning("left messages pending for other replicas",
                        extra={"count": len(left), "worker_id": self.worker_id})

    # --- reading ----------------------------------------------------------------------------

    async def _take_slots(self, wait: bool) -> int:
        """Reserve free concurrency slots: we only read as many messages as we can run, so the
        rest stay in the stream for other replicas."""
        if wait:
            await self._slots.acquire()
            n = 1
        else:
            n = 0
        while n < self.settings.read_batch and not self._slots.locked():
            await self._slots.acquire()
            n += 1
        return n

    def _give_back(self, n: int) -> None:
        for _ in range(n):
            self._slots.release()

    async def _read_loop(self) -> None:
        """Fill free slots with new entries (reclaimed ones queue ahead: `_reclaim_loop`)."""
        errors = 0
        while not self._stopping.is_set():
            await self._docker_ready.wait()  # no Docker, no new work (nothing is failed)
            n = await self._take_slots(wait=True)
            got: list[Delivery] = []
            try:
                got = await self._until_stopped(
                    self.consumer.read(n, self.settings.read_block_ms)) or []
                errors = 0
            except TRANSIENT as exc:
                errors += 1
                self._transient("redis", exc)
                await self._sleep(backoff(errors))
            self._give_back(n - len(got))
            for d in got:
                self._start(d, holds_slot=True)

    async def _reclaim_loop(self) -> None:
        """Twice a second, take over entries whose owner stopped renewing them, even when all
        slots are busy: they wait for a slot in the semaphore's FIFO queue, ahead of the read
        loop, so a dead replica's jobs never wait behind a backlog. At most one extra batch
        of `WORKER_CONCURRENCY` is held this way (and renewed like any in-flight entry)."""
        # Twice a second: a dead replica's work restarts within the lease timeout + 0.5 s.
        interval = min(0.5, self.settings.lease_timeout_ms / 8000)
        limit = 2 * self.settings.worker_concurrency
        while not self._stopping.is_set():
            await asyncio.sleep(interval)
            room = limit - len(self._inflight)
            if room <= 0 or not self._docker_ready.is_set():
                continue
            try:
                got = await self.consumer.reclaim(self.settings.lease_timeout_ms, room)
            except TRANSIENT as exc:
                self._transient("redis", exc)
                continue
            for d in got:
                log.info("reclaimed message", extra={"message_id": d.message_id,
                                                     "deliveries": d.deliveries})
                self._start(d)

    async def _until_stopped(self, aw: Awaitable[T]) -> T | None:
        """Await `aw`, or give up on it when stop() is called (a blocked XREADGROUP)."""
        task = asyncio.ensure_future(aw)
        stop = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task in done:
            return task.result()
        task.cancel()
        # A message read in the same instant stays pending; it is released or reclaimed.
        with contextlib.suppress(asyncio.CancelledError, *TRANSIENT):
            await task
        return None

    def _start(self, d: Delivery, holds_slot: bool = False) -> None:
        if d.message_id in self._inflight:
            if holds_slot:
                self._slots.release()
            return
        f = self._inflight[d.message_id] = InFlight(d)
        f.task = asyncio.create_task(self._handle(f, holds_slot))
        self.metrics.in_flight.set(len(self._inflight))

    async def _handle(self, f: InFlight, holds_slot: bool) -> None:
        if not holds_slot:
            await self._slots.acquire()
        try:
            await self._process(f)
        except asyncio.CancelledError:
            log.info("job abandoned (lease lost or shutdown)",
                     extra={"job_id": str(f.job_id), "message_id": f.delivery.message_id})
            raise
        except Exception:
            # A bug must not kill the worker or lose the message: it stays pending and is
            # redelivered (and dead-lettered after MAX_DELIVERIES).
            log.exception("unexpected error; message left pending",
                          extra={"job_id": str(f.job_id), "message_id": f.delivery.message_id})
        finally:
            self._slots.release()
            self._inflight.pop(f.delivery.message_id, None)
            self.metrics.in_flight.set(len(self._inflight))

    # --- one job ----------------------------------------------------------------------------

    async def _process(self, f: InFlight) -> None:
        d = f.delivery
        try:
            msg = StreamMessage.model_validate(d.fields)
        except ValidationError:
            self.metrics.malformed.inc()
            await self._dead_letter(f, "MALFORMED_MESSAGE", None)
            return
        f.job_id = msg.job_id
        if msg.job_id in self._running:
            # A second message for a job this worker is already running: a duplicate.
            self.metrics.duplicates.inc()
            await self._retry("redis", lambda: self.consumer.ack_if_owner(d.message_id))
            f.acked = True
            return
        self._running.add(msg.job_id)
        try:
            await self._process_job(f, msg.job_id)
        finally:
            self._running.discard(msg.job_id)

    async def _process_job(self, f: InFlight, job_id: uuid.UUID) -> None:
        d = f.delivery
        if d.deliveries > self.settings.max_deliveries:
            job, claimed = await self._load(job_id, claim=False)  # poison: never claim it
        else:
            job, claimed = await self._load(job_id, claim=True)
        if job is None:
            await self._dead_letter(f, "UNKNOWN_JOB", None)
        elif job.state.terminal:
            self.metrics.duplicates.inc()
            await self._ack(f)
        elif d.deliveries > self.settings.max_deliveries:
            await self._dead_letter(f, "MAX_DELIVERIES", job)
        elif claimed or job.state is State.QUEUED:
            await self._own(f, job)
        elif d.reclaimed:
            await self._own(f, job, take_over=True)
        else:
            # A second message for a job another worker is running right now: not ours.
            self.metrics.duplicates.inc()
            await self._retry("redis", lambda: self.consumer.ack_if_owner(d.message_id))
            f.acked = True

    async def _load(self, job_id: uuid.UUID, claim: bool) -> tuple[Job | None, bool]:
        """Read the job and (claim=True) claim it if QUEUED, in one statement. The API may
        XADD before its INSERT commits: an unknown id is retried a few times."""
        for attempt in range(self.settings.unknown_job_retries + 1):
            if claim:
                job, claimed = await self._retry("postgres", lambda: self.store.load_and_claim(
                    job_id, worker_id=self.worker_id, detail={}))
            else:
                job, claimed = await self._retry("postgres",
                                                 lambda: self.store.get_job(job_id)), False
            if job is not None:
                return job, claimed
            if attempt < self.settings.unknown_job_retries:
                await self._sleep(self.settings.unknown_job_delay_ms / 1000 * (attempt + 1))
        return None, False

    async def _own(self, f: InFlight, job: Job, take_over: bool = False) -> None:
        """Make the job ours (unless already claimed), refuse a bad URL, or scan it. Losing a
        versioned write anywhere on the way means another worker owns the job: drop it."""
        try:
            problem = url_problem(job.url)
            if problem:
                await self._finish(f, job, State.FAILED, "INVALID_URL", problem)
                return
            if take_over:
                job = await self._take_over(f, job)
            elif job.state is State.QUEUED:  # not claimed by the load (URL failed the filter)
                job = await self._move(job, State.FETCHING, add_attempt=True)
            await self._scan(f, job)
        except Conflict:
            self.metrics.conflicts.inc()
            log.info("state conflict: another worker owns the job; dropping it",
                     extra={"job_id": str(job.id), "worker_id": self.worker_id})
            await self._retry("redis", lambda: self.consumer.ack_if_owner(f.delivery.message_id))
            f.acked = True

    async def _take_over(self, f: InFlight, job: Job) -> Job:
        """The owner's lease expired: it died or is partitioned. Take the job over with a
        versioned write; the old owner's next write will fail and it will drop the job."""
        self.metrics.redeliveries.inc()
        moved = await self._move(job, State.FETCHING, add_attempt=True,
                                 detail={"reclaimed_from": job.worker_id,
                                         "message_id": f.delivery.message_id})
        # The old owner's container may still be running: it is ours to stop now.
        with contextlib.suppress(Exception):
            await self.runner.remove_labelled(job.id)
        return moved

    async def _scan(self, f: InFlight, job: Job) -> None:
        if job.created_at is not None:
            self.metrics.stage.labels("queue_wait").observe(
                max(0.0, time.time() - job.created_at.timestamp()))
        if await self._reuse_cached(f, job):
            return
        result = await self._run_container(job)
        self.metrics.container_runs.labels(result.status.value).inc()
        self.metrics.stage.labels("fetch").observe(result.seconds)
        while result.status is RunStatus.CRASHED and job.attempts < self.settings.max_attempts:
            job = await self._move(job, State.FETCHING, add_attempt=True,
                                   detail={"retry": result.detail})
            result = await self._run_container(job)
            self.metrics.container_runs.labels(result.status.value).inc()
        if result.status is RunStatus.TIMEOUT:
            await self._finish(f, job, State.TIMED_OUT, "TIMEOUT", result.detail)
        elif result.status is RunStatus.CRASHED:
            await self._finish(f, job, State.FAILED, "CONTAINER_ERROR", result.detail)
        elif result.status is RunStatus.OUTPUT_INVALID or result.report is None:
            await self._finish(f, job, State.FAILED, "OUTPUT_INVALID", result.detail)
        elif result.report.error and result.report.error.code == "BLOCKED_TARGET":
            await self._finish(f, job, State.FAILED, "BLOCKED_TARGET",
                               result.report.error.message)
        else:
            await self._analyze_and_complete(f, job, result.report)

    async def _reuse_cached(self, f: InFlight, job: Job) -> bool:
        """A recent result for the same normalized URL answers this scan without a container
        (RESULT_CACHE_TTL_S; 0 disables). The result row says where it came from."""
        key = _url_key(job.url)
        if not self.settings.result_cache_ttl_s or key is None:
            return False
        hit = await self._retry("postgres", lambda: self.store.cached_result(
            key, self.settings.result_cache_ttl_s))
        if hit is None:
            return False
        try:
            report = Report.model_validate(hit["report"])
            cached = Analysis(verdict=hit["verdict"], score=hit["score"],
                              signals=hit["signals"] or [],
                              analyzer_version=hit["analyzer_version"] or "")
        except ValidationError:
            return False  # an old or foreign row: scan afresh
        job = await self._move(job, State.ANALYZING, detail={"cached_from": str(hit["job_id"])})
        self.metrics.cache_hits.inc()
        await self._complete(f, job, report, cached, cached_from=hit["job_id"])
        return True

    async def _run_container(self, job: Job) -> RunResult:
        """Run the fetcher; while Docker is unreachable, wait for it (the job is not failed,
        its lease is kept) and stop taking new messages meanwhile."""
        attempt = 0
        while True:
            try:
                result = await self.runner.run(job.id, job.url)
                self._docker_ready.set()
                return result
            except DockerUnavailable as exc:
                attempt += 1
                if self._docker_ready.is_set():
                    log.error("docker unreachable; pausing intake", extra={"error": str(exc)})
                self._docker_ready.clear()
                self._transient("docker", exc)
                await self._sleep(backoff(attempt, base=0.5, cap=5))
                with contextlib.suppress(Exception):  # leftovers of the failed attempt
                    await self.runner.remove_labelled(job.id)

    async def _analyze_and_complete(self, f: InFlight, job: Job, report: Report) -> None:
        job = await self._move(job, State.ANALYZING)
        t0 = time.monotonic()
        result = analysis.analyze(job.url, report, blocklist=self.blocklist,
                                  suspicious_threshold=self.settings.suspicious_threshold,
                                  malicious_threshold=self.settings.malicious_threshold)
        self.metrics.stage.labels("analyze").observe(time.monotonic() - t0)
        await self._complete(f, job, report, result)

    async def _complete(self, f: InFlight, job: Job, report: Report, result: Analysis,
                        cached_from: uuid.UUID | None = None) -> None:
        key = _url_key(job.url)
        op = _op_token()
        version = await self._retry("postgres", lambda: self.store.complete(
            job, worker_id=self.worker_id, report=report, analysis=result, url_key=key,
            cached_from=cached_from, detail={"op": op}))
        if version is None and not await self._landed(job, op):
            raise Conflict
        self.metrics.verdicts.labels(result.verdict.value).inc()
        await self._done(f, job, State.COMPLETED)

    # --- writes and acks --------------------------------------------------------------------

    async def _move(self, job: Job, to: State, *, add_attempt: bool = False,
                    detail: dict[str, Any] | None = None, error_code: str | None = None,
                    error_message: str | None = None) -> Job:
        """One versioned transition; raises Conflict when another worker got there first."""
        op = _op_token()
        new = await self._retry("postgres", lambda: self.store.transition(
            job, to, worker_id=self.worker_id, detail={**(detail or {}), "op": op},
            add_attempt=add_attempt, error_code=error_code, error_message=error_message))
        if new is None:
            new = await self._landed(job, op)
            if new is None:
                raise Conflict
        log.debug("transition", extra={"job_id": str(job.id), "from": job.state.value,
                                       "state": to.value, "version": new.version})
        return new

    async def _landed(self, job: Job, op: str) -> Job | None:
        """After a zero-row write: did our own write commit before the connection dropped?
        (A retried write then sees its own version bump as a conflict.) The audit row of the
        next version carries the write's token, so this is exact."""
        ours = await self._retry("postgres", lambda: self.store.audit_op(job.id,
                                                                           job.version + 1))
        if ours != op:
            return None
        return await self._retry("postgres", lambda: self.store.get_job(job.id))

    async def _finish(self, f: InFlight, job: Job, to: State, code: str, message: str) -> None:
        """A terminal failure: write it, then ack."""
        await self._move(job, to, error_code=code, error_message=message[:2000],
                         detail={"error_code": code})
        await self._done(f, job, to)

    async def _done(self, f: InFlight, job: Job, to: State) -> None:
        await self._ack(f)
        self.metrics.jobs.labels(to.value.lower()).inc()
        total = time.monotonic() - f.delivery.read_at
        self.metrics.stage.labels("total").observe(total)
        log.info("job finished", extra={"job_id": str(job.id), "state": to.value,
                                        "worker_id": self.worker_id,
                                        "seconds": round(total, 3)})

    async def _ack(self, f: InFlight) -> None:
        # Called only after the terminal state committed (or the job was already terminal).
        f.acked = True  # from here on the lease need not (and cannot) be renewed
        await self._retry("redis", lambda: self.consumer.ack_batched(f.delivery.message_id))
        f.acked = True

    async def _dead_letter(self, f: InFlight, reason: str, job: Job | None) -> None:
        if job is not None and not job.state.terminal:
            with contextlib.suppress(Conflict):
                await self._move(job, State.FAILED, error_code=reason,
                                 error_message=f"dead-lettered: {reason}",
                                 detail={"dead_letter": reason})
                self.metrics.jobs.labels("failed").inc()
        await self._retry("redis", lambda: self.consumer.dead_letter(f.delivery, reason))
        f.acked = True
        self.metrics.dead_letters.labels(reason.lower()).inc()
        log.warning("message dead-lettered", extra={"message_id": f.delivery.message_id,
                                                    "reason": reason,
                                                    "job_id": str(f.job_id)})

    # --- leases -----------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Renew our in-flight messages; cancel jobs whose message another replica took."""
        while True:
            await asyncio.sleep(self.settings.lease_renew_ms / 1000)
            ids = [m for m, f in self._inflight.items() if not f.acked]
            try:
                owned = await self.consumer.renew(ids)
            except TRANSIENT as exc:
                self._transient("redis", exc)
                continue
            for mid in set(ids) - owned:
                f = self._inflight.get(mid)
                if f and f.task and not f.acked:
                    log.warning("lease lost; abandoning job",
                                extra={"job_id": str(f.job_id), "message_id": mid})
                    f.task.cancel()

    # --- helpers ----------------------------------------------------------------------------

    async def _retry(self, dependency: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Retry a call through transient outages (exponential backoff with jitter). Gives up
        only when the worker is stopping, leaving the message pending."""
        attempt = 0
        while True:
            try:
                return await fn()
            except TRANSIENT as exc:
                attempt += 1
                self._transient(dependency, exc)
                if self._stopping.is_set() and attempt > 3:
                    raise
                await asyncio.sleep(backoff(attempt))

    def _transient(self, dependency: str, exc: BaseException) -> None:
        self.metrics.errors.labels(dependency).inc()
        log.warning("transient error", extra={"dependency": dependency,
                                              "error": f"{type(exc).__name__}: {exc}"[:300]})

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _op_token() -> str:
    """Identifies one write attempt in its audit row."""
    return os.urandom(6).hex()


def _url_key(url: str) -> str | None:
    try:
        return analysis.normalize_url(url)
    except ValueError:
        return None
