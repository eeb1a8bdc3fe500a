"""The container runner: report parsing (pure), the sandbox configuration, `Runner` against a
fake daemon whose calls can hang (no Docker needed), and the warm path against the real Docker
(the URL on stdin, the stdout cap, the timeout kill, removal, never a second use, takeover)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aiodocker
import orjson
import pytest
from aiodocker.stream import Message

from safeurl_worker import runner as runner_mod
from safeurl_worker.config import ConfigError, Settings, load_settings
from safeurl_worker.runner import (
    LABEL_JOB,
    LABEL_WORKER,
    WARM_PREFIX,
    DockerUnavailable,
    FetcherNetworkMissing,
    Runner,
    RunStatus,
    container_config,
    parse_report,
    render_config,
)

from .conftest import FETCHER_IMAGE, REDIS_URL, ROOT, TestNet, _derived_image, docker

GOOD = {"fetcher_version": "1.0", "requested_url": "http://a.test/", "final_url": "http://a.test/",
        "http_status": 200, "body_size": 3, "error": None}


def test_valid_report_parses() -> None:
    r = parse_report(orjson.dumps(GOOD) + b"\n", 1 << 20)
    assert r.status is RunStatus.OK and r.report is not None
    assert r.report.http_status == 200


def test_output_over_cap_is_invalid() -> None:
    r = parse_report(orjson.dumps(GOOD) + b" " * 5000, 4096)
    assert r.status is RunStatus.OUTPUT_INVALID and "over" in r.detail


def test_not_json_empty_and_unknown_keys_are_invalid() -> None:
    assert parse_report(b"hello", 4096).status is RunStatus.OUTPUT_INVALID
    assert parse_report(b"", 4096).status is RunStatus.OUTPUT_INVALID
    extra = parse_report(orjson.dumps({**GOOD, "surprise": 1}), 4096)
    assert extra.status is RunStatus.OUTPUT_INVALID and "surprise" in extra.detail
    two = parse_report(orjson.dumps(GOOD) + b"\n" + orjson.dumps(GOOD), 4096)
    assert two.status is RunStatus.OUTPUT_INVALID


def test_sandbox_settings() -> None:
    s = load_settings(container_memory_limit_mb=256, container_cpu_limit=0.5,
                      redis_password="s3cret", fetcher_network="none")
    job = uuid.uuid4()
    c = container_config(s, job, "http://a.test/")
    hc = c["HostConfig"]
    assert c["Cmd"] == ["http://a.test/"]
    assert c["User"] == "65534:65534"
    assert c["Labels"] == {LABEL_JOB: str(job), LABEL_WORKER: s.worker_id}
    assert hc["Memory"] == hc["MemorySwap"] == 256 * 1024 * 1024
    assert hc["NanoCpus"] == 500_000_000
    assert hc["ReadonlyRootfs"] is True and hc["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["PidsLimit"] > 0 and "/tmp" in hc["Tmpfs"]
    limits = {u["Name"]: (u["Soft"], u["Hard"]) for u in hc["Ulimits"]}
    assert limits["core"] == (0, 0) and limits["nofile"][1] <= 1024
    assert limits["fsize"] == (s.container_tmpfs_mb * 2**20,) * 2
    assert 0 < hc["ShmSize"] <= 16 * 2**20
    assert hc["DnsSearch"] == ["."] and "Dns" not in hc  # no host search domains
    assert hc["Binds"] == [] and hc["NetworkMode"] == "none" and c["NetworkDisabled"] is True
    assert not any("s3cret" in e for e in c["Env"])


def test_stdin_form_differs_from_the_docker_run_form_only_in_how_the_url_arrives() -> None:
    s = load_settings(fetcher_network="none")
    job = uuid.uuid4()
    argv, warm, cold = (container_config(s, job, "http://a.test/"), container_config(s, None),
                        container_config(s, job))
    url_keys = {"Cmd", "AttachStdin", "AttachStdout", "OpenStdin", "StdinOnce", "Labels"}
    for form in (warm, cold):
        assert {k: v for k, v in form.items() if k not in url_keys} == \
            {k: v for k, v in argv.items() if k not in url_keys}  # every sandbox setting
        assert form["Cmd"] == [] and form["OpenStdin"] and form["StdinOnce"]
        assert form["AttachStdin"] and form["AttachStdout"] and not form["AttachStderr"]
    assert not argv["OpenStdin"] and not argv["AttachStdout"]
    assert warm["Labels"] == {LABEL_JOB: "", LABEL_WORKER: s.worker_id}  # no job yet
    assert cold["Labels"] == argv["Labels"] == {LABEL_JOB: str(job), LABEL_WORKER: s.worker_id}


def test_render_config_is_the_sandbox_with_the_browsers_image_limits_and_cap() -> None:
    s = load_settings(fetcher_network="none", browser_memory_limit_mb=1024,
                      browser_pids_limit=256, browser_output_max_bytes=4 << 20)
    job = uuid.uuid4()
    fetcher, browser = container_config(s, job), render_config(s, job)
    assert browser["Image"] == s.browser_image != fetcher["Image"]
    hc = browser["HostConfig"]
    assert hc["Memory"] == hc["MemorySwap"] == 1024 * 2**20 and hc["PidsLimit"] == 256
    assert browser["Env"] == [*fetcher["Env"], f"RENDER_MAX_OUTPUT_BYTES={4 << 20}"]
    swapped = {"Memory", "MemorySwap", "PidsLimit"}
    # Everything else is the fetcher's sandbox, setting for setting (user, read-only root,
    # caps, tmpfs, ulimits, network, DNS, runtime, labels, the URL on stdin).
    assert {k: v for k, v in hc.items() if k not in swapped} == \
        {k: v for k, v in fetcher["HostConfig"].items() if k not in swapped}
    assert {k: v for k, v in browser.items() if k not in ("Image", "Env", "HostConfig")} == \
        {k: v for k, v in fetcher.items() if k not in ("Image", "Env", "HostConfig")}
    assert runner_mod.output_cap(s, "render") == 4 << 20
    assert runner_mod.output_cap(s, "static") == s.container_output_max_bytes


# --- Runner against a fake daemon: every Docker call is bounded, a hung daemon is not a TIMEOUT ---

STARTED = "2024-05-01T12:00:00.000000001Z"
NOT_FINISHED = "0001-01-01T00:00:00Z"


class FakeTransport:
    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.daemon.stream_broken

    def write_eof(self) -> None:
        self.daemon.calls.append("stdin-eof")


class FakeStream:
    """aiodocker's attach Stream: stdin recorded, stdout from `daemon.stdout`."""

    def __init__(self, daemon: FakeDaemon) -> None:
        self.daemon = daemon
        conn = type("Conn", (), {"transport": FakeTransport(daemon)})()
        self._resp = type("Resp", (), {"connection": conn})()
        self._chunks = iter(daemon.stdout)

    async def __aenter__(self) -> FakeStream:
        await self.daemon._answer("attach")
        return self

    async def write_in(self, data: bytes) -> None:
        self.daemon.stdin += data

    async def read_out(self) -> Message | None:
        d = self.daemon
        await d.started.wait()  # nothing comes out before start
        chunk = next(self._chunks, None)
        if chunk is not None:
            d.chunks_read += 1
            return Message(1, chunk.encode())
        await d._answer("log")  # end of stream, or a stream that stalls
        return None

    async def close(self) -> None:
        self.daemon.log_closed = True


