"""Metrics, health and readiness: one small aiohttp app on METRICS_PORT.

/metrics  Prometheus text format (this replica's own registry: nothing double-counts across
          replicas; stream-wide gauges are labelled so dashboards can take max() over replicas)
/healthz  liveness: the event loop answered
/readyz   readiness: Redis, PostgreSQL and Docker reachable and the worker taking jobs (503 + JSON
          reason otherwise)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

Probe = Callable[[], Awaitable[str | None]]  # returns None when ready, else the reason

_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.jobs = Counter("safeurl_jobs", "Jobs this replica brought to a terminal state.",
                            ["outcome"], registry=r)
        self.stage = Histogram("safeurl_job_duration_seconds",
                               "Time spent per stage (queue_wait, fetch, render, analyze, total).",
                               ["stage"], buckets=_STAGE_BUCKETS, registry=r)
        self.in_flight = Gauge("safeurl_jobs_in_flight", "Jobs this replica holds now.",
                               registry=r)
        self.container_runs = Counter("safeurl_container_runs", "Fetcher container runs.",
                                      ["result"], registry=r)
        self.conflicts = Counter("safeurl_state_conflicts",
                                 "Versioned writes that lost to another worker.", registry=r)
        self.redeliveries = Counter("safeurl_redeliveries",
                                    "Messages taken over from another (dead or slow) owner.",
                                    registry=r)
        self.duplicates = Counter("safeurl_duplicate_deliveries",
                                  "Messages for jobs already finished or owned elsewhere.",
                                  registry=r)
        self.dead_letters = Counter("safeurl_dead_letters", "Messages moved to the dead-letter "
                                    "stream.", ["reason"], registry=r)
        self.malformed = Counter("safeurl_malformed_messages", "Messages without a valid job_id.",
                                 registry=r)
        self.verdicts = Counter("safeurl_verdicts", "Completed scans by verdict.", ["verdict"],
                                registry=r)
        self.cache_hits = Counter("safeurl_result_cache_hits",
                                  "Scans answered from a recent result of the same URL.",
                                  registry=r)
        self.janitor_actions = Counter("safeurl_janitor_actions", "Janitor repairs.", ["action"],
                                       registry=r)
        self.errors = Counter("safeurl_transient_errors",
                              "Transient dependency errors that were retried.", ["dependency"],
                              registry=r)
        self.stream_lag = Gauge("safeurl_stream_lag", "Entries not yet delivered to the group.",
                                ["stream", "group"], registry=r)
        self.stream_pending = Gauge("safeurl_stream_pending", "Entries delivered, not acked.",
                                    ["stream", "group"], registry=r)
        self.ready = Gauge("safeurl_worker_ready", "1 when this replica is ready.", registry=r)
        # Scheduling (docs/contract.md, "Lanes, tenants and politeness"). `tenant` is "" for a
        # lane's own stream; one series per active tenant, so keep tenant names few and stable.
        self.queue_waiting = Gauge("safeurl_queue_waiting", "Entries not yet delivered, per "
                                   "lane and tenant.", ["lane", "tenant"], registry=r)
        self.queue_pending = Gauge("safeurl_queue_pending", "Entries delivered, not acked "
                                   "(running or deferred), per lane and tenant.",
                                   ["lane", "tenant"], registry=r)
        self.lane_wait = Histogram("safeurl_queue_wait_seconds", "From XADD to the job starting "
                                   "(after any politeness deferral), per lane and tenant.",
                                   ["lane", "tenant"], buckets=_STAGE_BUCKETS, registry=r)
        self.lane_jobs = Counter("safeurl_lane_jobs", "Jobs this replica brought to a terminal "
                                 "state, per lane and tenant.", ["lane", "tenant", "outcome"],
                                 registry=r)
        self.deferrals = Counter("safeurl_deferrals", "Jobs that waited outside a slot, by "
                                 "reason.", ["reason"], registry=r)
        self.deferred = Gauge("safeurl_jobs_deferred", "Jobs this replica holds that wait for "
                              "their target domain.", registry=r)
        self.queues_seen: set[tuple[str, str, str]] = set()  # (stream, lane, tenant) exported

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    def __init__(self, metrics: Metrics, probes: dict[str, Probe], port: int,
                 on_scrape: Callable[[], Awaitable[None]] | None = None) -> None:
        self.metrics = metrics
        self.probes = probes
        self.port = port
        self.on_scrape = on_scrape
        self._runner: web.AppRunner | None = None

    async def start(self, host: str = "0.0.0.0") -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, self.port).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        if self.on_scrape:
            # A scrape must not fail because Redis is slow: serve the last stream figures.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.on_scrape(), 2)
        # Readiness is exported on every scrape, not only when a probe calls /readyz.
        self.metrics.ready.set(0 if await self.check() else 1)
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        reasons = await self.check()
        self.metrics.ready.set(0 if reasons else 1)
        body = {"status": "ready" if not reasons else "not ready", "reasons": reasons}
        return web.Response(body=orjson.dumps(body), status=503 if reasons else 200,
                            content_type="application/json")

    async def check(self) -> dict[str, str]:
        async def one(probe: Probe) -> str | None:
            try:
                return await asyncio.wait_for(probe(), 3)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"[:200] or "unreachable"

        names = list(self.probes)
        results = await asyncio.gather(*(one(self.probes[n]) for n in names))
        return {n: r for n, r in zip(names, results, strict=True) if r}
