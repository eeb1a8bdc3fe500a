"""The container report is sanitized at the boundary: every validated Report can be stored.

PostgreSQL rejects NUL in text and `\\u0000` in jsonb; a lone surrogate (which JSON can escape)
cannot be encoded to UTF-8 at all, so neither asyncpg nor orjson accepts it.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import ValidationError

from safeurl_worker.models import Analysis, Form, Report, State, Verdict
from safeurl_worker.store import Store

# Written as JSON text, as the fetcher prints it: NUL and lone-surrogate escapes everywhere.
HOSTILE = r"""{
  "fetcher_version": "1.0\u0000",
  "requested_url": "http://a.test/\u0000",
  "final_url": "http://a.test/\ud800",
  "title": "Log\u0000in \ud800 here \udfff",
  "headers": {"x-evil\u0000": "v\u0000al\ud800", "server": "nginx"},
  "features": {"forms": [{"action": "http://a.test/\u0000post\udc00", "has_password": true}],
               "js_redirects": ["http://b.test/\u0000"]},
  "error": {"code": "CONNECT\u0000_FAILED", "message": "\ud800"}
}"""


def _strings(value: Any) -> list[str]:
    """Every string in a JSON-like value, dict keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _clean(s: str) -> bool:
    return "\x00" not in s and not any("\ud800" <= c <= "\udfff" for c in s)


def hostile_report() -> Report:
    # The stdlib parser keeps lone surrogates (orjson.loads refuses them).
    return Report.model_validate(json.loads(HOSTILE))


def test_nul_and_lone_surrogates_are_removed_everywhere() -> None:
    raw = json.loads(HOSTILE)
    assert not all(_clean(s) for s in _strings(raw))  # the input really is hostile
    report = hostile_report()
    assert report.title == "Login \ufffd here \ufffd"
    assert report.headers == {"x-evil": "val\ufffd", "server": "nginx"}
    assert report.features.forms[0].action == "http://a.test/post\ufffd"
    assert report.features.js_redirects == ["http://b.test/"]
    assert report.final_url == "http://a.test/\ufffd"
    assert report.error is not None and report.error.code == "CONNECT_FAILED"
    assert all(_clean(s) for s in _strings(report.model_dump(mode="json")))


def test_sanitized_report_serializes_with_orjson() -> None:
    with pytest.raises(TypeError):  # why it matters: orjson refuses a lone surrogate
        orjson.dumps("\ud800")
    report = hostile_report()
    dumped = orjson.dumps(report.model_dump(mode="json"))
    assert b"\\u0000" not in dumped
    assert Report.model_validate(orjson.loads(dumped)) == report


def test_bounds_apply_after_sanitizing() -> None:
    base = {"fetcher_version": "1", "requested_url": "http://a.test/"}
    # NULs do not count against the limit: they are gone before it is checked.
    ok = Report.model_validate({**base, "title": "a" * 1024 + "\x00" * 10})
    assert ok.title == "a" * 1024
    with pytest.raises(ValidationError):
        Report.model_validate({**base, "title": "a" * 1025})
    with pytest.raises(ValidationError):  # a surrogate becomes one U+FFFD, still one character
        Report.model_validate({**base, "title": "a" * 1024 + "\ud800"})
    with pytest.raises(ValidationError):  # unknown keys are still rejected
        Report.model_validate({**base, "extra\x00": 1})


def test_clean_text_is_unchanged() -> None:
    title = "Caf\u00e9 \U0001f600 \u4e2d\u6587"  # non-ASCII and a real astral character
    report = Report.model_validate({"fetcher_version": "1", "requested_url": "http://a.test/",
                                    "title": title})
    assert report.title == title


def test_parts_validated_on_their_own_are_sanitized_too() -> None:
    form = Form(action="http://a.test/\x00x\ud800")
    assert form.action == "http://a.test/x\ufffd"
    report = Report.model_validate({"fetcher_version": "1", "requested_url": "http://a.test/",
                                    "features": {"forms": [form]}})
    assert report.features.forms[0].action == "http://a.test/x\ufffd"


@pytest.mark.integration
async def test_sanitized_report_is_stored(store: Store) -> None:
    # The premise: the raw strings would not reach the database.
    with pytest.raises(asyncpg.exceptions.CharacterNotInRepertoireError):
        await store.pool.execute("SELECT $1::text", "a\x00b")
    with pytest.raises(asyncpg.exceptions.DataError, match="surrogates not allowed"):
        await store.pool.execute("SELECT $1::text", "a\ud800b")

    report = hostile_report()
    job = await store.get_job(await store.insert_job("http://a.test/"))
    assert job is not None
    for state in (State.FETCHING, State.ANALYZING):
        job = await store.transition(job, state, worker_id="w-test")
        assert job is not None
    analysis = Analysis(verdict=Verdict.SUSPICIOUS, score=40, signals=[],
                        analyzer_version="test")
    version = await store.complete(job, worker_id="w-test", report=report, analysis=analysis,
                                   url_key="http://a.test/")
    assert version == 3
    row = await store.pool.fetchrow(
        "SELECT j.state, r.title, r.final_url, r.report FROM scan_jobs j "
        "JOIN scan_results r ON r.job_id = j.id WHERE j.id = $1", job.id)
    assert row is not None and row["state"] == "COMPLETED"
    assert row["title"] == report.title and row["final_url"] == report.final_url
    assert Report.model_validate(row["report"]) == report


def test_a_job_without_lane_or_tenant_is_the_default_lane_without_a_tenant() -> None:
    from uuid import uuid4

    from safeurl_worker.models import Job

    job = Job(id=uuid4(), url="http://a.test/", state=State.QUEUED, version=0, attempts=0)
    assert (job.lane, job.tenant) == (None, None)
    bulk = job.model_copy(update={"lane": "bulk", "tenant": "acme"})
    assert (bulk.lane, bulk.tenant) == ("bulk", "acme")