class FakeEvents:
    """docker.events: a `die` event for the container as it starts, if `daemon.die_code`."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def subscribe(self, *, filters: str) -> FakeEvents:
        assert json.loads(filters)["event"] == ["die"]
        return self

    async def get(self) -> dict[str, Any] | None:
        return await self.queue.get()

    async def stop(self) -> None:
        pass


class FakeDaemon:
    """The aiodocker surface the runner uses (docker.version, docker.images.inspect,
    docker.containers.create/list and one container's rename/attach/start/wait/show/kill/delete).
    A call named in `hang` never answers, as with a SIGSTOPped dockerd; every call is recorded in
    `calls` before it answers or hangs."""

    def __init__(self, *, hang: set[str] | None = None, exit_code: int = 0,
                 state: dict[str, Any] | None = None, stdout: list[str] | None = None) -> None:
        self.hang = hang or set()
        self.exit_code = exit_code
        self.state = state or {"Running": True, "StartedAt": STARTED, "FinishedAt": NOT_FINISHED}
        self.stdout = [orjson.dumps(GOOD).decode()] if stdout is None else stdout
        self.calls: list[str] = []
        self.stdin = b""
        self.names: list[str] = []
        self.image_id = "sha256:one"
        self.chunks_read = 0
        self.log_closed = False
        self.deleted = 0
        self.started = asyncio.Event()
        self.waiting = asyncio.Event()  # wait() was called: the container is running
        self.containers = self  # docker.containers.create / .list
        self.images = self  # docker.images.inspect
        self.events = FakeEvents()
        self.die_code: int | None = None
        self.stream_broken = False
        self.id = "fake-container"

    async def _answer(self, name: str) -> None:
        self.calls.append(name)
        if name in self.hang:
            await asyncio.Event().wait()  # never set

    async def version(self) -> dict[str, Any]:
        await self._answer("version")
        return {"Version": "fake"}

    async def inspect(self, name: str) -> dict[str, Any]:
        await self._answer("image")
        return {"Id": self.image_id}

    async def create(self, *, config: dict[str, Any], name: str) -> FakeDaemon:
        await self._answer("create")
        self.names.append(name)
        return self  # the daemon doubles as its single container

    def container(self, name: str) -> FakeDaemon:
        self.calls.append("container")  # a handle by name: no daemon call
        return self

    async def list(self, **kwargs: Any) -> list[dict[str, Any]]:
        await self._answer("list")
        return []

    async def rename(self, name: str) -> None:
        await self._answer("rename")
        self.names.append(name)

    def attach(self, *, stdin: bool, stdout: bool, stderr: bool) -> FakeStream:
        assert stdin and stdout and not stderr
        return FakeStream(self)

    async def start(self) -> None:
        await self._answer("start")
        self.started.set()
        if self.die_code is not None:
            attributes = {"exitCode": str(self.die_code)}
            self.events.queue.put_nowait({"id": self.id, "Actor": {"Attributes": attributes}})

    async def wait(self) -> dict[str, Any]:
        self.waiting.set()
        await self._answer("wait")
        return {"StatusCode": self.exit_code}

    async def show(self) -> dict[str, Any]:
        await self._answer("show")
        return {"State": self.state, "Image": self.image_id}

    async def kill(self) -> None:
        await self._answer("kill")

    async def delete(self, *, force: bool) -> None:
        assert force
        await self._answer("delete")
        self.deleted += 1


@pytest.fixture
def fast_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_mod, "_API_TIMEOUT", 0.2)
    monkeypatch.setattr(runner_mod, "_PROBE_TIMEOUT", 0.1)


def make_runner(daemon: FakeDaemon, **overrides: Any) -> Runner:
    # The container timeout's lower bound (1 s) is the shortest run these tests can judge.
    # Created ahead, not started, unless a test starts them (warm_start=True): the tests of
    # the pool's mechanics were written for the plain form, the started form has its own.
    settings = load_settings(container_timeout_ms=1000, container_output_max_bytes=4096,
                             **{"warm_start": False, **overrides})
    return Runner(settings, cast(Any, daemon))


async def run_settled(runner: Runner, url: str = "http://a.test/") -> runner_mod.RunResult:
    """A run, then its background removal finished."""
    try:
        return await runner.run(uuid.uuid4(), url)
    finally:
        await runner.settle()


@pytest.mark.usefixtures("fast_timeouts")
async def test_hung_daemon_during_wait_is_docker_unavailable_not_timeout() -> None:
    daemon = FakeDaemon(hang={"wait", "show", "kill", "delete"})
    with pytest.raises(DockerUnavailable, match="daemon does not answer"):
        await run_settled(make_runner(daemon))
    assert "kill" not in daemon.calls  # nothing was judged, so nothing was killed
    assert "delete" in daemon.calls  # attempted; the janitor removes it if the daemon stays hung


@pytest.mark.usefixtures("fast_timeouts")
async def test_overrun_with_responsive_daemon_is_timeout_and_killed() -> None:
    daemon = FakeDaemon(hang={"wait"})
    result = await run_settled(make_runner(daemon))
    assert result.status is RunStatus.TIMEOUT
    assert daemon.calls[-3:] == ["show", "kill", "delete"] and daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
@pytest.mark.parametrize(("finished", "status"), [
    ("2024-05-01T12:00:00.5Z", RunStatus.OK),  # exited in time; only the daemon was slow
    ("2024-05-01T12:00:01.5Z", RunStatus.TIMEOUT),  # it ran past the limit by its own clock
])
async def test_exit_hidden_by_slow_daemon_is_judged_by_container_run_time(
        finished: str, status: RunStatus) -> None:
    daemon = FakeDaemon(hang={"wait"}, state={"Running": False, "ExitCode": 0,
                                              "StartedAt": STARTED, "FinishedAt": finished})
    result = await run_settled(make_runner(daemon))
    assert result.status is status, result.detail
    assert ("kill" in daemon.calls) is (status is RunStatus.TIMEOUT)
    assert daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
async def test_hung_stdout_stream_is_docker_unavailable_not_output_invalid() -> None:
    daemon = FakeDaemon(hang={"log"})  # one chunk of the report, then the stream stalls
    with pytest.raises(DockerUnavailable):
        await run_settled(make_runner(daemon))
    assert daemon.chunks_read == 1 and daemon.log_closed
    assert daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
async def test_stdout_read_stops_one_chunk_past_the_cap() -> None:
    daemon = FakeDaemon(stdout=["x" * 1000] * 50, hang={"wait"})  # still running when over
    t0 = time.monotonic()
    result = await run_settled(make_runner(daemon))
    assert result.status is RunStatus.OUTPUT_INVALID and "over 4096" in result.detail
    assert daemon.chunks_read == 5 and daemon.log_closed  # 5000 bytes > cap; rest never read
    assert "kill" in daemon.calls and daemon.deleted  # killed at once, not at the timeout
    assert time.monotonic() - t0 < 0.9


@pytest.mark.usefixtures("fast_timeouts")
async def test_successful_run_sends_the_url_on_stdin_reads_report_and_deletes() -> None:
    daemon = FakeDaemon()
    result = await run_settled(make_runner(daemon), "http://a.test/x\r\n")
    assert result.status is RunStatus.OK and result.report is not None
    # Attached and stdin closed before start: nothing of stdout is missed, the URL is waiting.
    assert daemon.calls[:4] == ["create", "attach", "stdin-eof", "start"]
    assert sorted(daemon.calls[4:]) == ["delete", "log", "wait"]  # read while waiting
    assert daemon.stdin == b"http://a.test/x\n"  # exactly one line
    assert daemon.deleted and daemon.log_closed


@pytest.mark.usefixtures("fast_timeouts")
@pytest.mark.parametrize("call", ["create", "attach", "start"])
async def test_hung_create_attach_or_start_is_docker_unavailable(call: str) -> None:
    daemon = FakeDaemon(hang={call})
    with pytest.raises(DockerUnavailable):
        await run_settled(make_runner(daemon))
    # The container always goes: after a create that got no answer, by its own name (the
    # daemon may have made it).
    assert daemon.deleted
    assert ("container" in daemon.calls) is (call == "create")


@pytest.mark.usefixtures("fast_timeouts")
async def test_hung_list_is_docker_unavailable() -> None:
    daemon = FakeDaemon(hang={"list"})
    with pytest.raises(DockerUnavailable):
        await make_runner(daemon).remove_labelled(uuid.uuid4())


@pytest.mark.usefixtures("fast_timeouts")
async def test_hung_daemon_fails_ping() -> None:
    assert await make_runner(FakeDaemon()).ping() is True
    assert await make_runner(FakeDaemon(hang={"version"})).ping() is False


@pytest.mark.usefixtures("fast_timeouts")
async def test_cancelled_run_still_deletes_its_container() -> None:
    daemon = FakeDaemon(hang={"wait"})
    runner = make_runner(daemon)
    task = asyncio.create_task(runner.run(uuid.uuid4(), "http://a.test/"))
    await daemon.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await runner.settle()
    assert daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
async def test_container_that_could_not_be_removed_is_removed_by_the_next_run() -> None:
    daemon = FakeDaemon(hang={"delete"})  # Docker stops answering as the scan ends
    runner = make_runner(daemon)
    await run_settled(runner)
    assert not daemon.deleted
    daemon.hang = set()  # Docker is back
    daemon.calls.clear()
    await run_settled(runner)
    # The leftover goes by its own id (a handle, no label search), beside the new run.
    assert daemon.calls[0] == "container" and "create" in daemon.calls
    assert daemon.deleted == 2


# --- the warm pool, on the fake daemon ------------------------------------------------------

async def until(cond: Callable[[], bool], timeout: float = 10) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within {timeout}s")


@contextlib.asynccontextmanager
async def warm_pool(runner: Runner, n: int = 1) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(runner.keep_warm())
    try:
        await until(lambda: len(runner._warm) >= n)
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.usefixtures("fast_timeouts")
async def test_warm_container_is_renamed_for_its_job_before_it_starts() -> None:
    daemon = FakeDaemon()
    runner = make_runner(daemon, worker_concurrency=1)
    async with warm_pool(runner):
        assert daemon.names[0].startswith(WARM_PREFIX)
        daemon.calls.clear()
        job = uuid.uuid4()
        result = await runner.run(job, "http://a.test/")
        await runner.settle()
        assert result.status is RunStatus.OK
        assert daemon.names[1].startswith(f"safeurl-{job}-")
        # Renamed first, then started; the only create is the pool's next container (every
        # slot busy: one is made for the next job meanwhile).
        assert daemon.calls[0] == "rename" and daemon.calls.count("create") == 1
        assert daemon.calls.index("rename") < daemon.calls.index("start")
        assert daemon.names[2].startswith(WARM_PREFIX)
    assert runner._warm == []


class RecordingDaemon(FakeDaemon):
    """Also keeps the config of every container created."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.configs: list[dict[str, Any]] = []

    async def create(self, *, config: dict[str, Any], name: str) -> FakeDaemon:
        self.configs.append(config)
        return await super().create(config=config, name=name)


@pytest.mark.usefixtures("fast_timeouts")
async def test_render_run_is_created_at_job_time_never_warm_and_reads_its_own_cap() -> None:
    # A render report bigger than the fetcher's cap (4096 here) but under the browser's.
    big = orjson.dumps({**GOOD, "render": {"dom": "x" * 6000}}).decode()
    daemon = RecordingDaemon(stdout=[big])
    runner = make_runner(daemon, worker_concurrency=1, browser_output_max_bytes=65536)
    async with warm_pool(runner):
        daemon.calls.clear()
        job = uuid.uuid4()
        result = await runner.run(job, "http://a.test/", mode="render")
        await runner.settle()
        assert result.status is RunStatus.OK, result.detail
        # No warm container was taken (no rename): one was created for the job, by its name.
        assert "rename" not in daemon.calls and daemon.calls[0] == "create"
        assert daemon.configs[-1] == render_config(runner.settings, job)
        assert daemon.names[-1].startswith(f"safeurl-{job}-") and daemon.stdin == \
            b"http://a.test/\n"
        assert len(runner._warm) == 1  # the fetcher's warm container is still there
        # The same report from the fetcher is over its cap.
        daemon.stdout = [big]
        assert (await runner.run(uuid.uuid4(), "http://a.test/")).status is \
            RunStatus.OUTPUT_INVALID
        await runner.settle()


@pytest.mark.usefixtures("fast_timeouts")
@pytest.mark.parametrize("change", ["image", "settings", "rename fails"])
async def test_unusable_warm_container_falls_back_to_create_at_job_time(change: str) -> None:
    daemon = FakeDaemon()
    runner = make_runner(daemon, worker_concurrency=1)
    async with warm_pool(runner):
        daemon.calls.clear()
        if change == "image":
            daemon.image_id = "sha256:two"  # FETCHER_IMAGE was re-tagged
        elif change == "settings":
            runner.settings = load_settings(container_timeout_ms=1000,
                                            container_output_max_bytes=8192,
                                            worker_concurrency=1)
        else:
            daemon.hang = {"rename"}
        result = await runner.run(uuid.uuid4(), "http://a.test/")
        await runner.settle()
        assert result.status is RunStatus.OK
        i = daemon.calls.index("create")
        if change == "settings":  # judged before the rename: it never carries the job's name
            assert "rename" not in daemon.calls[:i] and i < daemon.calls.index("start")
        else:  # the image is judged with the rename (one round trip), and a failed rename
            assert daemon.calls.index("rename") < i < daemon.calls.index("start")
        assert daemon.deleted >= 2  # the unused warm one, and the job's


@pytest.mark.usefixtures("fast_timeouts")
@pytest.mark.parametrize("code", [0, 3])
async def test_die_event_gives_the_exit_code_before_wait_answers(code: int) -> None:
    # `wait` answers only once the daemon released the container's network and mounts; the
    # `die` event carries the same exit code earlier.
    daemon = FakeDaemon(hang={"wait"})
    daemon.die_code = code
    runner = make_runner(daemon, worker_concurrency=1)
    async with warm_pool(runner):
        result = await runner.run(uuid.uuid4(), "http://a.test/")
    assert result.status is (RunStatus.OK if code == 0 else RunStatus.CRASHED)
    assert result.seconds < 0.9 and "kill" not in daemon.calls  # no timeout involved
    assert runner._exits == {}


@pytest.mark.usefixtures("fast_timeouts")
async def test_started_ahead_container_gets_its_url_and_is_not_started_again() -> None:
    daemon = FakeDaemon()
    runner = make_runner(daemon, worker_concurrency=2, warm_start=True)
    async with warm_pool(runner, 2):
        assert daemon.calls[:4] == ["create", "show", "attach", "start"]  # made, started
        daemon.calls.clear()
        result = await runner.run(uuid.uuid4(), "http://a.test/")
        await runner.settle()
    assert result.status is RunStatus.OK
    calls = [c for c in daemon.calls if c != "image"]  # the pool checks the image too
    assert calls[:2] == ["rename", "stdin-eof"]  # named for its job before it has the URL
    run = daemon.calls[:daemon.calls.index("wait")]  # (the pool refills afterwards)
    assert "start" not in run and "create" not in run
    assert daemon.stdin == b"http://a.test/\n"


@pytest.mark.usefixtures("fast_timeouts")
@pytest.mark.parametrize("broken", ["died", "stream"])
async def test_started_ahead_container_that_died_waiting_is_not_used(broken: str) -> None:
    daemon = FakeDaemon()
    runner = make_runner(daemon, worker_concurrency=2, warm_start=True)
    async with warm_pool(runner, 2):
        if broken == "died":
            runner._exits[daemon.id].set_result(137)  # e.g. killed while it waited
        else:
            daemon.stream_broken = True  # the daemon restarted: our attach stream is gone
        daemon.calls.clear()
        result = await runner.run(uuid.uuid4(), "http://a.test/")
        await runner.settle()
    assert result.status is RunStatus.OK
    # Discarded before it was renamed: a started container that never gets a URL must not
    # look like the job's run (it would be counted against the job's domain). A container
    # made for the job ran it.
    i = daemon.calls.index("create")
    assert "rename" not in daemon.calls[:i] and i < daemon.calls.index("start")


@pytest.mark.usefixtures("fast_timeouts")
async def test_warm_containers_are_recycled_well_before_the_orphan_age() -> None:
    daemon = FakeDaemon()
    runner = make_runner(daemon, worker_concurrency=1)
    # A live worker's warm containers never reach the age at which the janitor takes them
    # for a dead worker's.
    assert runner.warm_max_age_s <= runner_mod.orphan_age_s(runner.settings) / 2
    runner.warm_max_age_s = 0.2
    async with warm_pool(runner):
        first = runner._warm[0].made
        await until(lambda: bool(runner._warm) and runner._warm[0].made > first, timeout=3)
        await runner.settle()
        assert daemon.deleted >= 1  # the old one went


# --- the warm path against the real Docker --------------------------------------------------

@pytest.fixture(scope="module")
def sleeper_image() -> str:
    """Reads its line from stdin, then runs until killed."""
    return _derived_image("safeurl-test-sleeper:latest", '["python3", "-c", '
                          '"import sys, time; sys.stdin.readline(); time.sleep(120)"]')


@pytest.fixture(scope="module")
def flood_image() -> str:
    """Writes 8 MiB to stdout, then runs until killed."""
    return _derived_image("safeurl-test-flood:latest", '["python3", "-c", '
                          '"import sys, time; sys.stdout.write(\\"x\\" * (8 << 20)); '
                          'sys.stdout.flush(); time.sleep(120)"]')


def real_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "fetcher_image": FETCHER_IMAGE, "fetcher_network": "none", "worker_concurrency": 2,
        "worker_id": f"w-runner-{uuid.uuid4().hex[:8]}", "container_timeout_ms": 30000,
        "warm_start": False}  # as make_runner
    return Settings(**{**base, **overrides})


