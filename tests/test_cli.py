"""The `safeurl-worker` console script, run as a real subprocess against the real services.

The operator commands (`status`, `check`, `retry`, `dlq`, `submit --wait`) are run exactly as an
operator would, with the test's settings as their environment, next to a worker running in this
event loop. Parser-only tests at the top need no services.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from safeurl_worker.api.config import hash_token, parse_tokens
from safeurl_worker.artifacts import Artifact
from safeurl_worker.cli import EXIT_QUOTA, build_parser
from safeurl_worker.config import Settings
from safeurl_worker.consumer import Queue
from safeurl_worker.logs import JsonFormatter, TextFormatter
from safeurl_worker.models import Analysis, Render, Report, State, Verdict
from safeurl_worker.store import Store

from .conftest import TestNet, running_worker
from .helpers import CLI, audit, env_of, submit, wait_all_terminal, wait_terminal

SUBCOMMANDS = ["run", "api", "migrate", "submit", "status", "check", "retry", "dlq", "prune",
               "token"]


@dataclass(frozen=True)
class Out:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def cli(settings: Settings, *args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> Out:
    """Run the console script without blocking the loop (a worker may run in it)."""
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, env={**env_of(settings, "cli"), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Out(proc.returncode, out.decode(), err.decode())


# --- parser and --help (no services) --------------------------------------------------------


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand_exits_zero_with_an_example(command: str) -> None:
    out = subprocess.run([CLI, command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"usage: safeurl-worker {command}" in out.stdout
    assert "example" in out.stdout.lower(), out.stdout
    assert "safeurl-worker" in out.stdout.split("example", 1)[1], out.stdout


def test_top_level_help_lists_every_subcommand() -> None:
    out = subprocess.run([CLI, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in SUBCOMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("argv", [
    ["status", "not-a-uuid"],
    ["retry", "--state", "COMPLETED"],
    ["retry", "not-a-uuid"],
    ["retry", "--since", "yesterday"],
    ["dlq", "frobnicate"],
    ["submit"],
    ["prune"],
    ["prune", "--older-than", "soon"],
    ["prune", "--older-than", "30"],
    ["submit", "http://x/", "--tenant", "acme corp"],
    ["submit", "http://x/", "--tenant", ""],
    ["token", "ci", "--tenant", "-x"],
    [],
])
def test_parser_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_parser_accepts_the_documented_forms() -> None:
    p = build_parser()
    jid = uuid.uuid4()
    assert p.parse_args(["status", str(jid)]).job_id == jid
    # The `--since` example from the docs (a trailing Z) parses to an aware time.
    a = p.parse_args(["retry", "--state", "TIMED_OUT", "--since", "2026-11-23T10:00Z"])
    assert a.state == "TIMED_OUT" and a.since.utcoffset() is not None
    a = p.parse_args(["retry", "--error-code", "CONTAINER_ERROR", "--limit", "5"])
    assert (a.error_code, a.limit, a.job_ids) == ("CONTAINER_ERROR", 5, [])
    a = p.parse_args(["dlq", "replay", "1-0", "2-0"])
    assert (a.action, a.ids) == ("replay", ["1-0", "2-0"])
    assert p.parse_args(["submit", "http://x/", "--wait"]).timeout == 120
    assert p.parse_args(["submit", "http://x/", "--mode", "render"]).mode == "render"
    assert p.parse_args(["submit", "http://x/"]).mode is None  # the worker's SCAN_MODE
    assert p.parse_args(["status", str(jid), "--screenshot", "s.png"]).screenshot == "s.png"
    assert p.parse_args(["prune", "--older-than", "30d"]).older_than == 30 * 86400
    assert p.parse_args(["prune", "--older-than", "12h", "--batch", "50"]).batch == 50
    assert p.parse_args(["dlq", "purge", "--all"]).all is True
    a = p.parse_args(["submit", "http://x/", "--lane", "bulk", "--tenant", "acme.eu-1"])
    assert (a.lane, a.tenant) == ("bulk", "acme.eu-1")
    a = p.parse_args(["submit", "http://x/"])
    assert (a.lane, a.tenant) == (None, None)


def test_run_help_lists_every_environment_variable() -> None:
    out = subprocess.run([CLI, "run", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in Settings.model_fields:
        assert f"  {name.upper()} " in out.stdout, name
    assert "WORKER_CONCURRENCY           5" in out.stdout
    for name in ("CALLBACK_DEFAULT_URL", "NOTIFY_FINISHED"):  # the api settings `run` reads
        assert f"  {name} " in out.stdout, name


def test_log_timestamps_are_utc_with_an_offset() -> None:
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "created": 0.5})
    assert json.loads(JsonFormatter().format(record))["ts"] == "1970-01-01T00:00:00.500+00:00"
    assert TextFormatter().format(record).startswith("1970-01-01T00:00:00.500+00:00 INFO")


def test_invalid_configuration_exits_with_one_line_naming_the_variable() -> None:
    env = {**os.environ, "WORKER_CONCURRENCY": "abc"}
    out = subprocess.run([CLI, "run"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "WORKER_CONCURRENCY" in lines[0] and "abc" in lines[0], lines[0]
    assert lines[0].startswith("safeurl-worker: invalid configuration:"), lines[0]


# --- against the real services ----------------------------------------------------------------


async def counts_by_state(store: Store) -> dict[str, int]:
    rows = await store.pool.fetch("SELECT state, count(*) AS n FROM scan_jobs GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


@pytest.mark.integration
async def test_status_table_json_and_one_job(
        settings: Settings, store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    async with running_worker(settings):
        good = [await submit(store, rds, settings, "http://site-a.test/") for _ in range(3)]
        bad = await submit(store, rds, settings, "ftp://x")
        await wait_all_terminal(store, [*good, bad], timeout=90)
        await asyncio.sleep(0.5)  # the acks are batched

        st = (await cli(settings, "status", "--json")).json()
        db = await counts_by_state(store)
        assert db == {"COMPLETED": 3, "FAILED": 1}
        assert st["jobs"] == {"QUEUED": 0, "FETCHING": 0, "ANALYZING": 0, "TIMED_OUT": 0,
                              **db}
        assert st["last_5m"] == {"completed": 3, "failed": 1}
        assert st["last_60m"] == {"completed": 3, "failed": 1}
        assert st["oldest_queued_s"] is None
        # (the janitor trims acknowledged entries: the length is at most what was added)
        assert 0 <= st["stream"]["length"] <= 4 and st["stream"]["pending"] == 0
        assert st["stream"]["lag"] == 0
        assert st["stream"]["consumers"][settings.worker_id]["pending"] == 0
        assert st["dead_letters"] == 0

        table = await cli(settings, "status")
        assert table.code == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0] == "JOBS"
        assert "  COMPLETED         3" in lines and "  FAILED            1" in lines
        assert f"  consumer {settings.worker_id}" in table.stdout
        assert "lag 0  pending 0" in table.stdout
        assert "DEAD LETTERS   0" in table.stdout

    one = await cli(settings, "status", str(good[0]))
    assert one.code == 0, one.stderr
    view = one.json()
    assert set(view) == {"job", "result", "audit", "artifacts"}
    assert view["artifacts"] == []  # a static scan has none
    assert view["job"]["id"] == str(good[0]) and view["job"]["state"] == "COMPLETED"
    assert view["result"]["verdict"] == "safe" and view["result"]["http_status"] == 200
    assert [(a["to_state"], a["version"]) for a in view["audit"]] == [
        ("FETCHING", 1), ("ANALYZING", 2), ("COMPLETED", 3)]
    failed = (await cli(settings, "status", str(bad))).json()
    assert failed["job"]["error_code"] == "INVALID_URL" and failed["result"] is None

    missing = await cli(settings, "status", str(uuid.uuid4()))
    assert missing.code == 1 and "no job" in missing.stderr
    garbage = await cli(settings, "status", "not-a-uuid")
    assert garbage.code == 2
    assert "not a job id (UUID): 'not-a-uuid'" in garbage.stderr, garbage.stderr
    assert "Traceback" not in garbage.stderr


@pytest.mark.integration
async def test_submit_wait_prints_the_final_json(
        settings: Settings, store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    async with running_worker(settings):
        ok = await cli(settings, "submit", "http://site-a.test/", "--wait", "--timeout", "60")
        assert ok.code == 0, ok.stderr
        view = ok.json()  # stdout is exactly the JSON (progress goes to stderr)
        assert view["job"]["state"] == "COMPLETED" and view["result"]["verdict"] == "safe"
        assert "COMPLETED" in ok.stderr
        bad = await cli(settings, "submit", "ftp://x", "--wait", "--timeout", "60")
        assert bad.code == 1, bad.stderr
        assert bad.json()["job"]["error_code"] == "INVALID_URL"
        plain = await cli(settings, "submit", "http://site-a.test/")
        assert plain.code == 0
        job_id = uuid.UUID(plain.stdout.strip())  # without --wait: just the id
        assert (await wait_terminal(store, job_id))["state"] == "COMPLETED"
    assert await store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 3


async def check_cli(settings: Settings, *args: str) -> Out:
    """`check`, ignoring (by retrying) containers left by other tests on the shared daemon."""
    for _ in range(30):
        out = await cli(settings, "check", *args)
        others = [line for line in out.stdout.splitlines() if line.startswith("VIOLATION")
                  and "labelled safeurl.job_id still exists" not in line]
        if out.code == 0 or others:
            return out
        await asyncio.sleep(1)
    return out


@pytest.mark.integration
async def test_check_passes_when_settled_and_fails_on_a_broken_invariant(
        settings: Settings, store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    async with running_worker(settings):
        ids = [await submit(store, rds, settings, "http://site-a.test/") for _ in range(3)]
        await wait_all_terminal(store, ids, timeout=90)
        await asyncio.sleep(0.5)
    ok = await check_cli(settings)
    assert ok.code == 0, ok.stdout + ok.stderr
    assert "all invariants hold" in ok.stdout

    # Break the audit trail of one job: check names it.
    await store.pool.execute("DELETE FROM scan_audit_log WHERE job_id = $1 AND version = 2",
                             ids[0])
    broken = await check_cli(settings)
    assert broken.code == 1, broken.stdout
    assert f"VIOLATION job {ids[0]} audit versions broken" in broken.stdout, broken.stdout
    # ...and its chain: version 3 starts from ANALYZING, where version 2 used to lead.
    assert f"VIOLATION job {ids[0]} audit chain broken at version 3" in broken.stdout
    assert "2 violation(s)" in broken.stdout
    # A COMPLETED job without its result row is a second violation.
    await store.pool.execute("DELETE FROM scan_results WHERE job_id = $1", ids[1])
    broken = await check_cli(settings)
    assert broken.code == 1
    assert f"VIOLATION job {ids[1]} is COMPLETED with 0 result rows" in broken.stdout
    assert "3 violation(s)" in broken.stdout
    # A job left QUEUED is a violation, unless --allow-active.
    queued = await store.insert_job("http://site-a.test/")
    assert f"job {queued} is not terminal (QUEUED)" in (await check_cli(settings)).stdout
    assert str(queued) not in (await check_cli(settings, "--allow-active")).stdout


@pytest.mark.integration
async def test_check_allow_active_passes_on_a_live_system(
        settings: Settings, store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    async with running_worker(settings):
        ids = [await submit(store, rds, settings, "http://site-a.test/slow") for _ in range(2)]
        deadline = time.monotonic() + 30
        while await store.pool.fetchval(
                "SELECT count(*) FROM scan_jobs WHERE state = 'FETCHING'") < 1:
            assert time.monotonic() < deadline, "no job started"
            await asyncio.sleep(0.05)
        live = await cli(settings, "check", "--allow-active")
        await wait_all_terminal(store, ids, timeout=60)
    print(f"\n[cli] check --allow-active while 2 jobs run: exit {live.code}\n{live.stdout}")
    assert live.code == 0, live.stdout


@pytest.mark.integration
async def test_retry_requeues_a_failed_job_and_a_worker_takes_it_again(
        settings: Settings, store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    async with running_worker(settings):
        job_id = await submit(store, rds, settings, "ftp://x")
        done = await submit(store, rds, settings, "http://site-a.test/")
        await wait_all_terminal(store, [job_id, done], timeout=60)
        await asyncio.sleep(0.5)
    job = await wait_terminal(store, job_id)
    assert (job["state"], job["error_code"], job["version"]) == ("FAILED", "INVALID_URL", 1)
    length = await rds.xlen(settings.scan_stream)

    none = await cli(settings, "retry")
    assert none.code == 2 and "name job ids or a filter" in none.stderr, none.stderr

    # A COMPLETED job is not retried (skipped); the FAILED one is.
    out = await cli(settings, "retry", str(job_id), str(done))
    assert out.code == 0, out.stderr
    assert "re-queued 1, skipped 1" in out.stdout, out.stdout
    row: Any = await store.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1", job_id)
    assert (row["state"], row["version"], row["error_code"], row["finished_at"]) == (
        "QUEUED", 2, None, None)
    last: Any = await store.pool.fetchrow(
        "SELECT * FROM scan_audit_log WHERE job_id = $1 ORDER BY version DESC LIMIT 1", job_id)
    assert (last["from_state"], last["to_state"], last["version"]) == ("FAILED", "QUEUED", 2)
    assert last["worker_id"] == "cli:cli"
    assert last["detail"]["retry"] is True
    assert last["detail"]["previous_error"] == "INVALID_URL"
    assert await rds.xlen(settings.scan_stream) == length + 1
    newest: Any = await rds.xrevrange(settings.scan_stream, count=1)
    assert newest[0][1][b"job_id"] == str(job_id).encode()  # (and its target domain)
    assert await store.pool.fetchval("SELECT state FROM scan_jobs WHERE id=$1",
                                     done) == "COMPLETED"

    async with running_worker(settings):
        deadline = time.monotonic() + 60
        while (await store.pool.fetchval("SELECT version FROM scan_jobs WHERE id=$1",
                                         job_id)) < 3:
            assert time.monotonic() < deadline, "the re-queued job was not taken again"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    row = await store.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1", job_id)
    assert (row["state"], row["error_code"]) == ("FAILED", "INVALID_URL")
    assert await audit(store, job_id) == [
        ("QUEUED", "FAILED", 1), ("FAILED", "QUEUED", 2), ("QUEUED", "FAILED", 3)]

    # By filter: --error-code re-queues it once more; nothing else matches.
    out = await cli(settings, "retry", "--state", "FAILED", "--error-code", "INVALID_URL")
    assert out.code == 0 and "re-queued 1, skipped 0" in out.stdout, out.stdout
    out = await cli(settings, "retry", "--error-code", "TIMEOUT")
    assert out.code == 0 and "re-queued 0, skipped 0" in out.stdout, out.stdout
    async with running_worker(settings):
        deadline = time.monotonic() + 60
        while (await store.pool.fetchval("SELECT version FROM scan_jobs WHERE id=$1",
                                         job_id)) < 5:
            assert time.monotonic() < deadline, "the re-queued job was not taken again"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    assert [a[2] for a in await audit(store, job_id)] == [1, 2, 3, 4, 5]
    ok = await check_cli(settings)
    assert ok.code == 0, ok.stdout


async def dlq_entries(settings: Settings, want: int, timeout: float = 30) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        out = await cli(settings, "dlq", "list", "--json")
        assert out.code == 0, out.stderr
        entries: list[dict[str, str]] = out.json()
        if len(entries) >= want:
            return entries
        assert time.monotonic() < deadline, f"dead-letter stream has {entries}"
        await asyncio.sleep(0.2)


@pytest.mark.integration
async def test_dlq_list_replay_purge(
        make_settings: type[Settings], store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    settings = make_settings(unknown_job_retries=1, unknown_job_delay_ms=50)
    assert (await cli(settings, "dlq", "list")).stdout.strip() == "(empty)"
    ghost = uuid.uuid4()
    async with running_worker(settings):
        mid: Any = await rds.xadd(settings.scan_stream, {"job_id": "garbage"})
        garbage_mid = mid.decode()
        mid = await rds.xadd(settings.scan_stream, {"job_id": str(ghost)})
        ghost_mid = mid.decode()
        entries = await dlq_entries(settings, 2)
        by_reason = {e["reason"]: e for e in entries}
        assert set(by_reason) == {"MALFORMED_MESSAGE", "UNKNOWN_JOB"}, entries
        assert by_reason["MALFORMED_MESSAGE"]["job_id"] == "garbage"
        assert by_reason["MALFORMED_MESSAGE"]["original_id"] == garbage_mid
        assert by_reason["UNKNOWN_JOB"]["job_id"] == str(ghost)
        assert by_reason["UNKNOWN_JOB"]["original_id"] == ghost_mid
        text = await cli(settings, "dlq", "list")
        for e in entries:
            assert f"{e['id']}  {e['reason']}" in text.stdout, text.stdout
        assert "job_id=garbage" in text.stdout and f"original={garbage_mid}" in text.stdout

        unknown, malformed = by_reason["UNKNOWN_JOB"]["id"], by_reason["MALFORMED_MESSAGE"]["id"]
        # Replaying before the job row exists fails and keeps the entry.
        early = await cli(settings, "dlq", "replay", unknown)
        assert early.code == 1 and f"job {ghost} does not exist" in early.stderr, early.stderr
        assert "replayed 0" in early.stdout
        # The API's INSERT finally lands: replay, and the job completes.
        await store.insert_job("http://site-a.test/", job_id=ghost)
        replay = await cli(settings, "dlq", "replay", unknown)
        assert replay.code == 0, replay.stderr
        assert "replayed 1" in replay.stdout
        job = await wait_terminal(store, ghost, timeout=60)
        assert job["state"] == "COMPLETED", job
        # A malformed entry cannot be replayed; it says to purge it.
        bad = await cli(settings, "dlq", "replay", malformed)
        assert bad.code == 1 and "malformed" in bad.stderr and "purge" in bad.stderr
        missing = await cli(settings, "dlq", "replay", "1-0")
        assert missing.code == 1 and "no such dead-letter entry" in missing.stderr
        none = await cli(settings, "dlq", "replay")
        assert none.code == 2
        await asyncio.sleep(0.5)
    left = await dlq_entries(settings, 1)
    assert [e["id"] for e in left] == [malformed]
    # Without ids (and not on a terminal) purge refuses and deletes nothing.
    refused = await cli(settings, "dlq", "purge")
    assert refused.code == 2 and "--all" in refused.stderr, refused.stderr
    assert len(await dlq_entries(settings, 1)) == 1
    purged = await cli(settings, "dlq", "purge", "--all")
    assert purged.code == 0 and "purged 1" in purged.stdout, purged.stdout
    assert (await cli(settings, "dlq", "list")).stdout.strip() == "(empty)"
    assert (await cli(settings, "dlq", "list", "--json")).json() == []
    assert await audit(store, ghost) == [
        ("QUEUED", "FETCHING", 1), ("FETCHING", "ANALYZING", 2), ("ANALYZING", "COMPLETED", 3)]
    ok = await check_cli(settings)
    assert ok.code == 0, ok.stdout


@pytest.mark.integration
@pytest.mark.parametrize("action", ["replay", "purge"])
async def test_dlq_commands_reject_malformed_entry_ids_cleanly(
        settings: Settings, rds: redis.Redis, action: str) -> None:
    await rds.xadd(settings.dead_letter_stream, {"reason": "MALFORMED_MESSAGE", "job_id": "x"})
    out = await cli(settings, "dlq", action, "not-an-id")
    assert out.code == 1, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    assert "not-an-id" in out.stderr, out.stderr
    assert await rds.xlen(settings.dead_letter_stream) == 1


@pytest.mark.integration
async def test_prune_deletes_old_finished_jobs_only(settings: Settings, store: Store,
                                                    rds: redis.Redis) -> None:
    old, recent, queued = [await store.insert_job("http://a.test/") for _ in range(3)]
    for job_id in (old, recent):
        job = await store.get_job(job_id)
        assert job is not None
        await store.transition(job, State.FAILED, worker_id="w", error_code="MAX_DELIVERIES")
        await rds.xadd(settings.dead_letter_stream, {"job_id": str(job_id),
                                                     "reason": "MAX_DELIVERIES"})
    await store.pool.execute("UPDATE scan_jobs SET finished_at = now() - interval '31 days', "
                             "created_at = now() - interval '32 days' WHERE id = $1", old)
    await store.pool.execute("UPDATE scan_jobs SET created_at = now() - interval '90 days' "
                             "WHERE id = $1", queued)
    out = await cli(settings, "prune", "--older-than", "30d")
    assert out.code == 0, out.stderr
    assert out.stdout.strip() == ("pruned 1 jobs, 0 results, 1 audit rows, 0 callbacks, "
                                  "0 callback attempts, 1 dead letters")
    # The old job's dead letter went with it; the recent one's stays.
    entries = await rds.xrange(settings.dead_letter_stream)
    assert [f[b"job_id"] for _, f in entries] == [str(recent).encode()]
    left = {r["id"] for r in await store.pool.fetch("SELECT id FROM scan_jobs")}
    assert left == {recent, queued}
    assert await store.pool.fetchval("SELECT count(*) FROM scan_audit_log WHERE job_id = $1",
                                     old) == 0
    again = await cli(settings, "prune", "--older-than", "30d")
    assert again.stdout.startswith("pruned 0 jobs")


@pytest.mark.integration
async def test_status_lists_artifacts_and_writes_the_screenshot(
        database: str, store: Store, tmp_path: Path) -> None:
    """A completed render scan (its rows written as the worker writes them): `status JOB`
    lists its artifacts, `--screenshot FILE` writes the image's bytes."""
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                        "0000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
    job = await store.get_job(await store.insert_job("http://a.test/", mode="render"))
    for to in (State.FETCHING, State.ANALYZING):
        assert job is not None
        job = await store.transition(job, to, worker_id="w")
    assert job is not None
    report = Report(fetcher_version="render", requested_url="http://a.test/", http_status=200,
                    render=Render(stored_apart=["screenshot", "dom"]))
    await store.complete(job, worker_id="w", report=report, url_key=None,
                         analysis=Analysis(verdict=Verdict.SAFE, score=0, signals=[],
                                           analyzer_version="t"),
                         artifacts=[Artifact("screenshot", "image/png", png),
                                    Artifact("dom", "text/html", b"<p>hi</p>")])
    settings = Settings(database_url=database, metrics_port=0)
    shot = tmp_path / "shot.png"
    out = await cli(settings, "status", str(job.id), "--screenshot", str(shot))
    assert out.code == 0, out.stderr
    assert [(a["kind"], a["content_type"], a["size"]) for a in out.json()["artifacts"]] == [
        ("screenshot", "image/png", len(png)), ("dom", "text/html", 9)]
    assert shot.read_bytes() == png and f"wrote {len(png)} bytes (image/png)" in out.stderr
    # A job without a screenshot: said so, exit 1, nothing written.
    plain = await store.insert_job("http://b.test/")
    none = await cli(settings, "status", str(plain), "--screenshot", str(tmp_path / "x.png"))
    assert none.code == 1 and "has no screenshot" in none.stderr
    assert not (tmp_path / "x.png").exists()


