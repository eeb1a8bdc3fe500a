"""The job path's decisions, in memory: `Pipeline` (message -> Outcome) and `Worker.settle` (the
terminal write commits, then the ack or dead-letter), against fakes of the Store, the container
runner and the stream consumer. No Redis, PostgreSQL or Docker.

The fake store keeps the real store's write rules: every write is versioned (`WHERE id AND
version AND state`; a stale version matches nothing and returns None), audited (the audit row
carries the write's `detail`, including `OwnedJob`'s op token), and the claim only takes QUEUED
jobs whose URL passes the SQL filter and whose faults are below the limit. Every committed write,
ack and dead-letter goes into one event log, so the tests assert their exact order.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import asyncpg
import pytest

from safeurl_worker import errors as errors_mod
from safeurl_worker import pipeline as pipeline_mod
from safeurl_worker.artifacts import Artifact
from safeurl_worker.config import Settings, load_settings
from safeurl_worker.consumer import Consumer, Message
from safeurl_worker.intake import InFlight
from safeurl_worker.metrics import Metrics
from safeurl_worker.models import (
    Analysis,
    Features,
    Form,
    Job,
    RedirectHop,
    Refusal,
    Render,
    RenderHop,
    RenderImage,
    RenderRequest,
    Report,
    ReportError,
    Signal,
    State,
    Verdict,
)
from safeurl_worker.pipeline import (
    Completed,
    DeadLettered,
    Duplicate,
    Failed,
    Outcome,
    Released,
    SetAside,
    parse_message,
    url_key,
)
from safeurl_worker.runner import DockerUnavailable, RunResult, RunStatus
from safeurl_worker.store import Store
from safeurl_worker.worker import Worker

URL = "http://example.test/"


class _AnyOp:
    """Equal to any op token (a random hex string)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and re.fullmatch(r"[0-9a-f]{12}", other) is not None


ANY_OP: Any = _AnyOp()
OTHER, OTHER_TOKEN = "w-other", "tok-other"
Event = tuple[str, ...]

# --- fakes ----------------------------------------------------------------------------------


@dataclasses.dataclass
class AuditRow:
    job_id: uuid.UUID
    from_state: State
    to_state: State
    version: int
    worker_id: str | None
    detail: dict[str, Any]


@dataclasses.dataclass
class Failure:
    """The next `times` calls to one of `methods` (None: any) raise `make()`. With `lost_reply`
    the call commits first (the reply is lost on the way back)."""

    make: Callable[[], BaseException]
    times: int
    methods: frozenset[str] | None
    lost_reply: bool


# The claim's URL filter, as in store._LOAD_AND_CLAIM (`~* '^https?://[^/?#[:space:]]'`).
_CLAIMABLE = re.compile(r"^https?://[^/?#\s]", re.IGNORECASE)


class FakeStore:
    """The Store methods the pipeline, OwnedJob and settle use, over a dict of Job rows."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.jobs: dict[uuid.UUID, Job] = {}
        self.error_messages: dict[uuid.UUID, str | None] = {}
        self.results: dict[uuid.UUID, dict[str, Any]] = {}
        self.audit: list[AuditRow] = []
        self.cache: dict[str, Mapping[str, Any]] = {}
        self.calls: list[str] = []
        self.failures: list[Failure] = []
        self.reject_complete = False  # complete raises class-22 "rejected data"
        self.before_call: Callable[[str], None] | None = None

    # --- test controls ----------------------------------------------------------------------

    def add(self, url: str = URL, state: State = State.QUEUED, **fields: Any) -> Job:
        job = Job(id=uuid.uuid4(), url=url, state=state, version=fields.pop("version", 0),
                  attempts=fields.pop("attempts", 0), **fields)
        self.jobs[job.id] = job
        return job

    def fail_next(self, times: int, make: Callable[[], BaseException],
                  methods: Iterable[str] | None = None, lost_reply: bool = False) -> None:
        self.failures.append(Failure(make, times, frozenset(methods) if methods else None,
                                     lost_reply))

    def external_write(self, job_id: uuid.UUID, detail: dict[str, Any] | None = None,
                       **changes: Any) -> Job:
        """Another worker's versioned write (its own op token in the audit row)."""
        old = self.jobs[job_id]
        new = old.model_copy(update={**changes, "version": old.version + 1})
        self._commit(old, new, {"op": "someone-else", **(detail or {})}, tag="external")
        return new

    def trail(self, job_id: uuid.UUID) -> list[tuple[State, State, int]]:
        return [(a.from_state, a.to_state, a.version) for a in self.audit if a.job_id == job_id]

    def details(self, job_id: uuid.UUID) -> list[dict[str, Any]]:
        return [a.detail for a in self.audit if a.job_id == job_id]

    # --- the Store API ----------------------------------------------------------------------

    async def get_job(self, job_id: uuid.UUID) -> Job | None:
        self._before("get_job")
        return self.jobs.get(job_id)

    async def load_and_claim(self, job_id: uuid.UUID, *, worker_id: str, owner_token: str,
                             max_faults: int, detail: Mapping[str, Any]
                             ) -> tuple[Job | None, bool]:
        self._before("load_and_claim")
        job = self.jobs.get(job_id)
        if job is None:
            self._after("load_and_claim")
            return None, False
        if (job.state is State.QUEUED and len(job.url) <= 2048 and _CLAIMABLE.match(job.url)
                and job.faults < max_faults):
            new = job.model_copy(update={
                "state": State.FETCHING, "version": job.version + 1, "worker_id": worker_id,
                "attempts": job.attempts + 1, "error_code": None, "owner_token": owner_token})
            self.error_messages[job_id] = None
            self._commit(job, new, dict(detail))
            self._after("load_and_claim")
            return new, True
        self._after("load_and_claim")
        return job, False

    async def transition(self, job: Job, to: State, *, worker_id: str,
                         owner_token: str | None = None,
                         detail: Mapping[str, Any] | None = None,
                         error_code: str | None = None, error_message: str | None = None,
                         add_attempt: bool = False, add_fault: bool = False) -> Job | None:
        self._before("transition")
        cur = self.jobs.get(job.id)
        if cur is None or cur.version != job.version or cur.state is not job.state:
            self._after("transition")
            return None
        new = cur.model_copy(update={
            "state": to, "version": cur.version + 1, "worker_id": worker_id,
            "attempts": cur.attempts + int(add_attempt), "faults": cur.faults + int(add_fault),
            "owner_token": owner_token, "error_code": error_code})
        self.error_messages[job.id] = error_message
        self._commit(cur, new, dict(detail or {}))
        self._after("transition")
        return new

    async def complete(self, job: Job, *, worker_id: str, report: Report, analysis: Analysis,
                       url_key: str | None, cached_from: uuid.UUID | None = None,
                       detail: Mapping[str, Any] | None = None,
                       artifacts: Sequence[Artifact] = (),
                       analyzing: Mapping[str, Any] | None = None) -> int | None:
        self._before("complete")
        if self.reject_complete:  # PostgreSQL refuses the values: nothing commits
            raise asyncpg.exceptions.CharacterNotInRepertoireError(
                "invalid byte sequence for encoding \"UTF8\": 0x00")
        cur = self.jobs.get(job.id)
        want = State.ANALYZING if analyzing is None else State.FETCHING
        if cur is None or cur.version != job.version or cur.state is not want:
            self._after("complete")
            return None
        if analyzing is not None:  # FETCHING -> ANALYZING in the same statement
            mid = cur.model_copy(update={"state": State.ANALYZING, "version": cur.version + 1,
                                         "worker_id": worker_id})
            self._commit(cur, mid, dict(analyzing))
            cur = mid
        new = cur.model_copy(update={"state": State.COMPLETED, "version": cur.version + 1,
                                     "worker_id": worker_id, "error_code": None})
        self.error_messages[job.id] = None
        self.results[job.id] = {"verdict": analysis.verdict.value, "score": analysis.score,
                                "url_key": url_key, "cached_from": cached_from,
                                "report": report.model_dump(mode="json"),
                                "artifacts": list(artifacts)}
        self._commit(cur, new, {"verdict": analysis.verdict.value, "score": analysis.score,
                                **(detail or {})})
        self._after("complete")
        return new.version

    async def cached_result(self, url_key: str, ttl_s: int,
                            rendered: bool = False) -> Mapping[str, Any] | None:
        self._before("cached_result")
        hit = self.cache.get(url_key)
        return None if hit is None or (rendered and not hit["report"].get("render")) else hit

    async def last_audit_detail(self, job_id: uuid.UUID) -> dict[str, Any] | None:
        self._before("last_audit_detail")
        rows = [a for a in self.audit if a.job_id == job_id]
        return dict(max(rows, key=lambda a: a.version).detail) if rows else None

    async def audit_op(self, job_id: uuid.UUID, version: int) -> str | None:
        self._before("audit_op")
        for a in self.audit:
            if a.job_id == job_id and a.version == version:
                op = a.detail.get("op")
                return None if op is None else str(op)
        return None

    # --- internals --------------------------------------------------------------------------

    def _commit(self, old: Job, new: Job, detail: dict[str, Any], tag: str = "write") -> None:
        assert new.version == old.version + 1
        self.jobs[new.id] = new
        self.audit.append(AuditRow(new.id, old.state, new.state, new.version, new.worker_id,
                                   detail))
        self.events.append((tag, old.state.value, new.state.value))

    def _failure(self, method: str) -> Failure | None:
        for f in self.failures:
            if f.times > 0 and (f.methods is None or method in f.methods):
                return f
        return None

    def _before(self, method: str) -> None:
        self.calls.append(method)
        if self.before_call:
            self.before_call(method)
        f = self._failure(method)
        if f is not None and not f.lost_reply:
            f.times -= 1
            raise f.make()

    def _after(self, method: str) -> None:
        f = self._failure(method)
        if f is not None and f.lost_reply:
            f.times -= 1
            raise f.make()


