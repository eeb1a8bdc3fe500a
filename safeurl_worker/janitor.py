"""The janitor: repairs what no single job's worker can see. One replica at a time runs the
rounds, elected with a Redis lock that expires if its holder dies; right after Redis lost data
(a stream or group had to be recreated) the replica that noticed runs a round at once.

Each round:
  * re-enqueue QUEUED jobs that have no entry in the stream (the API's XADD was lost, or Redis
    lost the entry) once they are `REQUEUE_AFTER_S` old (2 s right after a data loss);
  * recover FETCHING/ANALYZING jobs whose owner is dead (no heartbeat with its token) and that
    have no entry left anywhere in the stream (no takeover can find them);
  * remove containers labelled by this service that outlived the container timeout (orphans of
    a crashed replica, including its never-started warm containers), forget idle consumers
    that hold nothing, trim acknowledged entries.
Every repair is a versioned, audited write (detail `janitor`) and a counted metric: a repair
means some path lost a message, so `safeurl-worker check` reports how many jobs needed one.
Judging owners dead waits until Redis has answered this replica for a whole lease, like takeovers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from . import ops
from .config import Settings
from .consumer import Consumer
from .errors import cancelled_under_us, pause
from .metrics import Metrics
from .models import Job, State
from .politeness import target_domain
from .runner import ContainerRunner, orphan_age_s
from .store import Store

log = logging.getLogger("safeurl.janitor")

# Extend the lock only if we still hold it (compare-and-pexpire).
_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class Janitor:
    def __init__(self, settings: Settings, store: Store, consumer: Consumer,
                 runner: ContainerRunner, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.consumer = consumer
        self.runner = runner
        self.metrics = metrics
        self.lock_key = f"safeurl:janitor:{settings.scan_stream}:{settings.scan_group}"
        self._renew_lock = consumer.redis.register_script(_RENEW_LOCK)

    async def loop(self) -> None:
        interval = self.settings.janitor_interval_s
        lost = self.consumer.data_lost
        while True:
            await pause(lost, interval)
            prompt = lost.is_set()
            lost.clear()
            try:
                if prompt or await self._leader(ttl_ms=int(interval * 3000)):
                    await self.run_once(after_data_loss=prompt)
            except Exception as exc:  # a bad round must not stop the janitor
                cancelled_under_us()  # but a cancel a client library turned into one must
                log.warning("janitor round failed", extra={"error": f"{type(exc).__name__}: "
                                                                    f"{exc}"[:300]})

    async def _leader(self, ttl_ms: int) -> bool:
        me = self.settings.worker_id
        if await self.consumer.redis.set(self.lock_key, me, nx=True, px=ttl_ms):
            return True
        return bool(await self._renew_lock(keys=[self.lock_key], args=[me, ttl_ms]))

    async def run_once(self, after_data_loss: bool = False) -> dict[str, int]:
        age = min(2.0, self.settings.requeue_after_s) if after_data_loss \
            else self.settings.requeue_after_s
        actions: dict[str, Callable[[], Awaitable[int]]] = {
            "requeued": lambda: self.requeue_lost(age),
            "recovered": self.recover_stuck,
            "containers_removed": self.remove_orphans,
            "consumers_removed": lambda: self.consumer.remove_idle_consumers(
                int(self.settings.consumer_idle_s * 1000)),
            "trimmed": self.consumer.trim,
            # RETENTION_DAYS: a bounded prune per round (with the dead letters of pruned jobs);
            # housekeeping, not a repair.
            "pruned": lambda: ops.prune_retained(self.store, self.settings.retention_days,
                                                 self.consumer)}
        done: dict[str, int] = {}
        for action, fn in actions.items():
            try:  # each repair stands alone: one failing must not skip the others
                done[action] = await fn()
            except Exception as exc:
                cancelled_under_us()  # a cancel (worker stopping) that surfaced as an error
                done[action] = 0
                log.warning("janitor action failed", extra={
                    "action": action, "error": f"{type(exc).__name__}: {exc}"[:300]})
        for action, n in done.items():
            if n and action not in ("trimmed", "pruned"):
                self.metrics.janitor_actions.labels(action).inc(n)
                log.warning("janitor repaired", extra={"action": action, "count": n})
        if done.get("pruned"):
            log.info("janitor pruned", extra={"jobs": done["pruned"]})
        return done

    async def requeue_lost(self, age_s: float | None = None) -> int:
        """QUEUED jobs with no entry in the stream: their XADD never happened or was lost."""
        candidates = await self.store.queued_since(
            self.settings.requeue_after_s if age_s is None else age_s)
        if not candidates:
            return 0
        in_stream, complete = await self.consumer.job_ids_in_stream()
        if not complete:  # a backlog too long to scan: judge again when it has shrunk
            log.info("janitor: stream backlog too long to look for lost entries")
            return 0
        lost = [j for j in candidates if j.id not in in_stream]
        return await self._requeue(lost, {"janitor": "requeued: no stream entry"}, fault=False)

    async def recover_stuck(self) -> int:
        """FETCHING/ANALYZING jobs of a dead owner with no entry left in the stream."""
        lease_s = self.settings.lease_timeout_ms / 1000
        if self.consumer.steady_for() < lease_s:
            return 0  # Redis just came back: live owners may not have beaten again yet
        candidates = await self.store.active_since(lease_s)
        if not candidates:
            return 0
        gone = {j.id: await self._owner_state(j) for j in candidates}
        gone = {jid: st for jid, st in gone.items() if st != "alive"}
        if not gone:
            return 0
        in_stream, complete = await self.consumer.job_ids_in_stream()
        if not complete:
            return 0
        n = 0
        for j in candidates:
            if j.id in gone and j.id not in in_stream:
                # An owner that died running it counts against the job, as a takeover would.
                n += await self._requeue([j], {"janitor": "recovered: owner gone, no entry"},
                                         fault=gone[j.id] == "dead")
        return n

    async def _owner_state(self, job: Job) -> str:
        if not (job.owner_token and job.worker_id):
            return "dead"
        return await self.consumer.owner_state(job.worker_id, job.owner_token)

    async def remove_orphans(self) -> int:
        # Older than any live scan can be (a scan is killed at the container timeout); this
        # includes the never-started warm containers of a dead worker (a live one recycles its
        # own well before this age).
        with contextlib.suppress(Exception):  # Docker down: try again next round
            return await self.runner.remove_labelled(older_than_s=orphan_age_s(self.settings))
        return 0

    async def _requeue(self, jobs: list[Job], detail: dict[str, Any], fault: bool) -> int:
        n = 0
        for job in jobs:
            # The versioned write first: if two janitors ever overlap, only one re-enqueues.
            moved = await self.store.transition(job, State.QUEUED,
                                                worker_id=self.settings.worker_id,
                                                detail=detail, add_fault=fault)
            if moved is not None:
                # A lane no longer configured: the default lane rather than a stream no one reads.
                lane = job.lane if job.lane in self.consumer.lanes else None
                await self.consumer.enqueue(job.id, lane=lane, tenant=job.tenant,
                                            domain=target_domain(job.url))
                n += 1
        return n
