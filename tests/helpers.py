"""Small helpers shared by the integration tests: submit like the API, wait, inspect."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from safeurl_worker.config import Settings
from safeurl_worker.store import Store

TERMINAL = {"COMPLETED", "FAILED", "TIMED_OUT"}
CLI = str(Path(sys.executable).parent / "safeurl-worker")


async def submit(store: Store, rds: redis.Redis, settings: Settings, url: str) -> uuid.UUID:
    """What the API service does: insert the QUEUED row, then XADD its id."""
    job_id = await store.insert_job(url)
    await rds.xadd(settings.scan_stream, {"job_id": str(job_id)})
    return job_id


async def wait_terminal(store: Store, job_id: uuid.UUID, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await store.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1", job_id)
        if row is not None and row["state"] in TERMINAL:
            return dict(row)
        await asyncio.sleep(0.05)
    row = await store.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1", job_id)
    raise AssertionError(f"job {job_id} not terminal after {timeout}s: {row and dict(row)}")


async def wait_all_terminal(store: Store, ids: list[uuid.UUID], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = await store.pool.fetchval(
            "SELECT count(*) FROM scan_jobs WHERE id = ANY($1::uuid[]) AND state = ANY($2)",
            ids, list(TERMINAL))
        if n == len(ids):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {n} of {len(ids)} jobs terminal after {timeout}s")


async def wait_until(probe: Callable[[], Awaitable[object]], want: object,
                     timeout: float) -> None:
    """Poll `probe` until it returns `want`; fail with the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    got = await probe()
    while got != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        got = await probe()
    assert got == want, f"still {got!r} (want {want!r}) after {timeout}s"


async def audit(store: Store, job_id: uuid.UUID) -> list[tuple[str | None, str, int]]:
    rows = await store.pool.fetch(
        "SELECT from_state, to_state, version FROM scan_audit_log WHERE job_id = $1 "
        "ORDER BY id", job_id)
    return [(r["from_state"], r["to_state"], r["version"]) for r in rows]


async def pending(rds: redis.Redis, settings: Settings) -> int:
    info = await rds.xpending(settings.scan_stream, settings.scan_group)
    return int(info["pending"])


def labelled_containers(job_id: uuid.UUID | None = None, wait_s: float = 5) -> list[str]:
    """Our containers (of one job: by name - a warm container is renamed for its job), once
    the background removal had up to `wait_s` to finish."""
    args = ["docker", "ps", "-aq", "--filter", "label=safeurl.job_id"]
    if job_id:
        args += ["--filter", f"name=safeurl-{job_id}-"]
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(args, capture_output=True, text=True, check=True,
                             timeout=30).stdout.split()
        if not out or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def metric(worker_metrics_text: bytes, name: str, labels: dict[str, str] | None = None) -> float:
    """Read one sample from Prometheus text output."""
    want = name
    if labels:
        want += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in worker_metrics_text.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def report_of(row: dict[str, Any]) -> dict[str, Any]:
    rep = row["report"]
    return json.loads(rep) if isinstance(rep, str) else dict(rep)


def env_of(settings: Settings, worker_id: str) -> dict[str, str]:
    """The test's Settings as the environment of a worker process (every field, by name)."""
    keep = {k: v for k, v in os.environ.items() if k.upper() not in Settings.model_fields}
    mine = {name.upper(): str(value) for name, value in settings.model_dump().items()}
    return {**keep, **mine, "WORKER_ID": worker_id, "JANITOR_INTERVAL_S": "2",
            "METRICS_PORT": "0", "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}


class Fleet:
    """Worker processes for one test; every one is gone when the test ends."""

    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, worker_id: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{worker_id}.log", "ab")  # noqa: SIM115 - lives with the proc
        p = subprocess.Popen([CLI, "run"], env={**env_of(self.settings, worker_id), **env},
                             stdout=log, stderr=subprocess.STDOUT)
        self.procs[worker_id] = p
        return p

    def alive(self) -> list[str]:
        return [w for w, p in self.procs.items() if p.poll() is None]

    def log(self, worker_id: str) -> str:
        return (self.logdir / f"{worker_id}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=self.settings.shutdown_grace_s + 15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # A SIGKILLed replica leaves its warm containers to the janitor's orphan age, which a
        # test does not wait for: remove what this fleet's workers made.
        for worker in self.procs:
            ids = subprocess.run(["docker", "ps", "-aq", "--filter",
                                  f"label=safeurl.worker_id={worker}", "--filter",
                                  f"network={self.settings.fetcher_network}"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=60)


async def check(settings: Settings, *args: str) -> str:
    """Run `safeurl-worker check` against the test's database and stream; fail on a violation.
    `--allow-active`: while jobs still run."""
    env = env_of(settings, "checker")
    proc = await asyncio.create_subprocess_exec(CLI, "check", *args, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, f"invariants broken:\n{text}"
    return text


def janitor_jobs(output: str) -> int:
    """The `janitor repaired N job(s)` count from `check`'s output."""
    found = re.search(r"^janitor repaired (\d+) job\(s\)$", output, re.MULTILINE)
    assert found, f"no janitor count in check output:\n{output}"
    return int(found.group(1))