Step = RunResult | BaseException | Callable[[], Awaitable[RunResult]]


class FakeRunner:
    """ContainerRunner: each run takes the next scripted step (the last one repeats): a result,
    an exception to raise, or a coroutine function to await."""

    def __init__(self, *script: Step) -> None:
        self.script = list(script)
        self.runs: list[tuple[uuid.UUID, str]] = []
        self.modes: list[str] = []  # each run's mode
        self.removed: list[uuid.UUID | None] = []
        self.entered = asyncio.Event()
        self.probe: Callable[[], bool] | None = None  # sampled at each run (docker_ready)
        self.seen: list[bool] = []

    async def run(self, job_id: uuid.UUID, url: str, mode: str = "static") -> RunResult:
        self.runs.append((job_id, url))
        self.modes.append(mode)
        if self.probe is not None:
            self.seen.append(self.probe())
        self.entered.set()
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, RunResult):
            return step
        return await step()

    async def ping(self) -> bool:
        return True

    async def remove_labelled(self, job_id: uuid.UUID | None = None,
                              older_than_s: float | None = None) -> int:
        self.removed.append(job_id)
        return 0


class FakeConsumer:
    """What Worker, Intake, Pipeline and Message use of a Consumer."""

    consumer = "w-me"

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.live: set[tuple[str, str]] = set()  # (worker_id, token) pairs with a heartbeat
        self.stopped: set[tuple[str, str]] = set()  # ... that exited cleanly
        self.steady = 3600.0  # seconds since Redis last failed us

    async def owner_state(self, worker_id: str, token: str) -> str:
        if (worker_id, token) in self.live:
            return "alive"
        return "stopped" if (worker_id, token) in self.stopped else "dead"

    def steady_for(self) -> float:
        return self.steady

    async def ack_batched(self, message: Message) -> None:
        self.events.append(("ack", message.message_id))

    async def dead_letter(self, message: Message, reason: str) -> None:
        self.events.append(("dead_letter", message.message_id, reason))