def net_settings(testnet: TestNet, **overrides: Any) -> Settings:
    return real_settings(fetcher_network=testnet.name, fetch_allow_cidrs=testnet.subnet,
                         fetch_allowed_ports="80", **overrides)


def containers_of(settings: Settings, *filters: str) -> list[str]:
    args = ["ps", "-aq", "--no-trunc", "--filter", f"label={LABEL_WORKER}={settings.worker_id}"]
    for f in filters:
        args += ["--filter", f]
    return docker(*args).split()


def inspect(cid: str) -> dict[str, Any] | None:
    out = docker("inspect", cid, check=False)
    data: list[dict[str, Any]] = json.loads(out or "[]")
    return data[0] if data else None


def forbid_cold_create(runner: Runner) -> None:
    """Fail the run if the warm path falls back to creating a container for the job."""

    async def no_cold_create(job_id: uuid.UUID) -> None:
        raise AssertionError("the warm path fell back to creating a container")

    runner._create = no_cold_create  # type: ignore[method-assign,assignment]


@contextlib.asynccontextmanager
async def real_runner(settings: Settings) -> AsyncIterator[Runner]:
    client = aiodocker.Docker(url="unix:///var/run/docker.sock")
    runner = Runner(settings, client)
    try:
        yield runner
    finally:
        await runner.settle()
        await client.close()
        if left := containers_of(settings):  # a failed test leaves nothing behind
            docker("rm", "-f", *left, check=False)


