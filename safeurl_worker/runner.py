"""The container runner: one ephemeral, locked-down fetcher container per scan.

create -> start -> wait (under the timeout; SIGKILL on expiry) -> read capped stdout -> delete.
The container is deleted in every case (finally), including cancellation. Only the validated
report crosses back; the page's bytes never leave the container.

Every Docker Engine call has a timeout, and a slow or hung daemon is never the target's fault:
it raises DockerUnavailable (the worker pauses intake and runs the scan again later), and only a
container that the daemon confirms ran past the limit is a TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Protocol

import aiodocker
import aiohttp
import orjson
from pydantic import ValidationError

from .config import Settings
from .models import Report

LABEL_JOB = "safeurl.job_id"
LABEL_WORKER = "safeurl.worker_id"
# Per Docker API call (and for the whole stdout read), so a hung daemon cannot hold a job for
# long: the worker pauses intake after one of these instead of timing out every scan.
_API_TIMEOUT = 15.0
# A liveness question (version ping, inspect after a wait timed out): a healthy daemon answers
# in milliseconds, and the answer decides whether the target or Docker is to blame.
_PROBE_TIMEOUT = 5.0


class RunStatus(enum.StrEnum):
    OK = "ok"
    TIMEOUT = "timeout"
    CRASHED = "crashed"  # non-zero exit, OOM kill
    OUTPUT_INVALID = "output_invalid"


@dataclasses.dataclass(frozen=True)
class RunResult:
    status: RunStatus
    report: Report | None = None
    exit_code: int | None = None
    detail: str = ""
    seconds: float = 0.0


class ContainerRunner(Protocol):
    """What the worker needs from a runner (the benchmark swaps in an in-process stub)."""

    async def run(self, job_id: uuid.UUID, url: str) -> RunResult: ...

    async def ping(self) -> bool: ...

    async def remove_labelled(self, job_id: uuid.UUID | None = None,
                              older_than_s: float | None = None) -> int: ...


class DockerUnavailable(Exception):
    """The Docker daemon could not be reached: not the job's fault, so it is not failed."""


@contextlib.contextmanager
def _daemon_errors(any_status: bool = False) -> Iterator[None]:
    """Raise a failure to talk to the daemon (timeout, connection, 5xx) as DockerUnavailable.
    A 4xx (e.g. the container was removed under us) passes through unless `any_status`."""
    try:
        yield
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise DockerUnavailable(str(exc) or f"{type(exc).__name__}: no answer in time") from exc
    except aiodocker.DockerError as exc:
        if exc.status < 500 and not any_status:
            raise
        raise DockerUnavailable(f"{exc.status}: {exc.message}") from exc


_SHM_BYTES = 4 * 1024 * 1024
_NOFILE = 256  # one fetch needs a handful of sockets and files


def container_config(settings: Settings, job_id: uuid.UUID, url: str) -> dict[str, Any]:
    """The sandbox. Each setting is explained in docs/sandbox.md."""
    tmpfs_bytes = settings.container_tmpfs_mb * 1024 * 1024
    mem = settings.container_memory_limit_mb * 1024 * 1024
    env = [f"{k}={v}" for k, v in settings.fetcher_env().items()]  # limits only, no secrets
    return {
        "Image": settings.fetcher_image,
        "Cmd": [url],
        "Env": env,
        "User": "65534:65534",
        "Labels": {LABEL_JOB: str(job_id), LABEL_WORKER: settings.worker_id},
        "NetworkDisabled": settings.fetcher_network == "none",
        "AttachStdout": False, "AttachStderr": False, "Tty": False, "OpenStdin": False,
        "HostConfig": {
            "NetworkMode": settings.fetcher_network,
            "Memory": mem,
            "MemorySwap": mem,  # equal to Memory: no swap
            "NanoCpus": int(settings.container_cpu_limit * 1e9),
            "PidsLimit": settings.container_pids_limit,
            "ReadonlyRootfs": True,
            "Tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={settings.container_tmpfs_mb}m"},
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Init": True,  # a Python PID 1 ignores SIGTERM; docker-init forwards it
            "Privileged": False,
            "Binds": [], "Mounts": [],
            "IpcMode": "private",
            # DNS from FETCHER_DNS (else Docker's default servers), and never the host's search
            # domains: "." clears them, so a bare name cannot become an internal host's name.
            **({"Dns": settings.fetcher_dns.split(",")} if settings.fetcher_dns else {}),
            "DnsSearch": ["."],
            "ShmSize": _SHM_BYTES,  # a private /dev/shm, small: the fetcher does not use it
            # No core dumps (they would hold page content), few files, and no file in the tmpfs
            # bigger than the tmpfs itself.
            "Ulimits": [{"Name": "core", "Soft": 0, "Hard": 0},
                        {"Name": "nofile", "Soft": _NOFILE, "Hard": _NOFILE},
                        {"Name": "fsize", "Soft": tmpfs_bytes, "Hard": tmpfs_bytes}],
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "4m", "max-file": "1"}},
        },
    }