class RecordingWorker(Worker):
    """Records the outcome the pipeline handed to settle, and the one settle acted on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.given: list[Outcome] = []
        self.settled: list[Outcome] = []

    async def settle(self, m: Message, outcome: Outcome) -> None:
        self.given.append(outcome)
        await super().settle(m, outcome)

    def _count(self, m: Message, outcome: Outcome) -> None:
        self.settled.append(outcome)
        super()._count(m, outcome)


@dataclasses.dataclass
class Harness:
    settings: Settings
    events: list[Event]
    store: FakeStore
    consumer: FakeConsumer
    runner: FakeRunner
    metrics: Metrics
    worker: RecordingWorker
    _ids: int = 0

    def message(self, job_id: uuid.UUID | None = None, fields: dict[str, str] | None = None,
                reclaimed: bool = False) -> Message:
        self._ids += 1
        return Message(f"1-{self._ids}", fields if fields is not None else
                       {"job_id": str(job_id)}, cast(Consumer, self.consumer),
                       reclaimed=reclaimed)

    async def deliver(self, job_id: uuid.UUID, reclaimed: bool = False) -> Message:
        m = self.message(job_id, reclaimed=reclaimed)
        await self.worker.handle(InFlight(m))
        return m

    def count(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def build(*script: Step, **overrides: Any) -> Harness:
    base: dict[str, Any] = {
        "worker_id": "w-me", "database_url": "postgresql://fake/fake",
        "redis_url": "redis://fake:6379/0", "metrics_port": 0, "log_format": "text",
        "max_attempts": 3, "max_deliveries": 5, "unknown_job_retries": 1,
        "unknown_job_delay_ms": 1, "result_cache_ttl_s": 0, "shutdown_grace_s": 1,
    }
    settings = load_settings(**{**base, **overrides})
    events: list[Event] = []
    store, consumer = FakeStore(events), FakeConsumer(events)
    runner = FakeRunner(*(script or (ok(),)))
    metrics = Metrics()
    worker = RecordingWorker(settings, cast(Store, store), cast(Consumer, consumer), runner,
                             metrics)
    runner.probe = lambda: worker.docker_ready
    return Harness(settings, events, store, consumer, runner, metrics, worker)


def ok(url: str = URL, **report: Any) -> RunResult:
    return RunResult(RunStatus.OK, Report(fetcher_version="test", requested_url=url,
                                          final_url=url, http_status=200,
                                          content_type="text/html", title="Example",
                                          **{"features": Features(parse="full", text="Hello"),
                                             **report}), exit_code=0, seconds=0.01)


def crashed() -> RunResult:
    return RunResult(RunStatus.CRASHED, exit_code=3, detail="exit code 3")


def write(a: State, b: State) -> Event:
    return ("write", a.value, b.value)


def external(a: State, b: State) -> Event:
    return ("external", a.value, b.value)


HAPPY = [write(State.QUEUED, State.FETCHING), write(State.FETCHING, State.ANALYZING),
         write(State.ANALYZING, State.COMPLETED)]


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff waits are not under test here: keep them to a millisecond."""
    monkeypatch.setattr(errors_mod, "backoff", lambda *a, **k: 0.001)
    monkeypatch.setattr(pipeline_mod, "backoff", lambda *a, **k: 0.001)


# --- messages that never reach a job ----------------------------------------------------------


@pytest.mark.parametrize("fields", [{"junk": "x"}, {"job_id": "not-a-uuid"}, {}])
async def test_malformed_message_is_dead_lettered_without_touching_the_store(
        fields: dict[str, str]) -> None:
    h = build()
    m = h.message(fields=fields)
    await h.worker.handle(InFlight(m))
    assert h.worker.given == [DeadLettered("MALFORMED_MESSAGE")]
    assert h.events == [("dead_letter", m.message_id, "MALFORMED_MESSAGE")]
    assert h.store.calls == []
    assert h.runner.runs == []
    assert h.count("safeurl_malformed_messages_total") == 1


async def test_unknown_job_is_dead_lettered_after_its_retries() -> None:
    h = build(unknown_job_retries=2)
    missing = uuid.uuid4()
    m = await h.deliver(missing)
    assert h.worker.given == [DeadLettered("UNKNOWN_JOB")]
    assert h.events == [("dead_letter", m.message_id, "UNKNOWN_JOB")]
    assert h.store.calls == ["load_and_claim"] * 3  # the first read and two retries
    assert h.runner.runs == []


async def test_job_inserted_after_its_message_is_found_on_a_retry() -> None:
    """The API may XADD before its INSERT is visible: the retry finds the row."""
    h = build()
    job = Job(id=uuid.uuid4(), url=URL, state=State.QUEUED, version=0, attempts=0)

    def insert_late(method: str) -> None:
        if method == "load_and_claim" and h.store.calls.count("load_and_claim") == 2:
            h.store.jobs[job.id] = job

    h.store.before_call = insert_late
    m = await h.deliver(job.id)
    assert [type(o) for o in h.worker.given] == [Completed]
    assert h.events == [*HAPPY, ("ack", m.message_id)]


# --- jobs that are already finished -----------------------------------------------------------


@pytest.mark.parametrize(("state", "code"), [(State.COMPLETED, None),
                                             (State.FAILED, "CONTAINER_ERROR"),
                                             (State.FAILED, "INVALID_URL"),
                                             (State.TIMED_OUT, "TIMEOUT")])
async def test_terminal_job_is_a_duplicate_acked_without_a_write(state: State,
                                                                 code: str | None) -> None:
    h = build()
    job = h.store.add(state=state, version=3, attempts=1, worker_id=OTHER, error_code=code,
                      owner_token=OTHER_TOKEN)
    m = await h.deliver(job.id)
    assert h.worker.given == [Duplicate()]
    assert h.events == [("ack", m.message_id)]
    assert h.store.jobs[job.id] == job
    assert h.runner.runs == []
    assert h.count("safeurl_duplicate_deliveries_total") == 1


@pytest.mark.parametrize("code", ["MAX_DELIVERIES", "MALFORMED_MESSAGE", "UNKNOWN_JOB"])
async def test_job_failed_as_poison_whose_message_is_pending_is_dead_lettered_once(
        code: str) -> None:
    """The worker that wrote FAILED through this message died before dead-lettering it:
    finish that, with no second write."""
    h = build()
    job = h.store.add(state=State.FETCHING, version=1, attempts=1, faults=4, worker_id=OTHER,
                      owner_token=OTHER_TOKEN)
    m = h.message(job.id, reclaimed=True)
    h.store.external_write(job.id, detail={"message_id": m.message_id}, state=State.FAILED,
                           error_code=code)
    audit = list(h.store.audit)
    await h.worker.handle(InFlight(m))
    assert h.worker.given == [DeadLettered(code)]
    assert [e for e in h.events if e[0] == "dead_letter"] == [("dead_letter", m.message_id, code)]
    assert h.store.audit == audit


# --- a normal scan ----------------------------------------------------------------------------


