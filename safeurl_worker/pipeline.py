"""One job's life, as decisions: a message in, an `Outcome` out. Nothing here acks.

    parse the message -> load (and claim) the job -> decide whose it is -> run the container
    (waiting out Docker) -> analyse -> Completed / Failed / DeadLettered / Duplicate / SetAside
    / Released

The scan mode (`scan_jobs.mode`, else SCAN_MODE): `static` runs the fetcher; `render` runs the
fetcher and then the browser image, and judges the rendered report with the static one beside
it (the render rules compare them). With RENDER_ON=suspicious a static scan whose verdict is
not clean is scanned again rendered; if that render fails, the static result stands.

The pipeline writes the non-terminal transitions (claim, takeover, retry) through `OwnedJob`;
the terminal write and the ack belong to `Worker.settle`, which receives the outcome. A scan
analysed here reaches ANALYZING in the completing write itself (`Completed.analyzing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

from . import analysis, artifacts, urls
from .blocklist import Blocklist
from .brands import Catalogue
from .config import Settings
from .errors import DependencyDown, backoff, cancelled_under_us, pause, retrying
from .fetcher import weburl
from .job import Conflict, OwnedJob, Owner
from .metrics import Metrics
from .models import Analysis, Job, Report, State, StreamMessage, Verdict
from .runner import ContainerRunner, DockerUnavailable, Mode, RunResult, RunStatus

log = logging.getLogger("safeurl.pipeline")
MAX_URL_LENGTH = 2048
DEAD_LETTER_CODES = frozenset({"MAX_DELIVERIES", "MALFORMED_MESSAGE", "UNKNOWN_JOB"})


# --- outcomes -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Completed:
    """Scanned and analysed: write COMPLETED with the result, then ack."""

    job: OwnedJob
    report: Report  # as stored: a render report without its artifacts' bytes
    result: Analysis
    cached_from: uuid.UUID | None = None
    artifacts: tuple[artifacts.Artifact, ...] = ()  # stored with the result (scan_artifacts)
    # The job is still FETCHING: the completing write goes through ANALYZING with this audit
    # detail (one statement, store._COMPLETE). None: the job is ANALYZING already.
    analyzing: dict[str, object] | None = None


@dataclasses.dataclass(frozen=True)
class Failed:
    """A terminal failure of the job's own making (FAILED or TIMED_OUT): write it, then ack."""

    job: OwnedJob
    state: State
    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class DeadLettered:
    """Poison: fail the job if there is one, then move the message to the dead-letter stream."""

    reason: str
    job: OwnedJob | None = None


@dataclasses.dataclass(frozen=True)
class Duplicate:
    """The job is already terminal: nothing to write, just ack."""


@dataclasses.dataclass(frozen=True)
class SetAside:
    """A live replica owns the job: keep the message pending (unacked, no longer renewed) and
    look again after a lease, until the job is terminal or its owner is gone."""

    why: str


@dataclasses.dataclass(frozen=True)
class Released:
    """Not finished here (shutdown, or a bug): put the job back to QUEUED if it is ours, leave
    the message pending for the next owner. `fault`: a bug counts against the job."""

    job_id: uuid.UUID | None
    fault: bool = False


Outcome = Completed | Failed | DeadLettered | Duplicate | SetAside | Released


def url_problem(url: str) -> str | None:
    """Why a URL is refused before any container runs (INVALID_URL), or None.

    The fetcher's own parse and rules (`weburl`: browser semantics), so the worker never
    refuses a URL the fetcher would take, nor runs a container for one it would refuse.
    """
    if len(url) > MAX_URL_LENGTH:
        return f"URL is {len(url)} characters; the limit is {MAX_URL_LENGTH}"
    try:
        return weburl.fetch_problem(weburl.parse(url))
    except weburl.WebUrlError as exc:
        return str(exc)


# --- the pipeline ---------------------------------------------------------------------------