@pytest.mark.integration
async def test_warm_containers_get_the_url_on_stdin_serve_once_and_go(testnet: TestNet) -> None:
    settings = net_settings(testnet)
    async with real_runner(settings) as runner:

        forbid_cold_create(runner)
        async with warm_pool(runner, 2):
            before = {w.container.id for w in runner._warm}
            info = inspect(next(iter(before)))
            assert info is not None and info["State"]["Status"] == "created"
            assert info["Name"].startswith(f"/{WARM_PREFIX}") and not info["Config"]["Cmd"]
            assert info["Config"]["OpenStdin"] and info["Config"]["StdinOnce"]
            used: list[str] = []
            for path in ("/", "/about"):
                pool = {w.container.id for w in runner._warm}
                result = await runner.run(uuid.uuid4(), f"http://site-a.test{path}")
                assert result.status is RunStatus.OK, result.detail
                assert result.report is not None  # the URL came on stdin: no Cmd
                assert result.report.requested_url == f"http://site-a.test{path}"
                assert result.report.http_status == 200
                taken = pool - {w.container.id for w in runner._warm}
                assert len(taken) == 1  # a warm one ran it, and left the pool for good
                used += taken
                await runner.settle()
                assert inspect(used[-1]) is None  # removed
            assert len(set(used)) == 2 and set(used) <= before
            await until(lambda: len(runner._warm) == 2)  # refilled
        assert containers_of(settings) == []  # shutdown removes the warm ones


