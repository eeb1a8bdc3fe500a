"""The HTTP API against real PostgreSQL and Redis: in-process (httpx against the ASGI app) for
auth, validation, idempotency, listing, retry and dead letters; and end to end with real
`safeurl-worker run` and `safeurl-worker api` processes and a callback receiver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as redis

from safeurl_worker.api.app import Services, create_app, services
from safeurl_worker.api.config import ApiSettings, hash_token, parse_tokens
from safeurl_worker.callbacks import Deliverer
from safeurl_worker.config import Settings
from safeurl_worker.consumer import Queue
from safeurl_worker.models import Analysis, Report, State, Verdict
from safeurl_worker.store import NOTIFY_CHANNEL, Store

from .conftest import TestNet
from .helpers import CLI, Fleet, env_of, wait_terminal
from .test_callbacks import SECRET, free_port, receiver

pytestmark = pytest.mark.integration

TOKENS = {"submit": "tok-submitter-0123456789abcdef", "read": "tok-reader-0123456789abcdef",
          "operate": "tok-operator-0123456789abcdef"}
SCOPES = {"submit": "submit", "read": "read", "operate": "operate+read+submit"}
TOKEN_SPEC = ",".join(f"{name}:{hash_token(tok)}:{SCOPES[name]}" for name, tok in TOKENS.items())


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def api_settings(**overrides: Any) -> ApiSettings:
    base: dict[str, Any] = {"api_tokens": TOKEN_SPEC, "callback_secret": SECRET,
                            "callback_allow_cidrs": "127.0.0.1/32",
                            "callback_allowed_ports": "80,443,8099",
                            "api_rate_limit_per_min": 10_000, "api_max_body_bytes": 8192}
    return ApiSettings(**{**base, **overrides})


@dataclass
class Api:
    client: httpx.AsyncClient
    svc: Services
    settings: Settings


@pytest.fixture
async def make_api(make_settings: type[Settings]) -> AsyncIterator[Any]:
    stack: list[Any] = []

    async def build(worker: dict[str, Any] | None = None, **overrides: Any) -> Api:
        settings = make_settings(**(worker or {}))
        cm = services(settings, api_settings(**overrides))
        svc = await cm.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                   base_url="http://api.test")
        stack.append((cm, client))
        return Api(client, svc, settings)

    yield build
    for cm, client in reversed(stack):
        await client.aclose()
        await cm.__aexit__(None, None, None)


@pytest.fixture
async def api(make_api: Any) -> Api:
    built: Api = await make_api()
    return built


# --- configuration (no services) ---------------------------------------------------------------


def test_token_entries_are_parsed_and_bad_ones_named() -> None:
    [t] = parse_tokens(f"ci:{hash_token('x' * 20)}:submit+read")
    assert (t.name, t.scopes) == ("ci", frozenset({"submit", "read"}))
    with pytest.raises(ValueError, match="'ci'"):
        parse_tokens("ci:not-a-hash:read")
    with pytest.raises(ValueError, match="unknown scope"):
        parse_tokens(f"ci:{hash_token('x')}:admin")
    with pytest.raises(ValueError, match="unique"):
        parse_tokens(f"a:{hash_token('x')}:read,a:{hash_token('y')}:read")


def test_short_secrets_are_refused() -> None:
    for field in ("callback_secret", "api_session_secret"):
        with pytest.raises(ValueError, match="16 characters"):
            api_settings(**{field: "guessable"})
        assert getattr(api_settings(**{field: "x" * 16}), field) == "x" * 16


async def test_console_cookies_are_secure_behind_a_tls_proxy(make_api: Any) -> None:
    plain: Api = await make_api()
    behind_tls: Api = await make_api(api_secure_cookies=True)
    assert "secure" not in (await plain.client.get("/login")).headers["set-cookie"].lower()
    cookie = (await behind_tls.client.get("/login")).headers["set-cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie


def test_token_command_prints_a_hashed_entry() -> None:
    out = subprocess.run([CLI, "token", "ci", "--scopes", "submit,read"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stderr.strip().rsplit(" ", 1)[1]
    assert out.stdout.strip() == f"ci:{hash_token(token)}:submit+read"
    assert token not in out.stdout  # only the hash goes into configuration
    bad = subprocess.run([CLI, "token", "ci", "--scopes", "admin"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--scopes" in bad.stderr


# --- in-process -----------------------------------------------------------------------------------


async def test_openapi_schema_and_docs_are_served(api: Api) -> None:
    schema = (await api.client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in ["/v1/scans", "/v1/scans/{scan_id}", "/v1/scans/{scan_id}/artifacts/{kind}",
                 "/v1/scans/retry", "/v1/dead-letters", "/v1/dead-letters/replay", "/v1/status"]:
        assert path in paths, path
    assert set(paths["/v1/dead-letters"]) == {"get", "delete"}
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    docs = await api.client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text


async def test_auth_errors_are_401_and_403_with_json_bodies(api: Api) -> None:
    body = {"url": "http://site-a.test/"}
    r = await api.client.post("/v1/scans", json=body)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    r = await api.client.post("/v1/scans", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json() == {"error": "unauthorized",
                                                 "message": "unknown token"}
    r = await api.client.post("/v1/scans", json=body, headers=auth("read"))
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert "'submit' scope" in r.json()["message"]
    r = await api.client.get("/v1/status", headers=auth("submit"))
    assert r.status_code == 403
    r = await api.client.post("/v1/scans/retry", json={"state": "FAILED"}, headers=auth("read"))
    assert r.status_code == 403
    assert await api.svc.store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 0


async def test_submit_writes_the_row_then_xadds(api: Api, rds: redis.Redis) -> None:
    r = await api.client.post("/v1/scans", headers=auth("submit"), json={
        "url": "http://site-a.test/x", "mode": "render", "metadata": {"ticket": 42},
        "callback_url": "http://127.0.0.1:8099/hook"})
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["state"] == "QUEUED"
    row: Any = await api.svc.store.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1",
                                                 uuid.UUID(out["id"]))
    assert (row["url"], row["state"], row["version"], row["mode"], row["metadata"],
            row["callback_url"]) == ("http://site-a.test/x", "QUEUED", 0, "render",
                                     {"ticket": 42}, "http://127.0.0.1:8099/hook")
    entries = await rds.xrange(api.settings.scan_stream)
    # The default lane: the plain stream; the target domain rides along for the worker.
    assert [f for _, f in entries] == [{b"job_id": out["id"].encode(),
                                        b"domain": b"site-a.test"}]


async def test_idempotency_key_same_body_same_job_other_body_409(api: Api,
                                                                 rds: redis.Redis) -> None:
    body = {"url": "http://site-a.test/", "metadata": {"a": 1}}
    key = {"Idempotency-Key": "order-1"}
    first = await api.client.post("/v1/scans", json=body, headers={**auth("submit"), **key})
    again = await api.client.post("/v1/scans", json=body, headers={**auth("submit"), **key})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    other = await api.client.post("/v1/scans", json={**body, "metadata": {"a": 2}},
                                  headers={**auth("submit"), **key})
    assert other.status_code == 409 and other.json()["error"] == "conflict"
    assert first.json()["id"] in other.json()["message"]
    # Keys are per token: another caller's "order-1" is its own job.
    mine = await api.client.post("/v1/scans", json=body, headers={**auth("operate"), **key})
    assert mine.status_code == 202 and mine.json()["id"] != first.json()["id"]
    assert await api.svc.store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 2
    assert await rds.xlen(api.settings.scan_stream) == 2  # one XADD per job


async def test_concurrent_requests_with_one_key_make_one_job(api: Api) -> None:
    body = {"url": "http://site-a.test/"}
    headers = {**auth("submit"), "Idempotency-Key": "race"}
    got = await asyncio.gather(*(api.client.post("/v1/scans", json=body, headers=headers)
                                 for _ in range(8)))
    assert {r.status_code for r in got} == {202}
    assert len({r.json()["id"] for r in got}) == 1
    assert await api.svc.store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 1


@pytest.mark.parametrize(("body", "error", "says"), [
    ({"url": "ftp://x/"}, "invalid_url", "ftp"),
    ({"url": "http://"}, "invalid_url", ""),
    ({"url": "http://a.test/", "colour": "red"}, "invalid_request", "colour"),
    ({"url": "http://a.test/", "mode": "fast"}, "invalid_request", "mode"),
    ({}, "invalid_request", "url"),
    ({"url": "http://a.test/", "callback_url": "http://10.1.2.3/hook"},
     "invalid_callback_url", "10.1.2.3 is private"),
    ({"url": "http://a.test/", "callback_url": "http://169.254.169.254/"},
     "invalid_callback_url", "link-local"),
    ({"url": "http://a.test/", "callback_url": "http://127.0.0.1:9999/"},
     "invalid_callback_url", "port 9999"),
    ({"url": "http://a.test/", "callback_url": "gopher://127.0.0.1/"},
     "invalid_callback_url", ""),
])
async def test_validation_errors_are_422_with_the_reason(api: Api, body: dict[str, Any],
                                                         error: str, says: str) -> None:
    r = await api.client.post("/v1/scans", json=body, headers=auth("submit"))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == error and says in r.json()["message"], r.json()
    assert await api.svc.store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 0


async def test_body_size_limit_and_rate_limit(make_api: Any) -> None:
    api: Api = await make_api(api_rate_limit_per_min=3)
    big = {"url": "http://a.test/", "metadata": {"blob": "x" * 10_000}}
    r = await api.client.post("/v1/scans", json=big, headers=auth("submit"))
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    for _ in range(2):  # the refused body counted nothing; these two and the one above pass
        assert (await api.client.get("/v1/status", headers=auth("read"))).status_code == 200
    assert (await api.client.get("/v1/status", headers=auth("read"))).status_code == 200
    r = await api.client.get("/v1/status", headers=auth("read"))
    assert r.status_code == 429 and r.json()["error"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    # Per token: another token still gets through.
    assert (await api.client.get("/v1/status", headers=auth("operate"))).status_code == 200


async def _complete(store: Store, job_id: uuid.UUID, verdict: Verdict = Verdict.SAFE) -> None:
    job = await store.get_job(job_id)
    assert job is not None
    for s in (State.FETCHING, State.ANALYZING):
        job = await store.transition(job, s, worker_id="w")
        assert job is not None
    report = Report(fetcher_version="1", requested_url=job.url, http_status=200)
    analysis = Analysis(verdict=verdict, score=50 if verdict is Verdict.SUSPICIOUS else 0,
                        signals=[], analyzer_version="t")
    assert await store.complete(job, worker_id="w", report=report, analysis=analysis,
                                url_key=None)


async def _submit(api: Api, url: str = "http://site-a.test/", **extra: Any) -> uuid.UUID:
    r = await api.client.post("/v1/scans", json={"url": url, **extra}, headers=auth("submit"))
    assert r.status_code == 202, r.text
    return uuid.UUID(r.json()["id"])


async def test_get_one_scan_and_list_with_filters_and_cursor(api: Api) -> None:
    ids = [await _submit(api, f"http://site-a.test/{i}") for i in range(7)]
    await _complete(api.svc.store, ids[0], Verdict.SUSPICIOUS)
    await _complete(api.svc.store, ids[1])
    r = await api.client.get(f"/v1/scans/{ids[0]}", headers=auth("read"))
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["job"]["state"] == "COMPLETED" and view["job"]["url"] == "http://site-a.test/0"
    assert view["result"]["verdict"] == "suspicious" and view["result"]["score"] == 50
    assert [(a["from_state"], a["to_state"]) for a in view["audit"]] == [
        ("QUEUED", "FETCHING"), ("FETCHING", "ANALYZING"), ("ANALYZING", "COMPLETED")]
    assert view["callbacks"] == []
    assert "owner_token" not in view["job"] and "idempotency_key" not in view["job"]
    missing = await api.client.get(f"/v1/scans/{uuid.uuid4()}", headers=auth("read"))
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    bad = await api.client.get("/v1/scans/not-a-uuid", headers=auth("read"))
    assert bad.status_code == 422

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/v1/scans", params=params, headers=auth("read"))).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        await _submit(api, "http://site-a.test/new")  # arrivals do not shift the pages
    assert seen == [str(i) for i in reversed(ids)]  # newest first, each once
    q = await api.client.get("/v1/scans", params={"state": "COMPLETED"}, headers=auth("read"))
    assert {i["id"] for i in q.json()["items"]} == {str(ids[0]), str(ids[1])}
    q = await api.client.get("/v1/scans", params={"verdict": "suspicious"},
                             headers=auth("read"))
    assert [i["id"] for i in q.json()["items"]] == [str(ids[0])]
    q = await api.client.get("/v1/scans", params={"url": "http://site-a.test/3"},
                             headers=auth("read"))
    assert [i["id"] for i in q.json()["items"]] == [str(ids[3])]
    q = await api.client.get("/v1/scans", params={"since": "2999-01-01T00:00:00Z"},
                             headers=auth("read"))
    assert q.json()["items"] == []
    q = await api.client.get("/v1/scans", params={"cursor": "garbage"}, headers=auth("read"))
    assert q.status_code == 422
    q = await api.client.get("/v1/scans", params={"since": "2999-01-01T00:00:00"},
                             headers=auth("read"))
    assert q.status_code == 422 and "time zone" in q.json()["message"]


async def test_retry_by_id_and_filter(api: Api, rds: redis.Redis) -> None:
    failed = await _submit(api)
    job = await api.svc.store.get_job(failed)
    assert job is not None
    await api.svc.store.transition(job, State.FAILED, worker_id="w", error_code="TIMEOUT")
    done = await _submit(api)
    await _complete(api.svc.store, done)
    before = await rds.xlen(api.settings.scan_stream)
    r = await api.client.post("/v1/scans/retry", json={}, headers=auth("operate"))
    assert r.status_code == 422 and "filter" in r.json()["message"]
    r = await api.client.post("/v1/scans/retry", json={"state": "COMPLETED"},
                              headers=auth("operate"))
    assert r.status_code == 422
    r = await api.client.post("/v1/scans/retry", json={"ids": [str(failed), str(done)]},
                              headers=auth("operate"))
    assert r.json() == {"requeued": 1, "skipped": 1}
    row: Any = await api.svc.store.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1",
                                                 failed)
    assert (row["state"], row["error_code"], row["faults"]) == ("QUEUED", None, 0)
    last = (await api.client.get(f"/v1/scans/{failed}", headers=auth("read"))).json()["audit"][-1]
    assert last["worker_id"] == "api:operate" and last["detail"]["previous_error"] == "TIMEOUT"
    assert await rds.xlen(api.settings.scan_stream) == before + 1
    r = await api.client.post("/v1/scans/retry", json={"error_code": "TIMEOUT"},
                              headers=auth("operate"))
    assert r.json() == {"requeued": 0, "skipped": 0}  # already re-queued


async def test_dead_letters_list_replay_and_purge(api: Api, rds: redis.Redis) -> None:
    dead = api.settings.dead_letter_stream
    job_id = await _submit(api)
    job = await api.svc.store.get_job(job_id)
    assert job is not None
    await api.svc.store.transition(job, State.FAILED, worker_id="w",
                                   error_code="MAX_DELIVERIES")
    poisoned = (await rds.xadd(dead, {"job_id": str(job_id), "reason": "MAX_DELIVERIES",
                                      "original_id": "1-0"})).decode()
    junk = [(await rds.xadd(dead, {"job_id": "garbage", "reason": "MALFORMED_MESSAGE"}
                            )).decode() for _ in range(3)]
    page = (await api.client.get("/v1/dead-letters", params={"limit": 2},
                                 headers=auth("read"))).json()
    assert [e["id"] for e in page["items"]] == [poisoned, junk[0]]
    assert page["items"][0]["reason"] == "MAX_DELIVERIES"
    rest = (await api.client.get("/v1/dead-letters", params={"cursor": page["next_cursor"]},
                                 headers=auth("read"))).json()
    assert [e["id"] for e in rest["items"]] == junk[1:] and rest["next_cursor"] is None

    r = await api.client.post("/v1/dead-letters/replay", json={"ids": ["nope"]},
                              headers=auth("operate"))
    assert r.status_code == 422
    r = await api.client.post("/v1/dead-letters/replay", json={"ids": [poisoned, junk[0]]},
                              headers=auth("operate"))
    assert r.status_code == 200
    assert r.json()["replayed"] == 1 and "malformed" in r.json()["problems"][0]
    row: Any = await api.svc.store.pool.fetchrow("SELECT * FROM scan_jobs WHERE id = $1",
                                                 job_id)
    assert (row["state"], row["faults"]) == ("QUEUED", 0)
    newest = await rds.xrevrange(api.settings.scan_stream, count=1)
    assert newest[0][1][b"job_id"] == str(job_id).encode()

    r = await api.client.delete("/v1/dead-letters", headers=auth("operate"))
    assert r.status_code == 422 and "all=true" in r.json()["message"]
    assert await rds.xlen(dead) == 3  # nothing purged without an explicit choice
    r = await api.client.delete("/v1/dead-letters", params={"id": junk[0]},
                                headers=auth("operate"))
    assert r.json() == {"purged": 1}
    r = await api.client.delete("/v1/dead-letters", params={"all": "true"},
                                headers=auth("operate"))
    assert r.json() == {"purged": 2}
    assert await rds.exists(dead) == 0


async def test_status_is_the_fleet_table_as_json(api: Api) -> None:
    await _submit(api)
    st = (await api.client.get("/v1/status", headers=auth("read"))).json()
    assert st["jobs"]["QUEUED"] == 1 and st["stream"]["length"] == 1
    assert set(st) == {"jobs", "last_5m", "last_60m", "oldest_queued_s", "stream",
                       "dead_letters", "lanes", "tenants", "queues"}
    assert st["lanes"]["default"] | {"oldest_queued_s": None} == {
        "queued": 1, "running": 0, "oldest_queued_s": None, "done_5m": 0}
    assert st["tenants"] == {}


# --- lanes, tenants, quotas ------------------------------------------------------------------


async def test_lane_and_tenant_are_validated_stored_shown_and_filtered(
        api: Api, rds: redis.Redis) -> None:
    r = await api.client.post("/v1/scans", json={"url": "http://site-a.test/", "lane": "vip"},
                              headers=auth("submit"))
    assert r.status_code == 422 and r.json()["error"] == "invalid_lane", r.text
    assert r.json()["message"] == ("lane 'vip' is not configured; the lanes are: interactive, "
                                   "default, bulk")
    r = await api.client.post("/v1/scans", json={"url": "http://site-a.test/",
                                                 "tenant": "acme corp"}, headers=auth("submit"))
    assert r.status_code == 422 and r.json()["error"] == "invalid_request", r.text
    assert r.json()["message"].startswith("body.tenant: ") and "letters" in r.json()["message"]
    assert await api.svc.store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 0

    bulk = await _submit(api, "http://site-b.test/", lane="bulk", tenant="acme")
    plain = await _submit(api)
    named_default = await _submit(api, lane="default", tenant="acme")
    rows = {r["id"]: (r["lane"], r["tenant"]) for r in await api.svc.store.pool.fetch(
        "SELECT id, lane, tenant FROM scan_jobs")}
    assert rows == {bulk: ("bulk", "acme"), plain: (None, None),
                    named_default: (None, "acme")}  # one way to say "default" in the row
    queue = Queue.of(api.settings.scan_stream, "bulk", "acme").stream
    assert [f for _, f in await rds.xrange(queue)] == [
        {b"job_id": str(bulk).encode(), b"lane": b"bulk", b"tenant": b"acme",
         b"domain": b"site-b.test"}]

    job = (await api.client.get(f"/v1/scans/{bulk}", headers=auth("read"))).json()["job"]
    assert (job["lane"], job["tenant"]) == ("bulk", "acme")
    job = (await api.client.get(f"/v1/scans/{plain}", headers=auth("read"))).json()["job"]
    assert (job["lane"], job["tenant"]) == ("default", None)

    async def listed(**params: str) -> list[tuple[str, str, str | None]]:
        r = await api.client.get("/v1/scans", params=params, headers=auth("read"))
        assert r.status_code == 200, r.text
        return [(i["id"], i["lane"], i["tenant"]) for i in r.json()["items"]]

    assert await listed(lane="bulk") == [(str(bulk), "bulk", "acme")]
    assert await listed(lane="default") == [(str(named_default), "default", "acme"),
                                            (str(plain), "default", None)]
    assert await listed(tenant="acme") == [(str(named_default), "default", "acme"),
                                           (str(bulk), "bulk", "acme")]
    assert await listed(lane="interactive") == []


async def test_a_tenant_over_its_queued_quota_gets_429_with_retry_after(
        make_api: Any, rds: redis.Redis) -> None:
    api: Api = await make_api(worker={"tenant_quotas": '{"acme": {"max_queued": 2}}'})
    key = {**auth("submit"), "Idempotency-Key": "first"}
    body = {"url": "http://site-a.test/", "tenant": "acme", "lane": "bulk"}
    first = await api.client.post("/v1/scans", json=body, headers=key)
    assert first.status_code == 202, first.text
    await _submit(api, tenant="acme")
    r = await api.client.post("/v1/scans", json={"url": "http://site-a.test/", "tenant": "acme"},
                              headers=auth("submit"))
    assert r.status_code == 429, r.text
    assert r.json() == {"error": "quota_exceeded", "message": "tenant 'acme' has 2 queued "
                        "scans, its limit is 2: retry in 60 s"}
    assert r.headers["retry-after"] == "60"  # none of acme's scans finished lately
    assert await api.svc.store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 2
    # No third XADD to acme's queue of the default lane.
    assert await rds.xlen(Queue.of(api.settings.scan_stream, None, "acme").stream) == 1
    # The repeat of an accepted request is still its job, at the quota.
    again = await api.client.post("/v1/scans", json=body, headers=key)
    assert again.status_code == 202 and again.json() == first.json()
    # Other tenants have the default quota; a finished scan makes room (with its rate as hint).
    assert (await api.client.post("/v1/scans", json={"url": "http://site-a.test/",
                                                     "tenant": "zed"},
                                  headers=auth("submit"))).status_code == 202
    await _complete(api.svc.store, uuid.UUID(first.json()["id"]))
    await _submit(api, tenant="acme")
    r = await api.client.post("/v1/scans", json={"url": "http://site-a.test/", "tenant": "acme"},
                              headers=auth("submit"))
    # One finished in the last 5 minutes: one more place in about 300 s.
    assert r.status_code == 429 and r.headers["retry-after"] == "300", r.text


async def test_a_token_bound_to_a_tenant_submits_for_it_only(make_api: Any) -> None:
    bound = "tok-acme-0123456789abcdef"
    api: Api = await make_api(api_tokens=f"{TOKEN_SPEC},acme:{hash_token(bound)}:submit:acme")
    headers = {"Authorization": f"Bearer {bound}"}
    r = await api.client.post("/v1/scans", json={"url": "http://site-a.test/"}, headers=headers)
    assert r.status_code == 202, r.text
    assert (await api.svc.store.get_job(uuid.UUID(r.json()["id"]))).tenant == "acme"  # type: ignore[union-attr]
    r = await api.client.post("/v1/scans", json={"url": "http://site-a.test/",
                                                 "tenant": "acme"}, headers=headers)
    assert r.status_code == 202
    r = await api.client.post("/v1/scans", json={"url": "http://site-a.test/",
                                                 "tenant": "zed"}, headers=headers)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert "tenant 'acme' only" in r.json()["message"]
    [t] = parse_tokens(f"ci:{hash_token('x' * 20)}:submit:acme.eu-1")
    assert (t.name, t.scopes, t.tenant) == ("ci", frozenset({"submit"}), "acme.eu-1")
    with pytest.raises(ValueError, match="not a tenant name"):
        parse_tokens(f"ci:{hash_token('x' * 20)}:submit:-bad")


async def test_scan_page_shows_callback_deliveries(api: Api) -> None:
    async with receiver(8099) as rcv:
        job_id = await _submit(api, callback_url=rcv.url())
        await _complete(api.svc.store, job_id)
        d = Deliverer(api.svc.store, secret=SECRET, ports=[8099],
                      allow=api.svc.api.allow)
        try:
            assert await d.run_once() == 1
        finally:
            await d.close()
    view = (await api.client.get(f"/v1/scans/{job_id}", headers=auth("read"))).json()
    [cb] = view["callbacks"]
    assert (cb["status"], cb["attempts"], cb["url"]) == ("DELIVERED", 1, rcv.url())
    assert [(d["attempt"], d["http_status"]) for d in cb["deliveries"]] == [(1, 200)]


# --- end to end: real worker and api processes -------------------------------------------------


class ApiProcess:
    def __init__(self, settings: Settings, logdir: Path, port: int, **env: str) -> None:
        self.port = port
        self.log = logdir / "api.log"
        full = {**env_of(settings, "api-1"), "API_PORT": str(port), "API_TOKENS": TOKEN_SPEC,
                "CALLBACK_SECRET": SECRET, "CALLBACK_ALLOW_CIDRS": "127.0.0.1/32",
                "CALLBACK_BACKOFF_BASE_S": "0.5", "CALLBACK_BACKOFF_CAP_S": "1", **env}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([CLI, "api"], env=full, stdout=out,
                                         stderr=subprocess.STDOUT)

    async def ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            await asyncio.sleep(0.1)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def test_end_to_end_submit_complete_callback_retry_and_replay(
        make_settings: type[Settings], store: Store, rds: redis.Redis, testnet: TestNet,
        tmp_path: Path) -> None:
    settings = make_settings()
    up, later = free_port(), free_port()
    api = ApiProcess(settings, tmp_path, free_port(),
                     CALLBACK_ALLOWED_PORTS=f"{up},{later}")
    fleet = Fleet(settings, tmp_path)
    fleet.start("w-1", NOTIFY_FINISHED="true")
    heard: list[str] = []
    listener = await asyncpg.connect(settings.database_url)
    await listener.add_listener(NOTIFY_CHANNEL, lambda *a: heard.append(a[3]))
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}", timeout=10)
    try:
        await api.ready(client)
        # The real server counts a chunked body too.
        r = await client.post("/v1/scans", content=_chunks(70), headers={
            **auth("submit"), "Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        async with receiver(up) as rcv:
            # 1. submit -> the worker completes it -> the callback arrives, signed.
            r = await client.post("/v1/scans", headers={**auth("submit"),
                                                        "Idempotency-Key": "e2e-1"},
                                  json={"url": "http://site-a.test/", "callback_url": rcv.url(),
                                        "metadata": {"order": 7}})
            assert r.status_code == 202, r.text
            job_id = uuid.UUID(r.json()["id"])
            assert (await wait_terminal(store, job_id, 60))["state"] == "COMPLETED"
            deadline = time.monotonic() + 30
            while not rcv.got:
                assert time.monotonic() < deadline, api.log.read_text()[-3000:]
                await asyncio.sleep(0.1)
            got = rcv.got[0]
            assert got["valid"], got["headers"]
            body = orjson.loads(got["body"])
            assert (body["id"], body["state"], body["result"]["verdict"], body["metadata"]) == (
                str(job_id), "COMPLETED", "safe", {"order": 7})
            assert str(job_id) in heard  # NOTIFY_FINISHED on the worker: LISTEN hears it

            # 2. a receiver that is down for a while: delivered once it is back.
            r = await client.post("/v1/scans", headers=auth("submit"), json={
                "url": "http://site-a.test/", "callback_url": f"http://127.0.0.1:{later}/h"})
            late_job = uuid.UUID(r.json()["id"])
            assert (await wait_terminal(store, late_job, 60))["state"] == "COMPLETED"
            await _wait_attempts(store, late_job, 2)  # at least two refused attempts
            async with receiver(later) as back:
                deadline = time.monotonic() + 30
                while not back.got:
                    assert time.monotonic() < deadline, api.log.read_text()[-3000:]
                    await asyncio.sleep(0.1)
                assert back.got[0]["valid"]
                assert orjson.loads(back.got[0]["body"])["id"] == str(late_job)
            view = (await client.get(f"/v1/scans/{late_job}", headers=auth("read"))).json()
            [cb] = view["callbacks"]
            assert cb["status"] == "DELIVERED" and cb["attempts"] >= 3
            tries = cb["deliveries"]
            assert [t["attempt"] for t in tries] == list(range(1, len(tries) + 1))
            assert all(t["http_status"] is None for t in tries[:-1])
            assert tries[-1]["http_status"] == 200

            # 3. a private callback address is refused at the door.
            r = await client.post("/v1/scans", headers=auth("submit"), json={
                "url": "http://site-a.test/", "callback_url": "http://192.168.0.10/hook"})
            assert r.status_code == 422 and r.json()["error"] == "invalid_callback_url"

            # 4. a failed scan, retried through the API, fails again and calls back again.
            r = await client.post("/v1/scans", headers=auth("submit"), json={
                "url": "http://blocked.test:8080/", "callback_url": rcv.url()})
            failed = uuid.UUID(r.json()["id"])
            assert (await wait_terminal(store, failed, 60))["state"] == "FAILED"
            r = await client.post("/v1/scans/retry", headers=auth("operate"),
                                  json={"ids": [str(failed)]})
            assert r.json() == {"requeued": 1, "skipped": 0}
            deadline = time.monotonic() + 60
            while await store.pool.fetchval("SELECT version FROM scan_jobs WHERE id = $1",
                                            failed) < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            await _wait_callbacks(rcv, failed, 2)

            # 5. a dead letter replayed through the API completes.
            ghost = uuid.uuid4()
            await rds.xadd(settings.scan_stream, {"job_id": str(ghost)})
            entry = await _wait_dead_letter(client, str(ghost))
            await store.insert_job("http://site-a.test/", job_id=ghost)
            r = await client.post("/v1/dead-letters/replay", headers=auth("operate"),
                                  json={"ids": [entry]})
            assert r.json() == {"replayed": 1, "problems": []}
            assert (await wait_terminal(store, ghost, 60))["state"] == "COMPLETED"
    finally:
        await client.aclose()
        await listener.close()
        fleet.stop_all()
        code = api.stop()
    assert code == 0, api.log.read_text()[-3000:]


async def _wait_attempts(store: Store, job_id: uuid.UUID, n: int) -> None:
    deadline = time.monotonic() + 30
    while (await store.pool.fetchval("SELECT count(*) FROM scan_callback_attempts "
                                     "WHERE job_id = $1", job_id)) < n:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


async def _wait_callbacks(rcv: Any, job_id: uuid.UUID, n: int) -> None:
    deadline = time.monotonic() + 30
    while sum(orjson.loads(g["body"])["id"] == str(job_id) for g in rcv.got) < n:
        assert time.monotonic() < deadline, rcv.got
        await asyncio.sleep(0.1)
    states = [orjson.loads(g["body"])["state"] for g in rcv.got
              if orjson.loads(g["body"])["id"] == str(job_id)]
    assert states == ["FAILED"] * n


async def _wait_dead_letter(client: httpx.AsyncClient, job_id: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        items = (await client.get("/v1/dead-letters", headers=auth("read"))).json()["items"]
        found = [e["id"] for e in items if e.get("job_id") == job_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)



async def _chunks(n: int) -> AsyncIterator[bytes]:
    """A JSON scan request of about n KiB, sent without a Content-Length (chunked)."""
    yield b'{"url": "http://a.test/", "metadata": {"blob": "'
    for _ in range(n):
        yield b"x" * 1024
    yield b'"}}'


async def test_chunked_body_over_the_limit_is_413(make_api: Any) -> None:
    api: Api = await make_api(api_max_body_bytes=4096)
    # No Content-Length: the body arrives in chunks, and is counted as it does.
    r = await api.client.post("/v1/scans", content=_chunks(8),
                              headers={**auth("submit"), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "too_large", r.text
    r = await api.client.post("/login", content=_chunks(8),
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413, r.text
    ok = await api.client.post("/v1/scans", content=_chunks(1),
                               headers={**auth("submit"), "Content-Type": "application/json"})
    assert ok.status_code == 202, ok.text
    assert await api.svc.store.pool.fetchval("SELECT count(*) FROM scan_jobs") == 1


# A 1x1 PNG: what a render scan's report carries under render.screenshot (render/report.py).
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d4944415478da63f8cfc0f01f0005000201e2d3a1c50000000049454e44ae426082")


async def _with_render_artifacts(store: Store, job_id: uuid.UUID) -> None:
    """Give a completed job's stored report the artifacts a render scan keeps."""
    render = {"screenshot": {"type": "image/png", "width": 1, "height": 1, "size": len(PNG),
                             "sha256": "x", "base64": base64.b64encode(PNG).decode()},
              "dom": "<html><script>alert(1)</script></html>"}
    await store.pool.execute("UPDATE scan_results SET report = jsonb_set(report, '{render}', "
                             "$2::jsonb) WHERE job_id = $1", job_id, render)