async def test_queued_job_is_claimed_scanned_and_completed_before_the_ack() -> None:
    h = build()
    job = h.store.add()
    m = await h.deliver(job.id)
    [outcome] = h.worker.given
    assert isinstance(outcome, Completed)
    assert outcome.result.verdict is Verdict.SAFE
    # The COMPLETED write commits, and only then is the message acked.
    assert h.events == [*HAPPY, ("ack", m.message_id)]
    row = h.store.jobs[job.id]
    assert (row.state, row.version, row.attempts, row.faults, row.error_code) == \
        (State.COMPLETED, 3, 1, 0, None)
    assert (row.worker_id, row.owner_token) == ("w-me", h.worker.token)
    assert h.store.trail(job.id) == [(State.QUEUED, State.FETCHING, 1),
                                     (State.FETCHING, State.ANALYZING, 2),
                                     (State.ANALYZING, State.COMPLETED, 3)]
    assert h.store.results[job.id]["verdict"] == "safe"
    assert h.store.results[job.id]["url_key"] == url_key(URL)
    assert h.runner.runs == [(job.id, URL)]
    assert h.count("safeurl_jobs_total", outcome="completed") == 1


async def test_crash_twice_then_ok_completes_with_two_faults_in_three_attempts() -> None:
    h = build(crashed(), crashed(), ok(), max_attempts=3)
    job = h.store.add()
    m = await h.deliver(job.id)
    assert [type(o) for o in h.worker.given] == [Completed]
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults) == (State.COMPLETED, 3, 2)
    assert len(h.runner.runs) == 3
    assert h.events == [write(State.QUEUED, State.FETCHING),
                        write(State.FETCHING, State.FETCHING),
                        write(State.FETCHING, State.FETCHING),
                        write(State.FETCHING, State.ANALYZING),
                        write(State.ANALYZING, State.COMPLETED), ("ack", m.message_id)]
    assert [d.get("retry") for d in h.store.details(job.id)[1:3]] == ["exit code 3"] * 2


async def test_always_crashing_container_fails_container_error_after_max_attempts() -> None:
    h = build(crashed(), max_attempts=3)
    job = h.store.add()
    m = await h.deliver(job.id)
    assert [(type(o), getattr(o, "code", None)) for o in h.worker.given] == \
        [(Failed, "CONTAINER_ERROR")]
    row = h.store.jobs[job.id]
    assert (row.state, row.error_code, row.attempts, row.faults) == \
        (State.FAILED, "CONTAINER_ERROR", 3, 2)
    assert len(h.runner.runs) == 3
    assert h.events[-2:] == [write(State.FETCHING, State.FAILED), ("ack", m.message_id)]
    assert h.store.error_messages[job.id] == "exit code 3"
    assert job.id not in h.store.results


async def test_timeout_fails_timed_out_without_a_retry() -> None:
    h = build(RunResult(RunStatus.TIMEOUT, detail="killed after 30000 ms"))
    job = h.store.add()
    m = await h.deliver(job.id)
    row = h.store.jobs[job.id]
    assert (row.state, row.error_code, row.attempts, row.faults) == \
        (State.TIMED_OUT, "TIMEOUT", 1, 0)
    assert len(h.runner.runs) == 1
    assert h.events == [write(State.QUEUED, State.FETCHING),
                        write(State.FETCHING, State.TIMED_OUT), ("ack", m.message_id)]
    assert h.count("safeurl_jobs_total", outcome="timed_out") == 1


@pytest.mark.parametrize(("result", "code"), [
    (RunResult(RunStatus.OUTPUT_INVALID, detail="not a report"), "OUTPUT_INVALID"),
    (ok(error=ReportError(code="BLOCKED_TARGET", message="10.0.0.1 is private")),
     "BLOCKED_TARGET"),
])
async def test_invalid_output_and_blocked_target_fail_at_once(result: RunResult,
                                                              code: str) -> None:
    h = build(result)
    job = h.store.add()
    m = await h.deliver(job.id)
    row = h.store.jobs[job.id]
    assert (row.state, row.error_code, row.attempts, row.faults) == (State.FAILED, code, 1, 0)
    assert len(h.runner.runs) == 1
    assert h.events[-2:] == [write(State.FETCHING, State.FAILED), ("ack", m.message_id)]


async def test_redirect_to_a_refused_address_is_a_malicious_result() -> None:
    """A public page that redirected to an internal address: the refused hop is evidence."""
    hop = RedirectHop(url=URL, status=302, location="http://169.254.169.254/latest/")
    h = build(ok(redirects=[hop],
                 error=ReportError(code="BLOCKED_TARGET", message="address not allowed")))
    job = h.store.add()
    await h.deliver(job.id)
    assert h.store.jobs[job.id].state is State.COMPLETED
    assert h.store.results[job.id]["verdict"] == "malicious"


async def test_docker_unavailable_is_waited_out_without_a_fault() -> None:
    h = build(*[DockerUnavailable("connection refused") for _ in range(3)], ok())
    job = h.store.add()
    m = await h.deliver(job.id)
    assert [type(o) for o in h.worker.given] == [Completed]
    # Ready at the first run, not ready while Docker was down, ready again after it answered.
    assert h.runner.seen == [True, False, False, False]
    assert h.worker.docker_ready
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults) == (State.COMPLETED, 1, 0)
    assert h.events == [*HAPPY, ("ack", m.message_id)]  # no retry transitions
    assert h.runner.removed == []  # never by the job label: it may be a new owner's run
    assert h.count("safeurl_transient_errors_total", dependency="docker") == 3


@pytest.mark.parametrize(("url", "trail"), [
    # Not claimed by the load (the SQL filter refuses it): failed straight from QUEUED.
    ("ftp://example.test/file", [write(State.QUEUED, State.FAILED)]),
    ("x" * 3000, [write(State.QUEUED, State.FAILED)]),
    # Passes the SQL filter, fails the finer checks after the claim.
    ("http://exa mple.test/", [write(State.QUEUED, State.FETCHING),
                               write(State.FETCHING, State.FAILED)]),
])
async def test_invalid_url_fails_without_a_container(url: str, trail: list[Event]) -> None:
    h = build()
    job = h.store.add(url=url)
    m = await h.deliver(job.id)
    assert [(type(o), getattr(o, "code", None)) for o in h.worker.given] == \
        [(Failed, "INVALID_URL")]
    assert h.events == [*trail, ("ack", m.message_id)]
    row = h.store.jobs[job.id]
    assert (row.state, row.error_code, row.faults) == (State.FAILED, "INVALID_URL", 0)
    assert row.attempts == len(trail) - 1
    assert h.runner.runs == []