@pytest.mark.integration
async def test_stdout_over_the_cap_is_invalid_and_killed_at_once(flood_image: str) -> None:
    settings = real_settings(fetcher_image=flood_image, container_output_max_bytes=4096)
    async with real_runner(settings) as runner, warm_pool(runner, 1):
        t0 = time.monotonic()
        result = await runner.run(uuid.uuid4(), "http://a.test/")
        assert result.status is RunStatus.OUTPUT_INVALID and "over 4096" in result.detail
        assert time.monotonic() - t0 < 15  # killed at the cap, not at the 30 s timeout
        await runner.settle()
        assert containers_of(settings, f"name=safeurl-{uuid.UUID(int=0)}") == []


@pytest.mark.integration
async def test_warm_container_past_the_timeout_is_killed_and_removed(sleeper_image: str) -> None:
    settings = real_settings(fetcher_image=sleeper_image, container_timeout_ms=1000)
    async with real_runner(settings) as runner, warm_pool(runner, 2):
        job = uuid.uuid4()
        result = await runner.run(job, "http://a.test/")
        assert result.status is RunStatus.TIMEOUT and result.seconds < 10
        await runner.settle()
        assert containers_of(settings, f"name=safeurl-{job}-") == []


@pytest.mark.integration
@pytest.mark.parametrize("warm_start", [False, True])
async def test_remove_labelled_finds_the_running_warm_started_container_of_a_job(
        sleeper_image: str, warm_start: bool) -> None:
    settings = real_settings(fetcher_image=sleeper_image, warm_start=warm_start)
    async with real_runner(settings) as runner, warm_pool(runner, 2):
        job = uuid.uuid4()
        run = asyncio.create_task(runner.run(job, "http://a.test/"))
        await until(lambda: bool(containers_of(settings, f"name=safeurl-{job}-",
                                               "status=running")))
        running = containers_of(settings, f"name=safeurl-{job}-")
        await asyncio.sleep(0.3)  # started ahead: the URL is being written
        assert inspect(running[0])["Config"]["Labels"][LABEL_JOB] == ""  # type: ignore[index]
        # Another replica taking the job over: by the job's id alone.
        async with real_runner(real_settings()) as new_owner:
            assert await new_owner.remove_labelled(uuid.uuid4()) == 0  # nobody else's
            assert await new_owner.remove_labelled(job) == 1
        assert inspect(running[0]) is None
        with contextlib.suppress(DockerUnavailable):
            result = await asyncio.wait_for(run, 20)
            assert result.status is not RunStatus.OK
        await until(lambda: len(runner._warm) == 2)  # the pool is untouched, and refilled
        assert all(inspect(w.container.id) for w in runner._warm)