class Pipeline:
    def __init__(self, settings: Settings, owner: Owner, runner: ContainerRunner,
                 metrics: Metrics, owner_state: Callable[[str, str], Awaitable[str]],
                 steady: Callable[[], bool], docker_ready: asyncio.Event,
                 blocklist: Blocklist | None = None,
                 catalogue: Catalogue | None = None) -> None:
        self.settings = settings
        self.owner = owner
        self.runner = runner
        self.metrics = metrics
        self.owner_state = owner_state  # alive / stopped / dead (a Redis question)
        self.steady = steady  # has Redis answered us for a whole lease (owners could beat)?
        self.docker_ready = docker_ready
        self.blocklist = blocklist
        self.catalogue = catalogue  # the brand catalogue (the shipped one when None)

    async def process(self, message: StreamMessage | None, reclaimed: bool,
                      message_id: str = "") -> Outcome:
        if message is None:
            self.metrics.malformed.inc()
            return DeadLettered("MALFORMED_MESSAGE")
        try:
            return await self._decide(message.job_id, reclaimed, message_id)
        except Conflict:
            self.metrics.conflicts.inc()
            return await self.recheck(message.job_id)

    async def recheck(self, job_id: uuid.UUID) -> Outcome:
        """Someone else moved the job: if it is finished, our message is a duplicate; if not,
        its owner is live or will be judged dead later - keep the message until then."""
        job = await self.owner.db(lambda: self.owner.store.get_job(job_id))
        if job is None or job.state.terminal:
            return Duplicate()
        return SetAside("another worker moved the job")

    async def _decide(self, job_id: uuid.UUID, reclaimed: bool, message_id: str) -> Outcome:
        job, claimed = await self._load(job_id)
        if job is None:
            return DeadLettered("UNKNOWN_JOB")
        if job.state is State.FAILED and job.error_code in DEAD_LETTER_CODES and \
                await self._failed_for(job, message_id):
            # Failed for poison through this very message, which is still here: the worker
            # that wrote FAILED died before dead-lettering it. Finish that (no second write).
            return DeadLettered(job.error_code)
        if job.state.terminal:
            self.metrics.duplicates.inc()
            return Duplicate()
        owned = OwnedJob(self.owner, job)
        if claimed:
            return await self._run(owned)
        if job.state is State.QUEUED:
            # Not claimed by the load: it used up its faults, its URL failed the filter, or a
            # concurrent claim won (then our move below conflicts).
            if job.faults >= self.settings.max_deliveries:
                return DeadLettered("MAX_DELIVERIES", owned)
            problem = url_problem(job.url)
            if problem:
                return Failed(owned, State.FAILED, "INVALID_URL", problem)
            await owned.move(State.FETCHING, add_attempt=True)
            return await self._run(owned)
        return await self._someone_elses(owned, reclaimed)

    async def _someone_elses(self, owned: OwnedJob, reclaimed: bool) -> Outcome:
        """FETCHING/ANALYZING: whose is it? Ours (a claim whose reply was lost), a live
        replica's (this message is a duplicate: set aside), one that exited cleanly (take over,
        no fault), or a dead one's (take over; the job may have taken its worker down, so it
        counts as a fault). Nobody is judged dead until Redis has answered us for a lease."""
        job = owned.job
        if job.owner_token == self.owner.token:
            await owned.move(State.FETCHING, detail={"resumed": True})
            return await self._run(owned)
        if not self.steady():
            return SetAside("redis was unreachable: owners may not have beaten again yet")
        state = await self._owner_state(job)
        if state == "alive":
            self.metrics.duplicates.inc()
            return SetAside(f"running on live replica {job.worker_id}")
        fault = state == "dead"
        if fault and job.faults + 1 >= self.settings.max_deliveries:
            await self._remove_leftovers(job)
            return DeadLettered("MAX_DELIVERIES", owned)
        self.metrics.redeliveries.inc()
        await owned.move(State.FETCHING, add_attempt=True, add_fault=fault,
                         detail={"taken_from": job.worker_id, "owner": state,
                                 "reclaimed": reclaimed})
        return await self._run(owned)

    async def _remove_leftovers(self, job: Job) -> None:
        """The job ran before (its owner died or stopped): a container of that run may still
        be there, and it is ours to remove now. Docker down: the janitor removes it later."""
        with contextlib.suppress(Exception):
            await self.runner.remove_labelled(job.id)

    async def _owner_state(self, job: Job) -> str:
        if not (job.owner_token and job.worker_id):
            return "dead"
        worker_id, token = job.worker_id, job.owner_token
        return await retrying("redis", lambda: self.owner_state(worker_id, token),
                              self.owner.stopping, self.owner.on_error)

    async def _failed_for(self, job: Job, message_id: str) -> bool:
        """Was `job` failed for poison through the message `message_id`? (Any other message
        for it is a plain duplicate.)"""
        o = self.owner
        detail = await o.db(lambda: o.store.last_audit_detail(job.id))
        return bool(message_id) and (detail or {}).get("message_id") == message_id

    async def _load(self, job_id: uuid.UUID) -> tuple[Job | None, bool]:
        """Read the job and claim it if QUEUED, in one statement. The API may XADD before its
        INSERT commits: an unknown id is retried a few times."""
        o, s = self.owner, self.settings
        for attempt in range(s.unknown_job_retries + 1):
            job, claimed = await o.db(lambda: o.store.load_and_claim(
                job_id, worker_id=o.worker_id, owner_token=o.token,
                max_faults=s.max_deliveries, detail={}))
            if job is not None:
                return job, claimed
            if attempt < s.unknown_job_retries:
                await pause(o.stopping, s.unknown_job_delay_ms / 1000 * (attempt + 1))
        return None, False

    # --- scanning ---------------------------------------------------------------------------

    async def _run(self, owned: OwnedJob) -> Outcome:
        job = owned.job
        if job.created_at is not None:
            self.metrics.stage.labels("queue_wait").observe(
                max(0.0, time.time() - job.created_at.timestamp()))
        problem = url_problem(job.url)
        if problem:
            return Failed(owned, State.FAILED, "INVALID_URL", problem)
        if job.attempts > 1:
            await self._remove_leftovers(job)
        mode = self.mode_of(job)
        cached = await self._cached(owned, rendered=mode == "render")
        if cached is not None:
            return cached
        static = await self._scan(owned, "static")
        if mode == "render" and not _refused(static):
            # The static report goes beside the rendered one: the render rules compare them.
            return await self._judge(owned, await self._scan(owned, "render"), static=static)
        return await self._judge(owned, static, escalate=self.settings.render_on == "suspicious")

    def mode_of(self, job: Job) -> Mode:
        """The job's own mode, else SCAN_MODE (an unknown value is the default, too)."""
        return "render" if (job.mode or self.settings.scan_mode) == "render" else "static"

    async def _scan(self, owned: OwnedJob, mode: Mode) -> RunResult:
        """One container run, again while it crashes and the job has faults left."""
        result = await self._container(owned, mode)
        while result.status is RunStatus.CRASHED and \
                owned.job.faults + 1 < self.settings.max_attempts:
            # The job crashed its container: a fault of its own; try again while it has any.
            await owned.move(State.FETCHING, add_attempt=True, add_fault=True,
                             detail={"retry": result.detail, **_mode_detail(mode)})
            result = await self._container(owned, mode)
        return result

    async def _judge(self, owned: OwnedJob, result: RunResult, *,
                     static: RunResult | None = None, escalate: bool = False) -> Outcome:
        if result.status is RunStatus.TIMEOUT:
            return Failed(owned, State.TIMED_OUT, "TIMEOUT", result.detail)
        if result.status is RunStatus.CRASHED:
            return Failed(owned, State.FAILED, "CONTAINER_ERROR", result.detail)
        if result.status is RunStatus.OUTPUT_INVALID or result.report is None:
            return Failed(owned, State.FAILED, "OUTPUT_INVALID", result.detail)
        report = result.report
        verdict = self._analyze(owned.job.url, report, static.report if static else None)
        detail: dict[str, object] = {"mode": "render"} if report.render is not None else {}
        if escalate and _worth_rendering(report, verdict):
            rendered = await self._scan(owned, "render")
            if rendered.status is RunStatus.OK and rendered.report is not None:
                return await self._judge(owned, rendered, static=result)
            # The static result stands: a render that failed is no reason to lose it.
            detail = {"render_failed": f"{rendered.status.value}: {rendered.detail}"[:300]}
        # A refused target is a failure, unless there is evidence against it: a public page
        # that redirected to the refused address, or a blocklisted URL (sinkholed to 127.0.0.1);
        # a rendered page that navigated on (by script too) was shown, and is judged.
        if report.error and report.error.code == "BLOCKED_TARGET" and \
                verdict.verdict is not Verdict.MALICIOUS and \
                not (report.render is not None and report.render.navigation):
            return Failed(owned, State.FAILED, "BLOCKED_TARGET", report.error.message)
        if static is not None:
            detail["static_verdict"] = self._static_verdict(owned.job.url, static)
        stored, kept = artifacts.split(report, self.settings.browser_output_max_bytes)
        return Completed(owned, stored, verdict, artifacts=tuple(kept), analyzing=detail)

    def _analyze(self, url: str, report: Report, static: Report | None) -> Analysis:
        t0 = time.monotonic()
        verdict = analysis.analyze(url, report, blocklist=self.blocklist,
                                   catalogue=self.catalogue,
                                   suspicious_threshold=self.settings.suspicious_threshold,
                                   malicious_threshold=self.settings.malicious_threshold,
                                   static=static if report.render is not None else None)
        self.metrics.stage.labels("analyze").observe(time.monotonic() - t0)
        return verdict

    def _static_verdict(self, url: str, static: RunResult) -> str | None:
        """What the static scan alone would have said (the audit trail shows the difference
        rendering made)."""
        if static.report is None:
            return None
        return self._analyze(url, static.report, None).verdict.value

    async def _cached(self, owned: OwnedJob, rendered: bool = False) -> Outcome | None:
        """A recent result for the same normalized URL answers this scan without a container
        (RESULT_CACHE_TTL_S; 0 disables). The result row says where it came from. A render
        job takes only a render scan's result."""
        key = url_key(owned.job.url)
        if not self.settings.result_cache_ttl_s or key is None:
            return None
        o = self.owner
        hit = await o.db(lambda: o.store.cached_result(
            key, self.settings.result_cache_ttl_s, rendered))
        if hit is None:
            return None
        try:
            report = Report.model_validate(hit["report"])
            cached = Analysis(verdict=hit["verdict"], score=hit["score"],
                              signals=hit["signals"] or [],
                              analyzer_version=hit["analyzer_version"] or "",
                              confidence=_stored_confidence(hit.get("confidence")))
        except ValidationError:
            return None  # an old or foreign row: scan afresh
        self.metrics.cache_hits.inc()
        return Completed(owned, report, cached, cached_from=hit["job_id"],
                         analyzing={"cached_from": str(hit["job_id"])})

    async def _container(self, owned: OwnedJob, mode: Mode = "static") -> RunResult:
        """Run the fetcher (or the browser). While Docker is unreachable or hung, wait for it
        (the job is not failed and keeps its message) and let intake pause meanwhile."""
        attempt = 0
        while True:
            try:
                # A static-only runner (the benchmark's stub) need not know about modes.
                result = await (self.runner.run(owned.id, owned.job.url) if mode == "static"
                                else self.runner.run(owned.id, owned.job.url, mode=mode))
            except (DockerUnavailable, DependencyDown) as exc:
                cancelled_under_us()
                attempt += 1
                if self.docker_ready.is_set():
                    log.error("docker unreachable; pausing intake", extra={"error": str(exc)})
                self.docker_ready.clear()
                self.owner.on_error("docker", exc)
                if self.owner.stopping.is_set():
                    raise DependencyDown("docker", str(exc)) from exc
                # The runner removed its own container; never remove by the job's label here,
                # it may be a new owner's run.
                await pause(self.owner.stopping, backoff(attempt, base=0.5, cap=5))
                continue
            self.docker_ready.set()
            self.metrics.container_runs.labels(result.status.value).inc()
            self.metrics.stage.labels("render" if mode == "render" else "fetch").observe(
                result.seconds)
            return result


