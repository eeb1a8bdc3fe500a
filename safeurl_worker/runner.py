"""The container runner: one ephemeral, locked-down fetcher container per scan.

take a warm container (or create one) -> attach stdin+stdout -> write the URL line, close stdin
-> start -> wait (under the timeout; SIGKILL on expiry) while reading capped stdout -> delete in
the background. The container is deleted in every case, including cancellation. Only the
validated report crosses back; the page's bytes never leave the container.

Warm containers (WARM_CONTAINERS, on by default; docs/sandbox.md): `keep_warm` keeps one
created-but-not-started container ready per free slot (plus one while every slot is busy), so
creating a container is off the scan's critical path, and so is removing it (a background task).
A warm container is made from exactly the job's `container_config` except that the URL is not in
its command line: the fetcher reads it as one line on stdin. Each container runs one scan and is
never reused: it leaves the pool before its job touches it.

How a container is found by its job (takeover: `remove_labelled(job_id)` must kill a dead
owner's run): labels cannot change after create, so a warm container is labelled
`safeurl.job_id=""` and named `safeurl-warm-<random>`; when a job takes it, it is RENAMED to
`safeurl-<job_id>-<random>` before it is attached or started (WARM_START: before its URL is
written). A container created at job time
gets that name (and the job's label) at once. So every container that ever runs a job's URL
carries the job's name first, and `remove_labelled(job_id)` looks for the name (and our label).
Orphans go by age: a never-started container by its creation time (a dead worker's warm ones),
one that ran by its start time (a warm container may have waited long before its job).

A warm container is used only if it was made from the current `container_config` and the image
it was created from is still the one FETCHER_IMAGE names; otherwise it is removed, and any
failure of the warm path before the container starts falls back to creating one for the job.

With WARM_START the warm containers are also attached and started ahead (the fetcher imports
everything, then blocks reading its URL): a job only renames one, writes the line and judges the
run, whose time limit starts with the URL. Container start leaves the critical path too.

The exit code comes from the container's `die` event when that arrives first (`_watch_exits`):
the daemon answers `wait` only after releasing the network and mounts, tens of ms later.

Render scans (`run(..., mode="render")`, docs/sandbox.md) run the browser image in the same
sandbox (`render_config`: `container_config` with the browser's image, memory, pids and output
cap). They are never warm: their containers are created at job time (see `render_config`).

Every Docker Engine call has a timeout, and a slow or hung daemon is never the target's fault:
it raises DockerUnavailable (the worker pauses intake and runs the scan again later), and only a
container that the daemon confirms ran past the limit is a TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import aiodocker
import aiohttp
import orjson
from pydantic import ValidationError

from .config import ConfigError, Settings
from .errors import backoff
from .models import Report

log = logging.getLogger("safeurl.runner")
T = TypeVar("T")

LABEL_JOB = "safeurl.job_id"
LABEL_WORKER = "safeurl.worker_id"
WARM_PREFIX = "safeurl-warm-"
_JOB_NAME = re.compile(r"^safeurl-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-")
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


Mode = Literal["static", "render"]


class ContainerRunner(Protocol):
    """What the worker needs from a runner (the benchmark swaps in an in-process stub).
    `mode` is passed only for render scans, so a static-only stub may leave it out."""

    async def run(self, job_id: uuid.UUID, url: str, mode: Mode = "static") -> RunResult: ...

    async def ping(self) -> bool: ...

    async def remove_labelled(self, job_id: uuid.UUID | None = None,
                              older_than_s: float | None = None) -> int: ...


@runtime_checkable
class KeepsWarm(Protocol):
    """A runner with a warm pool: the worker runs `keep_warm` for its whole life."""

    async def keep_warm(self) -> None: ...


class DockerUnavailable(Exception):
    """The Docker daemon could not be reached: not the job's fault, so it is not failed."""


