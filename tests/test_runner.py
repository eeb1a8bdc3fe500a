"""The container runner: report parsing (pure), the sandbox configuration, and `Runner` against
a fake daemon whose calls can hang (no Docker needed)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
import pytest

from safeurl_worker import runner as runner_mod
from safeurl_worker.config import load_settings
from safeurl_worker.runner import (
    LABEL_JOB,
    LABEL_WORKER,
    DockerUnavailable,
    Runner,
    RunStatus,
    container_config,
    parse_report,
)

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


# --- Runner against a fake daemon: every Docker call is bounded, a hung daemon is not a TIMEOUT ---

STARTED = "2024-05-01T12:00:00.000000001Z"
NOT_FINISHED = "0001-01-01T00:00:00Z"


class FakeDaemon:
    """The aiodocker surface the runner uses (docker.version, docker.containers.create/list and
    one container's start/wait/show/log/kill/delete). A call named in `hang` never answers, as
    with a SIGSTOPped dockerd; every call is recorded in `calls` before it answers or hangs."""

    def __init__(self, *, hang: set[str] | None = None, exit_code: int = 0,
                 state: dict[str, Any] | None = None, stdout: list[str] | None = None) -> None:
        self.hang = hang or set()
        self.exit_code = exit_code
        self.state = state or {"Running": True, "StartedAt": STARTED, "FinishedAt": NOT_FINISHED}
        self.stdout = [orjson.dumps(GOOD).decode()] if stdout is None else stdout
        self.calls: list[str] = []
        self.chunks_read = 0
        self.log_closed = False
        self.deleted = False
        self.waiting = asyncio.Event()  # wait() was called: the container is running
        self.containers = self  # docker.containers.create / .list
        self.id = "fake-container"

    async def _answer(self, name: str) -> None:
        self.calls.append(name)
        if name in self.hang:
            await asyncio.Event().wait()  # never set

    async def version(self) -> dict[str, Any]:
        await self._answer("version")
        return {"Version": "fake"}

    async def create(self, *, config: dict[str, Any], name: str) -> FakeDaemon:
        await self._answer("create")
        return self  # the daemon doubles as its single container

    def container(self, name: str) -> FakeDaemon:
        self.calls.append("container")  # a handle by name: no daemon call
        return self

    async def list(self, **kwargs: Any) -> list[dict[str, Any]]:
        await self._answer("list")
        return []

    async def start(self) -> None:
        await self._answer("start")

    async def wait(self) -> dict[str, Any]:
        self.waiting.set()
        await self._answer("wait")
        return {"StatusCode": self.exit_code}

    async def show(self) -> dict[str, Any]:
        await self._answer("show")
        return {"State": self.state}

    async def log(self, *, stdout: bool, follow: bool) -> AsyncIterator[str]:
        assert stdout and follow
        try:
            for chunk in self.stdout:
                self.chunks_read += 1
                yield chunk
            await self._answer("log")  # end of stream, or a stream that stalls
        finally:
            self.log_closed = True

    async def kill(self) -> None:
        await self._answer("kill")

    async def delete(self, *, force: bool) -> None:
        assert force
        await self._answer("delete")
        self.deleted = True


@pytest.fixture
def fast_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_mod, "_API_TIMEOUT", 0.2)
    monkeypatch.setattr(runner_mod, "_PROBE_TIMEOUT", 0.1)


def make_runner(daemon: FakeDaemon) -> Runner:
    # The container timeout's lower bound (1 s) is the shortest run these tests can judge.
    settings = load_settings(container_timeout_ms=1000, container_output_max_bytes=4096)
    return Runner(settings, cast(Any, daemon))


@pytest.mark.usefixtures("fast_timeouts")
async def test_hung_daemon_during_wait_is_docker_unavailable_not_timeout() -> None:
    daemon = FakeDaemon(hang={"wait", "show", "kill", "delete"})
    with pytest.raises(DockerUnavailable, match="daemon does not answer"):
        await make_runner(daemon).run(uuid.uuid4(), "http://a.test/")
    assert "kill" not in daemon.calls  # nothing was judged, so nothing was killed
    assert "delete" in daemon.calls  # attempted; the janitor removes it if the daemon stays hung


@pytest.mark.usefixtures("fast_timeouts")
async def test_overrun_with_responsive_daemon_is_timeout_and_killed() -> None:
    daemon = FakeDaemon(hang={"wait"})
    result = await make_runner(daemon).run(uuid.uuid4(), "http://a.test/")
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
    result = await make_runner(daemon).run(uuid.uuid4(), "http://a.test/")
    assert result.status is status, result.detail
    assert ("kill" in daemon.calls) is (status is RunStatus.TIMEOUT)
    assert daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
async def test_hung_log_stream_is_docker_unavailable_not_output_invalid() -> None:
    daemon = FakeDaemon(hang={"log"})  # one chunk of the report, then the stream stalls
    with pytest.raises(DockerUnavailable):
        await make_runner(daemon).run(uuid.uuid4(), "http://a.test/")
    assert daemon.chunks_read == 1 and daemon.log_closed
    assert daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
async def test_stdout_read_stops_one_chunk_past_the_cap() -> None:
    daemon = FakeDaemon(stdout=["x" * 1000] * 50)
    result = await make_runner(daemon).run(uuid.uuid4(), "http://a.test/")
    assert result.status is RunStatus.OUTPUT_INVALID and "over 4096" in result.detail
    assert daemon.chunks_read == 5 and daemon.log_closed  # 5000 bytes > cap; rest never read
    assert daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
async def test_successful_run_reads_report_and_deletes() -> None:
    daemon = FakeDaemon()
    result = await make_runner(daemon).run(uuid.uuid4(), "http://a.test/")
    assert result.status is RunStatus.OK and result.report is not None
    assert daemon.calls == ["create", "start", "wait", "log", "delete"] and daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
@pytest.mark.parametrize("call", ["create", "start"])
async def test_hung_create_or_start_is_docker_unavailable(call: str) -> None:
    daemon = FakeDaemon(hang={call})
    with pytest.raises(DockerUnavailable):
        await make_runner(daemon).run(uuid.uuid4(), "http://a.test/")
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
    task = asyncio.create_task(make_runner(daemon).run(uuid.uuid4(), "http://a.test/"))
    await daemon.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert daemon.deleted


@pytest.mark.usefixtures("fast_timeouts")
async def test_container_that_could_not_be_removed_is_removed_by_the_next_run() -> None:
    daemon = FakeDaemon(hang={"delete"})  # Docker stops answering as the scan ends
    runner = make_runner(daemon)
    await runner.run(uuid.uuid4(), "http://a.test/")
    assert not daemon.deleted
    daemon.hang = set()  # Docker is back
    daemon.calls.clear()
    await runner.run(uuid.uuid4(), "http://a.test/")
    # The leftover goes first, by its own id (a handle, no label search), then the new run.
    assert daemon.calls[:3] == ["container", "delete", "create"]
    assert daemon.deleted


def test_fetcher_dns_servers_come_from_config() -> None:
    s = load_settings(fetcher_dns=" 192.0.2.53, 2001:db8::53 ", fetcher_user_agent="UA/1")
    hc = container_config(s, uuid.uuid4(), "http://a.test/")["HostConfig"]
    assert hc["Dns"] == ["192.0.2.53", "2001:db8::53"] and hc["DnsSearch"] == ["."]
    assert "FETCH_USER_AGENT=UA/1" in container_config(s, uuid.uuid4(), "http://a.test/")["Env"]
