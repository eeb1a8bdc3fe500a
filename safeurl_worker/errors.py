"""Which errors are the infrastructure's, and how we wait them out.

A dependency that is down, restarting, read-only, full or slow is never a job's fault: the call is
retried with backoff (and intake pauses) until it works or the worker is told to stop. Only errors
caused by the job itself (its container crashed, its data cannot be stored) may end or count
against a job. Everything not listed here is treated as a bug: logged, and the job handed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import redis.exceptions

log = logging.getLogger("safeurl.errors")
T = TypeVar("T")

# SQLSTATE classes of a server that cannot serve us now: connection (08), transaction rollback
# (40: serialization, deadlock), insufficient resources (53: disk full, out of memory, too many
# connections), operator intervention (57: shutdown, statement timeout), system error (58).
_PG_TRANSIENT_CLASSES = {"08", "40", "53", "57", "58"}
_PG_TRANSIENT_STATES = {"25006", "55P03", "55006"}  # read-only transaction, lock not available
# Redis replies that mean "not now": a replica after failover, loading, out of memory, a failed
# disk write, a cluster in motion.
_REDIS_TRANSIENT_PREFIXES = ("READONLY", "LOADING", "OOM", "MISCONF", "MASTERDOWN", "TRYAGAIN",
                             "CLUSTERDOWN", "NOREPLICAS", "BUSY ", "NOGROUP")
# uvloop raises a bare RuntimeError, not a ConnectionError, when a client writes to a connection
# the server has just closed (MagicStack/uvloop#506): a lost connection all the same.
_UVLOOP_CLOSED = "the handler is closed"
# asyncpg can hand out a pooled connection whose session the server has just terminated (an
# operator, a failover, `pg_terminate_backend`) before it has noticed the close: the next call
# fails in the client, before anything is sent, with "cannot switch to state N; another
# operation (M) is in progress" (MagicStack/asyncpg#1069). A lost connection all the same.
_ASYNCPG_STALE = "another operation"


class DependencyDown(Exception):
    """A dependency (named in `.dependency`) refused us for a reason of its own."""

    def __init__(self, dependency: str, message: str) -> None:
        super().__init__(f"{dependency}: {message}")
        self.dependency = dependency


def is_transient(exc: BaseException) -> bool:
    """True for errors of a dependency that is down, restarting, read-only or slow."""
    if isinstance(exc, DependencyDown | ConnectionError | TimeoutError | OSError):
        return True
    if isinstance(exc, RuntimeError) and _UVLOOP_CLOSED in str(exc):
        return True
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError
                   | redis.exceptions.BusyLoadingError | redis.exceptions.ReadOnlyError):
        return True
    if isinstance(exc, redis.exceptions.ResponseError):
        return str(exc).upper().startswith(_REDIS_TRANSIENT_PREFIXES)
    if isinstance(exc, asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        return True  # includes "connection was closed in the middle of operation"
    if isinstance(exc, asyncpg.InternalClientError) and _ASYNCPG_STALE in str(exc):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state[:2] in _PG_TRANSIENT_CLASSES or state in _PG_TRANSIENT_STATES
    return False


def is_rejected_data(exc: BaseException) -> bool:
    """PostgreSQL refused the values themselves (class 22: bad encoding, NUL, too long): the
    same write will fail every time, so it is the job's data, not the server."""
    return (isinstance(exc, asyncpg.PostgresError)
            and str(getattr(exc, "sqlstate", "") or "")[:2] == "22")


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


async def retrying(dependency: str, fn: Callable[[], Awaitable[T]], stopping: asyncio.Event,
                   on_error: Callable[[str, BaseException], None], cap: float = 5.0) -> T:
    """Call `fn` until it succeeds, waiting out transient errors with backoff. Once the worker
    is stopping it gives up after a few tries (re-raising), so shutdown is never held hostage."""
    attempt = 0
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            cancelled_under_us()
            attempt += 1
            on_error(dependency, exc)
            if stopping.is_set() and attempt >= 3:
                raise
            if stopping.is_set():
                await asyncio.sleep(0.2)
            else:
                await pause(stopping, backoff(attempt, cap=cap))


def cancelled_under_us() -> None:
    """Re-raise a cancellation that a client library turned into a connection error (a task
    cancelled mid-command may surface as one), so a loop or a retry never outlives its cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once when the worker is told to stop (or `stopping` is any event).
    asyncio.timeout, not wait_for: on Python 3.11 wait_for can return normally when a cancel
    arrives as the event fires, and a loop built on it would never end."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stopping.wait()