class FetcherNetworkMissing(ConfigError):
    """FETCHER_NETWORK names no Docker network. Start-up stops: no other network (least of all
    Docker's shared `bridge`) may stand in for the sandbox's own."""

    def __init__(self, name: str) -> None:
        # compose.yaml's and scripts/services.sh's options: no traffic between containers, and
        # for the default name the bridge deploy/firewall/docker-user.sh guards (br-safeurl).
        icc = "--opt com.docker.network.bridge.enable_icc=false"
        if name == "safeurl-fetch":
            how = ("`bash scripts/services.sh docker`, or by hand: `docker network create "
                   f"--driver bridge --opt com.docker.network.bridge.name=br-safeurl {icc} "
                   f"{name} && bash deploy/firewall/docker-user.sh apply`")
        else:
            how = (f"`docker network create --driver bridge {icc} {name}` (and its firewall, "
                   "docs/sandbox.md)")
        super().__init__(f"FETCHER_NETWORK={name}: no such Docker network. Create it with "
                         f"{how}; or set FETCHER_NETWORK to an existing network")


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


async def _within(aw: Awaitable[T], seconds: float) -> T:
    """`asyncio.wait_for` without its 3.11 flaw: a cancellation that arrives just as the call
    completes is not lost (a lost one would leave a job, or the warm pool, running on)."""
    async with asyncio.timeout(seconds):
        return await aw


_SHM_BYTES = 4 * 1024 * 1024
_NOFILE = 256  # one fetch needs a handful of sockets and files


def container_name(job_id: uuid.UUID) -> str:
    """The name of a container running `job_id` (random suffix: a retry makes a new one)."""
    return f"safeurl-{job_id}-{uuid.uuid4().hex[:8]}"


def job_of_container(labels: dict[str, str] | None, names: list[str] | None) -> str | None:
    """The job a container runs: its label, or for a warm container (created before its job,
    label empty) the job id in the name it was given when the job took it."""
    job = (labels or {}).get(LABEL_JOB)
    if job:
        return job
    for name in names or []:
        m = _JOB_NAME.match(name.lstrip("/"))
        if m:
            return m.group(1)
    return None


@functools.lru_cache(maxsize=4)
def _seccomp_opt(path: str) -> str:
    """`seccomp=<JSON>`: the Engine API takes the profile's text, not a path (read once)."""
    return "seccomp=" + orjson.dumps(orjson.loads(Path(path).read_bytes())).decode()


def _seccomp_opts(settings: Settings) -> list[str]:
    """FETCHER_SECCOMP_PROFILE: the shipped (or the operator's) profile; `daemon`: none, so
    the daemon applies its built-in one."""
    if settings.fetcher_seccomp_profile == "daemon":
        return []
    return [_seccomp_opt(settings.fetcher_seccomp_profile)]


def orphan_age_s(settings: Settings) -> float:
    """Older than any live scan can be (a scan is killed at the container timeout)."""
    return settings.orphan_after_s or settings.container_timeout_ms / 1000 + 60


def container_config(settings: Settings, job_id: uuid.UUID | None,
                     url: str | None = None) -> dict[str, Any]:
    """The sandbox. Each setting is explained in docs/sandbox.md.

    With `url`, the `docker run IMAGE URL` form. Without, the URL comes as one line on stdin
    (attached before start; StdinOnce: closing our side is the fetcher's EOF) - the runner's
    form, for warm containers (`job_id` None: no job yet) and containers made at job time alike.
    The two forms differ only in Cmd, the stdin/stdout attach flags and the job label."""
    tmpfs_bytes = settings.container_tmpfs_mb * 1024 * 1024
    mem = settings.container_memory_limit_mb * 1024 * 1024
    env = [f"{k}={v}" for k, v in settings.fetcher_env().items()]  # limits only, no secrets
    stdin = url is None
    return {
        "Image": settings.fetcher_image,
        "Cmd": [] if stdin else [url],
        "Env": env,
        "User": "65534:65534",
        "Labels": {LABEL_JOB: str(job_id) if job_id else "", LABEL_WORKER: settings.worker_id},
        "NetworkDisabled": settings.fetcher_network == "none",
        "AttachStdin": stdin, "AttachStdout": stdin, "AttachStderr": False, "Tty": False,
        "OpenStdin": stdin, "StdinOnce": stdin,
        "HostConfig": {
            "NetworkMode": settings.fetcher_network,
            "Memory": mem,
            "MemorySwap": mem,  # equal to Memory: no swap
            "NanoCpus": int(settings.container_cpu_limit * 1e9),
            "PidsLimit": settings.container_pids_limit,
            "ReadonlyRootfs": True,
            "Tmpfs": {"/tmp": f"rw,noexec,nosuid,nodev,size={settings.container_tmpfs_mb}m"},
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges", *_seccomp_opts(settings)],
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
            # FETCHER_RUNTIME (e.g. runsc: gVisor's own kernel between the page and the host's);
            # absent: the daemon's default runtime. docs/deploy.md weighs the options.
            **({"Runtime": settings.fetcher_runtime} if settings.fetcher_runtime else {}),
        },
    }