def test_submit_help_documents_the_quota_exit_status() -> None:
    out = subprocess.run([CLI, "submit", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "--lane" in text and "--tenant" in text
    assert "75 refused by the tenant's queued-scans quota" in text


def test_token_bound_to_a_tenant() -> None:
    out = subprocess.run([CLI, "token", "ci", "--scopes", "submit", "--tenant", "acme"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stderr.strip().rsplit(" ", 1)[1]
    assert out.stdout.strip() == f"ci:{hash_token(token)}:submit:acme"
    [parsed] = parse_tokens(out.stdout.strip())
    assert parsed.tenant == "acme"


@pytest.mark.integration
async def test_submit_with_lane_and_tenant_quota_refusal_and_status_sections(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    env = {"TENANT_QUOTAS": '{"acme": {"max_queued": 2}}'}
    ids = []
    for lane in ("bulk", "interactive"):
        ok = await cli(settings, "submit", "http://site-a.test/", "--lane", lane,
                       "--tenant", "acme", env=env)
        assert ok.code == 0, ok.stderr
        ids.append(uuid.UUID(ok.stdout.strip()))
    rows = {r["id"]: (r["lane"], r["tenant"]) for r in await store.pool.fetch(
        "SELECT id, lane, tenant FROM scan_jobs")}
    assert rows == {ids[0]: ("bulk", "acme"), ids[1]: ("interactive", "acme")}
    assert await rds.xlen(Queue.of(settings.scan_stream, "bulk", "acme").stream) == 1

    refused = await cli(settings, "submit", "http://site-a.test/", "--tenant", "acme",
                        env=env)
    assert refused.code == EXIT_QUOTA == 75
    assert refused.stdout == ""
    assert refused.stderr.splitlines() == [
        "safeurl-worker submit: refused: tenant 'acme' has 2 queued scans, its limit is 2: "
        "retry in 60 s"]
    bad = await cli(settings, "submit", "http://site-a.test/", "--lane", "vip")
    assert bad.code == 2 and bad.stderr.splitlines() == [
        "safeurl-worker submit: lane 'vip' is not configured; the lanes are: interactive, "
        "default, bulk"]
    plain = await cli(settings, "submit", "http://site-a.test/", "--lane", "default")
    assert plain.code == 0, plain.stderr
    assert await store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 3

    st = (await cli(settings, "status", "--json")).json()
    assert {k: (c["queued"], c["running"]) for k, c in st["lanes"].items()} == {
        "interactive": (1, 0), "default": (1, 0), "bulk": (1, 0)}
    assert {k: (c["queued"], c["running"]) for k, c in st["tenants"].items()} == {"acme": (2, 0)}
    table = (await cli(settings, "status")).stdout.splitlines()
    assert table[0] == "JOBS" and "  QUEUED            3" in table
    assert "LANES                              queued  running  oldest s  done 5m" in table
    assert ["bulk", "1", "0"] in [line.split()[:3] for line in table]
    assert "TENANTS                            queued  running  oldest s  done 5m" in table
    assert ["acme", "2", "0"] in [line.split()[:3] for line in table]
    acme = Queue.of(settings.scan_stream, "bulk", "acme").stream
    assert f"  queue {acme}  length 1  lag 1  pending 0" in table