class Runner:
    def __init__(self, settings: Settings, docker: aiodocker.Docker) -> None:
        self.settings = settings
        self.docker = docker
        # Our own containers whose removal failed (Docker down): removed by id as soon as Docker
        # answers again, never by the job's label (that may be a new owner's run by then).
        self._leftovers: set[str] = set()

    async def ping(self) -> bool:
        try:
            await asyncio.wait_for(self.docker.version(), _PROBE_TIMEOUT)
            return True
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def run(self, job_id: uuid.UUID, url: str) -> RunResult:
        started = time.monotonic()
        await self._remove_leftovers()
        container = await self._create(job_id, url)
        try:
            # any_status: once created, a 4xx (the container vanished under a restarting
            # daemon, or was removed) is still Docker's doing, never the target's.
            with _daemon_errors(any_status=True):
                result = await self._run_started(container)
        finally:
            await self._remove(container)
        return dataclasses.replace(result, seconds=time.monotonic() - started)

    async def _create(self, job_id: uuid.UUID, url: str) -> Any:
        # any_status: a missing image or a refused config is the deployment's problem, not
        # the job's.
        name = f"safeurl-{job_id}-{uuid.uuid4().hex[:8]}"
        create = asyncio.ensure_future(asyncio.wait_for(self.docker.containers.create(
            config=container_config(self.settings, job_id, url), name=name), _API_TIMEOUT))
        try:
            with _daemon_errors(any_status=True):
                return await asyncio.shield(create)
        except asyncio.CancelledError:
            # The daemon may be making it right now: let the call finish, then remove what it
            # made (by its own name, never by the job's label: after a takeover that label is
            # also on another replica's run).
            with contextlib.suppress(Exception):
                await create
            await self._remove(self.docker.containers.container(name))
            raise
        except DockerUnavailable:
            await self._remove(self.docker.containers.container(name))  # in case it was made
            raise

    async def _run_started(self, container: Any) -> RunResult:
        await asyncio.wait_for(container.start(), _API_TIMEOUT)
        limit = self.settings.container_timeout_ms / 1000
        code = await self._wait(container, limit)
        if code is None:
            await self._kill(container)
            return RunResult(RunStatus.TIMEOUT, detail=f"no exit after {limit:g}s")
        if code != 0:
            oom = code == 137
            return RunResult(RunStatus.CRASHED, exit_code=code,
                             detail="killed (out of memory?)" if oom else f"exit code {code}")
        raw = await self._stdout(container)
        return parse_report(raw, self.settings.container_output_max_bytes)

    async def _wait(self, container: Any, limit: float) -> int | None:
        """The container's exit code, or None if it ran past `limit` seconds."""
        try:
            status = await asyncio.wait_for(container.wait(), limit)
            return int(status.get("StatusCode", -1))
        except TimeoutError:
            pass
        # wait() also times out when the daemon hangs, so ask the daemon what happened; if it
        # does not answer, Docker is at fault, not the target.
        try:
            info = await asyncio.wait_for(container.show(), _PROBE_TIMEOUT)
        except TimeoutError as exc:
            raise DockerUnavailable(
                f"no exit after {limit:g}s and the daemon does not answer") from exc
        state = info.get("State") or {}
        if state.get("Running", True):
            # Our clock started once start() returned, after docker started the container: it
            # has run at least `limit` seconds.
            return None
        # It exited while the daemon was slow to tell us: judge its own run time, by docker.
        if _run_seconds(state) > limit:
            return None
        return int(state.get("ExitCode", -1))

    async def _stdout(self, container: Any) -> bytes:
        """Read stdout, stopping one byte past the cap (the rest is never read). The container
        has exited, so the whole read is bounded: a stalled stream is the daemon's fault."""
        cap = self.settings.container_output_max_bytes
        buf = bytearray()
        async with (asyncio.timeout(_API_TIMEOUT),
                    contextlib.aclosing(container.log(stdout=True, follow=True)) as chunks):
            async for chunk in chunks:
                buf += chunk.encode()
                if len(buf) > cap:
                    break
        return bytes(buf)

    async def _kill(self, container: Any) -> None:
        # Already gone is fine: delete(force=True) in run() settles it either way.
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError,
                                 TimeoutError):
            await asyncio.wait_for(container.kill(), _API_TIMEOUT)

    async def _remove(self, container: Any) -> None:
        # Shielded: a cancelled job must still remove its container (the delete carries on
        # while the cancellation propagates). A failure is remembered and retried on the next
        # run (and the janitor removes labelled orphans in any case).
        try:
            await asyncio.shield(asyncio.wait_for(container.delete(force=True), _API_TIMEOUT))
            self._leftovers.discard(container.id)
        except aiodocker.DockerError as exc:
            if exc.status != 404:  # 404: already gone
                self._leftovers.add(container.id)
        except (aiohttp.ClientError, OSError, TimeoutError):
            self._leftovers.add(container.id)

    async def _remove_leftovers(self) -> None:
        for cid in list(self._leftovers):
            await self._remove(self.docker.containers.container(cid))

    async def remove_labelled(self, job_id: uuid.UUID | None = None,
                              older_than_s: float | None = None) -> int:
        """Remove containers this service created (for one job, or older than a bound)."""
        label = f"{LABEL_JOB}={job_id}" if job_id else LABEL_JOB
        with _daemon_errors():
            found = await asyncio.wait_for(self.docker.containers.list(
                all=True, filters=orjson.dumps({"label": [label]}).decode()), _API_TIMEOUT)
        now = time.time()
        removed = 0
        for c in found:
            if older_than_s is not None and now - float(c["Created"]) < older_than_s:
                continue
            await self._remove(c)
            removed += 1
        return removed


def _run_seconds(state: dict[str, Any]) -> float:
    """An exited container's run time, from docker's own timestamps (one clock)."""
    try:
        return (datetime.fromisoformat(state["FinishedAt"])
                - datetime.fromisoformat(state["StartedAt"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return 0.0  # no usable times: judge it by its exit code


def parse_report(raw: bytes, cap: int) -> RunResult:
    """Validate the container's stdout as exactly one Report."""
    if len(raw) > cap:
        return RunResult(RunStatus.OUTPUT_INVALID, detail=f"stdout over {cap} bytes")
    text = raw.strip()
    if not text:
        return RunResult(RunStatus.OUTPUT_INVALID, detail="empty stdout")
    try:
        report = Report.model_validate(orjson.loads(text))
    except orjson.JSONDecodeError as exc:
        return RunResult(RunStatus.OUTPUT_INVALID, detail=f"not JSON: {exc}"[:300])
    except ValidationError as exc:
        return RunResult(RunStatus.OUTPUT_INVALID,
                         detail=f"report invalid: {exc.error_count()} errors: "
                                f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"[:300])
    return RunResult(RunStatus.OK, report=report, exit_code=0)