def render_config(settings: Settings, job_id: uuid.UUID) -> dict[str, Any]:
    """The browser sandbox: exactly `container_config` (URL on stdin, same user, read-only root,
    caps, network, DNS, runtime, ulimits...) except the image, the memory and pids limits
    (Chromium's processes need more: BROWSER_MEMORY_LIMIT_MB, BROWSER_PIDS_LIMIT) and the
    output cap the image fits its report under (RENDER_MAX_OUTPUT_BYTES).

    Created at job time, never kept warm: a warm browser container per slot would hold its
    memory reservation (1 GiB each by default) idle, and a render's own run (seconds) dwarfs
    the create it would save."""
    config = container_config(settings, job_id)
    mem = settings.browser_memory_limit_mb * 1024 * 1024
    config["Image"] = settings.browser_image
    config["Env"] = [*config["Env"],
                     f"RENDER_MAX_OUTPUT_BYTES={settings.browser_output_max_bytes}"]
    config["HostConfig"] = {**config["HostConfig"], "Memory": mem, "MemorySwap": mem,
                            "PidsLimit": settings.browser_pids_limit}
    return config


def output_cap(settings: Settings, mode: Mode) -> int:
    """The stdout cap of a run: a render report carries screenshots and the DOM."""
    if mode == "render":
        return settings.browser_output_max_bytes
    return settings.container_output_max_bytes


@dataclasses.dataclass(frozen=True)
class _Warm:
    """A created, never started container waiting for a job."""

    container: Any
    config: dict[str, Any]  # what it was created from: used only while that still holds
    image_id: str  # the image it was created from (FETCHER_IMAGE may be re-tagged later)
    made: float  # time.monotonic()
    stream: Any = None  # WARM_START: attached and started, the fetcher waiting on stdin