def _refused(result: RunResult) -> bool:
    """The fetcher refused the URL itself: no browser would be let through either."""
    report = result.report
    return bool(report and report.error and report.error.code == "BLOCKED_TARGET"
                and not report.redirects)


def _worth_rendering(report: Report, verdict: Analysis) -> bool:
    """RENDER_ON=suspicious: a page that was fetched and is not clean (suspicious, malicious,
    or too little seen to say: a page drawn by script looks empty to a static fetch)."""
    return report.render is None and report.http_status is not None and \
        verdict.verdict is not Verdict.SAFE and \
        not (report.error is not None and report.error.code == "BLOCKED_TARGET")


def _mode_detail(mode: Mode) -> dict[str, str]:
    return {"mode": mode} if mode == "render" else {}


def parse_message(fields: dict[str, str]) -> StreamMessage | None:
    try:
        return StreamMessage.model_validate(fields)
    except ValidationError:
        return None


def _stored_confidence(value: float | None) -> float:
    """A result stored before confidence existed rests on the page as fully as it could."""
    return 1.0 if value is None else value


def url_key(url: str) -> str | None:
    try:
        return urls.normalize_url(url)
    except ValueError:
        return None


__all__ = ["Completed", "DeadLettered", "Duplicate", "Failed", "Outcome", "Pipeline",
           "Released", "SetAside", "parse_message", "url_key", "url_problem"]