async def test_recent_result_answers_from_the_cache_without_a_container() -> None:
    h = build(result_cache_ttl_s=300)
    source = uuid.uuid4()
    key = url_key(URL)
    assert key is not None
    h.store.cache[key] = {
        "job_id": source, "verdict": "suspicious", "score": 40,
        "signals": [Signal(name="x", weight=40, evidence="y").model_dump()],
        "report": ok().report.model_dump(mode="json"),  # type: ignore[union-attr]
        "analyzer_version": "a1"}
    job = h.store.add()
    m = await h.deliver(job.id)
    assert h.runner.runs == []
    assert h.events == [*HAPPY, ("ack", m.message_id)]
    assert h.store.results[job.id]["cached_from"] == source
    assert h.store.results[job.id]["verdict"] == "suspicious"


# --- whose job is it? -------------------------------------------------------------------------


async def test_job_running_on_a_live_replica_is_set_aside_untouched() -> None:
    h = build()
    job = h.store.add(state=State.FETCHING, version=1, attempts=1, worker_id=OTHER,
                      owner_token=OTHER_TOKEN)
    h.consumer.live.add((OTHER, OTHER_TOKEN))
    await h.deliver(job.id, reclaimed=True)
    assert [type(o) for o in h.worker.given] == [SetAside]
    assert h.events == []  # no write, no ack, no dead-letter
    assert h.store.jobs[job.id] == job
    assert h.runner.runs == []
    assert h.runner.removed == []


@pytest.mark.parametrize("live", [set(), {(OTHER, "tok-earlier-life")}],
                         ids=["no-heartbeat", "restarted-owner"])
async def test_job_of_a_dead_owner_is_taken_over_with_a_fault(
        live: set[tuple[str, str]]) -> None:
    h = build()
    job = h.store.add(state=State.ANALYZING, version=2, attempts=1, worker_id=OTHER,
                      owner_token=OTHER_TOKEN)
    h.consumer.live |= live
    m = await h.deliver(job.id, reclaimed=True)
    assert [type(o) for o in h.worker.given] == [Completed]
    row = h.store.jobs[job.id]
    assert (row.state, row.version, row.attempts, row.faults) == (State.COMPLETED, 5, 2, 1)
    assert row.owner_token == h.worker.token
    assert h.events == [write(State.ANALYZING, State.FETCHING),
                        write(State.FETCHING, State.ANALYZING),
                        write(State.ANALYZING, State.COMPLETED), ("ack", m.message_id)]
    takeover = h.store.details(job.id)[0]
    assert (takeover["taken_from"], takeover["reclaimed"]) == (OTHER, True)
    assert h.runner.removed == [job.id]  # the earlier run's container, if any
    assert h.count("safeurl_redeliveries_total") == 1


async def test_job_of_an_owner_that_exited_cleanly_is_taken_over_without_a_fault() -> None:
    h = build()
    job = h.store.add(state=State.FETCHING, version=1, attempts=1, faults=4, worker_id=OTHER,
                      owner_token=OTHER_TOKEN)  # faults 4 of 5: a fault would dead-letter it
    h.consumer.stopped.add((OTHER, OTHER_TOKEN))  # SIGTERM, but its release could not be written
    m = await h.deliver(job.id, reclaimed=True)
    assert [type(o) for o in h.worker.given] == [Completed]
    row = h.store.jobs[job.id]
    assert (row.state, row.faults) == (State.COMPLETED, 4)
    assert h.store.details(job.id)[0]["owner"] == "stopped"
    assert h.events[-1] == ("ack", m.message_id)


async def test_nobody_is_judged_dead_right_after_a_redis_outage() -> None:
    h = build()
    job = h.store.add(state=State.FETCHING, version=1, attempts=1, worker_id=OTHER,
                      owner_token=OTHER_TOKEN)  # no heartbeat seen: it may not have beaten yet
    h.consumer.steady = 1.0  # Redis answered us for one second only
    await h.deliver(job.id, reclaimed=True)
    assert [type(o) for o in h.worker.given] == [SetAside]
    assert h.events == [] and h.store.jobs[job.id] == job and h.runner.runs == []


async def test_dead_owner_on_the_last_delivery_is_dead_lettered_after_the_failed_write() -> None:
    h = build(max_deliveries=5)
    job = h.store.add(state=State.FETCHING, version=3, attempts=2, faults=4, worker_id=OTHER,
                      owner_token=OTHER_TOKEN)
    m = await h.deliver(job.id, reclaimed=True)
    [outcome] = h.worker.given
    assert isinstance(outcome, DeadLettered)
    assert (outcome.reason, outcome.job is not None) == ("MAX_DELIVERIES", True)
    # FAILED commits first, then the message moves to the dead-letter stream.
    assert h.events == [write(State.FETCHING, State.FAILED),
                        ("dead_letter", m.message_id, "MAX_DELIVERIES")]
    row = h.store.jobs[job.id]
    assert (row.state, row.error_code, row.attempts, row.faults) == \
        (State.FAILED, "MAX_DELIVERIES", 2, 4)
    assert h.runner.runs == []
    assert h.runner.removed == [job.id]  # the container of the run that took its worker down
    assert h.count("safeurl_jobs_total", outcome="failed") == 1


async def test_queued_job_out_of_faults_is_dead_lettered_from_queued() -> None:
    h = build(max_deliveries=5)
    job = h.store.add(version=4, attempts=2, faults=5)
    m = await h.deliver(job.id, reclaimed=True)
    assert h.events == [write(State.QUEUED, State.FAILED),
                        ("dead_letter", m.message_id, "MAX_DELIVERIES")]
    assert h.store.jobs[job.id].error_code == "MAX_DELIVERIES"
    assert h.runner.runs == []


async def test_job_owned_by_our_own_token_is_resumed_without_a_fault() -> None:
    """A claim whose reply was lost: the row is ours already."""
    h = build()
    job = h.store.add(state=State.FETCHING, version=1, attempts=1, worker_id="w-me",
                      owner_token=h.worker.token)
    m = await h.deliver(job.id, reclaimed=True)
    assert [type(o) for o in h.worker.given] == [Completed]
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults) == (State.COMPLETED, 1, 0)
    assert h.store.details(job.id)[0] == {"resumed": True, "op": h.store.details(job.id)[0]["op"]}
    assert h.events == [write(State.FETCHING, State.FETCHING),
                        write(State.FETCHING, State.ANALYZING),
                        write(State.ANALYZING, State.COMPLETED), ("ack", m.message_id)]
    assert h.runner.removed == []
    assert h.count("safeurl_redeliveries_total") == 0


# --- PostgreSQL outages and lost replies ------------------------------------------------------


