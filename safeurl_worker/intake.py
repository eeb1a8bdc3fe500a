"""Intake: which messages this replica takes on, and when it lets go.

  * `_read_loop` ....... new entries, only as many as there are free slots, never while Docker
                         is down (it pings until Docker is back) or once stopping
  * `_beat_loop` ....... the heartbeat that proves this process alive, on its own so that a
                         slow Redis round elsewhere cannot let it lapse; notices Redis restarts
  * `_lease_loop` ...... lease renewal: jobs whose message another replica took are cancelled
                         (and released); our own idle entries (set aside, or a lost claim
                         reply) are adopted again
  * `_reclaim_loop` .... entries of replicas without a heartbeat (see consumer.py)
  * `_drain` ........... on stop: nothing new starts, in-flight jobs get the grace period (we
                         keep beating meanwhile), the rest are cancelled (their handler releases
                         them), every entry we hold is handed back and our heartbeat marked
                         stopped, so others take over at once and count no fault

Each message runs `handler(message)` in its own task under the concurrency semaphore; the
handler (`Worker.handle`) settles it. Intake never acks. A job that must wait for its target
domain (politeness.py) waits in `outside_slot`: its slot goes to the next message meanwhile,
its message stays ours and is renewed like any other, and the lease loop renews its domain hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .config import Settings
from .consumer import STOPPED, Consumer, Message
from .errors import backoff, cancelled_under_us, is_transient, pause, retrying
from .metrics import Metrics
from .politeness import DomainGate

log = logging.getLogger("safeurl.intake")


@dataclasses.dataclass
class InFlight:
    message: Message
    task: asyncio.Task[None] | None = None
    taken: bool = False  # another replica owns the message now: do not settle it
    holds_slot: bool = False  # holds one of the WORKER_CONCURRENCY slots
    deferred: bool = False  # waiting outside the slots (for its target domain)
    hold: tuple[str, str] | None = None  # (domain, holder) held in the DomainGate


class DuplicateWorkerId(Exception):
    """Another live process beats under our WORKER_ID: a configuration error."""


class Intake:
    def __init__(self, settings: Settings, consumer: Consumer, metrics: Metrics, token: str,
                 handler: Callable[[InFlight], Awaitable[None]],
                 stopping: asyncio.Event, docker_ready: asyncio.Event,
                 docker_ping: Callable[[], Awaitable[bool]],
                 gate: DomainGate | None = None) -> None:
        self.settings = settings
        self.consumer = consumer
        self.metrics = metrics
        self.token = token
        self.handler = handler
        self.stopping = stopping
        self.docker_ready = docker_ready
        self.docker_ping = docker_ping
        self.gate = gate
        self.taking_jobs = False
        self._slots = asyncio.Semaphore(settings.worker_concurrency)
        self._inflight: dict[str, InFlight] = {}  # by Message.key
        self._deferred = 0
        self._loops_done = asyncio.Event()

    def on_error(self, dependency: str, exc: BaseException) -> None:
        self.metrics.errors.labels(dependency).inc()
        log.warning("transient error", extra={"dependency": dependency,
                                              "error": f"{type(exc).__name__}: {exc}"[:300]})

    async def run(self) -> None:
        """Prove we are alive, create the group, take back our previous life's entries, then
        read until stopped; drain on the way out."""
        try:
            mine = await self._start_up()
            if mine is None:
                log.info("stopped during start-up")  # nothing taken, nothing to hand back
                return
        except Exception as exc:
            if self.stopping.is_set() and is_transient(exc):
                log.info("stopped while waiting for redis")  # nothing taken, nothing to hand back
                return
            raise
        for m in mine:  # our previous life's messages come first
            self._start(m)
        beat = [asyncio.create_task(self._beat_loop()), asyncio.create_task(self._lease_loop())]
        reclaim = asyncio.create_task(self._reclaim_loop())
        self.taking_jobs = True
        log.info("intake started", extra={"worker_id": self.consumer.consumer,
                                          "adopted": len(mine)})
        try:
            await self._read_loop()
        finally:
            self.taking_jobs = False
            deadline = time.monotonic() + self.settings.shutdown_grace_s
            reclaim.cancel()
            await self._drain(deadline)  # still beating: nobody takes our running jobs
            # The loops end on this flag as well as on cancel: a cancel that lands inside a
            # client library call may be lost there, and shutdown must not wait on it.
            self._loops_done.set()
            for t in [reclaim, *beat]:
                t.cancel()
            await asyncio.wait([reclaim, *beat], timeout=2)
            await self._hand_back(deadline)

    async def _start_up(self) -> list[Message] | None:
        await retrying("redis", self._wait_for_previous_life, self.stopping, self.on_error)
        if self.stopping.is_set():  # never beat over a heartbeat that may be a live twin's
            return None
        await retrying("redis", self._beat, self.stopping, self.on_error)
        await retrying("redis", self.consumer.ensure_group, self.stopping, self.on_error)
        return await retrying("redis", lambda: self.consumer.adopt(0, set(), 10_000),
                              self.stopping, self.on_error)

    async def _wait_for_previous_life(self) -> None:
        """A heartbeat under our WORKER_ID that is not ours: a previous life killed without a
        clean exit (it expires within a lease), or a second live process with the same id
        (it never does: refuse to start rather than fight over its jobs)."""
        lease = self.settings.lease_timeout_ms / 1000
        deadline = time.monotonic() + lease + 1
        while True:
            beat = await self.consumer.current_beat()
            if beat is None or beat.startswith(STOPPED):
                return
            if time.monotonic() > deadline:
                raise DuplicateWorkerId(
                    f"WORKER_ID {self.consumer.consumer!r} is in use by another live process; "
                    "give each replica its own WORKER_ID")
            log.warning("waiting for the previous life of this WORKER_ID to expire",
                        extra={"worker_id": self.consumer.consumer})
            await pause(self.stopping, min(1.0, lease / 4))
            if self.stopping.is_set():
                return

    # --- taking messages --------------------------------------------------------------------

    async def _read_loop(self) -> None:
        errors = 0
        while not self.stopping.is_set():
            if not self.docker_ready.is_set():  # no Docker, no new work (nothing is failed)
                await self._wait_for_docker()
                continue
            n = await self._take_slots()
            got: list[Message] = []
            try:
                if n and not self.stopping.is_set():
                    got = await self._read(n)
                errors = 0
            except Exception as exc:
                if not is_transient(exc):
                    raise
                cancelled_under_us()
                errors += 1
                self.on_error("redis", exc)
                await pause(self.stopping, backoff(errors, cap=2))
            for _ in range(n - len(got)):
                self._slots.release()
            for m in got:
                self._start(m, holds_slot=True)

    async def _wait_for_docker(self) -> None:
        """Until a job's container run or our own ping finds Docker answering again."""
        ping = asyncio.ensure_future(self.docker_ping())
        await self._until(ping)
        if ping.done() and not ping.cancelled() and ping.result():
            self.docker_ready.set()
            log.info("docker is back; taking jobs again")
        elif not self.stopping.is_set():
            await pause(self.stopping, 2)

    async def _read(self, n: int) -> list[Message]:
        """XREADGROUP, given up when stop() is called. An entry read in that instant stays
        pending and is handed back by the drain."""
        task = asyncio.ensure_future(self.consumer.read(n, self.settings.read_block_ms))
        await self._until(task)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return []

    async def _until(self, aw: asyncio.Event | asyncio.Future[Any]) -> None:
        """Wait for `aw` or for stop(), whichever comes first."""
        waiter = asyncio.ensure_future(aw.wait()) if isinstance(aw, asyncio.Event) else aw
        stop = asyncio.create_task(self.stopping.wait())
        await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if waiter is not aw:
            waiter.cancel()

    async def _take_slots(self) -> int:
        """Reserve free slots (at least one; none once stopping): we read only as many messages
        as we can run, so the rest stay in the stream for other replicas."""
        first = asyncio.ensure_future(self._slots.acquire())
        await self._until(first)
        if not first.done() or first.cancelled():
            first.cancel()
            return 0
        n = 1
        while n < self.settings.read_batch and not self._slots.locked():
            await self._slots.acquire()
            n += 1
        return n

    def _start(self, m: Message, holds_slot: bool = False) -> None:
        if m.key in self._inflight or self.stopping.is_set():
            if holds_slot:
                self._slots.release()
            return  # already running here, or too late: the drain hands it back
        f = self._inflight[m.key] = InFlight(m, holds_slot=holds_slot)
        f.task = asyncio.create_task(self._run_one(f))
        self.metrics.in_flight.set(len(self._inflight))

    async def _run_one(self, f: InFlight) -> None:
        try:
            if not f.holds_slot:
                await self._slots.acquire()
                f.holds_slot = True
                if self.stopping.is_set():
                    return  # a slot freed up during the drain: too late, it is handed back
            await self.handler(f)
        finally:
            if f.holds_slot:
                self._slots.release()
                f.holds_slot = False
            self._inflight.pop(f.message.key, None)
            self.metrics.in_flight.set(len(self._inflight))

    def can_defer(self) -> bool:
        """Room for one more job waiting outside the slots (MAX_DEFERRED bounds the memory)."""
        return self._deferred < self.settings.max_deferred

    async def outside_slot(self, f: InFlight, wait: Callable[[], Awaitable[bool]]) -> bool:
        """Run `wait` (a job deferred for its domain) without holding a slot: the slot goes to
        the next message meanwhile. True: the job's turn came, and it holds a slot again.
        False (stopping): it holds none, and must end without running."""
        if f.holds_slot:
            self._slots.release()
            f.holds_slot = False
        f.deferred = True
        self._deferred += 1
        self.metrics.deferred.set(self._deferred)
        try:
            turn = await wait()
        finally:
            f.deferred = False
            self._deferred -= 1
            self.metrics.deferred.set(self._deferred)
        if not turn or self.stopping.is_set():
            return False
        await self._slots.acquire()
        f.holds_slot = True
        return True

    def _room(self) -> int:
        """How many more messages adoption and takeover may start: jobs waiting for their
        domain do not count, they hold no slot."""
        return 2 * self.settings.worker_concurrency - (len(self._inflight) - self._deferred)

    # --- liveness ---------------------------------------------------------------------------

    async def _beat(self) -> None:
        old = await self.consumer.beat(self.token, self.settings.lease_timeout_ms)
        if old is not None and old != self.token and not old.startswith(STOPPED):
            log.error("another process beats under this WORKER_ID; give each replica its own",
                      extra={"worker_id": self.consumer.consumer})

    async def _beat_loop(self) -> None:
        """The heartbeat every LEASE_RENEW_MS, in a loop of its own. After an error it tries
        again within half a second, so a live owner beats again soon after Redis is back."""
        interval = self.settings.lease_renew_ms / 1000
        while not self._loops_done.is_set():
            try:
                await self._beat()
                if await self.consumer.check_restart():
                    log.warning("redis restarted: recent writes may be lost; recovering")
            except Exception as exc:
                self._loop_error(exc)
                await asyncio.sleep(min(0.5, interval))
                continue
            await asyncio.sleep(interval)

    async def _lease_loop(self) -> None:
        """Lease renewal and adoption every LEASE_RENEW_MS."""
        interval = self.settings.lease_renew_ms / 1000
        while not self._loops_done.is_set():
            await asyncio.sleep(interval)
            try:
                await self._renew()
                await self._adopt()
            except Exception as exc:
                self._loop_error(exc)

    def _loop_error(self, exc: Exception) -> None:
        cancelled_under_us()
        if not is_transient(exc):
            log.exception("intake round failed")
        self.on_error("redis", exc)

    async def _renew(self) -> None:
        holds = [f.hold for f in self._inflight.values() if f.hold]
        if self.gate and holds:
            await self.gate.renew(holds)
        for mid, why in (await self.consumer.renew(list(self._inflight))).items():
            f = self._inflight.get(mid)
            if f is None or why != "taken" or f.task is None:
                continue  # 'gone' (Redis lost the entry): finish the job; its ack is a no-op
            log.warning("message taken over by another replica; abandoning the job",
                        extra={"message_id": mid})
            f.taken = True
            f.task.cancel()

    async def _adopt(self) -> None:
        """Our own entries not running here and not renewed for a whole interval: set aside
        earlier (looked at again until their job ends), or read in an instant whose reply we
        lost. Nobody else will take them while we beat."""
        if self.stopping.is_set():
            return
        room = self._room()
        if room <= 0:
            return
        for m in await self.consumer.adopt(self.settings.lease_renew_ms,
                                           set(self._inflight), room):
            self._start(m)

    async def _reclaim_loop(self) -> None:
        """Twice a second, take over entries of replicas that stopped beating, even when all
        slots are busy: they wait in the semaphore's FIFO queue behind at most the one read
        already waiting, so a dead replica's jobs never wait behind a backlog. At most one
        extra batch of
        `WORKER_CONCURRENCY` is held this way. Only once Redis has answered us for a whole
        lease: after an outage every live owner must have had the chance to beat again."""
        lease = self.settings.lease_timeout_ms
        interval = min(0.5, lease / 8000)
        while not self.stopping.is_set():
            await asyncio.sleep(interval)
            room = self._room()
            if self.stopping.is_set() or room <= 0 or not self.docker_ready.is_set() or \
                    self.consumer.steady_for() * 1000 < lease:
                continue
            try:
                got = await self.consumer.reclaim(lease, room)
            except Exception as exc:
                self._loop_error(exc)
                continue
            for m in got:
                log.info("took over message", extra={"message_id": m.message_id,
                                                     "deliveries": m.deliveries})
                self._start(m)

    # --- letting go -------------------------------------------------------------------------

    async def _drain(self, deadline: float) -> None:
        """Let in-flight jobs finish within the grace period, then cancel the rest (their
        handler releases them). ~3.5 s of the grace are kept for releasing and handing back."""
        tasks = [f.task for f in self._inflight.values() if f.task]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=max(0.1, deadline - 3.5 - time.monotonic()))
        for t in late:
            t.cancel()
        if late:
            await asyncio.wait(late, timeout=max(0.1, deadline - 1.5 - time.monotonic()))
        log.info("drained", extra={"finished": len(tasks) - len(late), "released": len(late)})

    async def _hand_back(self, deadline: float) -> None:
        """Mark every entry we still hold idle, and our heartbeat stopped: another replica
        takes them over at once, as work handed back rather than lost."""
        keep_ms = int(max(self.settings.consumer_idle_s, 60) * 1000)
        try:
            async with asyncio.timeout(max(0.2, deadline - 0.5 - time.monotonic())):
                held = await self.consumer.hand_back(self.settings.lease_timeout_ms)
                await self.consumer.stop_beat(self.token, keep_ms)
        except Exception as exc:  # Redis down: the heartbeat expires within a lease instead
            log.warning("could not hand back messages", extra={"error": repr(exc)[:200]})
            return
        if held:
            log.warning("handed back messages for other replicas", extra={"count": held})
