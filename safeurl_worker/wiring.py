"""Wiring: the objects a command needs, connected to PostgreSQL, Redis and Docker.

`cli.py` parses arguments and prints; everything it (and the tests, and the benchmark) needs to
build a worker or talk to the services is made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiodocker

from . import brands, urls
from .blocklist import Blocklist
from .config import Settings
from .consumer import Consumer, connect, hash_tag
from .errors import backoff, is_transient, pause
from .janitor import Janitor
from .metrics import HealthServer, Metrics
from .politeness import DomainGate
from .runner import ContainerRunner, Runner
from .store import Store, create_pool
from .worker import Worker

log = logging.getLogger("safeurl")


@contextlib.asynccontextmanager
async def store_for(settings: Settings, size: int = 2, warm: bool = False) -> AsyncIterator[Store]:
    # warm: open every connection now rather than on the first busy second.
    pool = await create_pool(settings.database_url, size, min_size=size if warm else 1)
    try:
        yield Store(pool)
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def redis_for(settings: Settings) -> AsyncIterator[Any]:
    client = connect(settings.redis_dsn)
    try:
        yield client
    finally:
        await client.aclose()


def consumer_for(settings: Settings, name: str | None = None, block_ms: int = 1000
                 ) -> Consumer:
    return Consumer(connect(settings.redis_dsn, block_ms), settings.scan_stream,
                    settings.scan_group, name or settings.worker_id, settings.dead_letter_stream,
                    settings.dead_letter_maxlen, lanes=settings.lane_weights,
                    max_in_flight=lambda tenant: settings.quota(tenant).max_in_flight)


def gate_for(settings: Settings, consumer: Consumer) -> DomainGate:
    """PER_DOMAIN_CONCURRENCY across the fleet. A hold is renewed with the job's lease; one
    that is not (its replica died) lasts a container timeout more: the dead replica's
    container may still be fetching from the domain until its own deadline."""
    return DomainGate(consumer.redis, f"safeurl:dom:{hash_tag(settings.scan_stream)}:",
                      settings.per_domain_concurrency, settings.per_domain_interval_ms,
                      settings.lease_timeout_ms + settings.container_timeout_ms)


class StoppedDuringStartup(Exception):
    """SIGTERM arrived while we were still waiting for a dependency."""


async def _connect_store(settings: Settings, stopping: asyncio.Event,
                         status: dict[str, str], default_callback_url: str | None,
                         notify: bool) -> Store:
    """Open the PostgreSQL pool, waiting with backoff while the server is down or restarting:
    a dependency that blinks at start-up must not end the process. /readyz says why."""
    attempt = 0
    while True:
        try:
            # One connection per concurrent job plus the loops: no job waits for a connection.
            size = settings.worker_concurrency + 3
            return Store(await create_pool(settings.database_url, size, min_size=size),
                         default_callback_url, notify=notify)
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            status["postgres"] = f"connecting: {type(exc).__name__}: {exc}"[:200]
            log.warning("waiting for postgres", extra={"error": status["postgres"]})
            await pause(stopping, backoff(attempt, base=0.5, cap=5))
            if stopping.is_set():
                raise StoppedDuringStartup from exc


@contextlib.asynccontextmanager
async def wired_worker(settings: Settings, runner: ContainerRunner | None = None,
                       stopping: asyncio.Event | None = None,
                       default_callback_url: str | None = None,
                       notify: bool = False) -> AsyncIterator[Worker]:
    """A Worker connected to PostgreSQL, Redis and Docker, with its health server up first (so
    /readyz explains a slow start). `runner` replaces the Docker runner (the benchmark's stub);
    `default_callback_url` (CALLBACK_DEFAULT_URL) goes into the outbox for jobs without one;
    `notify` (NOTIFY_FINISHED): terminal writes NOTIFY safeurl_scan_finished."""
    stopping = stopping or asyncio.Event()
    metrics = Metrics()
    consumer = consumer_for(settings, block_ms=settings.read_block_ms)
    docker = aiodocker.Docker(url=f"unix://{settings.docker_socket_path}")
    runner = runner or Runner(settings, docker)
    wiring: dict[str, Any] = {"status": {}}
    health = HealthServer(metrics, _probes(wiring, consumer, runner), settings.metrics_port,
                          on_scrape=lambda: _scrape(consumer, metrics))
    store: Store | None = None
    try:
        if isinstance(runner, Runner):  # a stub runner (the benchmark's) makes no containers
            await runner.check_network()  # a missing FETCHER_NETWORK stops start-up
        if settings.metrics_port:
            await health.start()
        store = await _connect_store(settings, stopping, wiring["status"],
                                     default_callback_url, notify)
        wiring["store"] = store
        blocklist = Blocklist(settings.blocklist_path or None)
        catalogue = brands.load_catalogue(settings.brands_path or None)  # checked in main()
        urls.registrable_domain("example.com")  # load the public suffix list now, once
        janitor = Janitor(settings, store, consumer, runner, metrics)
        worker = Worker(settings, store, consumer, runner, metrics, blocklist, janitor,
                        stopping=stopping, catalogue=catalogue,
                        gate=gate_for(settings, consumer))
        wiring["worker"] = worker
        yield worker
    finally:
        await health.stop()
        if store is not None:  # a hung server must not hold up the exit
            try:
                await asyncio.wait_for(store.pool.close(), 1)
            except Exception:
                store.pool.terminate()
        await docker.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.redis.aclose(), 1)


async def run_worker(settings: Settings, default_callback_url: str | None = None,
                     notify: bool = False) -> None:
    stopping = asyncio.Event()
    install_signals(stopping)  # first: SIGTERM is honoured while we wait for dependencies
    try:
        async with wired_worker(settings, stopping=stopping,
                                default_callback_url=default_callback_url,
                                notify=notify) as worker:
            await worker.run()
    except StoppedDuringStartup:
        log.info("stopped before start-up completed")


def install_signals(stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    seen = {"count": 0}

    def on_signal(signum: int) -> None:
        seen["count"] += 1
        if seen["count"] > 1:
            log.error("second signal: exiting at once", extra={"signal": signum})
            os._exit(1)
        log.info("signal received: draining", extra={"signal": signum})
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


def _probes(wiring: dict[str, Any], consumer: Consumer, runner: ContainerRunner
            ) -> dict[str, Callable[[], Awaitable[str | None]]]:
    async def pg() -> str | None:
        store: Store | None = wiring.get("store")
        if store is None:
            return str(wiring["status"].get("postgres", "connecting"))
        await store.pool.fetchval("SELECT 1")
        return None

    async def rd() -> str | None:
        await consumer.redis.ping()
        return None

    async def dk() -> str | None:
        return None if await runner.ping() else "docker daemon unreachable"

    async def taking() -> str | None:
        worker: Worker | None = wiring.get("worker")
        if worker is None or not worker.taking_jobs:
            return "not taking jobs (starting or draining)"
        return None if worker.docker_ready else "paused: waiting for docker"

    return {"postgres": pg, "redis": rd, "docker": dk, "worker": taking}


async def _scrape(consumer: Consumer, metrics: Metrics) -> None:
    depths = await consumer.depths()
    seen = {(d["stream"], d["lane"], d["tenant"] or "") for d in depths}
    # A tenant queue removed while idle: its series go with it (the others keep their last
    # value while Redis cannot tell the lag).
    for stream, lane, tenant in metrics.queues_seen - seen:
        for gauge, labels in ((metrics.stream_lag, (stream, consumer.group)),
                              (metrics.stream_pending, (stream, consumer.group)),
                              (metrics.queue_waiting, (lane, tenant)),
                              (metrics.queue_pending, (lane, tenant))):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)
    metrics.queues_seen = seen
    for d in depths:
        labels = (d["stream"], consumer.group)
        metrics.stream_pending.labels(*labels).set(d["pending"])
        metrics.queue_pending.labels(d["lane"], d["tenant"] or "").set(d["pending"])
        if d["waiting"] is not None:
            metrics.stream_lag.labels(*labels).set(d["waiting"])
            metrics.queue_waiting.labels(d["lane"], d["tenant"] or "").set(d["waiting"])


@contextlib.asynccontextmanager
async def ops_consumer(settings: Settings) -> AsyncIterator[Consumer]:
    """What operator commands say to the streams goes through a Consumer (never reads)."""
    consumer = consumer_for(settings, name=f"cli:{settings.worker_id}")
    try:
        yield consumer
    finally:
        await consumer.redis.aclose()