@pytest.mark.integration
async def test_started_ahead_container_gets_the_url_and_its_limits_start_with_it(
        testnet: TestNet) -> None:
    # A 1 s limit, and the container waits 3 s for its job (past its own in-container alarm,
    # 0.7 s + 2 s): neither counts that wait.
    settings = net_settings(testnet, warm_start=True, container_timeout_ms=1000)
    async with real_runner(settings) as runner, warm_pool(runner, 2):
        forbid_cold_create(runner)
        cid = runner._warm[0].container.id
        assert inspect(cid)["State"]["Running"]  # type: ignore[index]
        await asyncio.sleep(3)
        result = await runner.run(uuid.uuid4(), "http://site-a.test/")
        assert result.status is RunStatus.OK, result.detail
        assert result.report is not None
        assert result.report.requested_url == "http://site-a.test/"
        await runner.settle()
        assert inspect(cid) is None  # the one that ran it (the first in the pool) is gone


@pytest.mark.integration
async def test_started_ahead_warm_container_of_a_dead_worker_goes_by_start_time(
        sleeper_image: str) -> None:
    settings = real_settings(fetcher_image=sleeper_image, warm_start=True)
    async with real_runner(settings) as dead, real_runner(real_settings()) as janitor:
        await dead._make_warm()  # started, waiting for a URL; then its worker dies
        cid = dead._warm[0].container.id
        # Judged on its own container: the daemon may hold other tests' leftovers, which the
        # janitor rightly removes too.
        await janitor.remove_labelled(older_than_s=3)
        assert inspect(cid) is not None  # not old yet
        await asyncio.sleep(3.5)
        assert await janitor.remove_labelled(older_than_s=3) >= 1
        assert inspect(cid) is None
        for w in dead._warm:  # its connection, as the dead worker's process exit would
            await w.stream.close()
        dead._warm.clear()


