"""Intake in memory: which messages a replica takes on and when it lets go, against a fake
consumer, a handler the test controls and a fake Docker ping. No Redis, PostgreSQL or Docker.

Every consumer call and every handler event goes into one log with its time, so the tests
assert order (adopted before read, hand-back after the cancellations) and timing (nothing taken
after stop(), heartbeats during the drain). Settings are small: a lease of 0.5 s renewed every
0.1 s, reads blocking 10 ms.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from safeurl_worker import intake as intake_mod
from safeurl_worker.config import Settings, load_settings
from safeurl_worker.consumer import STOPPED, Consumer, Message
from safeurl_worker.intake import DuplicateWorkerId, InFlight, Intake
from safeurl_worker.metrics import Metrics

pytestmark = pytest.mark.timeout(10)

TOKEN = "tok-me"
OTHER_TOKEN = "tok-other"  # another process life under our WORKER_ID

# --- the log ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    t: float
    name: str
    args: tuple[Any, ...]


class Log:
    """Consumer calls and handler events, in the order they happened."""

    def __init__(self) -> None:
        self.entries: list[Call] = []

    def add(self, name: str, *args: Any) -> None:
        self.entries.append(Call(time.monotonic(), name, args))

    def of(self, name: str) -> list[Call]:
        return [c for c in self.entries if c.name == name]

    def names(self) -> list[str]:
        return [c.name for c in self.entries]

    def first(self, name: str, *args: Any) -> int:
        for i, c in enumerate(self.entries):
            if c.name == name and c.args[:len(args)] == args:
                return i
        raise AssertionError(f"no {name}{args} in {self.brief()}")

    def last(self, name: str, *args: Any) -> int:
        found = [i for i, c in enumerate(self.entries)
                 if c.name == name and c.args[:len(args)] == args]
        if not found:
            raise AssertionError(f"no {name}{args} in {self.brief()}")
        return found[-1]

    def brief(self) -> list[str]:
        return [f"{c.name}{c.args}" for c in self.entries if c.name not in ("beat", "renew",
                                                                        "check_restart")]


# --- fakes ------------------------------------------------------------------------------------


class FakeConsumer:
    """The Consumer methods Intake calls. Each call is logged with its time; a method named in
    `down` (or every method, with "*") raises ConnectionError, as while Redis is down."""

    consumer = "w-me"

    def __init__(self, log: Log, busy: Callable[[], int]) -> None:
        self.log = log
        self.busy = busy  # handlers running now (logged with each read)
        self.heartbeat: Callable[[], str | None] = lambda: None  # what current_beat answers
        self.down: set[str] = set()
        self.previous_life: list[Message] = []  # adopt(0, ...) at start-up
        self.adoptable: collections.deque[list[Message]] = collections.deque()  # lease loop
        self.reclaimable: collections.deque[list[Message]] = collections.deque()
        self.stream: collections.deque[Message] = collections.deque()  # new entries
        self.renew_results: dict[str, str] = {}
        self.steady = 3600.0

    def _call(self, name: str, *args: Any) -> None:
        self.log.add(name, *args)
        if name in self.down or "*" in self.down:
            raise ConnectionError(f"redis is down ({name})")

    def message(self, mid: str) -> Message:
        return Message(mid, {"job_id": mid}, cast(Consumer, self))

    def push(self, *mids: str) -> list[Message]:
        ms = [self.message(mid) for mid in mids]
        self.stream.extend(ms)
        return ms

    async def current_beat(self) -> str | None:
        self._call("current_beat")
        return self.heartbeat()

    async def beat(self, token: str, ttl_ms: int) -> str | None:
        self._call("beat", token, ttl_ms)
        return token

    async def check_restart(self) -> bool:
        self._call("check_restart")
        return False

    async def ensure_group(self) -> None:
        self._call("ensure_group")

    async def adopt(self, min_idle_ms: int, running: set[str], count: int) -> list[Message]:
        self._call("adopt", min_idle_ms, frozenset(running), count)
        if min_idle_ms == 0:  # start-up: our previous life's entries
            got, self.previous_life = self.previous_life, []
            return got
        return self.adoptable.popleft() if self.adoptable else []

    async def read(self, count: int, block_ms: int) -> list[Message]:
        self._call("read", count, block_ms, self.busy())
        if self.stream:
            return [self.stream.popleft() for _ in range(min(count, len(self.stream)))]
        await asyncio.sleep(block_ms / 1000)
        return []

    async def renew(self, message_ids: list[str]) -> dict[str, str]:
        self._call("renew", tuple(message_ids))
        return {m: self.renew_results[m] for m in message_ids if m in self.renew_results}

    async def reclaim(self, min_idle_ms: int, count: int) -> list[Message]:
        self._call("reclaim", min_idle_ms, count)
        return self.reclaimable.popleft() if self.reclaimable else []

    def steady_for(self) -> float:
        return self.steady

    async def hand_back(self, lease_timeout_ms: int) -> int:
        self._call("hand_back", lease_timeout_ms)
        return 0

    async def stop_beat(self, token: str, keep_ms: int) -> None:
        self._call("stop_beat", token, keep_ms)


class Handler:
    """The job handler: each message blocks until its gate opens (or it is cancelled). A
    cancelled handler may take `release_s` to release its job, as Worker.handle does."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.got: dict[str, InFlight] = {}
        self.gates: collections.defaultdict[str, asyncio.Event] = \
            collections.defaultdict(asyncio.Event)
        self.cancelled: list[str] = []
        self.done: list[str] = []
        self.running = 0
        self.release_s = 0.0
        self.on_open: Callable[[str], None] | None = None  # runs when a gate opens

    async def __call__(self, f: InFlight) -> None:
        mid = f.message.message_id
        self.log.add("handle", mid)
        self.got[mid] = f
        self.running += 1
        try:
            await self.gates[mid].wait()
            if self.on_open:
                self.on_open(mid)
        except asyncio.CancelledError:
            self.log.add("cancelled", mid)
            self.cancelled.append(mid)
            if self.release_s:
                await asyncio.sleep(self.release_s)
            raise
        finally:
            self.running -= 1
        self.log.add("done", mid)
        self.done.append(mid)