@pytest.mark.parametrize("error", [
    lambda: asyncpg.exceptions.ReadOnlySQLTransactionError("read only"),
    lambda: ConnectionRefusedError(111, "Connection refused"),
    lambda: asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
], ids=["read-only", "refused", "starting-up"])
async def test_transient_error_during_the_claim_is_retried_and_counts_nothing(
        error: Callable[[], BaseException]) -> None:
    h = build()
    job = h.store.add()
    h.store.fail_next(2, error, methods={"load_and_claim"})
    m = await h.deliver(job.id)
    assert [type(o) for o in h.worker.given] == [Completed]
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults) == (State.COMPLETED, 1, 0)
    assert h.store.calls.count("load_and_claim") == 3
    assert h.events == [*HAPPY, ("ack", m.message_id)]
    assert h.count("safeurl_transient_errors_total", dependency="postgres") == 2


async def test_transient_errors_on_every_write_are_retried() -> None:
    h = build()
    job = h.store.add()
    h.store.fail_next(2, lambda: asyncpg.exceptions.ReadOnlySQLTransactionError("read only"),
                      methods={"transition"})
    h.store.fail_next(2, lambda: ConnectionResetError(104, "reset"), methods={"complete"})
    m = await h.deliver(job.id)
    assert h.events == [*HAPPY, ("ack", m.message_id)]
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults) == (State.COMPLETED, 1, 0)


async def test_lost_reply_of_the_claim_resumes_our_own_claim() -> None:
    h = build()
    job = h.store.add()
    h.store.fail_next(1, lambda: ConnectionResetError(104, "reset"),
                      methods={"load_and_claim"}, lost_reply=True)
    m = await h.deliver(job.id)
    assert [type(o) for o in h.worker.given] == [Completed]
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults) == (State.COMPLETED, 1, 0)
    assert h.events == [write(State.QUEUED, State.FETCHING), write(State.FETCHING, State.FETCHING),
                        write(State.FETCHING, State.ANALYZING),
                        write(State.ANALYZING, State.COMPLETED), ("ack", m.message_id)]
    assert h.store.details(job.id)[1]["resumed"] is True


async def test_lost_reply_of_the_completing_write_is_recognised_not_a_conflict() -> None:
    h = build()
    job = h.store.add()
    h.store.fail_next(1, lambda: ConnectionResetError(104, "reset"), methods={"complete"},
                      lost_reply=True)
    m = await h.deliver(job.id)
    assert [type(o) for o in h.worker.settled] == [Completed]
    assert h.events == [*HAPPY, ("ack", m.message_id)]
    # The retry matched no row: our own write (its token is in the ANALYZING audit row, the
    # first of the two the statement wrote).
    assert h.store.calls.count("complete") == 2
    assert h.count("safeurl_state_conflicts_total") == 0


async def test_lost_reply_of_a_transition_is_recognised_not_a_conflict() -> None:
    h = build(RunResult(RunStatus.TIMEOUT, detail="killed after 30000 ms"))
    job = h.store.add()
    h.store.fail_next(1, lambda: ConnectionResetError(104, "reset"), methods={"transition"},
                      lost_reply=True)
    m = await h.deliver(job.id)
    assert [type(o) for o in h.worker.settled] == [Failed]
    assert h.events == [write(State.QUEUED, State.FETCHING),
                        write(State.FETCHING, State.TIMED_OUT), ("ack", m.message_id)]
    assert h.store.calls.count("transition") == 2
    assert h.count("safeurl_state_conflicts_total") == 0


# --- another worker got there first ----------------------------------------------------------


async def _completed_outcome(h: Harness, job: Job) -> tuple[Message, Completed]:
    m = h.message(job.id)
    outcome = await h.worker.pipeline.process(parse_message(m.fields), False)
    assert isinstance(outcome, Completed)
    assert h.events == HAPPY[:1]  # ANALYZING comes with the completing write
    return m, outcome


async def test_conflict_on_the_terminal_write_with_the_job_finished_elsewhere_acks() -> None:
    h = build()
    job = h.store.add()
    m, outcome = await _completed_outcome(h, job)
    theirs = h.store.external_write(job.id, state=State.COMPLETED, worker_id=OTHER,
                                    owner_token=OTHER_TOKEN)
    await h.worker.settle(m, outcome)
    assert h.worker.settled == [Duplicate()]
    assert h.events == [*HAPPY[:1], external(State.FETCHING, State.COMPLETED),
                        ("ack", m.message_id)]
    assert h.store.jobs[job.id] == theirs
    assert job.id not in h.store.results  # ours was never written
    assert h.count("safeurl_state_conflicts_total") == 1


async def test_conflict_on_the_terminal_write_with_the_job_still_running_elsewhere() -> None:
    h = build()
    job = h.store.add()
    m, outcome = await _completed_outcome(h, job)
    theirs = h.store.external_write(job.id, state=State.FETCHING, worker_id=OTHER,
                                    owner_token=OTHER_TOKEN, attempts=2, faults=1)
    await h.worker.settle(m, outcome)
    assert [type(o) for o in h.worker.settled] == [SetAside]
    assert h.events[-1] == external(State.FETCHING, State.FETCHING)  # no ack, no dead-letter
    assert h.store.jobs[job.id] == theirs
    assert job.id not in h.store.results


async def test_job_taken_over_while_our_container_ran_is_set_aside() -> None:
    """A slow owner: another replica took the job over during the run; our next write loses."""
    h = build()
    job = h.store.add()

    async def taken_over_meanwhile() -> RunResult:
        h.store.external_write(job.id, state=State.FETCHING, worker_id=OTHER,
                               owner_token=OTHER_TOKEN, attempts=2, faults=1)
        return ok()

    h.runner.script = [taken_over_meanwhile]
    await h.deliver(job.id)
    # The completing write loses (a conflict at settling): the message is set aside.
    assert [type(o) for o in h.worker.given] == [Completed]
    assert [type(o) for o in h.worker.settled] == [SetAside]
    assert h.events == [write(State.QUEUED, State.FETCHING),
                        external(State.FETCHING, State.FETCHING)]
    assert h.store.jobs[job.id].owner_token == OTHER_TOKEN
    assert h.count("safeurl_state_conflicts_total") == 1


