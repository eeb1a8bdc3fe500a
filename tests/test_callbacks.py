"""Completion callbacks: the outbox row and NOTIFY written by the terminal write itself, and the
deliverer (signature, retries with backoff, SSRF refusal, replicas claiming rows once) against
a real PostgreSQL and a receiver on 127.0.0.1 that the test runs itself."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from safeurl_worker import callbacks
from safeurl_worker.callbacks import Deliverer, sign, verify
from safeurl_worker.fetcher import netcheck
from safeurl_worker.models import Analysis, Job, Report, State, Verdict
from safeurl_worker.store import NOTIFY_CHANNEL, Store, Submission, create_pool

SECRET = "test-secret-0123456789"
LOOPBACK = netcheck.parse_cidrs("127.0.0.1/32")


# --- signing (no services) --------------------------------------------------------------------


def test_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    body = b'{"id":"x"}'
    want = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, body) == f"sha256={want}"
    assert verify(SECRET, "1700000000", body, f"sha256={want}", now=1700000100)
    assert not verify(SECRET, "1700000000", body + b" ", f"sha256={want}", now=1700000100)
    assert not verify("other", "1700000000", body, f"sha256={want}", now=1700000100)
    assert not verify(SECRET, "1700000000", body, f"sha256={want}", now=1700001000)  # stale
    assert not verify(SECRET, "soon", body, f"sha256={want}")


def test_backoff_grows_exponentially_and_is_capped() -> None:
    for attempt, full in [(1, 2), (2, 4), (3, 8), (10, 600)]:
        d = callbacks.backoff_s(attempt, 2, 600)
        assert full * 0.5 <= d <= full, (attempt, d)


def test_private_addresses_are_refused_without_network_io() -> None:
    def no_dns(host: str, port: int) -> list[str]:
        raise AssertionError(f"resolved {host}: an address literal needs no lookup")

    for url in ["http://10.1.2.3/hook", "http://169.254.169.254/latest", "http://[::1]/",
                "http://127.0.0.1/", "http://0x7f.1/"]:
        checked = callbacks.check_callback_url(url, [80], [], no_dns)
        assert not checked.ok and checked.code == netcheck.BLOCKED_TARGET, url
    # A name is resolved once by the resolver given; every address it returns is checked.
    checked = callbacks.check_callback_url(
        "http://hooks.example/", [80], [], lambda h, p: ["93.184.216.34", "192.168.1.5"])
    assert not checked.ok and "192.168.1.5" in checked.reason
    # The allow-list is the only way in for a private address.
    ok = callbacks.check_callback_url("http://127.0.0.1:8099/", [8099], LOOPBACK, no_dns)
    assert ok.ok and ok.addresses == ["127.0.0.1"]


# --- the receiver -------------------------------------------------------------------------------


def _documented_verify() -> Callable[..., bool]:
    """The receiver snippet of docs/api.md (*Completion callbacks*), run as printed."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    after = text.split("**Verify every callback**", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/api.md", "exec"), scope)  # our own documentation, as printed
    fn: Callable[..., bool] = scope["verify"]
    return fn


DOCUMENTED_VERIFY = _documented_verify()


def test_the_documented_receiver_snippet_verifies_a_signature() -> None:
    body = b'{"id":"x"}'
    ts = int(time.time())
    headers = {"X-SafeURL-Timestamp": str(ts), "X-SafeURL-Signature": sign(SECRET, ts, body)}
    assert DOCUMENTED_VERIFY(SECRET, headers, body)
    assert not DOCUMENTED_VERIFY(SECRET, headers, body + b" ")
    assert not DOCUMENTED_VERIFY("another-secret", headers, body)
    old = {"X-SafeURL-Timestamp": str(ts - 600),
           "X-SafeURL-Signature": sign(SECRET, ts - 600, body)}
    assert not DOCUMENTED_VERIFY(SECRET, old, body)  # a replay of an old request




