"""The worker: intake hands it messages, the pipeline turns each into an outcome, and `settle` is
the one place where a job is settled and its message acked.

Where things happen (the one-minute tour):
  * a message is read ............ `Intake._read_loop` -> `Consumer.read`    (intake.py)
  * lanes, tenants, politeness ... `Consumer.read` (weighted order, quotas), `Worker._polite`
  * a job is claimed ............. `Pipeline._load` -> `Store.load_and_claim` (pipeline.py)
  * a container runs ............. `Pipeline._container` -> `Runner.run`     (runner.py)
  * a state transition is written  `OwnedJob.move` / `OwnedJob.complete`     (job.py, store.py)
  * a job is settled, msg acked .. `Worker.settle` (only after the terminal write committed)
  * heartbeat / takeover ......... `Intake._beat_loop`, `Intake._reclaim_loop`
  * lost work recovered .......... `Janitor` (janitor.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from .blocklist import Blocklist
from .brands import Catalogue
from .config import Settings
from .consumer import Consumer, Message
from .errors import is_transient, retrying
from .intake import InFlight, Intake
from .janitor import Janitor
from .job import Conflict, OwnedJob, Owner, Rejected
from .metrics import Metrics
from .models import State, StreamMessage
from .pipeline import (
    Completed,
    DeadLettered,
    Duplicate,
    Failed,
    Outcome,
    Pipeline,
    Released,
    SetAside,
    parse_message,
    url_key,
)
from .politeness import DomainGate, target_domain
from .runner import ContainerRunner, KeepsWarm
from .store import Store

log = logging.getLogger("safeurl.worker")


class Worker:
    def __init__(self, settings: Settings, store: Store, consumer: Consumer,
                 runner: ContainerRunner, metrics: Metrics,
                 blocklist: Blocklist | None = None,
                 janitor: Janitor | None = None,
                 stopping: asyncio.Event | None = None,
                 catalogue: Catalogue | None = None,
                 gate: DomainGate | None = None) -> None:
        self.settings = settings
        self.store = store
        self.consumer = consumer
        self.metrics = metrics
        self.janitor = janitor
        self.worker_id = settings.worker_id
        self.token = uuid.uuid4().hex  # this process life: a restart under the same id differs
        self.stopping = stopping or asyncio.Event()
        self.runner = runner
        self.gate = gate  # PER_DOMAIN_CONCURRENCY across the fleet (politeness.py)
        self._docker_ready = asyncio.Event()
        self._docker_ready.set()
        self._running: set[uuid.UUID] = set()  # job ids being processed here
        self.intake = Intake(settings, consumer, metrics, self.token, self.handle,
                             self.stopping, self._docker_ready, runner.ping, gate)
        self.owner = Owner(store, self.worker_id, self.token, self.stopping,
                           self.intake.on_error)
        lease_s = settings.lease_timeout_ms / 1000
        self.pipeline = Pipeline(settings, self.owner, runner, metrics, consumer.owner_state,
                                 lambda: consumer.steady_for() >= lease_s, self._docker_ready,
                                 blocklist, catalogue)

    def stop(self) -> None:
        """Stop taking messages; `run` then drains in-flight jobs."""
        self.stopping.set()

    @property
    def taking_jobs(self) -> bool:
        return self.intake.taking_jobs

    @property
    def docker_ready(self) -> bool:
        return self._docker_ready.is_set()

    async def run(self) -> None:
        janitor = asyncio.create_task(self.janitor.loop()) if self.janitor else None
        # Warm containers for the free slots (runner.py); stopped after the drain, which
        # removes the ones left and waits for the background removals.
        warm = asyncio.create_task(self.runner.keep_warm()) \
            if isinstance(self.runner, KeepsWarm) else None
        log.info("worker started", extra={"worker_id": self.worker_id,
                                          "concurrency": self.settings.worker_concurrency})
        try:
            await self.intake.run()
        finally:
            if janitor:
                janitor.cancel()
                # Bounded: the exit must not wait on a cancel lost inside a client library.
                await asyncio.wait([janitor], timeout=5)
            if warm:
                warm.cancel()  # its clean-up removes the warm containers: let it finish
                await asyncio.gather(warm, return_exceptions=True)
            log.info("worker stopped", extra={"worker_id": self.worker_id})

    # --- one message ------------------------------------------------------------------------

    async def handle(self, f: InFlight) -> None:
        """Run the pipeline for one message and settle what it returns."""
        m = f.message
        parsed = parse_message(m.fields)
        job_id = parsed.job_id if parsed else None
        if job_id is not None and job_id in self._running:
            # A second message for a job running here: looked at again once that job is done.
            self.metrics.duplicates.inc()
            await self.settle(m, SetAside("the job is running here"))
            return
        if job_id is not None:
            self._running.add(job_id)
        try:
            if parsed is not None and not await self._polite(f, parsed):
                # Stopping while deferred, or set aside: the job was never claimed, and its
                # message stays pending here (handed back by the drain, or adopted again).
                return
            self._waited(m)
            outcome = await self._outcome(f, parsed, job_id)
            await self.settle(m, outcome)
        except asyncio.CancelledError:
            # Shutdown, or another replica took the message: give the job back if it is still
            # ours (a versioned write, so it never undoes the new owner's takeover).
            with contextlib.suppress(Exception):
                await asyncio.shield(self.settle(m, Released(job_id)))
            raise
        except Exception:
            # Only a dependency failing while we stop, or a bug, gets here; the message stays
            # pending either way and is handed back or adopted again.
            log.exception("could not settle; message left pending",
                          extra={"message_id": m.message_id, "job_id": str(job_id)})
        finally:
            if job_id is not None:
                self._running.discard(job_id)
            if f.hold and self.gate:
                hold, f.hold = f.hold, None
                with contextlib.suppress(Exception):  # unreleased, it expires within a lease
                    await asyncio.shield(self.gate.release(*hold))

    # --- politeness ---------------------------------------------------------------------------

    async def _polite(self, f: InFlight, parsed: StreamMessage) -> bool:
        """Take a turn of the job's target domain (PER_DOMAIN_CONCURRENCY across the fleet)
        before the job is claimed. Must it wait, it waits outside its slot, keeping its message
        (renewed, not a delivery failure), ahead of lower lanes waiting here for the same
        domain. False: stopping while it waited; or MAX_DEFERRED jobs wait already, and this
        one is set aside (its message stays pending, unrenewed: adopted again after
        LEASE_RENEW_MS, no fault) so the replica keeps reading other work."""
        gate = self.gate
        if gate is None or gate.open:
            return True
        domain = f.message.fields.get("domain") or await self._domain_of(parsed.job_id)
        if not domain:
            return True  # an unknown job or a URL without a host: the pipeline says why
        holder = f"{parsed.job_id}@{self.token}"
        # Renewed and released from the moment Redis may grant it (a release of a place not
        # held is a no-op), so a place granted while the job waits for a slot is never lost.
        f.hold = (domain, holder)
        if not await retrying("redis", lambda: gate.try_acquire(domain, holder), self.stopping,
                              self.intake.on_error):
            return True
        if not self.intake.can_defer():
            self.metrics.deferrals.labels("set_aside").inc()
            return False
        self.metrics.deferrals.labels("domain").inc()
        rank = self._lane_rank(f.message)
        return await self.intake.outside_slot(f, lambda: retrying(
            "redis", lambda: gate.acquire(domain, holder, self.stopping, rank), self.stopping,
            self.intake.on_error))

    def _lane_rank(self, m: Message) -> int:
        lanes = list(self.settings.lane_weights)
        lane = m.queue.lane if m.queue else "default"
        return lanes.index(lane) if lane in lanes else len(lanes)

    async def _domain_of(self, job_id: uuid.UUID) -> str | None:
        """The target domain from the row, for messages that do not carry it (a plain XADD)."""
        job = await self.owner.db(lambda: self.store.get_job(job_id))
        return target_domain(job.url) if job is not None else None

    def _waited(self, m: Message) -> None:
        """Queue wait per lane and tenant: from the entry's XADD (its id's milliseconds) to
        now. Only first deliveries: a taken-over message has waited for other reasons."""
        if m.reclaimed or m.deliveries > 1:
            return
        with contextlib.suppress(ValueError):
            added = int(m.message_id.partition("-")[0]) / 1000
            lane, tenant = (m.queue.lane, m.queue.tenant or "") if m.queue else ("default", "")
            self.metrics.lane_wait.labels(lane, tenant).observe(max(0.0, time.time() - added))

    async def _outcome(self, f: InFlight, parsed: object, job_id: uuid.UUID | None) -> Outcome:
        try:
            return await self.pipeline.process(parsed, f.message.reclaimed,  # type: ignore[arg-type]
                                               f.message.message_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_transient(exc):  # a dependency still down while we stop: no one's fault
                return Released(job_id)
            log.exception("unexpected error; releasing the job",
                          extra={"message_id": f.message.message_id, "job_id": str(job_id)})
            return Released(job_id, fault=True)

    # --- settling: the only place that acks -------------------------------------------------

    async def settle(self, m: Message, outcome: Outcome) -> None:
        """Settle a job: its terminal write commits first, and only then is its message acked
        (or dead-lettered, which acks it atomically). A released or set-aside message is not
        acked: it stays pending for whoever finishes the job."""
        outcome = await self._write(outcome, m.message_id)
        if isinstance(outcome, Completed | Failed | Duplicate):
            await self._redis(m.ack)
        elif isinstance(outcome, DeadLettered):
            reason = outcome.reason
            await self._redis(lambda: m.dead_letter(reason))
        self._count(m, outcome)

    async def _write(self, outcome: Outcome, message_id: str) -> Outcome:
        """The settling write of an outcome; returns what to do with the message."""
        try:
            if isinstance(outcome, Completed):
                await outcome.job.complete(outcome.report, outcome.result, outcome.cached_from,
                                           url_key(outcome.job.job.url), outcome.artifacts,
                                           outcome.analyzing)
            elif isinstance(outcome, Failed):
                await outcome.job.fail(outcome.state, outcome.code, outcome.message)
            elif isinstance(outcome, DeadLettered) and outcome.job is not None:
                await outcome.job.fail(State.FAILED, outcome.reason,
                                       f"dead-lettered: {outcome.reason}",
                                       detail={"message_id": message_id})
            elif isinstance(outcome, Released) and outcome.job_id is not None:
                await self._release(outcome.job_id, outcome.fault)
        except Conflict:
            job = getattr(outcome, "job", None)
            if not isinstance(job, OwnedJob):
                return outcome
            self.metrics.conflicts.inc()
            return await self.pipeline.recheck(job.id)
        except Rejected as exc:
            if not isinstance(outcome, Completed):
                raise
            # The database refuses this result however often we try: fail the job once.
            log.error("result rejected by the database", extra={"job_id": str(outcome.job.id),
                                                               "error": str(exc)})
            text = str(exc).encode("ascii", "backslashreplace").decode()
            return await self._write(Failed(outcome.job, State.FAILED, "RESULT_REJECTED", text),
                                     message_id)
        return outcome

    async def _release(self, job_id: uuid.UUID, fault: bool) -> None:
        """Put a job we own back to QUEUED so the next owner claims it cleanly."""
        job = await self.owner.db(lambda: self.store.get_job(job_id))
        if job is None or job.state.terminal or job.owner_token not in (None, self.token):
            return
        if job.state is State.QUEUED and not fault:
            return
        with contextlib.suppress(Conflict):
            await OwnedJob(self.owner, job).move(
                State.QUEUED, add_fault=fault, detail={"released": "error" if fault else "stop"})

    async def _redis(self, fn: Callable[[], Awaitable[None]]) -> None:
        await retrying("redis", fn, self.stopping, self.intake.on_error)

    def _count(self, m: Message, outcome: Outcome) -> None:
        total = time.monotonic() - m.read_at
        if isinstance(outcome, Completed | Failed | DeadLettered):
            lane, tenant = (m.queue.lane, m.queue.tenant or "") if m.queue else ("default", "")
            state = "completed" if isinstance(outcome, Completed) else \
                outcome.state.value.lower() if isinstance(outcome, Failed) else "dead_lettered"
            self.metrics.lane_jobs.labels(lane, tenant, state).inc()
        extra = {"message_id": m.message_id, "outcome": type(outcome).__name__,
                 "worker_id": self.worker_id}
        if isinstance(outcome, Completed):
            self.metrics.verdicts.labels(outcome.result.verdict.value).inc()
            self.metrics.jobs.labels("completed").inc()
        elif isinstance(outcome, Failed):
            self.metrics.jobs.labels(outcome.state.value.lower()).inc()
            extra["error_code"] = outcome.code
        elif isinstance(outcome, DeadLettered):
            self.metrics.dead_letters.labels(outcome.reason.lower()).inc()
            if outcome.job is not None:
                self.metrics.jobs.labels("failed").inc()
            log.warning("message dead-lettered", extra={**extra, "reason": outcome.reason})
            return
        else:  # Duplicate, SetAside, Released: visible, so a stuck message can be explained
            why = getattr(outcome, "why", None) or ("fault" if getattr(outcome, "fault", False)
                                                    else None)
            log.info("message not settled here", extra={**extra, "why": why})
            return
        self.metrics.stage.labels("total").observe(total)
        log.info("job finished", extra={**extra, "job_id": str(outcome.job.id),
                                        "seconds": round(total, 3)})