class Runner:
    def __init__(self, settings: Settings, docker: aiodocker.Docker) -> None:
        self.settings = settings
        self.docker = docker
        # Our own containers whose removal failed (Docker down): removed by id as soon as Docker
        # answers again, never by the job's label (that may be a new owner's run by then).
        self._leftovers: set[str] = set()
        self._removing: dict[str, asyncio.Task[None]] = {}  # background removals, by id
        self._warm: list[_Warm] = []
        self._busy = 0  # runs in progress
        self._wake = asyncio.Event()  # keep_warm: a slot was taken or freed
        self._exits: dict[str, asyncio.Future[int]] = {}  # container id -> its `die` event
        # Recycled well before the janitor's orphan age, so a live worker's warm containers are
        # never taken for orphans (a started one is judged by its start time: one started
        # ahead must also have its whole run before that age).
        orphan, limit = orphan_age_s(settings), settings.container_timeout_ms / 1000
        self.warm_max_age_s = max(5.0, min(orphan / 2, orphan - limit - 10))

    async def ping(self) -> bool:
        try:
            await _within(self.docker.version(), _PROBE_TIMEOUT)
            return True
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def check_network(self) -> None:
        """Start-up: raise FetcherNetworkMissing unless FETCHER_NETWORK exists (`none`, `host`
        and `bridge` always do). A daemon that does not answer is not decided here (logged): the
        worker waits for Docker as during a run, and every container it creates names this
        network, so a missing one fails those creates with Docker's own error, never falls back."""
        name = self.settings.fetcher_network
        if ":" in name or name == "default":  # `container:<id>`, the daemon's default: no name
            return
        try:
            await _within(self.docker.networks.get(name), _PROBE_TIMEOUT)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise FetcherNetworkMissing(name) from None
            log.warning("could not check FETCHER_NETWORK", extra={"error": str(exc)})
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("could not check FETCHER_NETWORK: docker unreachable",
                        extra={"error": str(exc) or type(exc).__name__})

    async def run(self, job_id: uuid.UUID, url: str, mode: Mode = "static") -> RunResult:
        started = time.monotonic()
        self._remove_leftovers()
        self._busy += 1
        try:
            if mode == "render":  # never warm (render_config says why)
                w, container = None, await self._create_named(render_config(
                    self.settings, job_id), container_name(job_id))
            else:
                w = await self._take_warm(job_id)
                container = w.container if w else await self._create(job_id)
            try:
                # any_status: once created, a 4xx (the container vanished under a restarting
                # daemon, or was removed) is still Docker's doing, never the target's.
                with _daemon_errors(any_status=True):
                    result = await self._run_created(container, url, w.stream if w else None,
                                                     output_cap(self.settings, mode))
            finally:
                self._remove_later(container)
        finally:
            self._busy -= 1
            self._wake.set()
        return dataclasses.replace(result, seconds=time.monotonic() - started)

    # --- the warm pool ----------------------------------------------------------------------

    async def keep_warm(self) -> None:
        """Until cancelled (the worker's life): keep `_wanted()` warm containers ready. On the
        way out, remove them and wait for the background removals."""
        failures = 0
        watcher = asyncio.create_task(self._watch_exits())
        try:
            while self.settings.warm_containers:
                self._wake.clear()
                try:
                    await self._drop_stale()
                    if self._wanted() > 0:
                        await self._make_warm()
                        failures = 0
                        continue
                except Exception as exc:  # Docker down, image missing: jobs go cold meanwhile
                    failures += 1
                    log.warning("could not make a warm container", extra={
                        "error": f"{type(exc).__name__}: {exc}"[:300]})
                    await asyncio.sleep(backoff(failures, base=0.5, cap=10))
                    continue
                # asyncio.timeout, not wait_for: wait_for (3.11) drops a cancellation that
                # arrives as the event is set, and the pool would outlive its worker.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.warm_max_age_s / 4):
                        await self._wake.wait()
            await asyncio.Event().wait()  # off: nothing to do until the worker stops
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            warm, self._warm = self._warm, []
            for w in warm:
                self._discard(w)
            await self.settle()

    async def _watch_exits(self) -> None:
        """Our containers' `die` events, for `_wait`: the daemon sends one as soon as it knows
        the exit code, tens of milliseconds before `wait` answers (that waits for the network
        and mounts to be released). Only a shortcut: with no event, `wait` decides."""
        filters = {"type": ["container"], "event": ["die"],
                   "label": [f"{LABEL_WORKER}={self.settings.worker_id}"]}
        failures = 0
        channel: Any = self.docker.events  # untyped in aiodocker
        try:
            while True:
                events = channel.subscribe(filters=orjson.dumps(filters).decode())
                while (ev := await events.get()) is not None:
                    failures = 0
                    exited = self._exits.get(str(ev.get("id")))
                    code = ((ev.get("Actor") or {}).get("Attributes") or {}).get("exitCode")
                    if exited is not None and not exited.done() and code is not None:
                        exited.set_result(int(code))
                with contextlib.suppress(Exception):  # the stream ended or failed: again
                    await channel.stop()
                failures += 1
                await asyncio.sleep(backoff(failures, base=0.5, cap=10))
        finally:
            with contextlib.suppress(Exception):
                await channel.stop()

    async def settle(self) -> None:
        """Wait (bounded) for the background removals started so far."""
        if self._removing:
            await asyncio.wait(list(self._removing.values()), timeout=_API_TIMEOUT + 1)

    def _wanted(self) -> int:
        """One per free slot; while every slot is busy, one for the next job (made during the
        run, so back-to-back jobs do not wait for a create either)."""
        return max(1, self.settings.worker_concurrency - self._busy) - len(self._warm)

    async def _make_warm(self) -> None:
        config = container_config(self.settings, None)
        container = await self._create_named(config, f"{WARM_PREFIX}{uuid.uuid4().hex[:12]}")
        stream = None
        try:
            with _daemon_errors(any_status=True):
                info = await _within(container.show(), _API_TIMEOUT)
                if self.settings.warm_start:
                    stream = container.attach(stdin=True, stdout=True, stderr=False)
                    await _within(stream.__aenter__(), _API_TIMEOUT)
                    self._exits[container.id] = asyncio.get_running_loop().create_future()
                    await _within(container.start(), _API_TIMEOUT)
        except BaseException:
            self._exits.pop(container.id, None)
            self._remove_later(container, stream)
            raise
        self._warm.append(_Warm(container, config, str(info.get("Image")), time.monotonic(),
                                stream))

    def _discard(self, w: _Warm) -> None:
        self._exits.pop(w.container.id, None)
        self._remove_later(w.container, w.stream)

    async def _image_id(self) -> str:
        with _daemon_errors(any_status=True):
            info = await _within(self.docker.images.inspect(self.settings.fetcher_image),
                                 _PROBE_TIMEOUT)
        return str(info.get("Id"))

    def _usable(self, w: _Warm, image_id: str | None) -> bool:
        died = self._exits.get(w.container.id)
        return (w.config == container_config(self.settings, None)
                and time.monotonic() - w.made < self.warm_max_age_s
                and (image_id is None or w.image_id == image_id)
                and (w.stream is None or (died is not None and not died.done()
                                          and not _stream_closed(w.stream))))

    async def _drop_stale(self) -> None:
        """Remove warm containers that are too old, or from other settings or another image."""
        if not self._warm:
            return
        try:
            image_id: str | None = await self._image_id()
        except (DockerUnavailable, aiodocker.DockerError):
            image_id = None  # judged again at take time, which asks the daemon itself
        for w in [w for w in self._warm if not self._usable(w, image_id)]:
            self._warm.remove(w)
            self._discard(w)

    async def _take_warm(self, job_id: uuid.UUID) -> _Warm | None:
        """A warm container renamed for `job_id`, or None (none ready, or it failed: the caller
        creates one). It leaves the pool here, so it can never serve a second job."""
        if not self._warm:
            return None
        w = self._warm.pop(0)
        self._wake.set()
        if not self._usable(w, None):  # too old, other settings, or no longer waiting: it
            self._discard(w)  # never carries the job's name (only the image is judged after)
            return None
        try:
            # Renamed before it can start: from here on `remove_labelled(job_id)` finds it.
            _, image_id = await asyncio.gather(
                _within(w.container.rename(container_name(job_id)), _PROBE_TIMEOUT),
                self._image_id())
            if self._usable(w, image_id):
                return w
        except asyncio.CancelledError:
            self._discard(w)
            raise
        except Exception as exc:
            log.info("warm container unusable; creating one",
                     extra={"job_id": str(job_id), "error": f"{type(exc).__name__}: {exc}"[:200]})
        self._discard(w)
        return None

    # --- one container ----------------------------------------------------------------------

    async def _create(self, job_id: uuid.UUID) -> Any:
        return await self._create_named(container_config(self.settings, job_id),
                                        container_name(job_id))

    async def _create_named(self, config: dict[str, Any], name: str) -> Any:
        # any_status: a missing image or a refused config is the deployment's problem, not
        # the job's.
        create = asyncio.ensure_future(_within(self.docker.containers.create(
            config=config, name=name), _API_TIMEOUT))
        try:
            with _daemon_errors(any_status=True):
                return await asyncio.shield(create)
        except asyncio.CancelledError:
            # The daemon may be making it right now: let the call finish, then remove what it
            # made (by its own name, never by the job's label: after a takeover that label is
            # also on another replica's run).
            with contextlib.suppress(Exception):
                await create
            self._remove_later(self.docker.containers.container(name))
            raise
        except DockerUnavailable:
            self._remove_later(self.docker.containers.container(name))  # in case it was made
            raise

    async def _run_created(self, container: Any, url: str, ahead: Any = None,
                           cap: int | None = None) -> RunResult:
        """Attach, hand over the URL, start, and judge the run. The stream is attached before
        start, so no byte of stdout is missed; stdin is closed before start, so the fetcher
        never waits for its URL. `ahead`: the stream of a container started ahead, waiting for
        its URL (its run, and its time limit, start with the URL)."""
        stream = ahead or container.attach(stdin=True, stdout=True, stderr=False)
        reader: asyncio.Task[bytes] | None = None
        cap = cap or self.settings.container_output_max_bytes
        try:
            if ahead is None:
                await _within(stream.__aenter__(), _API_TIMEOUT)  # the hijacked stream
            # One line: "\r" and "\n" are not part of a URL (a browser's parser drops them).
            line = url.replace("\r", "").replace("\n", "").encode() + b"\n"
            await _within(stream.write_in(line), _API_TIMEOUT)
            _close_stdin(stream)
            reader = asyncio.create_task(self._read_stdout(stream, cap))
            if ahead is None:
                self._exits[container.id] = asyncio.get_running_loop().create_future()
                await _within(container.start(), _API_TIMEOUT)
            return await self._judge(container, reader, stream, ahead is not None, cap)
        finally:
            self._exits.pop(container.id, None)
            if reader is not None and not reader.done():
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            with contextlib.suppress(Exception):
                await stream.close()

    async def _judge(self, container: Any, reader: asyncio.Task[bytes], stream: Any,
                     ahead: bool = False, cap: int | None = None) -> RunResult:
        cap = cap or self.settings.container_output_max_bytes
        limit = self.settings.container_timeout_ms / 1000
        waiter = asyncio.create_task(self._wait(container, limit, ahead))
        try:
            await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done() and not reader.exception() and len(reader.result()) > cap:
                # Over the cap: the report is invalid whatever follows. Close the stream first:
                # a daemon blocked writing to a stream nobody reads is slow to kill.
                with contextlib.suppress(Exception):
                    await stream.close()
                await self._kill(container)
                return parse_report(reader.result(), cap)
            code = await waiter
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(BaseException):
                    await waiter
        if code is None:
            await self._kill(container)
            return RunResult(RunStatus.TIMEOUT, detail=f"no exit after {limit:g}s")
        if code != 0:
            oom = code == 137
            return RunResult(RunStatus.CRASHED, exit_code=code,
                             detail="killed (out of memory?)" if oom else f"exit code {code}")
        # It has exited, so the stream ends now: a stalled one is the daemon's fault.
        raw = await _within(reader, _API_TIMEOUT)
        return parse_report(raw, cap)

    async def _wait(self, container: Any, limit: float, ahead: bool = False) -> int | None:
        """The container's exit code, or None if it ran past `limit` seconds (`ahead`: a
        container started ahead of its URL; docker's run time includes its wait for it)."""
        try:
            return await _within(self._exit_code(container), limit)
        except TimeoutError:
            pass
        # wait() also times out when the daemon hangs, so ask the daemon what happened; if it
        # does not answer, Docker is at fault, not the target.
        try:
            info = await _within(container.show(), _PROBE_TIMEOUT)
        except TimeoutError as exc:
            raise DockerUnavailable(
                f"no exit after {limit:g}s and the daemon does not answer") from exc
        state = info.get("State") or {}
        if state.get("Running", True):
            # Our clock started once start() returned, after docker started the container: it
            # has run at least `limit` seconds.
            return None
        # It exited while the daemon was slow to tell us: judge its own run time, by docker.
        if not ahead and _run_seconds(state) > limit:
            return None
        return int(state.get("ExitCode", -1))

    async def _exit_code(self, container: Any) -> int:
        """`wait`, or the container's `die` event if that comes first (see `_watch_exits`)."""
        waiter = asyncio.ensure_future(container.wait())
        died = self._exits.get(container.id) or asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
            if died.done():
                return died.result()
            return int(waiter.result().get("StatusCode", -1))
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(BaseException):
                    await waiter

    async def _read_stdout(self, stream: Any, cap: int | None = None) -> bytes:
        """Stdout as it comes, stopping one chunk past the cap (the rest is never read)."""
        cap = cap or self.settings.container_output_max_bytes
        buf = bytearray()
        while (msg := await stream.read_out()) is not None:
            if msg.stream == 1:
                buf += msg.data
                if len(buf) > cap:
                    break
        return bytes(buf)

    async def _kill(self, container: Any) -> None:
        # Already gone is fine: the removal settles it either way.
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError,
                                 TimeoutError):
            await _within(container.kill(), _API_TIMEOUT)

    # --- removal ----------------------------------------------------------------------------

    def _remove_later(self, container: Any, stream: Any = None) -> None:
        """Remove in the background: the job's result does not wait for it. Its own task, so a
        cancelled job still removes its container. `stream`: its attach stream, closed first."""
        cid = str(container.id)
        if cid in self._removing:
            return
        task = asyncio.create_task(self._remove(container, stream))
        self._removing[cid] = task
        task.add_done_callback(lambda _: self._removing.pop(cid, None))

    async def _remove(self, container: Any, stream: Any = None) -> None:
        # A failure is remembered and retried on the next run (and the janitor removes labelled
        # orphans in any case).
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.close()
        try:
            await _within(container.delete(force=True), _API_TIMEOUT)
            self._leftovers.discard(container.id)
        except aiodocker.DockerError as exc:
            if exc.status != 404:  # 404: already gone
                self._leftovers.add(container.id)
            else:
                self._leftovers.discard(container.id)
        except (aiohttp.ClientError, OSError, TimeoutError):
            self._leftovers.add(container.id)

    def _remove_leftovers(self) -> None:
        for cid in list(self._leftovers):
            self._remove_later(self.docker.containers.container(cid))

    async def remove_labelled(self, job_id: uuid.UUID | None = None,
                              older_than_s: float | None = None) -> int:
        """Remove containers this service created: those that run (or ran) `job_id` - named for
        it, whether warm or made for the job - or those older than a bound (never started: by
        creation time; started: by start time)."""
        filters: dict[str, list[str]] = {"label": [LABEL_JOB]}
        if job_id:
            filters["name"] = [f"safeurl-{job_id}-"]
        with _daemon_errors():
            found = await _within(self.docker.containers.list(
                all=True, filters=orjson.dumps(filters).decode()), _API_TIMEOUT)
        removed = 0
        for c in found:
            if job_id and not any(n.lstrip("/").startswith(f"safeurl-{job_id}-")
                                  for n in c["Names"] or []):
                continue  # the name filter is a pattern; the job's name is exact
            if older_than_s is not None and not await self._older(c, older_than_s):
                continue
            await self._remove(c)
            removed += 1
        return removed

    async def _older(self, c: Any, limit: float) -> bool:
        if time.time() - float(c["Created"]) < limit:
            return False
        if c["State"] == "created":
            return True  # never started: a warm container of a dead worker, or a failed create
        # It may have waited warm before its job: judge the run by when it started.
        try:
            info = await _within(c.show(), _API_TIMEOUT)
            started = datetime.fromisoformat(info["State"]["StartedAt"])
        except aiodocker.DockerError:
            return False  # gone meanwhile
        except (KeyError, TypeError, ValueError, aiohttp.ClientError, OSError, TimeoutError):
            return True  # no start time to go by: its creation time says it is old
        return time.time() - started.timestamp() >= limit


def _transport(stream: Any) -> Any:
    resp = getattr(stream, "_resp", None)  # aiodocker exposes no more of the hijacked stream
    return resp.connection.transport if resp is not None and resp.connection else None


def _stream_closed(stream: Any) -> bool:
    """A started-ahead container's attach stream broke (the daemon restarted): its URL could
    not reach it."""
    transport = _transport(stream)
    return transport is None or transport.is_closing()


def _close_stdin(stream: Any) -> None:
    """Half-close the hijacked connection: the daemon closes the container's stdin (StdinOnce)
    and stdout keeps coming. aiodocker's Stream.close() would close both directions."""
    transport = _transport(stream)
    if transport is not None and transport.can_write_eof():
        transport.write_eof()


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
