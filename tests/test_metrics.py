"""Metrics, health and readiness over HTTP, against a real running worker.

A worker runs in this event loop with METRICS_PORT set to a free port; the test scrapes
`/metrics`, `/healthz` and `/readyz` with aiohttp as Prometheus and a readiness probe would, and
watches the counters move as real jobs complete, fail and time out. The readiness test stops the
shared PostgreSQL for a few seconds (and always starts it again).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from safeurl_worker.config import Settings
from safeurl_worker.consumer import lane_stream
from safeurl_worker.store import Store

from .conftest import ROOT, TestNet, running_worker
from .helpers import metric, submit, wait_all_terminal, wait_terminal

pytestmark = pytest.mark.integration
SERVICES = ["bash", str(ROOT / "scripts" / "services.sh")]

# Every label a replica may export, with every value it may take (docs/operations.md). The
# stream/group labels are checked against the test's own names; `le` must be a number.
BOUNDED: dict[str, set[str]] = {
    "outcome": {"completed", "failed", "timed_out", "dead_lettered"},
    "stage": {"queue_wait", "fetch", "analyze", "total"},
    "result": {"ok", "timeout", "crashed", "output_invalid"},
    "reason": {"malformed_message", "unknown_job", "max_deliveries", "domain"},
    "verdict": {"safe", "suspicious", "malicious", "unknown"},
    "action": {"requeued", "recovered", "containers_removed", "consumers_removed"},
    "dependency": {"redis", "postgres", "docker"},
}
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes, str]:
    """GET http://127.0.0.1:<port><path>: (status, body, content type)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
            http.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


async def get_json(port: int, path: str) -> tuple[int, Any]:
    status, body, ctype = await get(port, path)
    assert ctype.startswith("application/json"), (path, ctype, body)
    return status, json.loads(body)


async def scrape(port: int) -> bytes:
    status, body, ctype = await get(port, "/metrics")
    assert status == 200, body
    assert ctype.startswith("text/plain"), ctype
    return body