@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records every callback it gets."""

    port: int
    status: int = 200  # what it answers
    got: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        ours = verify(SECRET, request.headers.get("X-SafeURL-Timestamp", ""), body,
                      request.headers.get("X-SafeURL-Signature", ""))
        # What a receiver written from docs/api.md does, with the snippet printed there.
        documented = DOCUMENTED_VERIFY(SECRET, request.headers, body)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.got.append({"path": request.path, "headers": dict(request.headers), "body": body,
                         "valid": ours and documented, "peer": peer})
        return web.Response(status=self.status)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def receiver(port: int | None = None, status: int = 200) -> AsyncIterator[Receiver]:
    r = Receiver(port or free_port(), status)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


# --- helpers ------------------------------------------------------------------------------------


async def _job(store: Store, callback_url: str | None, url: str = "http://a.test/") -> Job:
    sub = await store.submit_job(Submission(uuid.uuid4(), url, callback_url, {"ref": "r-1"}))
    job = await store.get_job(sub.id)
    assert job is not None
    return job


async def _move(store: Store, job: Job, *states: State, **kw: Any) -> Job:
    for s in states:
        moved = await store.transition(job, s, worker_id="w", **kw)
        assert moved is not None
        job = moved
    return job


async def _complete(store: Store, job: Job) -> None:
    job = await _move(store, job, State.FETCHING, State.ANALYZING)
    report = Report(fetcher_version="1", requested_url=job.url, http_status=200,
                    final_url=job.url)
    analysis = Analysis(verdict=Verdict.SUSPICIOUS, score=40, signals=[], analyzer_version="t")
    assert await store.complete(job, worker_id="w", report=report, analysis=analysis,
                                url_key=None) is not None


async def _outbox(store: Store, job_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await store.pool.fetch("SELECT * FROM scan_callbacks WHERE job_id = $1 ORDER BY id",
                                  job_id)
    return [dict(r) for r in rows]


def _deliverer(store: Store, ports: list[int], **kw: Any) -> Deliverer:
    base: dict[str, Any] = {"secret": SECRET, "ports": ports, "allow": LOOPBACK,
                            "timeout_s": 2, "backoff_base_s": 0.2, "backoff_cap_s": 1}
    return Deliverer(store, **{**base, **kw})


# --- the outbox and NOTIFY ---------------------------------------------------------------------


@pytest.mark.integration
async def test_terminal_writes_insert_the_outbox_row_and_notify(store: Store,
                                                                database: str) -> None:
    heard: list[str] = []
    all_heard = asyncio.Event()

    def on_notify(*args: Any) -> None:
        heard.append(args[3])  # (connection, pid, channel, payload)
        if len(heard) == 3:
            all_heard.set()

    quiet = store  # NOTIFY_FINISHED off (the default): outbox rows, no NOTIFY
    store = Store(store.pool, notify=True)
    listener = await asyncpg.connect(database)
    await listener.add_listener(NOTIFY_CHANNEL, on_notify)
    try:
        unheard = await _job(quiet, "http://127.0.0.1:9/quiet")
        await _complete(quiet, unheard)
        completed = await _job(store, "http://127.0.0.1:9/done")
        await _complete(store, completed)
        failed = await _job(store, "http://127.0.0.1:9/failed")
        await _move(store, failed, State.FETCHING)
        assert await _outbox(store, failed.id) == []  # not terminal: nothing yet
        failed = await store.get_job(failed.id)  # type: ignore[assignment]
        await _move(store, failed, State.TIMED_OUT, error_code="TIMEOUT")
        silent = await _job(store, None)
        await _complete(store, silent)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_heard.wait(), 5)
        await asyncio.sleep(0.2)  # room for a stray fourth one
    finally:
        await listener.close()
    # Notifications arrive in commit order; the quiet store's write sent none.
    assert heard == [str(j.id) for j in (completed, failed, silent)]
    assert [r["state"] for r in await _outbox(quiet, unheard.id)] == ["COMPLETED"]
    done = await _outbox(store, completed.id)
    assert [(r["state"], r["version"], r["url"], r["status"]) for r in done] == [
        ("COMPLETED", 3, "http://127.0.0.1:9/done", "PENDING")]
    timed = await _outbox(store, failed.id)
    assert [(r["state"], r["error_code"], r["version"]) for r in timed] == [
        ("TIMED_OUT", "TIMEOUT", 2)]
    assert await _outbox(store, silent.id) == []  # no callback URL, no default: no row


@pytest.mark.integration
async def test_configured_default_url_is_used_for_jobs_without_their_own(database: str) -> None:
    pool = await create_pool(database, 2)
    try:
        store = Store(pool, default_callback_url="http://127.0.0.1:9/default")
        own = await _job(store, "http://127.0.0.1:9/own")
        plain = await _job(store, None)
        for job in (own, plain):
            await _move(store, job, State.FAILED, error_code="INVALID_URL")
        assert [r["url"] for r in await _outbox(store, own.id)] == ["http://127.0.0.1:9/own"]
        assert [r["url"] for r in await _outbox(store, plain.id)] == [
            "http://127.0.0.1:9/default"]
    finally:
        await pool.close()


@pytest.mark.integration
async def test_a_conflicting_terminal_write_leaves_no_outbox_row(store: Store) -> None:
    job = await _job(store, "http://127.0.0.1:9/x")
    await _move(store, job, State.FAILED, error_code="INVALID_URL")
    # A second writer with the stale version loses the race: no state, no callback.
    assert await store.transition(job, State.FAILED, worker_id="w2",
                                  error_code="INVALID_URL") is None
    assert len(await _outbox(store, job.id)) == 1


# --- delivery ----------------------------------------------------------------------------------


@pytest.mark.integration
async def test_delivery_is_signed_and_recorded(store: Store) -> None:
    async with receiver() as rcv:
        job = await _job(store, rcv.url("/hooks/scan"))
        await _complete(store, job)
        d = _deliverer(store, [rcv.port])
        try:
            assert await d.run_once() == 1
            assert await d.run_once() == 0  # delivered: not due again
        finally:
            await d.close()
    assert len(rcv.got) == 1
    got = rcv.got[0]
    assert got["valid"], got["headers"]
    assert got["path"] == "/hooks/scan"
    assert got["headers"]["X-SafeURL-Event"] == "scan.finished"
    assert got["headers"]["Host"] == f"127.0.0.1:{rcv.port}"
    body = orjson.loads(got["body"])
    assert body["id"] == str(job.id) and body["state"] == "COMPLETED"
    assert body["result"] == {"verdict": "suspicious", "score": 40, "final_url": job.url}
    assert body["metadata"] == {"ref": "r-1"} and body["version"] == 3
    assert got["headers"]["X-SafeURL-Delivery"] == str(body["delivery_id"])
    [row] = await _outbox(store, job.id)
    assert (row["status"], row["attempts"], row["delivered_at"] is not None) == (
        "DELIVERED", 1, True)
    view = await store.scan_view(job.id)
    assert view is not None
    assert [(a["attempt"], a["http_status"], a["error"]) for a in
            view["callbacks"][0]["deliveries"]] == [(1, 200, None)]


@pytest.mark.integration
async def test_receiver_down_then_up_is_retried_with_backoff_and_delivered(store: Store
                                                                           ) -> None:
    port = free_port()  # nothing listens yet
    job = await _job(store, f"http://127.0.0.1:{port}/hook")
    await _move(store, job, State.FAILED, error_code="INVALID_URL")
    d = _deliverer(store, [port])
    try:
        assert await d.run_once() == 1  # connection refused
        [row] = await _outbox(store, job.id)
        assert row["status"] == "PENDING" and "ConnectError" in row["last_error"]
        assert await d.run_once() == 0  # backing off: not due yet
        async with receiver(port, status=503) as rcv:  # up, but failing
            await asyncio.sleep(0.25)
            assert await d.run_once() == 1
            rcv.status = 200
            deadline = time.monotonic() + 10
            while (await _outbox(store, job.id))[0]["status"] == "PENDING":
                assert time.monotonic() < deadline, await _outbox(store, job.id)
                await d.run_once()
                await asyncio.sleep(0.05)
    finally:
        await d.close()
    [row] = await _outbox(store, job.id)
    assert row["status"] == "DELIVERED"
    view = await store.scan_view(job.id)
    assert view is not None
    tries = view["callbacks"][0]["deliveries"]
    assert [t["attempt"] for t in tries] == list(range(1, len(tries) + 1))
    assert tries[0]["http_status"] is None and "ConnectError" in tries[0]["error"]
    assert tries[1]["http_status"] == 503 and tries[-1]["http_status"] == 200
    assert len(rcv.got) == len(tries) - 1  # one request per attempt that reached it
    assert all(g["valid"] for g in rcv.got)
    # Each attempt waited at least half its backoff after the previous one.
    for prev, nxt in itertools.pairwise(tries):
        assert (nxt["at"] - prev["at"]).total_seconds() >= 0.09


@pytest.mark.integration
async def test_gives_up_after_max_attempts(store: Store) -> None:
    async with receiver(status=500) as rcv:
        job = await _job(store, rcv.url())
        await _move(store, job, State.FAILED, error_code="INVALID_URL")
        d = _deliverer(store, [rcv.port], max_attempts=2, backoff_base_s=0.05,
                       backoff_cap_s=0.05)
        try:
            deadline = time.monotonic() + 10
            while (await _outbox(store, job.id))[0]["status"] == "PENDING":
                assert time.monotonic() < deadline
                await d.run_once()
                await asyncio.sleep(0.06)
        finally:
            await d.close()
    [row] = await _outbox(store, job.id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("FAILED", 2, "HTTP 500")
    assert len(rcv.got) == 2


@pytest.mark.integration
async def test_private_callback_address_is_refused_and_never_retried(store: Store) -> None:
    job = await _job(store, "http://10.20.30.40/hook")
    await _move(store, job, State.FAILED, error_code="INVALID_URL")
    named = await _job(store, "http://hooks.internal.test/hook")
    await _move(store, named, State.FAILED, error_code="INVALID_URL")

    def resolver(host: str, port: int) -> list[str]:
        # Called for the name only: the address literal is judged without a lookup.
        assert host == "hooks.internal.test"
        return ["172.16.5.4"]  # a private answer for a name: refused the same way

    d = _deliverer(store, [80], allow=[], resolver=resolver)
    try:
        assert await d.run_once() == 2
        assert await d.run_once() == 0
    finally:
        await d.close()
    [row] = await _outbox(store, job.id)
    assert row["status"] == "REFUSED" and "10.20.30.40 is private" in row["last_error"]
    [row] = await _outbox(store, named.id)
    assert row["status"] == "REFUSED" and "172.16.5.4 is private" in row["last_error"]


@pytest.mark.integration
async def test_two_deliverers_never_send_one_attempt_twice(store: Store) -> None:
    async with receiver() as rcv:
        jobs = [await _job(store, rcv.url()) for _ in range(30)]
        for job in jobs:
            await _move(store, job, State.FAILED, error_code="INVALID_URL")
        a, b = _deliverer(store, [rcv.port], batch=7), _deliverer(store, [rcv.port], batch=7)
        try:
            while True:
                n = sum(await asyncio.gather(a.run_once(), b.run_once()))
                if n == 0:
                    break
        finally:
            await a.close()
            await b.close()
    ids = [orjson.loads(g["body"])["id"] for g in rcv.got]
    assert sorted(ids) == sorted(str(j.id) for j in jobs)  # each exactly once
    assert await store.pool.fetchval(
        "SELECT count(*) FROM scan_callbacks WHERE status = 'DELIVERED' AND attempts = 1") == 30


@pytest.mark.integration
async def test_a_claim_whose_deliverer_died_is_retried_after_its_lease(store: Store) -> None:
    async with receiver() as rcv:
        job = await _job(store, rcv.url())
        await _move(store, job, State.FAILED, error_code="INVALID_URL")
        # A deliverer claims the row and dies before it records anything.
        assert len(await store.claim_callbacks(10, lease_s=0.3)) == 1
        d = _deliverer(store, [rcv.port])
        try:
            assert await d.run_once() == 0  # leased to the dead one
            await asyncio.sleep(0.4)
            assert await d.run_once() == 1
        finally:
            await d.close()
    [row] = await _outbox(store, job.id)
    assert (row["status"], row["attempts"]) == ("DELIVERED", 2)
    assert len(rcv.got) == 1


@contextlib.asynccontextmanager
async def raw_server(answer: Any) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 whose every connection is handled by `answer(reader, writer)`
    (for receivers no HTTP framework would play: endless bodies, a trickled status line)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await answer(reader, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)


@pytest.mark.integration
async def test_redirects_are_not_followed(store: Store) -> None:
    async with receiver() as elsewhere:
        async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _read_request(reader)
            writer.write(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " +
                         elsewhere.url("/stolen").encode() + b"\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()

        async with raw_server(redirect) as port:
            job = await _job(store, f"http://127.0.0.1:{port}/hook")
            await _move(store, job, State.FAILED, error_code="INVALID_URL")
            d = _deliverer(store, [port, elsewhere.port])
            try:
                assert await d.run_once() == 1
            finally:
                await d.close()
    assert elsewhere.got == []  # the Location was never visited
    [row] = await _outbox(store, job.id)
    assert (row["status"], row["last_error"]) == ("PENDING", "HTTP 307")


@pytest.mark.integration
async def test_the_answer_body_is_never_read_and_an_attempt_has_a_deadline(store: Store
                                                                          ) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n")
        while True:  # 100 GB announced, sent as fast as the socket takes it
            writer.write(b"x" * 65536)
            await writer.drain()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        for byte in b"HTTP/1.1 200 OK\r\n" * 1000:  # one byte every 0.1 s: never a timeout
            writer.write(bytes([byte]))           # of httpx's own (it counts per read)
            await writer.drain()
            await asyncio.sleep(0.1)

    async with raw_server(endless) as big, raw_server(trickle) as slow:
        fast = await _job(store, f"http://127.0.0.1:{big}/hook")
        late = await _job(store, f"http://127.0.0.1:{slow}/hook")
        for job in (fast, late):
            await _move(store, job, State.FAILED, error_code="INVALID_URL")
        d = _deliverer(store, [big, slow], timeout_s=1.5)
        try:
            started = time.monotonic()
            assert await asyncio.wait_for(d.run_once(), 10) == 2
            took = time.monotonic() - started
        finally:
            await d.close()
    assert took < 3, took  # the trickle was cut at the deadline
    [row] = await _outbox(store, fast.id)
    assert row["status"] == "DELIVERED"  # the status line is all we read
    [row] = await _outbox(store, late.id)
    assert (row["status"], row["last_error"]) == ("PENDING", "no answer within 1.5 s")


@pytest.mark.integration
async def test_each_attempt_opens_its_own_connection(store: Store) -> None:
    """Connections are pooled by address: reusing one would carry a callback over a connection
    whose certificate was verified for another host at that address."""
    async with receiver() as rcv:
        for _ in range(2):
            job = await _job(store, rcv.url())
            await _move(store, job, State.FAILED, error_code="INVALID_URL")
        d = _deliverer(store, [rcv.port], batch=1)
        try:
            assert await d.run_once() == 1
            assert await d.run_once() == 1
        finally:
            await d.close()
    assert len(rcv.got) == 2 and rcv.got[0]["peer"] != rcv.got[1]["peer"]