@pytest.mark.integration
async def test_orphans_by_age_never_started_by_creation_and_started_by_start(
        sleeper_image: str) -> None:
    """A dead worker's warm containers go once older than the limit; a warm container that
    waited that long and then started is a live scan, judged by its start."""
    settings = real_settings(fetcher_image=sleeper_image, warm_containers=True)
    async with real_runner(settings) as dead, real_runner(real_settings()) as janitor:
        await dead._make_warm()  # and its worker dies: nobody removes it
        await dead._make_warm()
        orphans = [w.container.id for w in dead._warm]
        await asyncio.sleep(3.5)
        job = uuid.uuid4()
        run = asyncio.create_task(dead.run(job, "http://a.test/"))  # takes one of the two
        await until(lambda: bool(containers_of(settings, f"name=safeurl-{job}-",
                                               "status=running")))
        assert await janitor.remove_labelled(older_than_s=3) >= 1
        left = [cid for cid in orphans if inspect(cid)]
        assert len(left) == 1  # the never-started one went; the running one stays
        assert inspect(left[0])["State"]["Running"]  # type: ignore[index]
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


def test_fetcher_dns_servers_come_from_config() -> None:
    s = load_settings(fetcher_dns=" 192.0.2.53, 2001:db8::53 ", fetcher_user_agent="UA/1")
    hc = container_config(s, uuid.uuid4(), "http://a.test/")["HostConfig"]
    assert hc["Dns"] == ["192.0.2.53", "2001:db8::53"] and hc["DnsSearch"] == ["."]
    assert "FETCH_USER_AGENT=UA/1" in container_config(s, uuid.uuid4(), "http://a.test/")["Env"]


# --- FETCHER_RUNTIME: the same sandbox under gVisor -----------------------------------------

KERNEL_PROBE = ("import os, urllib.request; print(os.uname().release); "
                "print(urllib.request.urlopen('http://site-a.test/', timeout=20).status)")


@pytest.mark.integration
async def test_fetcher_runtime_puts_every_sandbox_container_under_gvisor(
        testnet: TestNet) -> None:
    """FETCHER_RUNTIME=runsc (registered by scripts/services.sh): the worker's sandbox
    configuration runs on the network with gVisor's kernel, not the host's. (A whole scan is
    not asserted here: this runsc build sometimes exits 2 after a complete report, a known
    defect documented in docs/deploy.md.)"""
    if '"runsc"' not in docker("info", "--format", "{{json .Runtimes}}"):
        pytest.fail("the runsc runtime is not registered with dockerd (scripts/services.sh)")
    settings = net_settings(testnet, fetcher_runtime="runsc")
    cfg = container_config(settings, uuid.uuid4())
    assert cfg["HostConfig"]["Runtime"] == "runsc"
    assert render_config(settings, uuid.uuid4())["HostConfig"]["Runtime"] == "runsc"
    assert "Runtime" not in container_config(net_settings(testnet), None)["HostConfig"]
    async with real_runner(settings) as runner:
        # The worker's configuration with only the program swapped: the kernel it runs on, and
        # a fetch of the test host over the container's own network.
        probe = await runner.docker.containers.create(
            config={**cfg, "Entrypoint": ["python3", "-c", KERNEL_PROBE], "Cmd": [],
                    "AttachStdin": False, "OpenStdin": False, "StdinOnce": False},
            name=f"safeurl-runtime-probe-{uuid.uuid4().hex[:8]}")
        try:
            await probe.start()
            await asyncio.wait_for(probe.wait(), 60)
            out = "".join(await probe.log(stdout=True)).split()
            info = inspect(probe.id)
        finally:
            await probe.delete(force=True)
    assert info is not None and info["HostConfig"]["Runtime"] == "runsc"
    assert out[:2] == ["4.4.0", "200"] and os.uname().release != "4.4.0", out


# --- FETCHER_SECCOMP_PROFILE: the filter pinned in the package, by default ------------------

SHIPPED_SECCOMP = ROOT / "safeurl_worker" / "data" / "seccomp-default.json"


def test_the_shipped_seccomp_profile_is_the_default_passed_as_its_text(tmp_path: Path) -> None:
    shipped = load_settings()
    assert Path(shipped.fetcher_seccomp_profile) == Path(runner_mod.__file__).parent / "data" / \
        "seccomp-default.json"
    opts = container_config(shipped, uuid.uuid4(), "http://a.test/")["HostConfig"]["SecurityOpt"]
    assert opts[0] == "no-new-privileges" and len(opts) == 2
    assert json.loads(opts[1].removeprefix("seccomp=")) == json.loads(SHIPPED_SECCOMP.read_text())
    # An operator's own file, the same way.
    own = tmp_path / "own.json"
    own.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": []}')
    opts = container_config(load_settings(fetcher_seccomp_profile=str(own)), None)[
        "HostConfig"]["SecurityOpt"]
    assert opts == ["no-new-privileges", 'seccomp={"defaultAction":"SCMP_ACT_ERRNO","syscalls":[]}']
    # `daemon`: no profile named, the daemon applies its built-in one.
    daemon = load_settings(fetcher_seccomp_profile="daemon")
    assert daemon.fetcher_seccomp_profile == "daemon"
    assert container_config(daemon, None)["HostConfig"]["SecurityOpt"] == ["no-new-privileges"]


