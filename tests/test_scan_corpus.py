"""A corpus of hostile and benign pages, end to end: stream -> real worker -> real fetcher
container -> analysis -> the verdict and signals stored in PostgreSQL.

Every page is served by the test host on the test's internal docker network (tests/testhost);
no scan reaches any other address. Scans of one worker run concurrently (submit all, then wait)
to keep the file fast. Everything is checked from the database rows, as the API would read them.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from safeurl_worker.config import Settings
from safeurl_worker.store import Store

from .conftest import TestNet, running_worker
from .helpers import audit, labelled_containers, metric, submit, wait_all_terminal, wait_terminal

pytestmark = pytest.mark.integration

RANK = {"safe": 0, "unknown": 0, "suspicious": 1, "malicious": 2}


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


async def _job(store: Store, job_id: uuid.UUID) -> dict[str, Any]:
    row = await store.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1", job_id)
    assert row is not None
    return dict(row)


async def _result(store: Store, job_id: uuid.UUID) -> dict[str, Any]:
    row = await store.pool.fetchrow("SELECT * FROM scan_results WHERE job_id = $1", job_id)
    assert row is not None, f"no scan_results row for {job_id}"
    r = dict(row)
    for col in ("signals", "redirects", "report"):
        r[col] = _json(r[col])
    return r


def _names(result: dict[str, Any]) -> set[str]:
    return {s["name"] for s in result["signals"] or []}


def _signal(result: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        s for s in result["signals"] or [] if s["name"] == name]
    assert len(found) == 1, f"{name} not exactly once in {result['signals']}"
    return found[0]


async def test_corpus_verdicts_and_signals(
        make_settings: type[Settings], store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    # The fetch deadline is 70 % of the container limit minus 1 s (here 4.6 s): the drip page
    # must end in a READ_TIMEOUT report, not a killed container.
    settings = make_settings(container_timeout_ms=8000, worker_concurrency=12)
    assert settings.fetch_allow_cidrs == testnet.subnet  # the test host's address is allowed
    urls = {
        "benign": "http://site-a.test/",
        "login": "http://site-a.test/login",
        "chain": "http://site-a.test/chain",
        "private_allowed": f"http://site-a.test/to/http://{testnet.host_ip}/",
        "loopback_redirect": "http://site-a.test/to/http://127.0.0.1/",
        "big": "http://site-a.test/big",
        "drip": "http://site-a.test/drip",
        "exe": "http://site-a.test/download.exe",
        "meta": "http://site-a.test/meta",
        "meta_delayed": "http://site-a.test/meta-delayed",
        "obfuscated": "http://site-a.test/obfuscated",
        "javascript": "javascript:alert(1)",
    }
    async with running_worker(settings) as worker:
        t0 = time.monotonic()
        ids = {k: await submit(store, rds, settings, u) for k, u in urls.items()}
        await wait_all_terminal(store, list(ids.values()), timeout=60)
        took = time.monotonic() - t0
        runs = metric(worker.metrics.render(), "safeurl_container_runs_total", {"result": "ok"})
    jobs = {k: await _job(store, i) for k, i in ids.items()}
    completed = {k for k, j in jobs.items() if j["state"] == "COMPLETED"}
    assert completed == set(urls) - {"javascript"}, jobs
    res = {k: await _result(store, ids[k]) for k in completed}

    # A plain benign page: safe, no signals at all.
    benign = res["benign"]
    assert benign["verdict"] == "safe" and benign["score"] == 0, benign
    assert benign["signals"] == [] and benign["http_status"] == 200
    assert benign["redirects"] == []

    # A login form posting its password to another site.
    login = res["login"]
    assert "password_form_cross_domain" in _names(login), login["signals"]
    assert "site-b.test" in _signal(login, "password_form_cross_domain")["evidence"]
    assert RANK[login["verdict"]] >= RANK["suspicious"] and login["score"] >= 40

    # A redirect chain across sites: signal, and every hop recorded in scan_results.redirects.
    chain = res["chain"]
    assert "cross_domain_redirect" in _names(chain), chain["signals"]
    assert [(h["url"], h["status"], h["location"], h["kind"]) for h in chain["redirects"]] == [
        ("http://site-a.test/chain", 301, "http://site-b.test/chain2", "http"),
        ("http://site-b.test/chain2", 302, "http://site-c.test/", "http"),
    ]
    assert chain["final_url"] == "http://site-c.test/" and chain["http_status"] == 200

    # A redirect to the test host's own private address, with its subnet in FETCH_ALLOW_CIDRS:
    # the operator allowed it, so it is followed (the refused case is the next test).
    private = res["private_allowed"]
    assert private["final_url"] == f"http://{testnet.host_ip}/"
    assert private["http_status"] == 200 and private["report"]["error"] is None
    assert [h["location"] for h in private["redirects"]] == [f"http://{testnet.host_ip}/"]
    assert "cross_domain_redirect" in _names(private)

    # A redirect to loopback is refused at that hop even with the test subnet allowed, and the
    # refused hop is evidence: a page that sends its visitors to 127.0.0.1 is malicious.
    loop = res["loopback_redirect"]
    assert loop["report"]["error"]["code"] == "BLOCKED_TARGET", loop["report"]
    assert loop["verdict"] == "malicious", loop
    assert "127.0.0.1" in _signal(loop, "redirect_to_blocked_target")["evidence"]

    # 50 MiB body: read up to FETCH_MAX_BYTES, flagged truncated, still a normal result.
    big = res["big"]
    assert big["report"]["body_truncated"] is True, big["report"]
    assert big["report"]["body_size"] == settings.fetch_max_bytes == 2 * 1024 * 1024
    assert big["http_status"] == 200 and big["verdict"] == "safe"

    # A drip feed (a byte a second): the fetcher's own deadline ends it with READ_TIMEOUT and
    # a report; the job COMPLETES (not TIMED_OUT). The response head (200) was received, so the
    # partial body is analysed; it holds nothing but "xxx…", and a page where nothing was seen
    # is "unknown", not "safe" (docs/analysis.md, honest verdicts).
    drip = res["drip"]
    assert jobs["drip"]["error_code"] is None
    assert drip["report"]["error"]["code"] == "READ_TIMEOUT", drip["report"]["error"]
    assert drip["http_status"] == 200 and 0 < drip["report"]["body_size"] < 100000
    assert drip["verdict"] == "unknown" and drip["signals"] == [], drip
    assert drip["confidence"] < 0.5, drip
    assert drip["report"]["timings"]["total_ms"] < settings.container_timeout_ms

    # An executable download.
    exe = res["exe"]
    assert "executable_download" in _names(exe), exe["signals"]
    assert RANK[exe["verdict"]] >= RANK["suspicious"]
    assert exe["content_type"] == "application/x-msdownload"

    # A meta refresh to another site: the fetcher follows it and records the hop with kind
    # "meta" (the meta_refresh_cross_domain signal is test_meta_refresh_cross_domain_signal).
    meta = res["meta"]
    assert "cross_domain_redirect" in _names(meta), meta["signals"]
    hops = meta["redirects"]
    assert [(h["url"], h["status"], h["location"], h["kind"]) for h in hops] == [
        ("http://site-a.test/meta", None, "http://site-b.test/", "meta")], hops
    assert meta["final_url"] == "http://site-b.test/"

    # A meta refresh with a long delay is recorded, not followed: the rule sees it on the page.
    delayed = res["meta_delayed"]
    assert delayed["redirects"] == [] and delayed["final_url"] == "http://site-a.test/meta-delayed"
    assert delayed["report"]["features"]["meta_refresh"] == "http://site-b.test/"
    assert "meta_refresh_cross_domain" in _names(delayed), delayed["signals"]

    # Obfuscated script with a hidden iframe.
    obf = res["obfuscated"]
    assert {"obfuscated_script", "hidden_iframe"} <= _names(obf), obf["signals"]
    # Points per docs/analysis.md: eval 3, fromCharCode 3, unescape 2, atob 2, document.write 1,
    # base64 run 5, each kind at most 3 times; capped at 30. The page has eval x2, atob,
    # unescape, fromCharCode, document.write and one long base64 run: 6+2+2+3+1+5 = 19.
    st = obf["report"]["features"]["scripts"]
    points = sum(min(3, st[k]) * w for k, w in (
        ("eval_count", 3), ("fromcharcode_count", 3), ("unescape_count", 2), ("atob_count", 2),
        ("document_write_count", 1), ("long_base64_runs", 5)))
    assert points == 19, st
    assert _signal(obf, "obfuscated_script")["weight"] == min(30, points)
    assert obf["score"] == 19 + 20 and obf["verdict"] == "suspicious"
    assert RANK[obf["verdict"]] >= RANK["suspicious"]

    # Not http(s): refused before any container runs.
    js = jobs["javascript"]
    assert (js["state"], js["error_code"]) == ("FAILED", "INVALID_URL"), js
    assert await audit(store, ids["javascript"]) == [("QUEUED", "FAILED", 1)]

    # Every stored signal has the documented shape.
    for k, r in res.items():
        for s in r["signals"]:
            assert set(s) == {"name", "weight", "evidence"}, (k, s)
        assert r["score"] == min(100, sum(s["weight"] for s in r["signals"])), (k, r)
    assert runs == len(urls) - 1  # every URL but javascript: ran exactly one container
    assert all(labelled_containers(i) == [] for i in ids.values())
    # One drip deadline (~4.6 s) plus container start-up, all scans in parallel.
    assert took < 30, f"corpus took {took:.1f}s"


async def test_meta_refresh_cross_domain_signal(
        settings: Settings, store: Store, rds: redis.Redis) -> None:
    async with running_worker(settings):
        job_id = await submit(store, rds, settings, "http://site-a.test/meta")
        assert (await wait_terminal(store, job_id))["state"] == "COMPLETED"
    meta = await _result(store, job_id)
    assert [h["kind"] for h in meta["redirects"]] == ["meta"]  # the fetcher followed it
    assert "meta_refresh_cross_domain" in _names(meta), meta["signals"]
    assert {"meta_refresh_cross_domain", "cross_domain_redirect"} <= _names(meta)
    assert meta["score"] == 20 + 15


async def test_private_target_refused_without_allow_cidr(
        make_settings: type[Settings], store: Store, rds: redis.Redis, testnet: TestNet) -> None:
    # No FETCH_ALLOW_CIDRS: the test host's address is private, so even the first hop
    # (site-a.test resolves to it) is refused - as is the address written as a literal.
    settings = make_settings(fetch_allow_cidrs="")
    async with running_worker(settings):
        via_name = await submit(store, rds, settings,
                                f"http://site-a.test/to/http://{testnet.host_ip}/")
        literal = await submit(store, rds, settings, f"http://{testnet.host_ip}/")
        await wait_all_terminal(store, [via_name, literal], timeout=45)
    assert "site-a.test resolves to a refused address" in (await _job(store, via_name))[
        "error_message"]
    for job_id in (via_name, literal):
        job = await _job(store, job_id)
        assert (job["state"], job["error_code"]) == ("FAILED", "BLOCKED_TARGET"), job
        msg = job["error_message"]
        # Names the rule (the refused network it is in), and the address only where the
        # submitter wrote it: where a name points inside is not theirs to learn.
        shown = testnet.host_ip if job_id == literal else "<address>"
        m = re.search(rf"{re.escape(shown)} is [\w -]+ \(([0-9./]+)\)", msg)
        assert m, msg
        assert job_id == literal or testnet.host_ip not in msg, msg
        assert ipaddress.ip_address(testnet.host_ip) in ipaddress.ip_network(m[1]), msg
        assert await store.pool.fetchval(
            "SELECT count(*) FROM scan_results WHERE job_id = $1", job_id) == 0
        assert [a[1] for a in await audit(store, job_id)] == ["FETCHING", "FAILED"]


async def test_blocklisted_domain_is_malicious(
        make_settings: type[Settings], store: Store, rds: redis.Redis, tmp_path: Path) -> None:
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# test blocklist\nsite-c.test   # the whole domain\n")
    settings = make_settings(blocklist_path=str(blocklist))
    async with running_worker(settings):
        direct = await submit(store, rds, settings, "http://site-c.test/")
        via_chain = await submit(store, rds, settings, "http://site-a.test/chain")
        clean = await submit(store, rds, settings, "http://site-b.test/")
        await wait_all_terminal(store, [direct, via_chain, clean], timeout=45)
    hit = await _result(store, direct)
    assert hit["verdict"] == "malicious" and hit["score"] == 100, hit
    assert "site-c.test" in _signal(hit, "blocklist_hit")["evidence"]
    # The chain ends on the blocklisted site: the final URL matches.
    chained = await _result(store, via_chain)
    assert chained["verdict"] == "malicious", chained
    assert {"blocklist_hit", "cross_domain_redirect"} <= _names(chained)
    # Another site is untouched.
    other = await _result(store, clean)
    assert other["verdict"] == "safe" and other["signals"] == [], other


@pytest.mark.skipif("result_cache_ttl_s" not in Settings.model_fields,
                    reason="Settings has no result_cache_ttl_s")
async def test_result_cache_reuses_verdict_within_ttl(
        make_settings: type[Settings], store: Store, rds: redis.Redis) -> None:
    settings = make_settings(result_cache_ttl_s=300)
    async with running_worker(settings) as worker:
        first = await submit(store, rds, settings, "http://site-a.test/login")
        assert (await wait_terminal(store, first))["state"] == "COMPLETED"
        # The same URL once normalized (case of scheme and host, default port, fragment).
        second = await submit(store, rds, settings, "HTTP://SITE-A.test:80/login#again")
        assert (await wait_terminal(store, second))["state"] == "COMPLETED"
        text = worker.metrics.render()
        assert metric(text, "safeurl_container_runs_total", {"result": "ok"}) == 1
    a = await _result(store, first)
    b = await _result(store, second)
    assert a["cached_from"] is None
    assert b["cached_from"] == first
    assert (b["verdict"], b["score"], b["signals"]) == (a["verdict"], a["score"], a["signals"])
    assert "password_form_cross_domain" in _names(b)
    assert b["url_key"] == a["url_key"] == "http://site-a.test/login"
    detail = await store.pool.fetchval(
        "SELECT detail FROM scan_audit_log WHERE job_id = $1 AND to_state = 'ANALYZING'", second)
    assert _json(detail)["cached_from"] == str(first)

    # RESULT_CACHE_TTL_S=0 disables reuse: the same URL runs a container again.
    off = make_settings(result_cache_ttl_s=0)
    async with running_worker(off) as worker:
        third = await submit(store, rds, off, "http://site-a.test/login")
        assert (await wait_terminal(store, third))["state"] == "COMPLETED"
        assert metric(worker.metrics.render(), "safeurl_container_runs_total",
                      {"result": "ok"}) == 1
    c = await _result(store, third)
    assert c["cached_from"] is None and c["verdict"] == a["verdict"]
