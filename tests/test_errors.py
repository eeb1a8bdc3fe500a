"""Which errors are a dependency's (wait and retry) and which are the job's or a bug's.

Pure, except one test that terminates real PostgreSQL sessions under a busy pool."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.exceptions as rexc
import uvloop

from safeurl_worker.errors import (
    DependencyDown,
    cancelled_under_us,
    is_rejected_data,
    is_transient,
    retrying,
)
from safeurl_worker.models import State
from safeurl_worker.store import Store, create_pool

from .conftest import ADMIN_DSN


@pytest.mark.parametrize("reply", ["READONLY You can't write against a read only replica.",
                                   "LOADING Redis is loading the dataset in memory",
                                   "OOM command not allowed when used memory > 'maxmemory'.",
                                   "MISCONF Redis is configured to save RDB snapshots",
                                   "MASTERDOWN Link with MASTER is down",
                                   "TRYAGAIN Multiple keys request during rehashing of slot",
                                   "CLUSTERDOWN The cluster is down",
                                   "NOREPLICAS Not enough good replicas to write.",
                                   "NOGROUP No such key 'scan-jobs' or consumer group"])
def test_redis_replies_that_mean_not_now_are_transient(reply: str) -> None:
    assert is_transient(rexc.ResponseError(reply))


def test_other_redis_replies_are_not_transient() -> None:
    assert not is_transient(rexc.ResponseError("WRONGTYPE Operation against a key holding "
                                               "the wrong kind of value"))
    assert is_transient(rexc.ConnectionError("Connection refused"))
    assert is_transient(rexc.TimeoutError("Timeout reading from socket"))


@pytest.mark.parametrize("exc", [asyncpg.exceptions.ReadOnlySQLTransactionError("read-only"),
                                 asyncpg.exceptions.DiskFullError("disk full"),
                                 asyncpg.exceptions.QueryCanceledError("statement timeout"),
                                 asyncpg.exceptions.AdminShutdownError("shutting down"),
                                 asyncpg.exceptions.CannotConnectNowError("starting up"),
                                 asyncpg.exceptions.TooManyConnectionsError("too many"),
                                 asyncpg.exceptions.SerializationError("serialization"),
                                 asyncpg.exceptions.DeadlockDetectedError("deadlock"),
                                 ConnectionRefusedError(), TimeoutError(),
                                 DependencyDown("docker", "hung")])
def test_dependency_errors_of_every_class_are_transient(exc: BaseException) -> None:
    assert is_transient(exc) and not is_rejected_data(exc)


def test_the_jobs_data_and_bugs_are_not_transient() -> None:
    nul = asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence 0x00")
    assert not is_transient(nul) and is_rejected_data(nul)
    assert not is_transient(asyncpg.exceptions.UniqueViolationError("duplicate key"))
    assert not is_transient(ValueError("a bug"))


async def test_retrying_waits_out_transient_errors_and_gives_up_only_when_stopping() -> None:
    calls: list[int] = []
    seen: list[str] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError
        return "ok"

    stopping = asyncio.Event()
    assert await retrying("pg", flaky, stopping, lambda d, e: seen.append(d), cap=0.01) == "ok"
    assert seen == ["pg", "pg"]

    async def down() -> str:
        raise ConnectionRefusedError

    stopping.set()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(retrying("pg", down, stopping, lambda d, e: None), 5)


async def test_a_cancellation_disguised_as_a_connection_error_is_not_retried() -> None:
    started = asyncio.Event()

    async def swallowing() -> None:
        try:
            started.set()
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise rexc.ConnectionError("connection closed") from None  # as a client may do

    task = asyncio.create_task(retrying("redis", swallowing, asyncio.Event(),
                                        lambda d, e: None))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


async def test_cancelled_under_us_is_quiet_in_a_task_nobody_cancelled() -> None:
    cancelled_under_us()


def test_a_write_to_a_connection_the_server_closed_under_uvloop_is_transient() -> None:
    """The worker runs on uvloop, which reports this as a RuntimeError (a Redis restart during
    a command once took a worker down that way)."""
    async def write_after_close() -> BaseException:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.abort()
        await asyncio.sleep(0.05)  # the loop closes the handle on its next turn
        try:
            writer.writelines([b"PING\r\n"])
        except Exception as exc:  # whatever the loop raises is what we classify
            return exc
        finally:
            server.close()
        raise AssertionError("the write did not fail")

    exc = uvloop.run(write_after_close())
    assert isinstance(exc, RuntimeError) and is_transient(exc)
    assert not is_transient(RuntimeError("some other bug"))


async def test_every_error_of_a_terminated_session_is_transient(database: str) -> None:
    """Sessions terminated under a busy pool (what a failover or an operator does): whatever
    the client raises for it must be waited out, never count against a job. asyncpg sometimes
    reports a connection the server just closed as an InternalClientError (see errors.py)."""
    pool = await create_pool(database, 6)
    store = Store(pool)
    unexpected: list[BaseException] = []
    stop = asyncio.Event()

    async def hammer() -> None:
        while not stop.is_set():
            try:
                job = await store.get_job(await store.insert_job("http://a.test/"))
                assert job is not None
                await store.transition(job, State.FETCHING, worker_id="w", owner_token="t",
                                       detail={})
            except Exception as exc:
                if not is_transient(exc):
                    unexpected.append(exc)
                await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(hammer()) for _ in range(10)]
    try:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            for _ in range(25):
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                                    database.rsplit("/", 1)[1])
                await asyncio.sleep(0.1)
        finally:
            await admin.close()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await pool.close()
    assert not unexpected, [f"{type(e).__name__}: {e}" for e in unexpected[:5]]