async def wait_metrics_up(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            await get(port, "/healthz", timeout=2)
            return
        except (aiohttp.ClientError, OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def assert_labels_bounded(text: bytes, settings: Settings, forbidden: list[str]) -> int:
    """Every label value of every sample comes from a small known set (or is the stream/group
    name); no job id or URL anywhere. Returns the number of labelled samples checked."""
    names = {"stream": {lane_stream(settings.scan_stream, lane) for lane in settings.lane_weights},
             "group": {settings.scan_group}, "lane": set(settings.lane_weights),
             "tenant": {""}}  # no tenant submits here
    checked = 0
    for family in text_string_to_metric_families(text.decode()):
        assert family.name.startswith("safeurl_"), family.name
        for sample in family.samples:
            for label, value in sample.labels.items():
                checked += 1
                if label == "le":
                    float(value)  # a bucket bound, "+Inf" included
                    continue
                allowed = BOUNDED.get(label) or names.get(label)
                assert allowed is not None, f"unexpected label {label!r} on {sample.name}"
                assert value in allowed, f"{sample.name}{{{label}={value!r}}} not in {allowed}"
    decoded = text.decode()
    assert not UUID_RE.search(decoded), "a job id leaked into the exposition"
    for s in forbidden:
        assert s not in decoded, f"{s!r} leaked into the exposition"
    return checked


async def test_counters_gauges_and_health_move_with_real_jobs(
        make_settings: type[Settings], store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    port = free_port()
    settings = make_settings(metrics_port=port, worker_concurrency=4)
    async with running_worker(settings):
        await wait_metrics_up(port)
        status, body = await get_json(port, "/healthz")
        assert (status, body) == (200, {"status": "ok"})
        _, body = await poll_readyz(port, 200, timeout=10)  # ready once the worker runs
        assert body == {"status": "ready", "reasons": {}}, body

        before = await scrape(port)
        assert metric(before, "safeurl_worker_ready") == 1
        assert metric(before, "safeurl_jobs_total", {"outcome": "completed"}) == 0
        assert metric(before, "safeurl_job_duration_seconds_count", {"stage": "total"}) == 0
        # The stream-wide gauges exist (refreshed from Redis by the scrape) and are labelled
        # with this test's stream and group only.
        sg = {"stream": settings.scan_stream, "group": settings.scan_group}
        for gauge in ("safeurl_stream_pending", "safeurl_stream_lag"):
            assert f'{gauge}{{group="{sg["group"]}",stream="{sg["stream"]}"}}'.encode() \
                in before, f"{gauge} missing after a scrape:\n{before.decode()}"

        good = [await submit(store, rds, settings, "http://site-a.test/") for _ in range(3)]
        bad = await submit(store, rds, settings, "ftp://x")
        await rds.xadd(settings.scan_stream, {"job_id": "garbage-not-a-uuid"})
        await wait_all_terminal(store, [*good, bad], timeout=90)
        assert (await wait_terminal(store, bad))["error_code"] == "INVALID_URL"
        await asyncio.sleep(0.5)  # acks are batched; the dead letter follows its read

        after = await scrape(port)
        assert metric(after, "safeurl_jobs_total", {"outcome": "completed"}) == 3
        assert metric(after, "safeurl_jobs_total", {"outcome": "failed"}) == 1
        assert metric(after, "safeurl_verdicts_total", {"verdict": "safe"}) == 3
        assert metric(after, "safeurl_container_runs_total", {"result": "ok"}) == 3
        assert metric(after, "safeurl_job_duration_seconds_count", {"stage": "total"}) == 4
        assert metric(after, "safeurl_job_duration_seconds_count", {"stage": "fetch"}) == 3
        assert metric(after, "safeurl_job_duration_seconds_sum", {"stage": "total"}) > 0
        assert metric(after, "safeurl_malformed_messages_total") == 1
        assert metric(after, "safeurl_dead_letters_total", {"reason": "malformed_message"}) == 1
        assert metric(after, "safeurl_jobs_in_flight") == 0
        assert metric(after, "safeurl_stream_pending", sg) == 0
        assert metric(after, "safeurl_stream_lag", sg) == 0
        checked = assert_labels_bounded(
            after, settings, ["site-a.test", "ftp://", "garbage", *map(str, good)])
        assert checked > 20
        status, body = await get_json(port, "/readyz")
        assert status == 200, body
    print(f"\n[metrics] {checked} labelled samples, all bounded; "
          f"{len(after.splitlines())} exposition lines")


async def test_crashed_container_and_timeout_counters(
        make_settings: type[Settings], store: Store, rds: redis.Redis, crash_image: str) -> None:
    crash_port, hang_port = free_port(), free_port()
    crashing = make_settings(metrics_port=crash_port, fetcher_image=crash_image, max_attempts=2)
    async with running_worker(crashing):
        await wait_metrics_up(crash_port)
        job_id = await submit(store, rds, crashing, "http://site-a.test/")
        job = await wait_terminal(store, job_id, timeout=90)
        assert (job["state"], job["error_code"]) == ("FAILED", "CONTAINER_ERROR"), job
        text = await scrape(crash_port)
        assert metric(text, "safeurl_container_runs_total", {"result": "crashed"}) == 2
        assert metric(text, "safeurl_jobs_total", {"outcome": "failed"}) == 1
        assert metric(text, "safeurl_jobs_total", {"outcome": "completed"}) == 0
        assert_labels_bounded(text, crashing, [str(job_id), "site-a.test"])

    # The fetcher's own deadline is beyond the container's: the container limit stops the scan.
    hanging = make_settings(metrics_port=hang_port, container_timeout_ms=3000,
                            fetch_timeout_ms=60000)
    async with running_worker(hanging):
        await wait_metrics_up(hang_port)
        job_id = await submit(store, rds, hanging, "http://site-a.test/hang")
        job = await wait_terminal(store, job_id, timeout=60)
        assert (job["state"], job["error_code"]) == ("TIMED_OUT", "TIMEOUT"), job
        text = await scrape(hang_port)
        assert metric(text, "safeurl_jobs_total", {"outcome": "timed_out"}) == 1
        assert metric(text, "safeurl_container_runs_total", {"result": "timeout"}) == 1
        assert metric(text, "safeurl_job_duration_seconds_count", {"stage": "total"}) == 1
        assert metric(text, "safeurl_job_duration_seconds_sum", {"stage": "fetch"}) >= 2.5
        assert_labels_bounded(text, hanging, [str(job_id), "site-a.test", "/hang"])


def _pg_ctl(*args: str) -> list[str]:
    ctl = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
    return ["runuser", "-u", "postgres", "--", str(ctl), "-D", "/var/lib/safeurl/pg", *args]


async def sh(cmd: list[str], timeout: float = 120) -> None:
    await asyncio.to_thread(subprocess.run, cmd, check=True, capture_output=True,
                            timeout=timeout)


async def poll_readyz(port: int, want: int, timeout: float) -> tuple[float, dict[str, Any]]:
    """Poll /readyz until it answers `want`; (seconds taken, last JSON body)."""
    t0 = time.monotonic()
    body: dict[str, Any] = {}
    while True:
        status, body = await get_json(port, "/readyz")
        if status == want:
            return time.monotonic() - t0, body
        assert time.monotonic() - t0 < timeout, f"/readyz still {status} after {timeout}s: {body}"
        await asyncio.sleep(0.2)


async def test_readyz_goes_503_naming_postgres_while_it_is_down_and_recovers(
        make_settings: type[Settings], store: Store, rds: redis.Redis) -> None:
    port = free_port()
    settings = make_settings(metrics_port=port)
    async with running_worker(settings):
        await wait_metrics_up(port)
        await poll_readyz(port, 200, timeout=10)
        try:
            await sh(_pg_ctl("stop", "-m", "fast", "-w"))
            took_down, body = await poll_readyz(port, 503, timeout=10)
            reason = body["reasons"].get("postgres")
            assert body["status"] == "not ready", body
            assert "postgres" in body["reasons"], body
            assert set(body["reasons"]) == {"postgres"}, body  # Redis and Docker are fine
            # A scrape still answers while a dependency is down, and reports not ready.
            text = await scrape(port)
            assert metric(text, "safeurl_worker_ready") == 0
        finally:
            await sh([*SERVICES, "postgres"])
        took_up, body = await poll_readyz(port, 200, timeout=15)
        assert body == {"status": "ready", "reasons": {}}
        assert metric(await scrape(port), "safeurl_worker_ready") == 1
        # And it works again: a job submitted after the outage completes.
        job_id = await submit(store, rds, settings, "http://site-a.test/")
        assert (await wait_terminal(store, job_id, timeout=60))["state"] == "COMPLETED"
    print(f"\n[metrics] /readyz 503 {took_down:.1f}s after stopping PostgreSQL "
          f"(postgres: {reason!r}); 200 again {took_up:.1f}s after starting it")