@dataclasses.dataclass
class Harness:
    settings: Settings
    log: Log
    consumer: FakeConsumer
    handler: Handler
    metrics: Metrics
    stopping: asyncio.Event
    docker_ready: asyncio.Event
    intake: Intake
    docker_up: bool = True  # what the ping answers
    ping_gate: asyncio.Event | None = None  # the ping hangs until set (None: answers at once)
    task: asyncio.Task[None] | None = None
    t_start: float = 0.0
    t_stop: float = 0.0

    async def ping(self) -> bool:
        self.log.add("ping")
        if self.ping_gate is not None:
            await self.ping_gate.wait()
        return self.docker_up

    def start(self) -> asyncio.Task[None]:
        self.t_start = time.monotonic()
        self.task = asyncio.create_task(self.intake.run())
        return self.task

    def stop(self) -> None:
        self.t_stop = time.monotonic()
        self.stopping.set()

    async def returned(self, within: float) -> float:
        """Wait for run() to return; its result (or exception) is raised here. Returns the
        seconds since stop() (since start() when stop() was not called)."""
        assert self.task is not None
        await asyncio.wait({self.task}, timeout=within)
        assert self.task.done(), f"run() did not return within {within} s: {self.log.brief()}"
        self.task.result()
        return time.monotonic() - (self.t_stop or self.t_start)

    def calls_after_stop(self, *names: str) -> list[Call]:
        return [c for c in self.log.entries if c.name in names and c.t >= self.t_stop]