async def test_rejected_result_fails_the_job_once_and_acks() -> None:
    h = build()
    job = h.store.add()
    h.store.reject_complete = True
    m = await h.deliver(job.id)
    assert [type(o) for o in h.worker.given] == [Completed]
    [settled] = h.worker.settled
    assert isinstance(settled, Failed)
    assert (settled.state, settled.code) == (State.FAILED, "RESULT_REJECTED")
    assert h.events == [*HAPPY[:1], write(State.FETCHING, State.FAILED),
                        ("ack", m.message_id)]
    row = h.store.jobs[job.id]
    assert (row.state, row.error_code, row.attempts, row.faults) == \
        (State.FAILED, "RESULT_REJECTED", 1, 0)
    assert h.store.calls.count("complete") == 1  # not retried
    assert "CharacterNotInRepertoireError" in (h.store.error_messages[job.id] or "")
    assert job.id not in h.store.results


# --- letting go -------------------------------------------------------------------------------


async def _block() -> RunResult:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_cancelled_at_shutdown_releases_the_job_to_queued_without_a_fault() -> None:
    h = build(_block)
    job = h.store.add()
    m = h.message(job.id)
    task = asyncio.create_task(h.worker.handle(InFlight(m)))
    await asyncio.wait_for(h.runner.entered.wait(), 5)
    h.worker.stop()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.worker.given == [Released(job.id)]
    assert h.events == [write(State.QUEUED, State.FETCHING), write(State.FETCHING, State.QUEUED)]
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults, row.owner_token) == (State.QUEUED, 1, 0, None)
    assert h.store.details(job.id)[-1]["released"] == "stop"


async def test_cancelled_because_another_replica_took_the_message_releases_if_still_ours(
        ) -> None:
    """A stalled owner resumes and finds its message taken: it gives the job back (the taker,
    which may have found it alive and set the message aside, then claims it cleanly)."""
    h = build(_block)
    job = h.store.add()
    m = h.message(job.id)
    f = InFlight(m)
    task = asyncio.create_task(h.worker.handle(f))
    await asyncio.wait_for(h.runner.entered.wait(), 5)
    f.taken = True
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.worker.given == [Released(job.id)]
    assert h.events == [write(State.QUEUED, State.FETCHING), write(State.FETCHING, State.QUEUED)]
    assert h.store.jobs[job.id].faults == 0


async def test_cancelled_after_the_taker_moved_the_job_writes_nothing() -> None:
    h = build(_block)
    job = h.store.add()
    m = h.message(job.id)
    f = InFlight(m)
    task = asyncio.create_task(h.worker.handle(f))
    await asyncio.wait_for(h.runner.entered.wait(), 5)
    theirs = h.store.external_write(job.id, state=State.FETCHING, worker_id=OTHER,
                                    owner_token=OTHER_TOKEN)
    f.taken = True
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.store.jobs[job.id] == theirs  # the new owner's takeover is never undone
    assert not [e for e in h.events if e[0] in ("ack", "dead_letter")]


async def test_bug_in_the_runner_releases_the_job_with_a_fault_and_no_ack() -> None:
    h = build(RuntimeError("a bug"))
    job = h.store.add()
    await h.deliver(job.id)
    assert h.worker.given == [Released(job.id, fault=True)]
    assert h.events == [write(State.QUEUED, State.FETCHING), write(State.FETCHING, State.QUEUED)]
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults, row.owner_token) == (State.QUEUED, 1, 1, None)
    assert h.store.details(job.id)[-1]["released"] == "error"


async def test_second_message_for_a_running_job_is_set_aside_then_acked() -> None:
    gate = asyncio.Event()

    async def gated() -> RunResult:
        await gate.wait()
        return ok()

    h = build(gated)
    job = h.store.add()
    m1, m2 = h.message(job.id), h.message(job.id)
    first = asyncio.create_task(h.worker.handle(InFlight(m1)))
    await asyncio.wait_for(h.runner.entered.wait(), 5)
    await asyncio.wait_for(h.worker.handle(InFlight(m2)), 5)  # does not hold a slot waiting
    assert h.events == [write(State.QUEUED, State.FETCHING)]  # m2 is kept, not acked
    gate.set()
    await asyncio.wait_for(first, 5)
    await h.worker.handle(InFlight(m2))  # adopted again after a renewal interval
    assert [type(o) for o in h.worker.given] == [SetAside, Completed, Duplicate]
    assert h.events == [*HAPPY, ("ack", m1.message_id), ("ack", m2.message_id)]
    assert len(h.runner.runs) == 1


async def test_docker_down_at_shutdown_releases_the_job_without_a_fault() -> None:
    h = build(DockerUnavailable("connection refused"))
    job = h.store.add()
    h.worker.stop()  # stopping: the wait for Docker gives up at once
    await h.deliver(job.id)
    assert h.worker.given == [Released(job.id)]
    assert h.events == [write(State.QUEUED, State.FETCHING), write(State.FETCHING, State.QUEUED)]
    row = h.store.jobs[job.id]
    assert (row.state, row.attempts, row.faults, row.owner_token) == (State.QUEUED, 1, 0, None)
    assert len(h.runner.runs) == 1


async def test_postgres_down_at_shutdown_leaves_the_message_pending() -> None:
    """Stopping with PostgreSQL down: the writes give up after a few tries, nothing is acked,
    the job stays ours (FETCHING) for the next owner to take over, and handle does not raise."""
    h = build()
    job = h.store.add()

    async def outage_then_ok() -> RunResult:
        h.worker.stop()
        h.store.fail_next(1000, lambda: ConnectionRefusedError(111, "Connection refused"))
        return ok()

    h.runner.script = [outage_then_ok]
    await h.deliver(job.id)
    # The completing write gave up (the handler's own error path), and the release could not
    # be written either: nothing settled, no fault, the message stays pending.
    assert [type(o) for o in h.worker.given] == [Completed]
    assert h.worker.settled == []
    assert h.events == [write(State.QUEUED, State.FETCHING)]
    row = h.store.jobs[job.id]
    assert (row.state, row.faults, row.owner_token) == (State.FETCHING, 0, h.worker.token)


async def test_duplicate_message_for_a_dead_lettered_job_is_not_dead_lettered_again() -> None:
    """The same job XADDed twice (the contract: duplicates are harmless, a terminal job is
    acknowledged and skipped) and dead-lettered for MAX_DELIVERIES through its first message.
    The second message must not add a second dead-letter entry: `safeurl-worker check` requires
    exactly one entry per FAILED MAX_DELIVERIES job (ops._jobs_without_their_entry)."""
    h = build(max_deliveries=5)
    job = h.store.add(state=State.FETCHING, version=3, attempts=2, faults=4, worker_id=OTHER,
                      owner_token=OTHER_TOKEN)
    first = await h.deliver(job.id, reclaimed=True)
    assert h.events == [write(State.FETCHING, State.FAILED),
                        ("dead_letter", first.message_id, "MAX_DELIVERIES")]
    second = await h.deliver(job.id)
    dead = [e for e in h.events if e[0] == "dead_letter"]
    assert dead == [("dead_letter", first.message_id, "MAX_DELIVERIES")], (
        "BUG (pipeline._decide): a FAILED job with a dead-letter error_code is dead-lettered "
        "again for EVERY later message, not only for the message whose dead-lettering was "
        "interrupted; a duplicate XADD thus makes a second dead-letter entry and `check` "
        "reports the job 'with 2 dead-letter entries'. Telling the two apart needs the "
        "message's identity (e.g. the message id in the FAILED write's audit detail).")
    assert h.events[-1] == ("ack", second.message_id)


