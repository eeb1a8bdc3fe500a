"""Fixtures for integration tests: real Redis, PostgreSQL and Docker (started by scripts/test.sh).

Each test gets its own database and stream, so tests never see each other's jobs. Test hosts run
in containers on an internal docker network the session creates; fetcher containers join that
network and are allowed its subnet (FETCH_ALLOW_CIDRS) - no traffic goes anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis
import redis.exceptions as redis_exc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from safeurl_worker.cli import wired_worker
from safeurl_worker.config import Settings
from safeurl_worker.store import Store, create_pool
from safeurl_worker.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
ADMIN_DSN = os.environ.get("SAFEURL_TEST_ADMIN_DSN", "postgresql://127.0.0.1/postgres")
REDIS_URL = os.environ.get("SAFEURL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
FETCHER_IMAGE = os.environ.get("FETCHER_IMAGE", "safeurl-fetcher:latest")
HOST_ALIASES = ("site-a.test", "site-b.test", "site-c.test", "blocked.test")


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


@dataclass(frozen=True)
class TestNet:
    __test__ = False  # a fixture value, not a test class

    name: str
    subnet: str
    host_ip: str  # the test host's own address on the network


@pytest.fixture(scope="session")
def testnet() -> Iterator[TestNet]:
    """An internal docker network with one test host answering for several names."""
    try:
        docker("image", "inspect", FETCHER_IMAGE)
    except (RuntimeError, FileNotFoundError) as exc:
        pytest.fail(f"fetcher image missing - run scripts/setup.sh first ({exc})")
    name = f"safeurl-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", "--internal", "--label", "safeurl.test=1", name)
    host = f"{name}-host"
    try:
        aliases = [a for alias in HOST_ALIASES for a in ("--network-alias", alias)]
        docker("run", "-d", "--name", host, "--network", name, *aliases,
               "--label", "safeurl.test=1", "--user", "0", "--entrypoint", "python3",
               "-v", f"{ROOT / 'tests' / 'testhost'}:/srv:ro", FETCHER_IMAGE,
               "/srv/server.py", "80")
        docker("exec", host, "python3", "-c",
               "import time, urllib.request\n"
               "for _ in range(100):\n"
               "    try: urllib.request.urlopen('http://127.0.0.1/', timeout=1); break\n"
               "    except OSError: time.sleep(0.1)\n")
        subnet = docker("network", "inspect", name, "-f",
                        "{{(index .IPAM.Config 0).Subnet}}")
        ip = docker("inspect", host, "-f",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        yield TestNet(name, subnet, ip)
    finally:
        docker("rm", "-f", host, check=False)
        docker("network", "rm", name, check=False)


def _derived_image(tag: str, entrypoint: str) -> str:
    """A fetcher-image variant with another entrypoint (crashing, printing garbage...)."""
    dockerfile = f"FROM {FETCHER_IMAGE}\nENTRYPOINT {entrypoint}\n"
    subprocess.run(["docker", "build", "-q", "-t", tag, "-"], input=dockerfile, text=True,
                   capture_output=True, check=True, timeout=120,
                   env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return tag


@pytest.fixture(scope="session")
def crash_image(testnet: TestNet) -> str:
    return _derived_image("safeurl-test-crash:latest",
                          '["python3", "-c", "import sys; sys.exit(3)"]')


@pytest.fixture(scope="session")
def garbage_image(testnet: TestNet) -> str:
    return _derived_image("safeurl-test-garbage:latest",
                          '["python3", "-c", "print(\\"this is not a report\\")"]')


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A fresh database with the schema applied; dropped afterwards."""
    name = f"safeurl_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    pool = await create_pool(dsn, 2)
    await Store(pool).migrate()
    await pool.close()
    yield dsn
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def make_settings(database: str, request: pytest.FixtureRequest) -> Iterator[type[Settings]]:
    """Settings for this test: own database and stream, fetchers on the test network."""
    stream = f"scan-jobs-{uuid.uuid4().hex[:8]}"

    def build(**overrides: object) -> Settings:
        testnet: TestNet = request.getfixturevalue("testnet")  # only tests that scan need it
        base: dict[str, object] = {
            "database_url": database, "redis_url": REDIS_URL, "scan_stream": stream,
            "dead_letter_stream": f"{stream}:dead", "fetcher_network": testnet.name,
            "fetch_allow_cidrs": testnet.subnet, "fetch_allowed_ports": "80",
            "container_timeout_ms": 15000, "metrics_port": 0, "worker_id": "w-test",
            "lease_renew_ms": 500, "lease_timeout_ms": 2000, "unknown_job_delay_ms": 50,
            "log_format": "text",
            "result_cache_ttl_s": 0,  # tests exercise real scans unless they test the cache
            # Every test scan targets the one test host (one "domain"): the politeness limit
            # would serialise them. Tests of politeness turn it on (test_politeness_fleet.py).
            "per_domain_concurrency": 0,
        }
        base.update(overrides)
        return Settings(**base)  # type: ignore[arg-type]

    yield build  # type: ignore[misc]
    # The lane streams, tenant queues, registry, heartbeats and domain holds carry its name.
    keys = subprocess.run(["redis-cli", "-u", REDIS_URL, "--scan", "--pattern", f"*{stream}*"],
                          capture_output=True, text=True, check=False, timeout=10).stdout.split()
    for i in range(0, len(keys), 500):
        subprocess.run(["redis-cli", "-u", REDIS_URL, "del", *keys[i:i + 500]],
                       capture_output=True, check=False, timeout=10)


@pytest.fixture
def settings(make_settings: type[Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    pool = await create_pool(database, 4)
    yield Store(pool)
    await pool.close()


@pytest.fixture
async def rds() -> AsyncIterator[redis.Redis]:
    # The test plays the API service: like a real one, it rides out a Redis restart.
    client = redis.Redis.from_url(
        REDIS_URL, retry=Retry(ExponentialBackoff(cap=1.0), 30),
        retry_on_error=[redis_exc.ConnectionError, redis_exc.TimeoutError])
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """Run a real worker in this event loop; stop it gracefully (drain) afterwards."""
    async with wired_worker(settings) as worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.stop()
            await asyncio.wait_for(task, settings.shutdown_grace_s + 30)