def build(**overrides: Any) -> Harness:
    base: dict[str, Any] = {
        "worker_id": "w-me", "database_url": "postgresql://fake/x",
        "redis_url": "redis://fake:1/0", "metrics_port": 0, "log_format": "text",
        "lease_renew_ms": 100, "lease_timeout_ms": 500, "read_block_ms": 10,
        "worker_concurrency": 2, "shutdown_grace_s": 1.5,
    }
    settings = load_settings(**{**base, **overrides})
    log = Log()
    handler = Handler(log)
    consumer = FakeConsumer(log, lambda: handler.running)
    metrics = Metrics()
    stopping, docker_ready = asyncio.Event(), asyncio.Event()
    docker_ready.set()
    h = Harness(settings, log, consumer, handler, metrics, stopping, docker_ready,
                cast(Intake, None))
    h.intake = Intake(settings, cast(Consumer, consumer), metrics, TOKEN, handler, stopping,
                      docker_ready, h.ping)
    return h


@pytest.fixture
async def make() -> AsyncIterator[Callable[..., Harness]]:
    """Builds harnesses; a run() still going at the end of a test is stopped and cancelled."""
    made: list[Harness] = []

    def _make(**overrides: Any) -> Harness:
        h = build(**overrides)
        made.append(h)
        return h

    yield _make
    tasks = [h.task for h in made if h.task is not None and not h.task.done()]
    for h in made:
        h.stopping.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def wait_until(pred: Callable[[], bool], what: str, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        await asyncio.sleep(0.005)


def spin(seconds: float) -> None:
    """CPU-bound work on the event loop (a job parsing a large page): nothing else runs."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


# --- 1. our previous life's entries -----------------------------------------------------------


async def test_previous_life_entries_start_before_any_read(make: Callable[..., Harness]) -> None:
    h = make(worker_concurrency=3)
    c = h.consumer
    c.previous_life = [c.message("old-1"), c.message("old-2")]
    c.push("new-1")
    h.start()
    await wait_until(lambda: "new-1" in h.handler.got, "the new message is handled")

    assert h.log.of("adopt")[0].args == (0, frozenset(), 10_000)  # all of them, idle or not
    first_read = h.log.first("read")
    assert h.log.first("handle", "old-1") < first_read
    assert h.log.first("handle", "old-2") < first_read
    assert h.log.first("adopt") < h.log.first("handle", "old-1")
    # The two adopted jobs hold two of the three slots: the first read asks for one message.
    assert h.log.entries[first_read].args[0] == 1
    assert [c.args[0] for c in h.log.of("handle")] == ["old-1", "old-2", "new-1"]

    h.stop()
    await h.returned(within=2.5)


# --- 2. reads never ask for more than the free slots ------------------------------------------


async def test_reads_ask_for_no_more_than_the_free_slots(make: Callable[..., Harness]) -> None:
    h = make(worker_concurrency=2)
    c, handler = h.consumer, h.handler
    c.push("m1")
    h.start()

    def reads() -> list[Call]:
        return h.log.of("read")

    await wait_until(lambda: "m1" in handler.got, "m1 is handled")
    assert reads()[0].args[0] == 2  # both slots free: ask for two (the stream had one)
    n = len(reads())
    await wait_until(lambda: len(reads()) > n, "a read after m1 started")
    assert reads()[-1].args[0] == 1  # one slot busy: ask for one

    c.push("m2")
    await wait_until(lambda: "m2" in handler.got, "m2 is handled")
    await asyncio.sleep(0.02)  # a read already in flight (the one that got m2) has returned
    n = len(reads())
    await asyncio.sleep(0.25)
    assert len(reads()) == n, "read while all slots were busy"

    handler.gates["m1"].set()
    await wait_until(lambda: len(reads()) > n, "a read once m1 finished")
    assert reads()[n].args[0] == 1

    handler.gates["m2"].set()
    await wait_until(lambda: any(r.args[0] == 2 for r in reads()[n + 1:]),
                     "a read for two once both finished")

    conc = h.settings.worker_concurrency
    for r in reads():
        count, _, busy = r.args
        assert 0 < count <= conc - busy, f"read({count}) with {busy} of {conc} slots busy"

    h.stop()
    await h.returned(within=2.5)


# --- 3. nothing starts after stop() -----------------------------------------------------------


async def test_message_waiting_for_a_slot_at_stop_is_never_handled(
        make: Callable[..., Harness]) -> None:
    h = make(worker_concurrency=2, shutdown_grace_s=5)
    c, handler = h.consumer, h.handler
    c.push("m1", "m2")
    c.adoptable.append([c.message("mine-1")])  # ours, set aside earlier
    c.reclaimable.append([c.message("dead-1")])  # a dead replica's
    h.start()
    await wait_until(lambda: {"m1", "m2"} <= set(handler.got), "both slots are busy")
    await wait_until(lambda: {"dead-1", "mine-1"} <= set(h.intake._inflight),
                     "the adopted and the reclaimed message wait for a slot")
    waiting = [h.intake._inflight[m].task for m in ("mine-1", "dead-1")]

    h.stop()
    handler.gates["m1"].set()  # slots free up during the drain
    handler.gates["m2"].set()
    await h.returned(within=2.5)

    assert sorted(handler.got) == ["m1", "m2"], \
        "a message that waited for a slot was run after stop()"
    assert sorted(handler.done) == ["m1", "m2"]
    assert h.log.names()[-2:] == ["hand_back", "stop_beat"]  # handed back instead
    # They got a slot (not cancelled: the drain had time) and returned without running.
    assert all(t is not None and t.done() and not t.cancelled() for t in waiting)
    assert h.intake._inflight == {}
    assert h.intake._slots._value == 2  # every slot given back


async def test_start_after_stopping_does_not_run_the_message(
        make: Callable[..., Harness]) -> None:
    h = make(worker_concurrency=2)
    h.stopping.set()
    for holds_slot in (False, True):
        if holds_slot:
            await h.intake._slots.acquire()
        h.intake._start(h.consumer.message(f"late-{holds_slot}"), holds_slot=holds_slot)
        assert h.intake._inflight == {}
    await asyncio.sleep(0.05)
    assert h.handler.got == {}
    assert h.intake._slots._value == 2  # the slot the read had reserved was given back


async def test_no_reclaim_or_adopt_after_stop(make: Callable[..., Harness]) -> None:
    h = make(worker_concurrency=2)
    h.consumer.push("m1")
    h.start()
    await wait_until(lambda: "m1" in h.handler.got, "m1 is handled")
    await wait_until(lambda: len(h.log.of("reclaim")) >= 2 and
                     any(a.args[0] > 0 for a in h.log.of("adopt")),
                     "reclaim and adopt rounds ran")
    h.stop()
    await h.returned(within=2.5)

    late = h.calls_after_stop("reclaim", "adopt")
    assert late == [], f"reclaim/adopt called after stop(): {late}"
    assert h.calls_after_stop("renew"), "leases must be renewed while draining"


async def test_no_reclaim_after_stop_while_a_job_keeps_the_loop_busy(
        make: Callable[..., Harness]) -> None:
    """stop() arrives while a job does CPU work on the event loop for 0.1 s (longer than the
    reclaim loop's 62.5 ms sleep). The reclaim loop checks `stopping` only before its sleep:
    when it wakes it calls reclaim() before the read loop has unwound to cancel it."""
    h = make(worker_concurrency=2, read_block_ms=1000)  # the default: a read is waiting
    h.handler.on_open = lambda mid: spin(0.1)
    h.consumer.push("m1")
    h.start()
    await wait_until(lambda: "m1" in h.handler.got, "m1 is handled")
    await wait_until(lambda: len(h.log.of("reclaim")) >= 2, "reclaim rounds ran")
    h.stop()
    h.handler.gates["m1"].set()  # the job's CPU-bound part runs right after stop()
    await h.returned(within=2.5)

    late = h.calls_after_stop("reclaim")
    assert late == [], (
        "BUG: Intake._reclaim_loop called consumer.reclaim() after stop(): it re-checks "
        "`stopping` only before its sleep, and run() cancels it only once the read loop has "
        "unwound. The entries it XCLAIMs are never started (_start refuses) but get a delivery "
        f"counted and are handed back. Calls after stop: {late}")


# --- 4. the drain -----------------------------------------------------------------------------


async def test_drain_cancels_within_grace_keeps_beating_then_hands_back(
        make: Callable[..., Harness]) -> None:
    grace = 1.5
    h = make(worker_concurrency=3, shutdown_grace_s=grace)
    h.handler.release_s = 0.08  # a cancelled job releases itself (one short write)
    h.consumer.push("m1", "m2", "m3")
    h.start()
    await wait_until(lambda: len(h.handler.got) == 3, "three jobs run")
    h.stop()
    took = await h.returned(within=grace + 1)

    assert took < grace + 0.5, f"run() took {took:.2f} s after stop()"
    assert sorted(h.handler.cancelled) == ["m1", "m2", "m3"]
    assert h.handler.done == []
    hand_back, stop_beat = h.log.first("hand_back"), h.log.first("stop_beat")
    assert hand_back < stop_beat
    assert all(h.log.first("cancelled", m) < hand_back for m in ("m1", "m2", "m3"))
    assert h.log.entries[hand_back].args == (h.settings.lease_timeout_ms,)
    assert h.log.entries[stop_beat].args == (TOKEN, 3_600_000)
    t_hand_back = h.log.entries[hand_back].t
    beats = [b for b in h.log.of("beat") if h.t_stop <= b.t < t_hand_back]
    assert beats, "no heartbeat between stop() and hand_back: others could take running jobs"
    assert not h.intake.taking_jobs
    assert h.intake._inflight == {}


# --- 5. lease renewal -------------------------------------------------------------------------


async def test_taken_message_is_cancelled_gone_message_keeps_running(
        make: Callable[..., Harness]) -> None:
    h = make(worker_concurrency=2)
    c, handler = h.consumer, h.handler
    c.push("taken-1", "gone-1")
    c.renew_results = {"taken-1": "taken", "gone-1": "gone"}
    h.start()
    await wait_until(lambda: "taken-1" in handler.cancelled, "the taken job is cancelled")
    renewed = [r for r in h.log.of("renew") if set(r.args[0]) == {"taken-1", "gone-1"}]
    assert renewed, "both jobs were renewed together"

    taken, gone = handler.got["taken-1"], handler.got["gone-1"]
    assert taken.taken is True
    assert taken.task is not None and taken.task.cancelled()
    await asyncio.sleep(0.25)  # more renewal rounds answer 'gone'
    assert gone.taken is False
    assert "gone-1" not in handler.cancelled
    assert gone.task is not None and not gone.task.done()

    handler.gates["gone-1"].set()
    await wait_until(lambda: handler.done == ["gone-1"], "the gone job finishes")
    h.stop()
    await h.returned(within=2.5)


# --- 6. Docker down ---------------------------------------------------------------------------


async def test_no_read_while_docker_ping_hangs_reads_again_once_it_answers(
        make: Callable[..., Harness]) -> None:
    h = make()
    h.docker_ready.clear()
    h.ping_gate = asyncio.Event()
    h.consumer.push("m1")
    h.start()
    await wait_until(lambda: h.log.of("ping") != [], "docker is pinged")
    await asyncio.sleep(0.25)
    assert h.log.of("read") == []
    assert h.log.of("reclaim") == [], "reclaimed while Docker was down"
    assert not h.docker_ready.is_set()

    h.ping_gate.set()
    await wait_until(lambda: "m1" in h.handler.got, "m1 is read and handled")
    assert h.docker_ready.is_set()
    assert h.log.first("ping") < h.log.first("read")
    h.stop()
    await h.returned(within=2.5)


async def test_docker_ping_false_keeps_reads_paused_until_true(
        make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    real_pause = intake_mod.pause

    async def short_pause(stopping: asyncio.Event, seconds: float) -> None:
        await real_pause(stopping, min(seconds, 0.02))

    monkeypatch.setattr(intake_mod, "pause", short_pause)  # the 2 s between pings
    h = make()
    h.consumer.push("m1")
    h.start()
    await wait_until(lambda: "m1" in h.handler.got, "m1 is handled")

    h.docker_up = False
    h.docker_ready.clear()  # a job's container run found Docker down
    await asyncio.sleep(0.03)  # a read already in flight returns
    reads = len(h.log.of("read"))
    await wait_until(lambda: len(h.log.of("ping")) >= 3, "docker is pinged again and again")
    assert len(h.log.of("read")) == reads, "read while Docker was down"
    assert not h.docker_ready.is_set()

    h.docker_up = True
    t_up = time.monotonic()
    await wait_until(lambda: any(r.t > t_up for r in h.log.of("read")), "reads resume")
    assert h.docker_ready.is_set()
    h.stop()
    await h.returned(within=2.5)


# --- 7. start-up: our WORKER_ID's heartbeat ---------------------------------------------------


async def test_live_duplicate_worker_id_raises_within_a_lease_and_a_second(
        make: Callable[..., Harness]) -> None:
    h = make()
    h.consumer.heartbeat = lambda: OTHER_TOKEN  # another live process keeps beating
    h.start()
    t0 = time.monotonic()
    with pytest.raises(DuplicateWorkerId, match="w-me"):
        await h.returned(within=3)
    took = time.monotonic() - t0
    lease_s = h.settings.lease_timeout_ms / 1000
    assert lease_s + 1 - 0.2 < took < lease_s + 1 + 0.4, f"raised after {took:.2f} s"
    assert len(h.log.of("current_beat")) > 1  # looked again while waiting
    assert set(h.log.names()) == {"current_beat"}, "touched more than the heartbeat's value"


@pytest.mark.parametrize("value", [None, f"{STOPPED}{OTHER_TOKEN}"])
async def test_start_up_proceeds_at_once_without_a_live_heartbeat(
        make: Callable[..., Harness], value: str | None) -> None:
    h = make()
    h.consumer.heartbeat = lambda: value
    h.start()
    await wait_until(lambda: h.log.of("read") != [], "the first read", timeout=0.5)
    assert h.log.names()[:4] == ["current_beat", "beat", "ensure_group", "adopt"]
    assert h.log.of("beat")[0].t - h.t_start < 0.1
    h.stop()
    await h.returned(within=2.5)


async def test_start_up_waits_for_a_previous_life_to_expire(
        make: Callable[..., Harness]) -> None:
    h = make()
    h.consumer.heartbeat = lambda: OTHER_TOKEN if time.monotonic() - h.t_start < 0.3 else None
    h.start()
    await wait_until(lambda: h.log.of("read") != [], "the first read", timeout=1.2)
    first_beat = h.log.of("beat")[0].t - h.t_start
    assert 0.3 <= first_beat < 0.6, f"first heartbeat after {first_beat:.2f} s"
    h.stop()
    await h.returned(within=2.5)


async def test_stop_while_waiting_out_a_duplicate_takes_nothing(
        make: Callable[..., Harness]) -> None:
    """Another live process beats under our WORKER_ID and stop() comes while we wait for its
    heartbeat to go away. We must leave without touching its heartbeat or its entries."""
    h = make()
    h.consumer.heartbeat = lambda: OTHER_TOKEN
    h.start()
    await asyncio.sleep(0.2)
    h.stop()
    took = await h.returned(within=2)
    assert took < 0.5

    touched = [c for c in h.log.entries if c.name != "current_beat"]
    assert touched == [], (
        "BUG: stop() during Intake._wait_for_previous_life makes it return normally, so "
        "_start_up goes on to beat() over the other process's heartbeat, adopt(0, ...) all "
        "entries of our consumer name (the other process's running jobs), then hands them back "
        "and marks the heartbeat 'stopped:' - other replicas reclaim the live process's jobs "
        f"at once. Calls made: {[f'{c.name}{c.args}' for c in touched]}")


# --- 8. stop during start-up while Redis is down ----------------------------------------------


@pytest.mark.parametrize("down", [{"beat"}, {"*"}])
async def test_stop_during_start_up_with_redis_down_returns_quietly(
        make: Callable[..., Harness], down: set[str]) -> None:
    h = make()
    h.consumer.down = down
    h.start()
    await wait_until(lambda: len(h.log.of("beat" if down == {"beat"} else "current_beat")) >= 2,
                     "start-up retries")
    h.stop()
    took = await h.returned(within=2)  # no exception
    assert took < 1.0, f"run() returned {took:.2f} s after stop()"
    names = set(h.log.names())
    assert names <= {"current_beat", "beat"}, f"went past start-up: {names}"
    assert h.handler.got == {}
    assert (h.metrics.registry.get_sample_value("safeurl_transient_errors_total",
                                               {"dependency": "redis"}) or 0) >= 2


# --- 9. reclaim waits until Redis has been steady for a lease ---------------------------------


async def test_reclaim_only_after_redis_was_steady_for_a_lease(
        make: Callable[..., Harness]) -> None:
    h = make()
    h.consumer.steady = 0.3  # seconds; the lease is 0.5
    h.start()
    await wait_until(lambda: h.log.of("read") != [], "intake runs")
    await asyncio.sleep(0.4)  # six reclaim rounds
    assert h.log.of("reclaim") == []

    h.consumer.steady = 0.5
    t_steady = time.monotonic()
    await wait_until(lambda: h.log.of("reclaim") != [], "a reclaim", timeout=0.3)
    first = h.log.of("reclaim")[0]
    assert first.t >= t_steady
    assert first.args == (500, 2 * h.settings.worker_concurrency)
    h.stop()
    await h.returned(within=2.5)


# --- politeness: a deferred job waits outside the slots ---------------------------------------


async def test_a_deferred_job_gives_its_slot_away_and_keeps_its_message(
        make: Callable[..., Harness]) -> None:
    h = make(worker_concurrency=1)
    c = h.consumer
    turn = asyncio.Event()  # the domain's turn comes
    ran: list[str] = []

    async def handler(f: InFlight) -> None:
        if f.message.message_id == "polite":
            assert await h.intake.outside_slot(f, turn.wait)
            assert f.holds_slot  # it runs in a slot again
        ran.append(f.message.message_id)

    h.intake.handler = handler
    c.push("polite")
    h.start()
    await wait_until(lambda: h.intake._deferred == 1, "the job is deferred")
    c.push("next")
    await wait_until(lambda: "next" in ran, "the next message ran in the freed slot")
    assert h.metrics.deferred._value.get() == 1
    # Still ours: its message is renewed with the running ones, and it is not counted
    # against the room for adoption and takeover (it holds no slot).
    n = len(h.log.of("renew"))
    await wait_until(lambda: len(h.log.of("renew")) > n, "a renewal")
    assert "polite" in h.log.of("renew")[-1].args[0]
    assert h.intake._room() == 2
    turn.set()
    await wait_until(lambda: "polite" in ran, "the deferred job ran")
    assert h.intake._deferred == 0 and h.metrics.deferred._value.get() == 0
    await wait_until(lambda: not h.intake._inflight, "nothing in flight")
    h.stop()
    await h.returned(within=2.5)
    assert h.intake._slots._value == 1  # its slot was given back exactly once


async def test_a_job_deferred_when_stopping_leaves_promptly(make: Callable[..., Harness]) -> None:
    h = make(worker_concurrency=1)
    h.consumer.push("polite")

    turns: list[bool] = []

    async def handler(f: InFlight) -> None:
        turns.append(await h.intake.outside_slot(f, h.stopping.wait))  # the gate gives up

    h.intake.handler = handler
    h.start()
    await wait_until(lambda: h.intake._deferred == 1, "the job is deferred")
    h.stop()
    assert await h.returned(within=2.5) < 1.0
    assert turns == [False]  # told to end without running, holding no slot
    assert h.intake._slots._value == 1
    assert h.log.of("hand_back")  # its message goes back for another replica
