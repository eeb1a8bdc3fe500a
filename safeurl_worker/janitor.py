"""The janitor: repairs what no single job's worker can see. One replica at a time runs it,
elected with a Redis lock that expires if its holder dies.

Each round:
  * re-enqueue jobs still QUEUED long after every older stream entry was delivered (the API
    inserted the row but its XADD was lost);
  * recover jobs stuck in FETCHING/ANALYZING whose message is no longer pending anywhere (no live
    lease can finish them);
  * remove containers labelled by this service that outlived the container timeout (orphans of
    a crashed replica);
  * trim acknowledged entries from the stream.
Every repair is a versioned, audited write and a counted metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

from .config import Settings
from .consumer import Consumer
from .metrics import Metrics
from .models import Job, State
from .runner import ContainerRunner
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
        while True:
            await asyncio.sleep(interval)
            try:
                if await self._leader(ttl_ms=int(interval * 3000)):
                    await self.run_once()
            except Exception as exc:  # a bad round must not stop the janitor
                log.warning("janitor round failed", extra={"error": f"{type(exc).__name__}: "
                                                                    f"{exc}"[:300]})

    async def _leader(self, ttl_ms: int) -> bool:
        me = self.settings.worker_id
        if await self.consumer.redis.set(self.lock_key, me, nx=True, px=ttl_ms):
            return True
        return bool(await self._renew_lock(keys=[self.lock_key], args=[me, ttl_ms]))

    async def run_once(self) -> dict[str, int]:
        actions = {"requeued": self.requeue_lost, "recovered": self.recover_stuck,
                   "containers_removed": self.remove_orphans, "trimmed": self.consumer.trim}
        done: dict[str, int] = {}
        for action, fn in actions.items():
            try:  # each repair stands alone: one failing must not skip the others
                done[action] = await fn()
            except Exception as exc:
                done[action] = 0
                log.warning("janitor action failed", extra={
                    "action": action, "error": f"{type(exc).__name__}: {exc}"[:300]})
        for action, n in done.items():
            if n and action != "trimmed":
                self.metrics.janitor_actions.labels(action).inc(n)
                log.warning("janitor repaired", extra={"action": action, "count": n})
        return done

    async def requeue_lost(self) -> int:
        """QUEUED jobs older than every delivered entry: their XADD never happened."""
        delivered_ms = await self._last_delivered_ms()
        if delivered_ms is None:
            return 0
        rows = await self.store.pool.fetch(
            "SELECT id, url, state, version, attempts, worker_id, error_code, created_at "
            "FROM scan_jobs WHERE state = 'QUEUED' "
            "AND updated_at < now() - make_interval(secs => $1) "
            "AND updated_at < to_timestamp($2 / 1000.0) - interval '5 seconds' "
            "ORDER BY updated_at LIMIT 500",
            float(self.settings.requeue_after_s), float(delivered_ms))
        return await self._requeue([Job.model_validate(dict(r)) for r in rows],
                                   {"janitor": "requeued: no stream entry"})

    async def recover_stuck(self) -> int:
        """FETCHING/ANALYZING jobs long past any possible run whose message nobody holds."""
        limit_s = (self.settings.container_timeout_ms / 1000 * self.settings.max_attempts
                   + self.settings.lease_timeout_ms / 1000 * 2 + 30)
        rows = await self.store.pool.fetch(
            "SELECT id, url, state, version, attempts, worker_id, error_code, created_at "
            "FROM scan_jobs WHERE state IN ('FETCHING', 'ANALYZING') "
            "AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT 500",
            limit_s)
        if not rows:
            return 0
        leased = await self._pending_job_ids()
        stuck = [Job.model_validate(dict(r)) for r in rows if r["id"] not in leased]
        return await self._requeue(stuck, {"janitor": "recovered: no live lease"})

    async def remove_orphans(self) -> int:
        # Older than any live scan can be (a scan is killed at the container timeout).
        older = self.settings.orphan_after_s or self.settings.container_timeout_ms / 1000 + 60
        with contextlib.suppress(Exception):  # Docker down: try again next round
            return await self.runner.remove_labelled(older_than_s=older)
        return 0

    async def _requeue(self, jobs: list[Job], detail: dict[str, Any]) -> int:
        n = 0
        for job in jobs:
            # The versioned write first: if two janitors ever overlap, only one re-enqueues.
            moved = await self.store.transition(job, State.QUEUED, worker_id=self.settings
                                                .worker_id, detail=detail)
            if moved is not None:
                await self.consumer.redis.xadd(self.settings.scan_stream,
                                               {"job_id": str(job.id)})
                n += 1
        return n

    async def _last_delivered_ms(self) -> int | None:
        if not await self.consumer.redis.exists(self.settings.scan_stream):
            return None
        for g in await self.consumer.redis.xinfo_groups(self.settings.scan_stream):
            name = g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
            if name == self.settings.scan_group:
                last = g["last-delivered-id"]
                last = last.decode() if isinstance(last, bytes) else str(last)
                return int(last.split("-")[0])
        return None

    async def _pending_job_ids(self) -> set[uuid.UUID]:
        """Job ids of every entry pending in the group (bounded scan of the PEL)."""
        r = self.consumer.redis
        entries = await r.xpending_range(self.settings.scan_stream, self.settings.scan_group,
                                         min="-", max="+", count=10_000)
        pipe = r.pipeline(transaction=False)
        for e in entries:
            mid = e["message_id"]
            pipe.xrange(self.settings.scan_stream, min=mid, max=mid, count=1)
        ids: set[uuid.UUID] = set()
        for found in await pipe.execute() if entries else []:
            for _, fields in found:
                with contextlib.suppress(ValueError, KeyError, AttributeError):
                    ids.add(uuid.UUID(fields[b"job_id"].decode()))
        return ids