# --- scan modes: static, render, RENDER_ON=suspicious -----------------------------------------

PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
LOGIN = Form(action="http://collect.example.net/p", method="post", has_password=True,
             has_email=True)
SUSPECT = LOGIN.model_copy(update={"action": "https://collect.example.net/p"})  # 55: suspicious


def rendered_ok(**features: Any) -> RunResult:
    """A browser's report: the DOM's features, a screenshot and the DOM."""
    render = Render(screenshot=RenderImage(type="image/png", size=len(PNG),
                                           base64=base64.b64encode(PNG).decode()),
                    dom="<html><form></form></html>",
                    requests=[RenderRequest(url=URL, type="document", navigation=True)])
    return ok(render=render,
              features=Features(parse="full", text="Hello", **features))


def analyzing_detail(h: Harness, job_id: uuid.UUID) -> dict[str, Any]:
    return next(a.detail for a in h.store.audit
                if a.job_id == job_id and a.to_state is State.ANALYZING)


async def test_render_job_runs_the_fetcher_then_the_browser_and_stores_artifacts() -> None:
    h = build(ok(), rendered_ok(forms=[LOGIN]))
    job = h.store.add(mode="render")
    m = await h.deliver(job.id)
    assert h.runner.modes == ["static", "render"]
    assert h.events == [*HAPPY, ("ack", m.message_id)]
    [done] = h.worker.given
    assert isinstance(done, Completed) and done.report.render is not None
    # The form exists only in the rendered DOM: seen, and compared with the static page.
    assert {"script_built_form", "password_form_cross_domain"} <= {
        s.name for s in done.result.signals}
    assert analyzing_detail(h, job.id) == {"mode": "render", "static_verdict": "safe",
                                           "op": ANY_OP}
    stored = h.store.results[job.id]
    assert [(a.kind, a.data) for a in stored["artifacts"]][:2] == [
        ("screenshot", PNG), ("dom", b"<html><form></form></html>")]
    # The row's report carries no screenshot bytes and no DOM.
    assert stored["report"]["render"]["screenshot"]["base64"] is None
    assert stored["report"]["render"]["dom"] is None


async def test_scan_mode_default_applies_to_jobs_without_their_own() -> None:
    h = build(ok(), rendered_ok(), scan_mode="render")
    await h.deliver(h.store.add().id)  # mode NULL: SCAN_MODE
    await h.deliver(h.store.add(mode="static").id)  # its own mode wins
    assert h.runner.modes == ["static", "render", "static"]


async def test_render_job_whose_url_is_refused_never_starts_a_browser() -> None:
    refused = ok(error=ReportError(code="BLOCKED_TARGET", message="10.0.0.1 is private"))
    h = build(refused)
    job = h.store.add(mode="render")
    await h.deliver(job.id)
    assert h.runner.modes == ["static"]
    [failed] = h.worker.given
    assert isinstance(failed, Failed) and failed.code == "BLOCKED_TARGET"


async def test_render_on_suspicious_escalates_only_a_scan_that_is_not_clean() -> None:
    suspicious = ok(features=Features(parse="full", text="Hello", forms=[SUSPECT]))
    h = build(ok(), suspicious, rendered_ok(forms=[LOGIN]), render_on="suspicious")
    clean = h.store.add()
    await h.deliver(clean.id)
    assert h.runner.modes == ["static"]  # a clean verdict is not rendered
    flagged = h.store.add()
    await h.deliver(flagged.id)
    assert h.runner.modes == ["static", "static", "render"]
    [_, done] = h.worker.given
    assert isinstance(done, Completed) and done.report.render is not None
    assert analyzing_detail(h, flagged.id)["static_verdict"] == "suspicious"
    assert h.store.results[flagged.id]["artifacts"]


async def test_escalated_render_that_fails_leaves_the_static_result_standing() -> None:
    suspicious = ok(features=Features(parse="full", text="Hello", forms=[SUSPECT]))
    h = build(suspicious, crashed(), render_on="suspicious", max_attempts=2)
    job = h.store.add()
    m = await h.deliver(job.id)
    assert h.runner.modes == ["static", "render", "render"]  # one crash retry
    [done] = h.worker.given
    assert isinstance(done, Completed) and done.report.render is None
    assert done.result.verdict is Verdict.SUSPICIOUS
    assert analyzing_detail(h, job.id)["render_failed"].startswith("crashed")
    assert h.events[-1] == ("ack", m.message_id)


async def test_render_job_whose_browser_times_out_is_timed_out() -> None:
    h = build(ok(), RunResult(RunStatus.TIMEOUT, detail="no exit after 15s"))
    job = h.store.add(mode="render")
    await h.deliver(job.id)
    [failed] = h.worker.given
    assert isinstance(failed, Failed) and failed.state is State.TIMED_OUT


async def test_rendered_page_that_navigated_to_a_refused_address_is_judged_not_failed() -> None:
    """A public page whose script sent the browser to a private address: the refusal is
    evidence (refused_subrequest), not a BLOCKED_TARGET failure of the submitted URL."""
    hop = RenderHop(url=URL, location="http://10.0.0.5/admin", kind="script")
    refused = Refusal(url="http://10.0.0.5/admin", code="BLOCKED_TARGET",
                      reason="10.0.0.5 is private (10.0.0.0/8)")
    render = ok(render=Render(navigation=[hop], refused=[refused]),
                error=ReportError(code="BLOCKED_TARGET", message="10.0.0.5 is private"))
    h = build(ok(), render)
    job = h.store.add(mode="render")
    await h.deliver(job.id)
    [done] = h.worker.given
    assert isinstance(done, Completed), done
    assert "refused_subrequest" in {s.name for s in done.result.signals}
    assert done.result.verdict is Verdict.SUSPICIOUS