def test_a_missing_or_broken_seccomp_profile_stops_start_up(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"names": []}')
    # `unconfined` is not a way out of the filter: it is read as a (missing) file.
    for path in (str(tmp_path / "missing.json"), str(broken), "unconfined"):
        with pytest.raises(ConfigError, match="FETCHER_SECCOMP_PROFILE"):
            load_settings(fetcher_seccomp_profile=path)


@pytest.mark.integration
async def test_a_scan_runs_under_the_shipped_seccomp_profile(testnet: TestNet) -> None:
    settings = net_settings(testnet)  # FETCHER_SECCOMP_PROFILE unset
    assert settings.fetcher_seccomp_profile == str(SHIPPED_SECCOMP.resolve())
    async with real_runner(settings) as runner:
        result = await runner.run(uuid.uuid4(), "http://site-a.test/")
    assert result.status is RunStatus.OK, result.detail
    assert result.report is not None and result.report.http_status == 200


@pytest.mark.integration
async def test_a_render_scan_runs_under_the_shipped_seccomp_profile(testnet: TestNet) -> None:
    """Chromium too: the browser sandbox gets the same filter (render_config) and renders."""
    settings = net_settings(testnet, container_timeout_ms=60000)
    assert settings.fetcher_seccomp_profile == str(SHIPPED_SECCOMP.resolve())
    async with real_runner(settings) as runner:
        result = await runner.run(uuid.uuid4(), "http://site-a.test/", mode="render")
    assert result.status is RunStatus.OK, result.detail
    assert result.report is not None and result.report.http_status == 200
    assert result.report.render is not None


# --- FETCHER_NETWORK: the isolated network by default, checked at start-up ------------------


def test_fetcher_network_defaults_to_the_isolated_network_the_scripts_make() -> None:
    assert load_settings().fetcher_network == "safeurl-fetch"
    services = (ROOT / "scripts" / "services.sh").read_text()
    # The message's recipe for the default network is the script's own command.
    message = str(FetcherNetworkMissing("safeurl-fetch"))
    assert "`bash scripts/services.sh docker`" in message
    create = ("docker network create --driver bridge --opt com.docker.network.bridge.name="
              "br-safeurl --opt com.docker.network.bridge.enable_icc=false safeurl-fetch")
    assert create in message and create in " ".join(services.replace("\\\n", " ").split())
    with pytest.raises(ConfigError, match="FETCHER_NETWORK"):
        load_settings(fetcher_network="")


@pytest.mark.integration
async def test_a_missing_fetcher_network_is_refused_with_how_to_create_it(
        testnet: TestNet) -> None:
    name = f"safeurl-missing-{uuid.uuid4().hex[:8]}"  # no such network; none is created
    async with real_runner(real_settings(fetcher_network=name)) as runner:
        with pytest.raises(FetcherNetworkMissing) as err:
            await runner.check_network()
    assert isinstance(err.value, ConfigError)
    message = str(err.value)
    assert message.startswith(f"FETCHER_NETWORK={name}: no such Docker network.")
    assert (f"`docker network create --driver bridge --opt com.docker.network.bridge."
            f"enable_icc=false {name}`") in message
    assert "set FETCHER_NETWORK to an existing network" in message
    assert not docker("network", "ls", "-q", "--filter", f"name={name}")
    for existing in (testnet.name, "none", "bridge"):  # `none` and `bridge` always exist
        async with real_runner(real_settings(fetcher_network=existing)) as runner:
            await runner.check_network()


async def test_an_unreachable_daemon_does_not_decide_the_network_check(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Docker down at start-up is not a configuration error: the worker waits for Docker as
    it does during a run, and its containers then name the network (no fallback)."""
    client = aiodocker.Docker(url=f"unix://{tmp_path / 'no-docker.sock'}")
    try:
        with caplog.at_level("WARNING", logger="safeurl.runner"):
            await Runner(real_settings(fetcher_network="safeurl-fetch"), client).check_network()
    finally:
        await client.close()
    assert "could not check FETCHER_NETWORK" in caplog.text


@pytest.mark.integration
def test_the_worker_stops_at_start_up_when_its_network_is_missing() -> None:
    """`safeurl-worker run` ends at once (exit 2) with the one-line message, no traceback; it
    never falls back to another network, and never reads the stream."""
    name = f"safeurl-missing-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "FETCHER_NETWORK": name, "METRICS_PORT": "0", "LOG_FORMAT": "text",
           "SCAN_STREAM": f"scan-jobs-{uuid.uuid4().hex[:8]}", "WORKER_ID": "w-no-network"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "safeurl_worker", "run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == \
        f"safeurl-worker: invalid configuration: {FetcherNetworkMissing(name)}"
    assert time.monotonic() - started < 15
    exists = subprocess.run(["redis-cli", "-u", REDIS_URL, "exists", env["SCAN_STREAM"]],
                            capture_output=True, text=True, timeout=10, check=True)
    assert exists.stdout.strip() == "0"  # no consumer group was made: it stopped before