async def test_artifacts_are_listed_and_served_safely(api: Api) -> None:
    plain, rendered = await _submit(api), await _submit(api, mode="render")
    for job_id in (plain, rendered):
        await _complete(api.svc.store, job_id)
    await _with_render_artifacts(api.svc.store, rendered)
    view = (await api.client.get(f"/v1/scans/{rendered}", headers=auth("read"))).json()
    assert [(a["kind"], a["type"], a["size"], a["href"]) for a in view["artifacts"]] == [
        ("screenshot", "image/png", len(PNG), f"/v1/scans/{rendered}/artifacts/screenshot"),
        ("dom", "text/html", 38, f"/v1/scans/{rendered}/artifacts/dom")]
    shot = await api.client.get(view["artifacts"][0]["href"], headers=auth("read"))
    assert shot.status_code == 200 and shot.content == PNG
    assert shot.headers["content-type"] == "image/png"
    assert shot.headers["x-content-type-options"] == "nosniff"
    dom = await api.client.get(view["artifacts"][1]["href"], headers=auth("read"))
    # The scanned page's HTML never renders on our origin: plain text, a download, sandboxed.
    assert dom.text == "<html><script>alert(1)</script></html>"
    assert dom.headers["content-type"].startswith("text/plain")
    assert dom.headers["content-disposition"].startswith("attachment")
    assert "sandbox" in dom.headers["content-security-policy"]
    for path in (f"/v1/scans/{rendered}/artifacts/full_page",
                 f"/v1/scans/{plain}/artifacts/screenshot",
                 f"/v1/scans/{uuid.uuid4()}/artifacts/dom"):
        r = await api.client.get(path, headers=auth("read"))
        assert r.status_code == 404 and r.json()["error"] == "not_found", path
    assert (await api.client.get(f"/v1/scans/{plain}", headers=auth("read"))
            ).json()["artifacts"] == []
    assert (await api.client.get(f"/v1/scans/{rendered}/artifacts/etc",
                                 headers=auth("read"))).status_code == 422
    assert (await api.client.get(view["artifacts"][0]["href"])).status_code == 401
    assert (await api.client.get(view["artifacts"][0]["href"], headers=auth("submit"))
            ).status_code == 403
