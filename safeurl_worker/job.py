"""A job this worker owns, and the only way its state is written.

`OwnedJob` wraps the row as last seen and makes every transition itself: one versioned, audited
statement (`Store.transition` / `Store.complete`) stamped with this process life's token. Losing
the version race raises `Conflict` (another worker moved the job); values PostgreSQL refuses
raise `Rejected`. A write whose reply was lost is recognised by its op token in the audit row.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .artifacts import Artifact
from .errors import is_rejected_data, retrying
from .models import Analysis, Job, Report, State
from .store import Store

T = TypeVar("T")


class Conflict(Exception):
    """A versioned write matched no row: another worker moved the job."""


class Rejected(Exception):
    """PostgreSQL refused the data itself (class 22): retrying cannot help."""


class Owner:
    """Who writes: this replica's id and process-life token, and how to wait out outages."""

    def __init__(self, store: Store, worker_id: str, token: str, stopping: asyncio.Event,
                 on_error: Callable[[str, BaseException], None]) -> None:
        self.store = store
        self.worker_id = worker_id
        self.token = token
        self.stopping = stopping
        self.on_error = on_error

    async def db(self, fn: Callable[[], Awaitable[T]]) -> T:
        """A PostgreSQL call, retried through outages (read-only, restarts, disk full...)."""
        return await retrying("postgres", fn, self.stopping, self.on_error)


class OwnedJob:
    def __init__(self, owner: Owner, job: Job) -> None:
        self.owner = owner
        self.job = job

    @property
    def id(self) -> uuid.UUID:
        return self.job.id

    async def move(self, to: State, *, add_attempt: bool = False, add_fault: bool = False,
                   detail: dict[str, Any] | None = None, error_code: str | None = None,
                   error_message: str | None = None) -> None:
        """One versioned transition; raises Conflict when another worker got there first."""
        op = _op_token()
        o = self.owner
        token = None if to is State.QUEUED else o.token  # a QUEUED job has no owner
        new = await self._write(lambda: o.store.transition(
            self.job, to, worker_id=o.worker_id, owner_token=token,
            detail={**(detail or {}), "op": op}, add_attempt=add_attempt, add_fault=add_fault,
            error_code=error_code, error_message=error_message))
        if new is None:
            new = await self._landed(op)
        self.job = new

    async def fail(self, to: State, code: str, message: str,
                   detail: dict[str, Any] | None = None) -> None:
        await self.move(to, error_code=code, error_message=message[:2000],
                        detail={"error_code": code, **(detail or {})})

    async def complete(self, report: Report, result: Analysis,
                       cached_from: uuid.UUID | None, url_key: str | None,
                       artifacts: Sequence[Artifact] = (),
                       analyzing: dict[str, Any] | None = None) -> None:
        """ANALYZING -> COMPLETED with the result row (and a render scan's artifacts), in one
        statement; with `analyzing` (its audit detail) from FETCHING through ANALYZING."""
        op = _op_token()
        o = self.owner
        # The op token goes in the next version's audit row, whichever that is (`_landed`).
        first = None if analyzing is None else {**analyzing, "op": op}
        version = await self._write(lambda: o.store.complete(
            self.job, worker_id=o.worker_id, report=report, analysis=result, url_key=url_key,
            cached_from=cached_from, detail={"op": op}, artifacts=artifacts, analyzing=first))
        if version is None:
            await self._landed(op)

    async def reload(self) -> Job | None:
        return await self.owner.db(lambda: self.owner.store.get_job(self.job.id))

    async def _write(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self.owner.db(fn)
        except Exception as exc:
            if is_rejected_data(exc):
                raise Rejected(f"{type(exc).__name__}: {exc}"[:500]) from exc
            raise

    async def _landed(self, op: str) -> Job:
        """After a zero-row write: did our own write commit before the connection dropped?
        (A retried write then sees its own version bump as a conflict.) The audit row of the
        next version carries the write's token, so this is exact."""
        o = self.owner
        ours = await o.db(lambda: o.store.audit_op(self.job.id, self.job.version + 1))
        job = await o.db(lambda: o.store.get_job(self.job.id)) if ours == op else None
        if job is None:
            raise Conflict
        return job


def _op_token() -> str:
    """Identifies one write attempt in its audit row."""
    return os.urandom(6).hex()
